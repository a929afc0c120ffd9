"""Checkpoint -> .pllm: plan every tensor, then quantize and write them one at a time."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import __version__
from ..formats.packed import FORMAT_NAME, FORMAT_VERSION, ModelConfig, TokenizerSpec
from ..formats.safetensors import FormatError, PlannedTensor, write_atomic
from ..quant import QUANT_FORMATS, check_group_size, layout_name, packed_shapes, quantization_nmse, quantize
from .checkpoint import Checkpoint
from .gguf_source import GGUFSource
from .lora import merged_source
from .strategy import QuantOptions, plan_quantization

# --quant names -> weight format of the transformer's linear layers
QUANT_CHOICES = {
    "f32": "f32", "f16": "f16", "bf16": "bf16", "int8": "int8",
    "int4": "int4_asym", "int4_sym": "int4_sym", "int4_asym": "int4_asym",
}
EMBEDDING_FORMAT_FOR_QUANT = "int8"  # embeddings / lm_head of int8 and int4 models
EMBEDDING_GROUP_SIZE = 32
DEFAULT_GROUP_SIZE = 32  # int8 / int4_sym / int4_asym when no group size is given


def open_source(path: str):
    """A Hugging Face directory or a .gguf file, as a conversion source."""
    if os.path.isdir(path):
        return Checkpoint(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GGUFSource(path)
    raise FormatError(f"{path} is neither a Hugging Face model directory nor a GGUF file")


def resolve_quant(quant: str | None, group_size: int | None) -> tuple[str | None, int]:
    """--quant name -> (weight format, group size); None keeps each GGUF tensor's own format.
    A group size other than the default given for a format without groups (or with no --quant) is
    refused (the CLI refuses any --group-size there)."""
    if group_size not in (None, DEFAULT_GROUP_SIZE) and QUANT_CHOICES.get(quant) not in QUANT_FORMATS:
        raise ValueError(f"a group size applies to int8 and int4 formats, not to {quant or 'the source formats'}")
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if quant is None:
        return None, group_size
    if quant not in QUANT_CHOICES:
        raise ValueError(f"unknown --quant {quant!r} (choose from {', '.join(QUANT_CHOICES)})")
    fmt = QUANT_CHOICES[quant]
    check_group_size(fmt, group_size)
    return fmt, group_size if fmt in QUANT_FORMATS else 0


@dataclass
class ConversionReport:
    output: str
    file_size: int
    quant: str
    group_size: int
    nmse: dict[str, float] = field(default_factory=dict)  # per quantized matrix
    bits_per_weight: float = 0.0  # linear layers only (embeddings excluded)
    kept_exactly: list[str] = field(default_factory=list)  # GGUF blocks copied without requantizing
    layouts: dict[str, int] = field(default_factory=dict)  # what was written: "int4_asym g64" -> matrices
    seconds: float = 0.0  # wall time of the whole conversion

    def summary(self) -> str:
        """What was written: file, size, time, the layouts with their matrix counts (embeddings and
        lm_head included), the quantization error."""
        lines = [f"wrote {self.output} ({self.file_size / 1e6:.1f} MB) in {self.seconds:.1f} s from "
                 + (f"--quant {self.quant}" if self.quant else "the source's formats")]
        if self.layouts:
            lines.append("layouts: " + ", ".join(f"{name} x{count}" for name, count in
                                                  sorted(self.layouts.items(), key=lambda kv: (-kv[1], kv[0]))))
        if self.kept_exactly:
            lines.append(f"{len(self.kept_exactly)} matrices kept bit for bit from the source blocks")
        if self.nmse:
            worst = sorted(self.nmse.items(), key=lambda kv: -kv[1])[:3]
            mean = float(np.mean(list(self.nmse.values())))
            lines.append(f"quantization NMSE: mean {mean:.2e}; worst "
                         + ", ".join(f"{n} {v:.2e}" for n, v in worst))
            lines.append(f"linear layers: {self.bits_per_weight:.2f} bits per weight")
        return "\n".join(lines)


def _plan_linear(base: str, fmt: str, group: int, rows: int, cols: int, source, report: ConversionReport,
                 weights_bits: list, native=None, strategy=None) -> list[PlannedTensor]:
    """Planned tensors for one matrix; the weight's producer fills the companions' cache.

    native: when given, returns the weight already in (fmt, group), kept bit for bit."""
    parts = packed_shapes(fmt, rows, cols, group)
    cache: dict[str, np.ndarray] = {}

    def produce(part: str):
        def run() -> np.ndarray:
            if part == "weight":
                if native is not None:
                    packed = native()
                    if (packed.rows, packed.cols) != (rows, cols):
                        raise FormatError(f"'{base}.weight' is {packed.rows}x{packed.cols}, config implies {rows}x{cols}")
                    report.kept_exactly.append(base)
                else:
                    w = source()
                    if w.shape != (rows, cols):
                        raise FormatError(f"'{base}.weight' has shape {list(w.shape)}, config implies {[rows, cols]}")
                    packed = strategy.quantize(base, w, fmt, group) if strategy else quantize(w, fmt, group)
                    if fmt != "f32":
                        report.nmse[base] = quantization_nmse(packed, w)
                weights_bits.append((packed.nbytes * 8, rows * cols, base))
                cache.update(scales=packed.scales, mins=packed.mins)
                return packed.data
            return cache.pop(part)
        return run

    return [PlannedTensor(f"{base}.{part}", dtype, shape, produce(part)) for part, (dtype, shape) in parts.items()]


def convert_checkpoint(src: str, output: str, quant: str | None = None, group_size: int | None = None,
                       progress: bool = True,
                       log=sys.stderr, lora: list[str] | tuple = (), options: QuantOptions | None = None
                       ) -> ConversionReport:
    """Converts a Hugging Face LLaMA-family directory or a llama GGUF file into a .pllm file (written atomically).

    quant None: f16 for Hugging Face checkpoints; for GGUF, each tensor's own format where pyllm holds it
    without loss (Q8_0, Q4_0, Q4_1, F32, F16, BF16), else f16. options: how int8/int4 scales are chosen
    (pyllm/convert/strategy.py; default: scale search for int4, min/max scales for int8, and for --quant int4
    a per-tensor choice of layout).
    group_size: values per scale of int8/int4 (default 32); given with quant "int4", every matrix keeps it
    (only the choice between int4_sym and int4_asym remains); refused (ValueError) for other formats.
    lora: PEFT adapter directories merged into the weights in float32, in order, before quantizing."""
    started = time.perf_counter()
    fmt, group = resolve_quant(quant, group_size)
    source = open_source(src)
    if lora:
        source = merged_source(source, lora)
    try:
        config: ModelConfig = source.config
        if fmt is None:
            for notice in getattr(source, "block_type_notices", list)():
                print(notice, file=log)
        strategy = plan_quantization(source, config, quant, fmt, group, options or QuantOptions(), progress, log,
                                     fixed_group=group_size is not None)
        tokenizer, tokenizer_blob = source.tokenizer()
        if len(tokenizer_blob) == 0:
            raise FormatError(f"{src}: empty tokenizer")
        report = ConversionReport(os.path.abspath(output), 0, quant, group if fmt in QUANT_FORMATS else 0)
        plans, linears, weights_bits = _plan(source, config, fmt, group, report, strategy)
        report.layouts = dict(Counter(layout_name(f, g) for f, g in linears.values()))
        blob_name = "tokenizer.json" if tokenizer.kind == "hf" else "tokenizer.model"
        blob = np.frombuffer(tokenizer_blob, dtype=np.uint8)
        plans.append(PlannedTensor(blob_name, "U8", (len(tokenizer_blob),), lambda: blob))
        metadata = build_metadata(config, linears, tokenizer, source.chat_template(), source.generation_defaults(),
                                  {"converter": f"pyllm {__version__}", "source": os.path.abspath(src),
                                   "quant": quant or "source", "group_size": group,
                                   **({"lora": [os.path.abspath(d) for d in lora]} if lora else {})})
        bar = _progress(len(plans), progress, log)
        report.file_size = write_atomic(output, metadata, plans, on_tensor=lambda p, v: bar.update(1))
        bar.close()
    finally:
        source.close()
    linear_bits = [b for b in weights_bits if b[2] != "model.embed_tokens" and b[2] != "lm_head"]
    report.bits_per_weight = sum(b[0] for b in linear_bits) / max(1, sum(b[1] for b in linear_bits))
    report.seconds = time.perf_counter() - started
    return report


def _choose_format(source, base: str, fmt: str | None, group: int) -> tuple[str, int]:
    native = source.native_format(base + ".weight")
    if fmt is None:
        fallback = getattr(source, "fallback_format", lambda name: None)(base + ".weight")
        return native or fallback or ("f16", 0)
    if base in ("model.embed_tokens", "lm_head") and fmt in QUANT_FORMATS:
        return EMBEDDING_FORMAT_FOR_QUANT, EMBEDDING_GROUP_SIZE
    return fmt, group


def _plan(source, config: ModelConfig, fmt: str | None, group: int, report: ConversionReport, strategy=None):
    plans: list[PlannedTensor] = []
    linears: dict[str, tuple[str, int]] = {}
    weights_bits: list = []
    for base, (rows, cols) in config.linear_shapes().items():
        name = base + ".weight"
        if not source.has(name):
            raise FormatError(f"{src_name(source)}: lacks '{name}'")
        f, g = _choose_format(source, base, fmt, group)
        if strategy is not None and base in strategy.formats:
            f, g = strategy.formats[base]
        linears[base] = (f, g)
        keep = f in QUANT_FORMATS and source.native_format(name) == (f, g)
        plans += _plan_linear(base, f, g, rows, cols, lambda n=name: source.load(n), report, weights_bits,
                              native=(lambda n=name: source.load_native(n)) if keep else None, strategy=strategy)
        bias_wanted = (config.attention_bias and ".self_attn." in base) or (config.mlp_bias and ".mlp." in base)
        if bias_wanted:
            plans.append(PlannedTensor(base + ".bias", "F32", (rows,), lambda n=base + ".bias": source.load(n)))
    for name in config.norm_names():
        plans.append(PlannedTensor(name, "F32", (config.hidden_size,), lambda n=name: source.load(n).reshape(-1)))
    return plans, linears, weights_bits


def src_name(source) -> str:
    return getattr(source, "dir", None) or getattr(source, "path", "source")


def build_metadata(config: ModelConfig, linears: dict, tokenizer: TokenizerSpec, chat_template: str,
                   generation: dict, source: dict) -> dict[str, str]:
    return {
        "format": FORMAT_NAME,
        "pyllm.format_version": str(FORMAT_VERSION),
        "pyllm.config": json.dumps(asdict(config)),
        "pyllm.linears": json.dumps({k: list(v) for k, v in linears.items()}),
        "pyllm.tokenizer": json.dumps(asdict(tokenizer)),
        "pyllm.chat_template": chat_template,
        "pyllm.generation": json.dumps(generation),
        "pyllm.source": json.dumps(source),
    }


def _progress(total: int, enabled: bool, log):
    from tqdm import tqdm

    return tqdm(total=total, desc="writing", unit="tensor", disable=not enabled, file=log)

