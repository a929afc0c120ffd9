"""Checkpoint -> .pllm: plan every tensor, then quantize and write them one at a time."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import __version__
from ..formats.packed import FORMAT_NAME, FORMAT_VERSION, ModelConfig, TokenizerSpec
from ..formats.safetensors import FormatError, PlannedTensor, write_atomic
from ..quant import FORMATS, QUANT_FORMATS, check_group_size, dequantize, nmse, packed_shapes, quantize
from .checkpoint import Checkpoint, read_chat_template, read_generation_defaults, read_tokenizer

# --quant names -> weight format of the transformer's linear layers
QUANT_CHOICES = {
    "f32": "f32", "f16": "f16", "bf16": "bf16", "int8": "int8",
    "int4": "int4_asym", "int4_sym": "int4_sym", "int4_asym": "int4_asym",
}
EMBEDDING_FORMAT_FOR_QUANT = "int8"  # embeddings / lm_head of int8 and int4 models
EMBEDDING_GROUP_SIZE = 32


def resolve_quant(quant: str, group_size: int) -> tuple[str, int]:
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

    def summary(self) -> str:
        lines = [f"wrote {self.output} ({self.file_size / 1e6:.1f} MB, {self.quant}"
                 + (f", group size {self.group_size}" if self.group_size else "") + ")"]
        if self.nmse:
            worst = sorted(self.nmse.items(), key=lambda kv: -kv[1])[:3]
            mean = float(np.mean(list(self.nmse.values())))
            lines.append(f"quantization NMSE: mean {mean:.2e}; worst "
                         + ", ".join(f"{n} {v:.2e}" for n, v in worst))
            lines.append(f"linear layers: {self.bits_per_weight:.2f} bits per weight")
        return "\n".join(lines)


def _plan_linear(base: str, fmt: str, group: int, rows: int, cols: int, source, report: ConversionReport,
                 weights_bits: list) -> list[PlannedTensor]:
    """Planned tensors for one matrix; the weight's producer fills the companions' cache."""
    parts = packed_shapes(fmt, rows, cols, group)
    cache: dict[str, np.ndarray] = {}

    def produce(part: str):
        def run() -> np.ndarray:
            if part == "weight":
                w = source()
                if w.shape != (rows, cols):
                    raise FormatError(f"'{base}.weight' has shape {list(w.shape)}, config implies {[rows, cols]}")
                packed = quantize(w, fmt, group)
                if fmt != "f32":
                    report.nmse[base] = nmse(dequantize(packed), w)
                weights_bits.append((packed.nbytes * 8, rows * cols, base))
                cache.update(scales=packed.scales, mins=packed.mins)
                return packed.data
            return cache.pop(part)
        return run

    return [PlannedTensor(f"{base}.{part}", dtype, shape, produce(part)) for part, (dtype, shape) in parts.items()]


def convert_checkpoint(src: str, output: str, quant: str = "f16", group_size: int = 32, progress: bool = True,
                       log=sys.stderr) -> ConversionReport:
    """Converts a Hugging Face LLaMA-family directory into a .pllm file (written atomically)."""
    fmt, group = resolve_quant(quant, group_size)
    ckpt = Checkpoint(src)
    try:
        config: ModelConfig = ckpt.config
        tokenizer, tokenizer_blob = read_tokenizer(src)
        report = ConversionReport(os.path.abspath(output), 0, quant, group)
        plans, linears, weights_bits = _plan(ckpt, config, fmt, group, report)
        blob_name = "tokenizer.json" if tokenizer.kind == "hf" else "tokenizer.model"
        blob = np.frombuffer(tokenizer_blob, dtype=np.uint8)
        plans.append(PlannedTensor(blob_name, "U8", (len(tokenizer_blob),), lambda: blob))
        metadata = build_metadata(config, linears, tokenizer, read_chat_template(src), read_generation_defaults(src),
                                  {"converter": f"pyllm {__version__}", "source": os.path.abspath(src),
                                   "quant": quant, "group_size": group})
        bar = _progress(len(plans), progress, log)
        report.file_size = write_atomic(output, metadata, plans, on_tensor=lambda p, v: bar.update(1))
        bar.close()
    finally:
        ckpt.close()
    linear_bits = [b for b in weights_bits if b[2] != "model.embed_tokens" and b[2] != "lm_head"]
    report.bits_per_weight = sum(b[0] for b in linear_bits) / max(1, sum(b[1] for b in linear_bits))
    return report


def _plan(ckpt: Checkpoint, config: ModelConfig, fmt: str, group: int, report: ConversionReport):
    plans: list[PlannedTensor] = []
    linears: dict[str, tuple[str, int]] = {}
    weights_bits: list = []
    for base, (rows, cols) in config.linear_shapes().items():
        if base in ("model.embed_tokens", "lm_head") and fmt in QUANT_FORMATS:
            f, g = EMBEDDING_FORMAT_FOR_QUANT, EMBEDDING_GROUP_SIZE
        else:
            f, g = fmt, group
        name = base + ".weight"
        if not ckpt.has(name):
            raise FormatError(f"{ckpt.dir}: checkpoint lacks '{name}'")
        linears[base] = (f, g)
        plans += _plan_linear(base, f, g, rows, cols, lambda n=name: ckpt.load(n), report, weights_bits)
        bias_wanted = (config.attention_bias and ".self_attn." in base) or (config.mlp_bias and ".mlp." in base)
        if bias_wanted:
            plans.append(PlannedTensor(base + ".bias", "F32", (rows,), lambda n=base + ".bias": ckpt.load(n)))
    for name in config.norm_names():
        plans.append(PlannedTensor(name, "F32", (config.hidden_size,), lambda n=name: ckpt.load(n)))
    return plans, linears, weights_bits


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

    return tqdm(total=total, desc="converting", unit="tensor", disable=not enabled, file=log, leave=False)


__all__ = ["convert_checkpoint", "ConversionReport", "resolve_quant", "FORMATS"]
