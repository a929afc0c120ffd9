"""Activation-aware scaling before GPTQ (AWQ's per-channel scales; Lin et al., 2023, "AWQ:
Activation-aware Weight Quantization for LLM Compression and Acceleration", section 3.2).

The matrices reading one input x [cols] (calibrate.INPUTS: q/k/v, gate/up, down, o) compute
W x = (W diag(s)) (diag(s)^-1 x) for any s > 0 [cols]. They are quantized as W diag(s), and
diag(s)^-1 is folded into the operation that produces x, so the model computes the same function
before quantization:

  attn_in   the layer's input_layernorm weight (and bias) / s
  mlp_in    the layer's post_attention_layernorm weight (and bias) / s
  mlp_mid   up_proj's rows (and bias) / s, for the gated feed-forward act(gate) * up only
  attn_out  v_proj's rows (and bias) / s; the query heads that share a kv head read its value
            channels, so o_proj's channels of those heads share one scale (the mean statistic)

Scales: s = rms(x)^alpha per channel (rms from the calibration Hessian's diagonal), normalised to a
geometric mean of 1 and clipped to [1/MAX_RATIO, MAX_RATIO] around it. alpha is chosen per input from
ALPHAS by the summed relative layer-output error of its matrices, each quantized in its layout with the
scale search on a sample of SAMPLE_ROWS rows: tr(dW' H' dW'^T) / tr(W H W^T) with W' = W diag(s) and
H' = diag(s)^-1 H diag(s)^-1 (the denominator does not depend on s). alpha 0 (s = 1) is a candidate, so
an input whose matrices scaling does not help keeps its weights; the choice per input is recorded in
the file (pyllm.source's quantizer record).
"""

from __future__ import annotations

import sys

import numpy as np

from .calibrate import INPUTS, load_matrix

ALPHAS = tuple(round(0.1 * k, 1) for k in range(11))
SAMPLE_ROWS = 96
MAX_RATIO = 1e3  # scales stay within [1e-3, 1e3] around their geometric mean (dead channels included)


def folding_targets(config, layer: int) -> dict[str, list[str]]:
    """input name -> the tensors (pyllm names) whose rows, or whose vector, take diag(s)^-1, for the
    inputs of `layer` this block lets a scale fold into; the other inputs are left out."""
    p = f"model.layers.{layer}."
    norm_parts = ("weight", "bias") if config.norm_type == "layer_norm" else ("weight",)
    targets = {p + "attn_in": [f"{p}input_layernorm.{part}" for part in norm_parts],
               p + "mlp_in": [f"{p}post_attention_layernorm.{part}" for part in norm_parts],
               p + "attn_out": [f"{p}self_attn.v_proj.weight"] + ([f"{p}self_attn.v_proj.bias"]
                                                                 if config.attention_bias else [])}
    if config.ffn_type == "gated":
        targets[p + "mlp_mid"] = [f"{p}mlp.up_proj.weight"] + ([f"{p}mlp.up_proj.bias"] if config.mlp_bias else [])
    return targets


def consumers(config, input_name: str) -> list[str]:
    """'model.layers.3.attn_in' -> the matrices (bases) of the block reading that input (no gate_proj
    when the feed-forward is not gated)."""
    prefix, _, short = input_name.rpartition(".")
    shapes = config.linear_shapes()
    return [f"{prefix}.{m}" for m in INPUTS[short] if f"{prefix}.{m}" in shapes]


def scales_for(rms: np.ndarray, alpha: float, config, input_name: str) -> np.ndarray:
    """f32 [cols] scales rms^alpha (geometric mean 1, ratio-clipped); for attn_out, tied across the
    query heads of each kv head (rms averaged over them first)."""
    rms = np.maximum(rms.astype(np.float64), 0.0)
    if input_name.endswith(".attn_out"):
        group = config.num_attention_heads // config.num_key_value_heads
        per_head = rms.reshape(config.num_key_value_heads, group, config.head_dim)
        rms = np.broadcast_to(per_head.mean(axis=1, keepdims=True), per_head.shape).reshape(-1)
    if alpha == 0 or not np.any(rms > 0):
        return np.ones(rms.shape, np.float32)
    floor = rms[rms > 0].max() / MAX_RATIO ** 2
    log_s = alpha * np.log(np.maximum(rms, floor))
    log_s -= log_s.mean()
    return np.exp(np.clip(log_s, -np.log(MAX_RATIO), np.log(MAX_RATIO))).astype(np.float32)


def value_divisor(config, s: np.ndarray) -> np.ndarray:
    """attn_out's scales f32 [heads * head_dim] -> v_proj's row divisors f32 [kv_heads * head_dim]
    (the scale each kv head's channels carry for all the query heads that read them)."""
    group = config.num_attention_heads // config.num_key_value_heads
    return np.ascontiguousarray(s.reshape(config.num_key_value_heads, group, config.head_dim)[:, 0, :].reshape(-1))


def _input_errors(task) -> tuple[str, list[float], np.ndarray]:
    """(input name, {base: sampled rows}) -> (input name, summed relative output error per alpha,
    the input's rms f64 [cols])."""
    from .strategy import relative_error
    from .workers import shared

    input_name, rows_sampled = task
    job = shared()
    h = job["hessians"].input_hessian(next(iter(rows_sampled)))
    rms = np.sqrt(np.maximum(np.diag(h), 0.0))
    samples = {base: load_matrix(job["load"], base, job["linears"][base])[rows]
               for base, rows in rows_sampled.items()}
    errors = []
    for alpha in ALPHAS:
        s = scales_for(rms, alpha, job["config"], input_name).astype(np.float64)
        h_scaled = h / np.outer(s, s)
        errors.append(sum(relative_error((w * s).astype(np.float32), h_scaled, *job["formats"][base])
                          for base, w in samples.items()))
    return input_name, errors, rms


def choose_scales(source, config, hessians, formats: dict[str, tuple[str, int]], progress: bool = True,
                  log=sys.stderr) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per foldable input: (input name -> f32 [cols] scales, for the inputs where alpha > 0 won;
    input name -> the alpha chosen, every foldable input, 0 = unscaled). formats: base -> (fmt, group)
    of every quantized block matrix; hessians: calibrate.Calibration. An input whose matrices, or the
    matrix its scales fold into, the source holds already in their layout (a GGUF file's Q8_0 / Q4_0 /
    Q4_1 blocks, kept bit for bit) is left unscaled (alpha 0): scaling would re-quantize them."""
    from ..progress import progress_bar
    from .workers import forked_map

    linears = {b: s for b, s in config.linear_shapes().items() if b in formats}
    rng = np.random.default_rng(0)
    tasks, names = [], []  # names: every foldable input, in order (the record's)
    for layer in range(config.num_hidden_layers):
        targets = folding_targets(config, layer)
        for input_name in targets:
            bases = [b for b in consumers(config, input_name) if b in formats]
            folded = [n.removesuffix(".weight") for n in targets[input_name] if n.removesuffix(".weight") in formats]
            if not bases:
                continue
            names.append(input_name)
            if not any(source.native_format(b + ".weight") == formats[b] for b in bases + folded):
                tasks.append((input_name, {b: np.sort(rng.choice(linears[b][0], size=min(linears[b][0], SAMPLE_ROWS),
                                                                 replace=False)) for b in bases}))
    alphas, scales = dict.fromkeys(names, 0.0), {}
    bar = progress_bar(len(tasks), "activation-aware scales", "input", progress, log)
    try:
        for name, errors, rms in forked_map(_input_errors, tasks, dict(load=source.load, linears=linears,
                                                                      formats=formats, hessians=hessians,
                                                                      config=config)):
            best = int(np.argmin(errors))  # ties: the smaller alpha (0 first)
            alphas[name] = ALPHAS[best]
            if ALPHAS[best] > 0:
                scales[name] = scales_for(rms, ALPHAS[best], config, name)
            bar.update(1)
    finally:
        bar.close()
    return scales, alphas


def fold_into_prefix(prefix: np.ndarray, config, scales: dict[str, np.ndarray]) -> np.ndarray:
    """A prefix-tuning adapter's keys and values f32 [layers, 2, kv_heads, virtual, head_dim] for the
    scaled model: its values enter the attention beside v_proj's, so each scaled layer's values take
    the same divisors (keys unchanged)."""
    out = np.array(prefix, dtype=np.float32)
    for layer in range(out.shape[0]):
        s = scales.get(f"model.layers.{layer}.attn_out")
        if s is not None:
            divisor = value_divisor(config, s).reshape(config.num_key_value_heads, 1, config.head_dim)
            out[layer, 1] /= divisor
    return out


class ScaledSource:
    """A conversion source with the scales folded in: each consumer matrix's columns times s, each
    folding target (calibrate's norm vectors, up_proj / v_proj rows and biases) divided by s.
    Tensors it changes have no native (bit-for-bit) format."""

    def __init__(self, source, config, scales: dict[str, np.ndarray]):
        self._source = source
        self._columns: dict[str, np.ndarray] = {}  # tensor name -> scales of its columns
        self._divided: dict[str, np.ndarray] = {}  # tensor name -> divisors of its rows / values
        for input_name, s in scales.items():
            layer = int(input_name.split(".")[2])
            for base in consumers(config, input_name):
                self._columns[base + ".weight"] = s
            divisor = value_divisor(config, s) if input_name.endswith(".attn_out") else s
            for name in folding_targets(config, layer)[input_name]:
                self._divided[name] = divisor

    def __getattr__(self, name):
        return getattr(self._source, name)

    def load(self, name: str) -> np.ndarray:
        w = self._source.load(name)
        if name in self._columns:
            w = (w.astype(np.float32) * self._columns[name][None, :]).astype(np.float32)
        if name in self._divided:
            s = self._divided[name]
            w = (w.astype(np.float32) / (s[:, None] if w.ndim == 2 else s)).astype(np.float32)
        return w

    def native_format(self, name: str):
        if name in self._columns or name in self._divided:
            return None
        return self._source.native_format(name)

    def codes_format(self, name: str):  # (the source's codes are of the unscaled tensor too)
        if name in self._columns or name in self._divided:
            return None
        return getattr(self._source, "codes_format", lambda n: None)(name)


class ScaledHessians:
    """calibrate.Calibration seen through the scales: H' = diag(s)^-1 H diag(s)^-1 for a scaled input."""

    def __init__(self, calibration, scales: dict[str, np.ndarray]):
        self._calibration, self._scales = calibration, scales

    def __getattr__(self, name):
        return getattr(self._calibration, name)

    def input_hessian(self, base: str) -> np.ndarray:
        h = self._calibration.input_hessian(base)
        s = self._scales.get(self._calibration.input_name(base))
        return h if s is None else h / np.outer(s, s).astype(np.float64)

