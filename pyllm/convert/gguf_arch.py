"""llama.cpp's GGUF layout of the families pyllm converts: one table entry per GGUF architecture.

A GGUF file names its family in `general.architecture` (llama.cpp's names: "llama" also for Mistral,
"qwen2", "qwen3", "gemma2", "gemma3", "phi3", "bloom", "gpt2", "glm4", "chatglm" for GLM and
ChatGLM3/GLM-4-chat) and its hyper-parameters under that prefix ("qwen2.block_count",
"gemma2.attention.sliding_window"...). Each entry here turns that metadata into the transformers
config.json its converter started from, so the family's own config_from_hf (pyllm/arch) decides the
ModelConfig exactly as for a Hugging Face checkpoint, and says where each pyllm tensor lies in the file.

Tensor names are the same in every family (llama.cpp's names, gguf-py's TENSOR_NAMES):

  pyllm                                   GGUF
  model.embed_tokens / embed_positions    token_embd / position_embd
  model.embed_norm / model.norm / lm_head token_embd_norm / output_norm / output
  layers.i.input_layernorm                blk.i.attn_norm
  layers.i.post_attention_layernorm       blk.i.ffn_norm          (the norm before the feed-forward)
  layers.i.attn_post_norm / ffn_post_norm blk.i.post_attention_norm / post_ffw_norm (Gemma, GLM-4)
  layers.i.self_attn.{q,k,v}_proj         blk.i.attn_{q,k,v}, or rows of the fused blk.i.attn_qkv
  layers.i.self_attn.o_proj               blk.i.attn_output
  layers.i.self_attn.{q,k}_norm           blk.i.attn_{q,k}_norm
  layers.i.mlp.{gate,up}_proj             blk.i.ffn_{gate,up}, or the two halves of a fused blk.i.ffn_up
  layers.i.mlp.down_proj                  blk.i.ffn_down

What llama.cpp's converter (convert_hf_to_gguf.py) changed on the way is already what pyllm stores,
or is undone here by taking rows, which keeps quantized blocks (whole rows of 32-value blocks) exact:
* BLOOM's per-head [q, k, v] rows are regrouped into q; k; v, GPT-2's Conv1D weights transposed to
  [out, in], Phi-3's qkv_proj and gate_up_proj kept fused: a pyllm matrix is a row block.
* Gemma's norm weights are stored as 1 + w, as pyllm stores them.
* llama.cpp permutes the q/k rows of "llama" files for its interleaved RoPE (LlamaModel.permute);
  the inverse row order is applied (pyllm runs Hugging Face's rotate-half RoPE). No other family
  here is permuted: Qwen, Gemma, Phi-3 and GPT-2 run NEOX-style RoPE in llama.cpp.
* GLM's interleaved RoPE pairs are kept by llama.cpp (glm4, chatglm) and reordered here within each
  head into rotate-half pairs, as pyllm/arch/glm.py does for Hugging Face checkpoints.
Hyper-parameters GGUF does not carry follow llama.cpp's own rules: Gemma 2 alternates local and
global layers, Gemma 3 has one global layer in six (set_swa_pattern), Gemma's query scale is
1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B shapes), Gemma 3's local RoPE theta is 10000.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..arch import ARCHITECTURES
from ..arch.glm import interleaved_to_half
from ..formats.packed import ModelConfig, checked_size
from ..formats.safetensors import FormatError

# pyllm's names of the global tensors and layer modules -> llama.cpp's
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.embed_positions": "position_embd",
                "model.embed_norm": "token_embd_norm", "model.norm": "output_norm", "lm_head": "output"}
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "attn_post_norm": "post_attention_norm",
    "ffn_post_norm": "post_ffw_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@dataclass(frozen=True)
class GGUFTensor:
    """Where a pyllm tensor lies in a GGUF file: rows [start, stop) of `source` (all rows when None),
    then reordered by `order` (an index array over those rows) when given."""

    source: str
    rows: tuple[int, int] | None = None
    order: np.ndarray | None = None


class Metadata:
    """A GGUF file's metadata under its architecture's prefix: get("block_count") reads
    "<arch>.block_count"; need() raises FormatError naming the missing key."""

    def __init__(self, arch: str, get: Callable, tensor_shapes: dict[str, tuple[int, ...]], path: str,
                 read_vector: Callable[[str], np.ndarray]):
        self.arch, self._get, self.shapes, self.path = arch, get, tensor_shapes, path
        self._read_vector = read_vector

    def get(self, key: str, default=None):
        value = self._get(f"{self.arch}.{key}")
        return default if value is None else value

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise FormatError(f"{self.path}: GGUF metadata lacks '{self.arch}.{key}'")
        return value

    def number(self, key: str, default=None, integer: bool = False):
        """A numeric value (need() when default is None): FormatError naming the key for a string, an
        array or a bool (float() and int() of them raised bare ValueError / TypeError), or a non-integer
        where an integer is meant (int() truncated it)."""
        value = self.need(key) if default is None else self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
                integer and not isinstance(value, numbers.Integral)):
            raise FormatError(f"{self.path}: GGUF metadata {self.arch}.{key} must be "
                              f"{'an integer' if integer else 'a number'}, got {_shown(value)}")
        return value

    def has(self, tensor: str) -> bool:
        return tensor in self.shapes

    def vector(self, tensor: str) -> np.ndarray:
        """A float vector tensor's values, f64 [n] (hyper-parameters stored as tensors: rope_freqs)."""
        return np.asarray(self._read_vector(tensor), dtype=np.float64).reshape(-1)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class GGUFArchitecture:
    """One GGUF architecture: hf_config(metadata) -> the transformers config.json dict of its family
    (the first entry of pyllm.arch.ARCHITECTURES whose gguf_name is this name), and row_order(pyllm
    name, config) -> the row order that tensor needs (None: as stored)."""

    name: str
    hf_config: Callable[[Metadata], dict]
    row_order: Callable[[str, ModelConfig], np.ndarray | None] = lambda name, config: None

    @property
    def family(self) -> str:
        return next(a.name for a in ARCHITECTURES.values() if a.gguf_name == self.name)


def _sizes(m: Metadata) -> dict:
    """The keys every llama.cpp text model writes, as transformers names them."""
    if m.get("expert_count"):
        raise FormatError(f"{m.path}: mixture-of-experts layers ({m.arch}.expert_count={m.get('expert_count')}) "
                          "are not supported by pyllm's engines")
    def size(name: str, key: str, default=None) -> int:  # bounded before anything loops over it (SIZE_LIMITS)
        value = m.need(key) if default is None else m.get(key, default)
        return checked_size(name, value, f"{m.path}: GGUF metadata {m.arch}.{key}")

    embedding = m.shapes["token_embd.weight"]
    if len(embedding) != 2:  # its rows are the vocabulary (a vector's missing second dimension was an IndexError)
        raise FormatError(f"{m.path}: token_embd.weight must be a matrix [vocabulary, hidden], got shape "
                          f"{list(reversed(embedding))}")
    hidden = size("hidden_size", "embedding_length")
    heads = size("num_attention_heads", "attention.head_count")
    # the head size: written as key_length when config.json named it, else q's rows per head
    q_rows = _rows(m.shapes["blk.0.attn_q.weight"]) if m.has("blk.0.attn_q.weight") else None
    head_dim = size("head_dim", "attention.key_length", q_rows // heads if q_rows else hidden // heads)
    cfg = dict(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=size("num_hidden_layers", "block_count"),
               num_key_value_heads=size("num_key_value_heads", "attention.head_count_kv", heads), head_dim=head_dim,
               intermediate_size=size("intermediate_size", "feed_forward_length"),
               max_position_embeddings=size("max_position_embeddings", "context_length", 2048),
               rms_norm_eps=float(m.number("attention.layer_norm_rms_epsilon", 1e-5)),
               vocab_size=int(embedding[1]), tie_word_embeddings=not m.has("output.weight"),
               attention_bias=m.has("blk.0.attn_q.bias") or m.has("blk.0.attn_qkv.bias"))
    cfg["rope_parameters"] = _rope(m, head_dim)
    return cfg


def _rope(m: Metadata, head_dim: int) -> dict:
    rope = {"rope_type": "default", "rope_theta": float(m.number("rope.freq_base", 10000.0))}
    dims = m.number("rope.dimension_count", head_dim, integer=True)
    if int(dims) != head_dim:
        rope["partial_rotary_factor"] = int(dims) / head_dim
    # llama.cpp's rules: the type defaults to linear, the factor is rope.scaling.factor or the older
    # rope.scale_linear (files of 2023), and a factor of 0 or none means no scaling. A factor without a
    # type was ignored here: positions 4x too far apart, a model that answers nonsense past its first words
    kind = m.get("rope.scaling.type", "linear")
    if kind not in ("linear", "none"):
        raise FormatError(f"{m.path}: rope scaling {_shown(kind)} is not supported (supported: linear)")
    key = "rope.scaling.factor" if m.get("rope.scaling.factor") is not None else "rope.scale_linear"
    factor = float(m.number(key, 0.0))
    if kind == "linear" and factor != 0:
        rope.update(rope_type="linear", factor=factor)
    if m.has("rope_factors_long.weight") or m.has("rope_factors_short.weight"):
        raise FormatError(f"{m.path}: per-dimension RoPE factors for long contexts (rope_factors_long / "
                          "rope_factors_short, LongRoPE) are not supported")
    if m.has("rope_freqs.weight"):  # Llama 3.1-3.3: llama3 scaling, which llama.cpp stores as this tensor
        if rope["rope_type"] != "default":
            raise FormatError(f"{m.path}: tensor 'rope_freqs.weight' beside linear rope scaling: pyllm reads "
                              "rope_freqs as llama3 scaling, which replaces it")
        rope.update(llama3_from_rope_freqs(m, rope["rope_theta"], int(dims)))
    return rope


# tolerance of a rope_freqs value against the llama3 scaling read from it (the file stores float32)
ROPE_FREQS_RTOL = 1e-5


def llama3_rope_freqs(inv_freq: np.ndarray, factor: float, low_freq_wavelen: float,
                      high_freq_wavelen: float) -> np.ndarray:
    """llama.cpp's rope_freqs of llama3 scaling (convert_hf_to_gguf.py, LlamaModel): per frequency
    f [n], 1 above the high-frequency wavelength's frequency, `factor` below the low one's, between
    them 1 / ((1 - smooth) / factor + smooth), smooth running linearly in 1/wavelength from 0 to 1.
    llama.cpp divides each frequency by it; transformers' llama3 parameters give the same frequencies
    (original_max_position_embeddings / low_freq_factor and / high_freq_factor are the two wavelengths)."""
    wavelen = 2 * np.pi / inv_freq
    smooth = (low_freq_wavelen / wavelen - 1) / (low_freq_wavelen / high_freq_wavelen - 1)
    between = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < high_freq_wavelen, 1.0, np.where(wavelen > low_freq_wavelen, factor, between))


def llama3_from_rope_freqs(m: Metadata, theta: float, rotary_dim: int) -> dict:
    """The llama3 rope scaling (transformers' rope_parameters) whose frequencies are a GGUF file's
    rope_freqs.weight [rotary_dim / 2]: the factor from the longest wavelengths, the two wavelengths
    from the values between (smooth is linear in 1/wavelength: a least-squares line), written as
    original_max_position_embeddings = the low-frequency wavelength, low_freq_factor 1. All ones
    is no scaling. FormatError naming the tensor when the values are not llama3's within ROPE_FREQS_RTOL
    (another scheme would give other positions in silence)."""
    values = m.vector("rope_freqs.weight")
    half = rotary_dim // 2
    where = f"{m.path}: tensor 'rope_freqs.weight'"
    if values.shape != (half,):
        raise FormatError(f"{where} has {values.size} values; the rotary dimensions make {half}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise FormatError(f"{where} holds values that are not positive finite numbers")
    if np.allclose(values, 1.0, rtol=0, atol=ROPE_FREQS_RTOL):
        return {}
    # the frequencies as transformers and the engines compute them: float32
    inv_freq = (1.0 / np.power(np.float32(theta), np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim),
                               dtype=np.float32)).astype(np.float64)
    wavelen = 2 * np.pi / inv_freq
    factor = float(values[-1])  # the longest wavelength's
    ones = np.isclose(values, 1.0, rtol=ROPE_FREQS_RTOL, atol=0)
    plateau = np.isclose(values, factor, rtol=ROPE_FREQS_RTOL, atol=0)
    between = ~ones & ~plateau
    refusal = FormatError(f"{where}: its per-dimension RoPE factors are not llama3 scaling's (1 for short "
                          "wavelengths, the factor for long ones, a smooth step between), the only kind pyllm's "
                          "engines run")
    if factor <= 1 or not ones[0]:
        raise refusal
    if between.sum() >= 2:
        smooth = (1 / values[between] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[between], smooth, 1)  # smooth = slope / wavelen + intercept
        if slope <= 0 or intercept >= 0:
            raise refusal
        low_wavelen, high_wavelen = slope / -intercept, slope / (1 - intercept)
    elif between.sum() == 0 and plateau.any():  # a step: any two wavelengths in the gap give these values
        short, long_ = wavelen[ones].max(), wavelen[plateau].min()
        high_wavelen, low_wavelen = short * (long_ / short) ** (1 / 3), short * (long_ / short) ** (2 / 3)
    else:
        raise refusal
    for candidate in (round(low_wavelen), low_wavelen):  # the integer context length it was made from, if it fits
        high = round(candidate / high_wavelen, 6)
        if high > 1 and np.allclose(llama3_rope_freqs(inv_freq, factor, candidate, candidate / high), values,
                                    rtol=ROPE_FREQS_RTOL, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": float(high),
                    "original_max_position_embeddings": candidate if isinstance(candidate, int) else float(candidate)}
    raise refusal


def _layer_norm_eps(m: Metadata) -> float:
    return float(m.number("attention.layer_norm_epsilon", 1e-5))


def _llama(m):
    return dict(_sizes(m), model_type="llama")


def _qwen2(m):
    return dict(_sizes(m), model_type="qwen2")


def _qwen3(m):
    return dict(_sizes(m), model_type="qwen3")


def _phi3(m):
    cfg = dict(_sizes(m), model_type="phi3")
    if m.get("attention.sliding_window"):
        cfg["sliding_window"] = int(m.number("attention.sliding_window", integer=True))
    return cfg


def _gemma(m, model_type: str, pattern: int, big_layers: int) -> dict:
    cfg = dict(_sizes(m), model_type=model_type, hidden_activation="gelu_pytorch_tanh")
    layers, window = cfg["num_hidden_layers"], m.get("attention.sliding_window")
    if window:
        window = m.number("attention.sliding_window", integer=True)
    # llama.cpp's set_swa_pattern(n): layer i is local when i % n < n - 1
    if window:
        cfg["sliding_window"] = int(window)
        cfg["layer_types"] = ["sliding_attention" if i % pattern < pattern - 1 else "full_attention"
                              for i in range(layers)]
    # llama.cpp scales queries by 1/sqrt(head_dim), but by 1/sqrt(hidden/heads) for the 27B shapes
    scalar = cfg["hidden_size"] // cfg["num_attention_heads"] if layers == big_layers else cfg["head_dim"]
    cfg["query_pre_attn_scalar"] = scalar
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        cfg[key] = m.number(key) if m.get(key) is not None else None
    return cfg


def _gemma2(m):
    return _gemma(m, "gemma2", pattern=2, big_layers=46)


def _gemma3(m):
    cfg = _gemma(m, "gemma3_text", pattern=6, big_layers=62)
    full = cfg.pop("rope_parameters")
    local = {"rope_type": "default", "rope_theta": float(m.number("rope.freq_base_swa", 10000.0))}
    cfg["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
    return cfg


def _bloom(m):
    cfg = _sizes(m)
    return dict(model_type="bloom", vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                n_head=cfg["num_attention_heads"], n_layer=cfg["num_hidden_layers"],
                layer_norm_epsilon=_layer_norm_eps(m), tie_word_embeddings=cfg["tie_word_embeddings"])


def _gpt2(m):
    cfg = _sizes(m)
    return dict(model_type="gpt2", vocab_size=cfg["vocab_size"], n_embd=cfg["hidden_size"],
                n_head=cfg["num_attention_heads"], n_layer=cfg["num_hidden_layers"],
                n_inner=cfg["intermediate_size"], n_positions=cfg["max_position_embeddings"],
                layer_norm_epsilon=_layer_norm_eps(m), activation_function="gelu_new",
                tie_word_embeddings=cfg["tie_word_embeddings"])


def _glm(model_type: str):
    def config(m):
        cfg = dict(_sizes(m), model_type=model_type)
        cfg["rope_parameters"].setdefault("partial_rotary_factor", 1.0)
        return cfg
    return config


def _llama_row_order(name: str, config: ModelConfig) -> np.ndarray | None:
    """The inverse of llama.cpp's q/k permutation (LlamaModel.permute) as a row order."""
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(_module(name))
    if heads is None:
        return None
    n = heads * config.head_dim
    return np.arange(n).reshape(heads, n // heads // 2, 2).swapaxes(1, 2).reshape(n)


def _glm_row_order(name: str, config: ModelConfig) -> np.ndarray | None:
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(_module(name))
    if heads is None:
        return None
    hd = config.head_dim
    return interleaved_to_half(np.arange(heads * hd), heads, hd, config.rotary_dim or hd)


def _module(name: str) -> str:
    return name.rsplit(".", 2)[-2]  # model.layers.0.self_attn.q_proj.weight -> q_proj


GGUF_ARCHITECTURES: dict[str, GGUFArchitecture] = {a.name: a for a in (
    GGUFArchitecture("llama", _llama, _llama_row_order),  # also Mistral's files
    GGUFArchitecture("qwen2", _qwen2),
    GGUFArchitecture("qwen3", _qwen3),
    GGUFArchitecture("gemma2", _gemma2),
    GGUFArchitecture("gemma3", _gemma3),
    GGUFArchitecture("phi3", _phi3),
    GGUFArchitecture("bloom", _bloom),
    GGUFArchitecture("gpt2", _gpt2),
    GGUFArchitecture("glm4", _glm("glm4"), _glm_row_order),
    GGUFArchitecture("chatglm", _glm("glm"), _glm_row_order),  # GlmForCausalLM, ChatGLM3, GLM-4-9B-chat
)}


def for_gguf(name: str, path: str) -> GGUFArchitecture:
    if not isinstance(name, str) or name not in GGUF_ARCHITECTURES:  # a list was a TypeError (unhashable)
        raise FormatError(f"{path}: GGUF architecture {_shown(name)} is not supported "
                          f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    return GGUF_ARCHITECTURES[name]


# tensors that hold hyper-parameters, read into the config rather than stored
CONFIG_TENSORS = ("rope_freqs.weight",)

# ModelConfig's names -> the GGUF metadata they come from, for the checks config_from_hf makes
CONFIG_KEYS = {"rope_theta": "rope.freq_base", "rotary_dim": "rope.dimension_count",
               "rope_scaling": "rope.scaling.factor", "norm_eps": "attention.layer_norm_rms_epsilon",
               "num_attention_heads": "attention.head_count / .attention.head_count_kv",
               "head_dim": "attention.key_length", "rope_theta_local": "rope.freq_base_swa",
               "sliding_window": "attention.sliding_window", "attn_logit_softcapping": "attn_logit_softcapping",
               "final_logit_softcapping": "final_logit_softcapping"}


def gguf_config(arch: GGUFArchitecture, m: Metadata) -> ModelConfig:
    """The ModelConfig of a GGUF file, through its family's config_from_hf; its refusals name the
    file and, where one is known, the metadata key (they read "model config: rope_theta must be...")."""
    try:
        return ARCHITECTURES[arch.family].config_from_hf(arch.hf_config(m))
    except FormatError as e:
        message = str(e)
        if message.startswith(m.path):
            raise
        message = message.removeprefix("model config: ")
        field = message.split(" ", 1)[0]
        if field == "norm_eps" and arch.name in ("bloom", "gpt2"):
            key = "attention.layer_norm_epsilon"
        else:
            key = CONFIG_KEYS.get(field)
        if field == "vocab_size":  # GGUF's vocabulary size is token_embd.weight's rows, not a metadata key
            where = "tensor 'token_embd.weight' (its rows are the vocabulary)"
        else:
            where = f"GGUF metadata {arch.name}.{key.replace(' / .', f' / {arch.name}.')}" if key else \
            f"the {arch.name} GGUF metadata"
        raise FormatError(f"{m.path}: {where}: {message}") from None


def gguf_tensors(arch: GGUFArchitecture, config: ModelConfig, m: Metadata) -> dict[str, GGUFTensor]:
    """pyllm tensor name -> where it lies in the file, for every tensor of the family's model
    (ARCHITECTURES[family].tensors(config)); FormatError naming what the file lacks."""
    wanted = ARCHITECTURES[arch.family].tensors(config)
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    fused = {"self_attn.q_proj": ("attn_qkv", 0, q_rows), "self_attn.k_proj": ("attn_qkv", q_rows, q_rows + kv_rows),
             "self_attn.v_proj": ("attn_qkv", q_rows + kv_rows, q_rows + 2 * kv_rows),
             "mlp.gate_proj": ("ffn_up", 0, config.intermediate_size),
             "mlp.up_proj": ("ffn_up", config.intermediate_size, 2 * config.intermediate_size)}
    out, missing = {}, []
    for name in wanted:
        base, kind = name.rsplit(".", 1)
        if base in GLOBAL_NAMES:
            place = GGUFTensor(f"{GLOBAL_NAMES[base]}.{kind}")
        else:
            _, _, layer, module = base.split(".", 3)  # model.layers.{i}.{module}
            place = GGUFTensor(f"blk.{layer}.{LAYER_NAMES[module]}.{kind}")
            if module in fused:
                source, start, stop = fused[module]
                source = f"blk.{layer}.{source}.{kind}"
                # fused when the module's own tensor is absent, or when ffn_up holds gate and up
                gate_up = module == "mlp.up_proj" and not m.has(f"blk.{layer}.ffn_gate.{kind}") and (
                    _rows(m.shapes[source]) == 2 * config.intermediate_size if m.has(source) else False)
                if (not m.has(place.source) and m.has(source)) or gate_up:
                    place = GGUFTensor(source, (start, stop))
            order = arch.row_order(name, config)
            if order is not None and place.source in m.shapes:
                # the reordering indexes every row the model's shapes imply: fewer was an IndexError
                held = place.rows[1] - place.rows[0] if place.rows is not None else _rows(m.shapes[place.source])
                if held != len(order):
                    raise FormatError(f"{m.path}: {place.source} has {held} rows, expected {len(order)} for this "
                                      "model's shapes (heads x head size)")
                place = GGUFTensor(place.source, place.rows, order)
        if place.source not in m.shapes:
            missing.append(place.source)
        elif place.rows is not None:  # a fused tensor must hold exactly its parts
            total = {"attn_qkv": q_rows + 2 * kv_rows, "ffn_up": 2 * config.intermediate_size}
            expected = total[place.source.split(".")[2]]
            if _rows(m.shapes[place.source]) != expected:
                raise FormatError(f"{m.path}: {place.source} has {_rows(m.shapes[place.source])} rows, expected "
                                  f"{expected} for this model's shapes")
        out[name] = place
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FormatError(f"{m.path}: the {arch.name} GGUF file lacks {shown}")
    return out


def _rows(shape: tuple[int, ...]) -> int:
    """Rows of a GGUF tensor (GGUF lists dimensions innermost first)."""
    return int(shape[1]) if len(shape) > 1 else int(shape[0])
