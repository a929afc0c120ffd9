"""pyllm's packed model file (.pllm): one safetensors file holding everything a model needs.

See docs/FORMAT.md. Metadata keys (all strings, JSON where noted):
  format                  "pyllm"
  pyllm.format_version    "1"
  pyllm.config            JSON: the normalised architecture config (ModelConfig below)
  pyllm.linears           JSON: {weight base name: [format, group_size]}
  pyllm.tokenizer         JSON: TokenizerSpec (kind, special tokens, add_bos/add_eos)
  pyllm.chat_template     Jinja chat template ("" when the model has none)
  pyllm.generation        JSON: generation defaults (temperature, top_p, ...)
  pyllm.source            JSON: provenance (converter, source path, quantization)
Tensors: Hugging Face names ("model.layers.0.self_attn.q_proj.weight"), with
".scales" / ".mins" beside quantized weights, and the tokenizer files as U8
blobs ("tokenizer.json" or "tokenizer.model").
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from ..quant import FORMATS, packed_shapes
from .safetensors import FormatError, SafetensorsFile

FORMAT_NAME = "pyllm"
FORMAT_VERSION = 1
TOKENIZER_BLOBS = ("tokenizer.json", "tokenizer.model")


@dataclass
class ModelConfig:
    """LLaMA-family architecture, normalised from a Hugging Face config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention_bias: bool = False
    mlp_bias: bool = False

    def validate(self) -> None:
        ints = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise FormatError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise FormatError("model config: num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise FormatError("model config: head_dim must be even")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise FormatError("model config: rms_norm_eps and rope_theta must be positive")

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """[rows, cols] of every matrix the engine multiplies by, by base name."""
        d, f = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        shapes = {"model.embed_tokens": (self.vocab_size, d)}
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "self_attn.q_proj": (q, d), p + "self_attn.k_proj": (kv, d), p + "self_attn.v_proj": (kv, d),
                p + "self_attn.o_proj": (d, q), p + "mlp.gate_proj": (f, d), p + "mlp.up_proj": (f, d),
                p + "mlp.down_proj": (d, f),
            })
        if not self.tie_word_embeddings:
            shapes["lm_head"] = (self.vocab_size, d)
        return shapes

    def norm_names(self) -> list[str]:
        names = []
        for i in range(self.num_hidden_layers):
            names += [f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"]
        return names + ["model.norm.weight"]


@dataclass
class TokenizerSpec:
    kind: str  # "hf" (tokenizer.json) or "sentencepiece" (tokenizer.model)
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)  # every id that ends generation
    add_bos_token: bool = False
    add_eos_token: bool = False
    added_tokens: dict[str, int] = field(default_factory=dict)  # special/added tokens outside the base vocab (spm)


class PackedModel:
    """An opened, fully validated .pllm file (the tensors stay memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        self.file = SafetensorsFile(path)
        self.path = self.file.path
        meta = self.file.metadata
        if meta.get("format") != FORMAT_NAME:
            raise FormatError(f"{self.path}: not a pyllm model file (metadata 'format' is {meta.get('format')!r})")
        version = meta.get("pyllm.format_version")
        if version != str(FORMAT_VERSION):
            raise FormatError(
                f"{self.path}: format version {version!r} is not supported by this pyllm (reads version "
                f"{FORMAT_VERSION}); convert the model again with this version"
            )
        try:
            config = json.loads(meta["pyllm.config"])
            self.linears: dict[str, tuple[str, int]] = {k: (v[0], int(v[1])) for k, v in json.loads(meta["pyllm.linears"]).items()}
            self.tokenizer = TokenizerSpec(**json.loads(meta["pyllm.tokenizer"]))
            self.generation: dict = json.loads(meta.get("pyllm.generation", "{}"))
            self.source: dict = json.loads(meta.get("pyllm.source", "{}"))
            self.config = ModelConfig(**config)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise FormatError(f"{self.path}: invalid pyllm metadata ({type(e).__name__}: {e})") from None
        self.chat_template: str = meta.get("pyllm.chat_template", "")
        self.config.validate()
        self._check_tensors()

    def _check_tensors(self) -> None:
        """Every tensor the engine will use exists with the dtype and shape its format implies."""
        t = self.file.tensors

        def expect(name: str, dtype: str, shape: tuple[int, ...]) -> None:
            if name not in t:
                raise FormatError(f"{self.path}: missing tensor '{name}'")
            if t[name].dtype != dtype or t[name].shape != shape:
                raise FormatError(
                    f"{self.path}: tensor '{name}' is {t[name].dtype} {list(t[name].shape)}, expected {dtype} {list(shape)}"
                )

        for base, (rows, cols) in self.config.linear_shapes().items():
            if base not in self.linears:
                raise FormatError(f"{self.path}: no format recorded for '{base}'")
            fmt, group = self.linears[base]
            if fmt not in FORMATS:
                raise FormatError(f"{self.path}: '{base}' has unknown format {fmt!r}")
            if fmt.startswith("int") and (group <= 0 or group % 32):
                raise FormatError(f"{self.path}: '{base}' has invalid group size {group}")
            for part, (dtype, shape) in packed_shapes(fmt, rows, cols, group).items():
                expect(f"{base}.{part}", dtype, shape)
        for name in self.config.norm_names():
            expect(name, "F32", (self.config.hidden_size,))
        blob = "tokenizer.json" if self.tokenizer.kind == "hf" else "tokenizer.model"
        if self.tokenizer.kind not in ("hf", "sentencepiece") or blob not in t or t[blob].dtype != "U8":
            raise FormatError(f"{self.path}: tokenizer of kind {self.tokenizer.kind!r} lacks its '{blob}' blob")

    def tokenizer_blob(self) -> bytes:
        return self.file.bytes("tokenizer.json" if self.tokenizer.kind == "hf" else "tokenizer.model")

    def engine_tensors(self) -> dict[str, tuple[str, list[int], int, int]]:
        """The tensor table the C++ engine re-checks: name -> (dtype, shape, begin, end)."""
        return {n: (i.dtype, list(i.shape), i.begin, i.end) for n, i in self.file.tensors.items()
                if not n.startswith("__pad__") and n not in TOKENIZER_BLOBS}

    def engine_config(self) -> dict:
        return asdict(self.config)

    @property
    def file_size(self) -> int:
        return self.file.file_size

    def close(self) -> None:
        self.file.close()
