"""Checkpoint -> .pllm: plan every tensor, then quantize and write them one at a time."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import __version__
from ..adapters import METADATA_KEY as ADAPTERS_METADATA_KEY
from ..formats.gguf_split import split_parts
from ..formats.packed import FORMAT_NAME, FORMAT_VERSION, ModelConfig, TokenizerSpec
from ..progress import progress_bar
from ..formats.safetensors import FormatError, PlannedTensor, check_finite, check_output_path, write_atomic
from ..quant import QUANT_FORMATS, check_group_size, layout_name, packed_shapes, quantization_nmse, quantize
from .checkpoint import ArchitectureView, Checkpoint
from .gguf_source import GGUFSource
from .lora import merged_source
from .awq import ScaledSource
from .strategy import QuantOptions, plan_quantization

# --quant names -> weight format of the transformer's linear layers
QUANT_CHOICES = {
    "f32": "f32", "f16": "f16", "bf16": "bf16", "int8": "int8",
    "int4": "int4_asym", "int4_sym": "int4_sym", "int4_asym": "int4_asym", "int4_asym_dq": "int4_asym_dq",
}
EMBEDDING_FORMAT_FOR_QUANT = "int8"  # embeddings / lm_head of int8 and int4 models
EMBEDDING_GROUP_SIZE = 32
DEFAULT_GROUP_SIZE = 32  # int8 / int4_sym / int4_asym / int4_asym_dq when no group size is given


def open_source(path: str):
    """A Hugging Face directory or a .gguf file, as a conversion source."""
    if os.path.isdir(path):
        return Checkpoint(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist" if path else "no model path given (it is empty)")
    if not os.path.isfile(path):  # a FIFO or a device: open() waited for ever for a writer
        raise FormatError(f"{path} is not a regular file: neither a Hugging Face model directory nor a GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GGUFSource(path)
    raise FormatError(f"{path} is neither a Hugging Face model directory nor a GGUF file")


class FiniteSource:
    """A conversion source whose tensors must be finite: load() refuses NaN or infinity naming the
    source's file and tensor (where(); as PEFT's safe_merge), before a quantizer or a calibration
    pass meets it."""

    def __init__(self, source):
        self._source = source

    def __getattr__(self, name):
        return getattr(self._source, name)

    def load(self, name: str) -> np.ndarray:
        w = self._source.load(name)
        check_finite(name, "F32", w, label=where(self._source, name))
        return w

    def load_native(self, name: str):
        """A block format's weight kept bit for bit: its scales and mins checked as load() checks values
        (a NaN block scale was refused by the writer, naming pyllm's "….scales" and blaming LoRA adapters)."""
        packed = self._source.load_native(name)
        for part, values in (("scales", packed.scales), ("mins", packed.mins)):
            if values is not None:
                check_finite(f"{name}.{part}", "F16", values,
                             label=f"{where(self._source, name)} (its blocks' {part}, kept bit for bit)")
        return packed


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
    phases: dict[str, float] = field(default_factory=dict)  # wall time per phase (calibration, layouts, GPTQ, writing)
    source_bytes: int = 0  # size of the source's files

    def summary(self) -> str:
        """What was written: file, size, time, the layouts with their matrix counts (embeddings and
        lm_head included), the quantization error."""
        lines = [f"wrote {self.output} ({self.file_size / 1e6:.1f} MB) in {self.seconds:.1f} s from "
                 + (f"--quant {self.quant}" if self.quant else "the source's formats")]
        if self.source_bytes and self.seconds > 0:
            lines.append(f"read {self.source_bytes / 1e6:.1f} MB of source at {self.source_bytes / 1e6 / self.seconds:.1f} MB/s; "
                         + ", ".join(f"{name} {s:.1f} s" for name, s in self.phases.items()))
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


@contextlib.contextmanager
def naming_the_tensor(label: str):
    """Quantizing a weight past the float16 range (65504, in the weight or its scales) raises quant's
    ValueError, which names no tensor: FormatError("{label}: ...; convert with --quant bf16 or f32")."""
    try:
        yield
    except ValueError as e:
        if "float16 range" not in str(e):
            raise
        raise FormatError(f"{label}: {e}; convert with --quant bf16 or f32") from None


def _plan_linear(base: str, fmt: str, group: int, rows: int, cols: int, source, report: ConversionReport,
                 weights_bits: list, native=None, strategy=None, label: str | None = None,
                 codes=None) -> list[PlannedTensor]:
    """Planned tensors for one matrix; the weight's producer fills the companions' cache.

    native: when given, returns the weight already in (fmt, group), kept bit for bit.
    codes: when given, returns the weight in (fmt, group) with the source's codes and rounded scales
    (or None: quantized then), measured against source() as a quantized one is.
    label: the file and source tensor of the weight, for a message (see where)."""
    label = label or f"tensor '{base}.weight'"
    parts = packed_shapes(fmt, rows, cols, group)
    cache: dict[str, np.ndarray] = {}

    def produce(part: str):
        def run() -> np.ndarray:
            if part == "weight":
                if native is not None:
                    packed = native()
                    if (packed.rows, packed.cols) != (rows, cols):
                        raise FormatError(f"{label} is {packed.rows}x{packed.cols}, "
                                          f"config implies {rows}x{cols}")
                    report.kept_exactly.append(base)
                else:
                    w = source()
                    if w.shape != (rows, cols):
                        raise FormatError(f"{label} has shape {list(w.shape)}, "
                                          f"config implies {[rows, cols]}")
                    packed = codes() if codes is not None else None
                    if packed is None:
                        with naming_the_tensor(label):
                            packed = strategy.quantize(base, w, fmt, group) if strategy else quantize(w, fmt, group)
                    if fmt != "f32":
                        report.nmse[base] = quantization_nmse(packed, w)
                weights_bits.append((packed.nbytes * 8, rows * cols, base))
                cache.update(scales=packed.scales, mins=packed.mins, steps=packed.steps)
                return packed.data
            return cache.pop(part)
        return run

    return [PlannedTensor(f"{base}.{part}", dtype, shape, produce(part)) for part, (dtype, shape) in parts.items()]


def check_output_is_not_an_input(output: str, inputs: list[str]) -> None:
    """FileExistsError when output already is a file the conversion reads (the source GGUF file or its
    shards, or
    a file directly inside the checkpoint or an adapter directory, symbolic links followed): the
    finished file replaces what the path names, so the checkpoint would be gone. Earlier .pllm files
    in those directories are not inputs and may be overwritten."""
    if not os.path.exists(output):
        return
    for item in inputs:
        if os.path.isdir(item):
            files = [os.path.join(item, name) for name in os.listdir(item) if not name.endswith(".pllm")]
        else:
            files = split_parts(item)  # a split GGUF model's shards (the output was one of them, replaced)
        for path in files:
            try:
                same = os.path.samefile(output, path)
            except OSError:
                continue
            if same:
                raise FileExistsError(f"refusing to write {output}: it is {path}, which this conversion reads "
                                      f"(from {item}); choose another output path")


def convert_checkpoint(src: str, output: str, quant: str | None = None, group_size: int | None = None,
                       progress: bool = True, log=sys.stderr, lora: list[str] | tuple = (),
                       options: QuantOptions | None = None, adapters: list | tuple = ()) -> ConversionReport:
    """Converts a Hugging Face directory of a family in pyllm.arch, or a llama GGUF file, into a .pllm file
    (written atomically).

    quant None: f16 for Hugging Face checkpoints; for GGUF, what gguf_source.GGUF_TYPES says of each tensor's
    type: a pyllm layout holding it exactly (Q8_0, Q4_0, Q4_1, Q5_0, MXFP4, IQ4_NL, floats; NVFP4 in f16), or
    its codes (Q4_K, IQ4_XS), else the nearest one at least as fine, said in a notice; types without a row are
    refused. options: how int8/int4 scales are chosen
    (pyllm/convert/strategy.py; default: scale search for int4, min/max scales for int8, and for --quant int4
    a per-tensor choice of layout).
    group_size: values per scale of int8/int4 (default 32); given with quant "int4", every matrix keeps it
    (only the choice between int4_sym and int4_asym remains); refused (ValueError) for other formats.
    lora: PEFT adapter directories merged into the weights in float32, in order, before quantizing.
    adapters: PEFT prompt-learning adapters (prompt tuning, P-tuning, prefix tuning) stored beside the
    weights under a name each, as (name or None, directory) pairs (pyllm/adapters.py)."""
    started = time.perf_counter()
    fmt, group = resolve_quant(quant, group_size)
    check_output_path(output)
    check_output_is_not_an_input(output, [src, *lora, *(directory for _, directory in adapters)])
    source = open_source(src)
    for notice in getattr(source, "notices", ()):
        print(notice, file=log)
    if lora:
        source = merged_source(source, lora, log)
    if hasattr(source, "arch"):  # Hugging Face names -> pyllm's (GGUF sources name tensors pyllm's way)
        try:
            source = ArchitectureView(source)
        except BaseException:
            source.close()
            raise
        for notice in source.notices:
            print(notice, file=log)
    source = FiniteSource(source)
    try:
        config: ModelConfig = source.config
        if fmt is None:
            for notice in getattr(source, "block_type_notices", list)():
                print(notice, file=log)
        strategy = plan_quantization(source, config, quant, fmt, group, options or QuantOptions(), progress, log,
                                     fixed_group=group_size is not None)
        if strategy.scales:  # the norms, up_proj and v_proj rows the scales fold into (awq.py)
            source = ScaledSource(source, config, strategy.scales)
        tokenizer, tokenizer_blob = source.tokenizer()
        if len(tokenizer_blob) == 0:
            raise FormatError(f"{src}: empty tokenizer")
        check_tokenizer_fits(tokenizer, tokenizer_blob, config, src)
        report = ConversionReport(os.path.abspath(output), 0, quant, group if fmt in QUANT_FORMATS else 0)
        plans, linears, weights_bits = _plan(source, config, fmt, group, report, strategy)
        report.layouts = dict(Counter(layout_name(f, g) for f, g in linears.values()))
        blob_name = "tokenizer.json" if tokenizer.kind == "hf" else "tokenizer.model"
        blob = np.frombuffer(tokenizer_blob, dtype=np.uint8)
        plans.append(PlannedTensor(blob_name, "U8", (len(tokenizer_blob),), lambda: blob))
        adapter_metadata = _prompt_adapters(adapters, config, source, plans, strategy.scales, log)
        chat_template = source.chat_template()
        _note_unusable_template(chat_template, src, log)
        metadata = build_metadata(config, linears, tokenizer, chat_template, source.generation_defaults(),
                                  {"converter": f"pyllm {__version__}", "source": os.path.abspath(src),
                                   "quant": quant or "source", "group_size": group,
                                   **({"quantizer": strategy.record} if strategy.record else {}),
                                   **({"lora": [os.path.abspath(d) for d in lora]} if lora else {})})
        if adapter_metadata:
            metadata[ADAPTERS_METADATA_KEY] = json.dumps(adapter_metadata)
        bar = progress_bar(len(plans), "writing", "tensor", progress, log)
        writing = time.perf_counter()
        report.file_size = write_atomic(output, metadata, plans, on_tensor=lambda p, v: bar.update(1))
        bar.close()
        report.phases = {**strategy.seconds, "writing": time.perf_counter() - writing}
    finally:
        source.close()
    report.source_bytes = source_size(src, lora, getattr(source, "files", None))
    linear_bits = [b for b in weights_bits if b[2] != "model.embed_tokens" and b[2] != "lm_head"]
    report.bits_per_weight = sum(b[0] for b in linear_bits) / max(1, sum(b[1] for b in linear_bits))
    report.seconds = time.perf_counter() - started
    return report


def check_tokenizer_fits(spec: TokenizerSpec, blob: bytes, config: ModelConfig, src: str) -> None:
    """FormatError when the tokenizer cannot be read or has ids past the embedding's rows: such a file
    was written, then refused by every load (pyllm.LLM checks the same); or when a special token id
    (BOS, an end of generation) is not a token of the model, which would never be added or never end
    a reply."""
    from ..tokenizer import Tokenizer

    try:
        size = Tokenizer(spec, blob).vocab_size
    except FormatError as e:  # a normalizer that lengthens text without bound, an added token renumbered
        raise FormatError(f"{src}: {e}; nothing was written") from None
    if size > config.vocab_size:
        raise FormatError(f"{src}: the tokenizer has {size} tokens but the model's embeddings only "
                          f"{config.vocab_size}; nothing was written")
    try:
        spec.validate()
        spec.check_ids(config.vocab_size)
    except FormatError as e:
        raise FormatError(f"{src}: {e}; nothing was written") from None


def source_size(src: str, lora=(), files: list[str] | None = None) -> int:
    """Bytes of the source's weight files: a GGUF file (files: the shards of a split one, as read), or a
    directory's *.safetensors / *.bin / *.pt files (LoRA adapter directories' included)."""
    total = sum(os.path.getsize(p) for p in files) if files else 0
    for path in (src, *lora):
        if files and path == src:
            continue
        if os.path.isfile(path):
            total += os.path.getsize(path)
            continue
        for name in os.listdir(path):
            if name.endswith((".safetensors", ".bin", ".pt")):
                total += os.path.getsize(os.path.join(path, name))
    return total


def _prompt_adapters(adapters, config: ModelConfig, source, plans: list, scales: dict | None = None,
                     log=sys.stderr) -> dict:
    """Reads the prompt-learning adapters (name or None, directory), appends their tensors to plans and
    returns their metadata entry (empty without adapters). scales: the activation-aware scales folded
    into the model (awq.py), which a prefix's values take as v_proj's rows do. log: where the warning
    for an adapter of another base goes."""
    from ..adapters import planned_tensors, read_peft_adapter
    from .awq import fold_into_prefix

    if not adapters:
        return {}
    read = [read_peft_adapter(directory, config, name, src_name(source), log) for name, directory in adapters]
    for adapter in read:
        if adapter.kind == "prefix" and scales:
            adapter.tensor = fold_into_prefix(adapter.tensor, config, scales)
    metadata, tensors = planned_tensors(read)
    plans += tensors
    return metadata


def write_float_model(source, config: ModelConfig, output: str, progress: bool = False, log=sys.stderr) -> int:
    """The source's weights in float32 as a .pllm file (what calibration runs through the engine);
    source: under pyllm's tensor names. Returns the file's size."""
    report = ConversionReport(os.path.abspath(output), 0, "f32", 0)
    plans, linears, _ = _plan(source, config, "f32", 0, report)
    tokenizer, tokenizer_blob = source.tokenizer()
    blob = np.frombuffer(tokenizer_blob, dtype=np.uint8)
    plans.append(PlannedTensor("tokenizer.json" if tokenizer.kind == "hf" else "tokenizer.model", "U8",
                               (len(tokenizer_blob),), lambda: blob))
    metadata = build_metadata(config, linears, tokenizer, "", {}, {"converter": f"pyllm {__version__}",
                                                                    "purpose": "calibration"})
    bar = progress_bar(len(plans), "float32 copy for calibration", "tensor", progress, log)
    size = write_atomic(output, metadata, plans, on_tensor=lambda p, v: bar.update(1))
    bar.close()
    return size


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
        # the source's own codes in a layout that is not bit for bit theirs (GGUF Q4_K), as native ones are
        # kept: by default, or when asked for that layout (--quant int4_asym, group 32)
        codes = (not keep and f in QUANT_FORMATS
                 and getattr(source, "codes_format", lambda n: None)(name) == (f, g))
        plans += _plan_linear(base, f, g, rows, cols, lambda n=name: source.load(n), report, weights_bits,
                              native=(lambda n=name: source.load_native(n)) if keep else None, strategy=strategy,
                              label=where(source, name), codes=(lambda n=name: source.load_codes(n)) if codes else None)
    for name, shape in config.vector_shapes().items():
        if not source.has(name):
            raise FormatError(f"{src_name(source)}: lacks '{name}'")
        plans.append(PlannedTensor(name, "F32", shape, lambda n=name, s=shape: _vector(source, n, s)))
    return plans, linears, weights_bits


def _vector(source, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A norm, bias or table tensor of the source as f32 `shape`, checked."""
    value = np.asarray(source.load(name), dtype=np.float32)
    if value.shape != tuple(shape):  # (a norm of [1, 64] for [64] was reshaped in silence; transformers refuses it)
        raise FormatError(f"{where(source, name)} has shape {list(value.shape)}, the config implies {list(shape)}")
    return np.ascontiguousarray(value)


def src_name(source) -> str:
    return getattr(source, "dir", None) or getattr(source, "path", "source")


def where(source, name: str) -> str:
    """The file and source tensor of `name` for a message ("…/model-00001-of-00002.safetensors: tensor
    'model.layers.0.mlp.up_proj.weight'"): source.where(name), else the source's directory or file."""
    locate = getattr(source, "where", None)
    return locate(name) if locate is not None else f"{src_name(source)}: tensor '{name}'"


def _note_unusable_template(chat_template: str, src: str, log) -> None:
    """Says so when the source's chat template cannot be used (past the size bound, not valid Jinja):
    the file keeps it, and chats with the file are refused naming it, so the conversion says it first."""
    from ..chat_template import TemplateError, check_chat_template

    if not chat_template:
        return
    try:
        check_chat_template(chat_template)
    except TemplateError as e:
        print(f"{src}: its chat template cannot be used ({e}); chats with the converted file need "
              "another (--chat-template: a built-in name, a Jinja file or Jinja source)", file=log)


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



