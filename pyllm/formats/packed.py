"""pyllm's packed model file (.pllm): one safetensors file holding everything a model needs.

See docs/FORMAT.md. Metadata keys (all strings, JSON where noted):
  format                  "pyllm"
  pyllm.format_version    "1"
  pyllm.config            JSON: the normalised architecture config (ModelConfig below)
  pyllm.linears           JSON: {weight base name: [format, group_size]}
  pyllm.tokenizer         JSON: TokenizerSpec (kind, special tokens, add_bos/add_eos)
  pyllm.chat_template     Jinja chat template ("" when the model has none)
  pyllm.generation        JSON: generation defaults (temperature, top_p, ...)
  pyllm.source            JSON: provenance (converter, source path, quantization; for int8/int4 "quantizer":
                          method, bits_budget, GPTQ damping, calibration and its windows per domain)
  pyllm.checksums         JSON: {tensor name: CRC-32 of its bytes, 8 hex digits} (verify())
  pyllm.header_checksum   CRC-32 of the rest of the header as canonical JSON (verify())
Tensors: Hugging Face names ("model.layers.0.self_attn.q_proj.weight"), with
".scales" / ".mins" beside quantized weights, and the tokenizer files as U8
blobs ("tokenizer.json" or "tokenizer.model").
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import asdict, dataclass, field

from ..quant import BLOCK, FORMATS, QUANT_FORMATS, packed_shapes
from ..sampling import MIN_REPETITION_PENALTY
from .safetensors import FormatError, SafetensorsFile, loads_json, verify_checksums

FORMAT_NAME = "pyllm"
FORMAT_VERSION = 2  # 2: the block description (architectures beyond LLaMA); 1 still opens
READABLE_VERSIONS = ("1", "2")
TOKENIZER_BLOBS = ("tokenizer.json", "tokenizer.model")
MAX_GROUP_SIZE = 1 << 20
# Upper bounds of a model's sizes, whatever asks for them (a .pllm file, config.json, GGUF metadata):
# released models stay far below (vocabularies of 262k, 126 layers, hidden 16384, FFN 53248), and a
# size past them is refused by name before anything loops over it or allocates for it (a GGUF file
# claiming 4,143,972,353 layers once held the converter for minutes building its tensor table).
SIZE_LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 20,
               "num_hidden_layers": 1 << 10, "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12,
               "head_dim": 1 << 12, "max_position_embeddings": 1 << 26}
# the engines compute in float32: a config number past its range (or below its smallest normal value) is
# not the number the file gives (norm_eps 1e39 became infinity and every logit 0; embedding_scale 1e-300, 0)
F32_MAX = 3.4028234663852886e38
F32_MIN_NORMAL = 1.1754943508222875e-38
GENERATION_NUMBERS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "max_new_tokens")


NORM_TYPES = ("rms_norm", "layer_norm")
POSITION_EMBEDDINGS = ("rope", "alibi", "learned")
FFN_TYPES = ("gated", "plain")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu", "relu")  # transformers' hidden_act names
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class ModelConfig:
    """A decoder-only transformer, normalised from a Hugging Face config by its architecture's entry in
    pyllm/arch: sizes, and the block description both engines read (docs/FORMAT.md, "config").

    The defaults describe the LLaMA block: pre-norm RMSNorm, rotate-half RoPE over the whole head,
    causal attention scaled by 1/sqrt(head_dim), gated SiLU feed-forward, no biases."""

    architecture: str  # a name in pyllm.arch.ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    norm_eps: float  # of every norm (RMSNorm or LayerNorm)
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    max_position_embeddings: int  # learned positions: the rows of the position table
    attention_bias: bool = False  # q/k/v projections
    attention_out_bias: bool = False  # o_proj
    mlp_bias: bool = False
    norm_type: str = "rms_norm"  # NORM_TYPES; layer_norm has weights and biases
    embedding_norm: bool = False  # a norm right after the embedding (BLOOM)
    embedding_scale: float = 1.0  # embeddings multiplied by it (Gemma: sqrt(hidden_size))
    position_embedding: str = "rope"  # POSITION_EMBEDDINGS
    rotary_dim: int | None = None  # RoPE on the first rotary_dim dims of each head (None: all)
    rope_theta_local: float | None = None  # sliding-window layers' theta, no scaling (Gemma 3)
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3, Gemma 3)
    post_norms: bool = False  # norms of the attention and feed-forward outputs (Gemma 2/3, GLM-4)
    ffn_type: str = "gated"  # FFN_TYPES: act(gate) * up, or act(up)
    hidden_act: str = "silu"  # ACTIVATIONS
    attention_scale: float | None = None  # None: 1/sqrt(head_dim) (Gemma: query_pre_attn_scalar ** -0.5)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None  # keys a sliding-window layer's query sees
    layer_types: list[str] | None = None  # LAYER_TYPES per layer; None: every layer sliding when sliding_window

    @classmethod
    def from_file(cls, values: dict, version: int) -> "ModelConfig":
        """The config as a .pllm file of `version` stores it (version 1: LLaMA only, rms_norm_eps).
        Raises TypeError for missing or unknown keys."""
        if version == 1:
            values = dict(values)
            if "rms_norm_eps" in values:
                values["norm_eps"] = values.pop("rms_norm_eps")
            values.setdefault("attention_out_bias", values.get("attention_bias", False))
        return cls(**values)

    def validate(self) -> None:
        for name in SIZE_LIMITS:
            checked_size(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise FormatError("model config: num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise FormatError("model config: head_dim must be even")
        in_range = f"(float32's range, {F32_MIN_NORMAL:.4g} to {F32_MAX:.4g})"
        for name in ("norm_eps", "rope_theta", "embedding_scale"):
            value = getattr(self, name)
            if not _is_f32_positive(value):
                raise FormatError(f"model config: {name} must be a positive finite number {in_range}, got {value!r}")
        for name in ("rope_theta_local", "attention_scale", "attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and not _is_f32_positive(value):
                raise FormatError(f"model config: {name} must be null or a positive finite number {in_range}, got "
                                  f"{value!r}")
        if not isinstance(self.architecture, str):
            raise FormatError(f"model config: architecture must be a string, got {self.architecture!r}")
        from ..arch import ARCHITECTURES  # the registry imports this module

        if self.architecture not in ARCHITECTURES:
            raise FormatError(f"model config: unknown architecture {self.architecture!r} (this pyllm runs "
                              f"{', '.join(ARCHITECTURES)})")
        for name in ("tie_word_embeddings", "attention_bias", "attention_out_bias", "mlp_bias", "embedding_norm",
                     "qk_norm", "post_norms"):
            if not isinstance(getattr(self, name), bool):
                raise FormatError(f"model config: {name} must be true or false, got {getattr(self, name)!r}")
        for name, choices in (("norm_type", NORM_TYPES), ("position_embedding", POSITION_EMBEDDINGS),
                              ("ffn_type", FFN_TYPES), ("hidden_act", ACTIVATIONS)):
            if getattr(self, name) not in choices:
                raise FormatError(f"model config: {name} must be one of {', '.join(choices)}, got "
                                  f"{getattr(self, name)!r}")
        if self.rotary_dim is not None and not (_is_int(self.rotary_dim) and 0 < self.rotary_dim <= self.head_dim
                                                and self.rotary_dim % 2 == 0):
            raise FormatError(f"model config: rotary_dim must be an even number in 2..head_dim, got {self.rotary_dim!r}")
        if self.sliding_window is not None and not (_is_int(self.sliding_window) and 0 < self.sliding_window < 2**63):
            raise FormatError(f"model config: sliding_window must be null or a positive 64-bit integer, got "
                              f"{self.sliding_window!r}")
        if self.layer_types is not None and not (
                isinstance(self.layer_types, list) and len(self.layer_types) == self.num_hidden_layers
                and all(t in LAYER_TYPES for t in self.layer_types)):
            raise FormatError(f"model config: layer_types must list one of {', '.join(LAYER_TYPES)} per layer")
        if self.rope_scaling is not None:
            # the keys the engine reads must have the right types; others are carried along
            numbers = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            ok = isinstance(self.rope_scaling, dict) and all(
                isinstance(v, str) if k in ("type", "rope_type") else _is_real(v) and abs(v) <= F32_MAX
                for k, v in self.rope_scaling.items() if k in ("type", "rope_type") + numbers
            )
            if not ok:
                raise FormatError(
                    f"model config: rope_scaling must be null or an object whose type is a string and whose "
                    f"{', '.join(numbers)} are finite numbers within float32's range, got {self.rope_scaling!r}"
                )
            # what the engine refuses when it loads the file (rope_inv_freq), refused when the file is written
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            # the keys transformers reads without a default (its rope initialisers raise KeyError)
            needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                      "original_max_position_embeddings")}.get(kind, ())
            absent = [key for key in needed if self.rope_scaling.get(key) is None]
            if absent:
                raise FormatError(f"model config: {kind} rope_scaling needs {', '.join(absent)}, got {self.rope_scaling!r}")
            if kind != "default" and not _is_f32_positive(self.rope_scaling.get("factor", 1.0)):
                raise FormatError(f"model config: rope_scaling factor must be positive {in_range}, got "
                                  f"{self.rope_scaling.get('factor')!r}")
            if kind == "llama3":
                low = self.rope_scaling["low_freq_factor"]
                high = self.rope_scaling["high_freq_factor"]
                old_len = self.rope_scaling["original_max_position_embeddings"]
                if not (_is_f32_positive(low) and high > low and _is_f32_positive(old_len)):
                    raise FormatError(f"model config: llama3 rope_scaling needs 0 < low_freq_factor < "
                                      f"high_freq_factor and a positive original_max_position_embeddings, got "
                                      f"{self.rope_scaling!r}")

    def sliding_windows(self) -> list[int]:
        """Per layer, the keys a query sees (0: all)."""
        if self.sliding_window is None:
            return [0] * self.num_hidden_layers
        types = self.layer_types or ["sliding_attention"] * self.num_hidden_layers
        return [self.sliding_window if t == "sliding_attention" else 0 for t in types]

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """[rows, cols] of every matrix the engine multiplies by (and the embedding table), by base name."""
        d, f = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        shapes = {"model.embed_tokens": (self.vocab_size, d)}
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes.update({p + "self_attn.q_proj": (q, d), p + "self_attn.k_proj": (kv, d),
                           p + "self_attn.v_proj": (kv, d), p + "self_attn.o_proj": (d, q)})
            if self.ffn_type == "gated":
                shapes[p + "mlp.gate_proj"] = (f, d)
            shapes.update({p + "mlp.up_proj": (f, d), p + "mlp.down_proj": (d, f)})
        if not self.tie_word_embeddings:
            shapes["lm_head"] = (self.vocab_size, d)
        return shapes

    def bias_names(self) -> list[str]:
        """The linear layers' bias vectors the block has (f32 [rows])."""
        names = []
        for base in self.linear_shapes():
            short = base.rsplit(".", 1)[-1]
            if ((self.attention_bias and short in ("q_proj", "k_proj", "v_proj"))
                    or (self.attention_out_bias and short == "o_proj")
                    or (self.mlp_bias and ".mlp." in base)):
                names.append(base + ".bias")
        return names

    def norm_names(self) -> list[str]:
        """Every norm's weight (and bias, for LayerNorm) vector, f32 [hidden_size]."""
        norms = ["model.embed_norm"] if self.embedding_norm else []
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            norms += [p + "input_layernorm", p + "post_attention_layernorm"]
            if self.post_norms:
                norms += [p + "attn_post_norm", p + "ffn_post_norm"]
        norms.append("model.norm")
        parts = ("weight", "bias") if self.norm_type == "layer_norm" else ("weight",)
        return [f"{n}.{part}" for n in norms for part in parts]

    def vector_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every f32 tensor besides the matrices: norms, biases, q/k norms, the position table."""
        shapes: dict[str, tuple[int, ...]] = {n: (self.hidden_size,) for n in self.norm_names()}
        rows = self.linear_shapes()
        shapes.update({n: (rows[n[:-len(".bias")]][0],) for n in self.bias_names()})
        if self.qk_norm:
            for i in range(self.num_hidden_layers):
                for which in ("q_norm", "k_norm"):
                    shapes[f"model.layers.{i}.self_attn.{which}.weight"] = (self.head_dim,)
        if self.position_embedding == "learned":
            shapes["model.embed_positions.weight"] = (self.max_position_embeddings, self.hidden_size)
        return shapes

    def engine_config(self) -> dict:
        """The description as the C++ engines read it (csrc/python/common.h parse_model)."""
        values = asdict(self)
        values.update(
            embedding_norm=int(self.embedding_norm), qk_norm=int(self.qk_norm), post_norms=int(self.post_norms),
            rotary_dim=self.rotary_dim or self.head_dim, rope_theta_local=self.rope_theta_local or 0.0,
            attention_scale=self.attention_scale or 0.0,
            attn_logit_softcapping=self.attn_logit_softcapping or 0.0,
            final_logit_softcapping=self.final_logit_softcapping or 0.0,
            sliding_window_per_layer=self.sliding_windows(),
        )
        return values


def checked_size(name: str, value, where: str = "model config") -> int:
    """value (an integer, numpy's included) as a size in 1..SIZE_LIMITS[name].
    Raises FormatError naming `where` and the key otherwise."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 0 < int(value) <= SIZE_LIMITS[name]:
        raise FormatError(f"{where}: {name} must be an integer in 1..{SIZE_LIMITS[name]}, got {value!r}")
    return int(value)


def check_generation_defaults(values: dict, where: str) -> None:
    """FormatError naming `where` and the key for a generation default that generate() would refuse
    each time it uses it (top_p 2, repetition_penalty 0, a NaN, "hot") or would change (max_new_tokens
    2.5 truncated), as converting and loading a file both check."""
    for key, value in values.items():
        if key == "do_sample":
            ok, want = isinstance(value, bool), "true or false"
        elif key not in GENERATION_NUMBERS:
            continue
        elif not _is_finite(value):
            ok, want = False, "a finite number"
        elif key in ("top_k", "max_new_tokens"):
            ok, want = value >= 0 and value == int(value), "an integer >= 0"
        elif key in ("top_p", "min_p"):
            ok, want = 0 <= value <= 1, "a number in [0, 1]"
        elif key == "typical_p":
            ok, want = 0 < value <= 1, "a number in (0, 1]"
        elif key == "repetition_penalty":  # (a smaller one overflows the scores: sampling.MIN_REPETITION_PENALTY)
            ok, want = value >= MIN_REPETITION_PENALTY, f"a number > 0 (at least {MIN_REPETITION_PENALTY:g})"
        else:  # temperature
            ok, want = value >= 0, "a number >= 0"
        if not ok:
            raise FormatError(f"{where}: generation default {key!r} has an invalid value {value!r:.80} "
                              f"(expected {want})")


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    """value is a real number that a float holds (an int of 400 digits is not)."""
    try:
        return _is_real(value) and math.isfinite(value)
    except OverflowError:
        return False


def _is_f32_positive(value) -> bool:
    """value is a real number that float32 holds as a positive normal number."""
    return _is_real(value) and F32_MIN_NORMAL <= value <= F32_MAX


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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

    def validate(self) -> None:
        def bad(what: str) -> FormatError:
            return FormatError(f"tokenizer spec: {what}")

        if self.kind not in ("hf", "sentencepiece"):
            raise bad(f"unknown kind {self.kind!r} (expected 'hf' or 'sentencepiece')")
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if not (getattr(self, name) is None or isinstance(getattr(self, name), str)):
                raise bad(f"{name} must be a string or null, got {getattr(self, name)!r}")
        if not (self.bos_token_id is None or (_is_int(self.bos_token_id) and self.bos_token_id >= 0)):
            raise bad(f"bos_token_id must be a token id or null, got {self.bos_token_id!r}")
        if not isinstance(self.eos_token_ids, list) or not all(_is_int(i) and i >= 0 for i in self.eos_token_ids):
            raise bad(f"eos_token_ids must be a list of token ids, got {self.eos_token_ids!r:.80}")
        if not (isinstance(self.add_bos_token, bool) and isinstance(self.add_eos_token, bool)):
            raise bad("add_bos_token and add_eos_token must be true or false")
        if not isinstance(self.added_tokens, dict) or not all(
            isinstance(k, str) and _is_int(v) and 0 <= v < 2**31 for k, v in self.added_tokens.items()
        ):
            raise bad("added_tokens must map token strings to token ids")

    def check_ids(self, vocab_size: int) -> None:
        """FormatError for a BOS or end-of-generation id that is not one of the model's vocab_size tokens:
        a BOS past it made every generate() refuse its own prompt ("token ids must lie in ..."), an end
        past it could never end a reply."""
        named = [("bos_token_id", self.bos_token_id)] + [("eos_token_ids", i) for i in self.eos_token_ids]
        for name, i in named:
            if i is not None and i >= vocab_size:
                raise FormatError(f"tokenizer spec: {name} {i} is not a token of the model (its vocabulary has "
                                  f"{vocab_size})")


# a layer's tensors in a .pllm file (pyllm's names, the converter's for every family)
_LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.")


class PackedModel:
    """An opened, fully validated .pllm file (the tensors stay memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        self.file = SafetensorsFile(path)
        self.path = self.file.path
        meta = self.file.metadata
        if meta.get("format") != FORMAT_NAME:
            raise FormatError(f"{self.path}: not a pyllm model file (metadata 'format' is {meta.get('format')!r})")
        version = meta.get("pyllm.format_version")
        if version not in READABLE_VERSIONS:
            # a later version is a newer pyllm's file: upgrading reads it (the message said only to convert again)
            newer = isinstance(version, str) and version.isascii() and version.isdigit() and int(version) > FORMAT_VERSION
            raise FormatError(
                f"{self.path}: format version {version!r} is not supported by this pyllm (reads versions "
                f"{', '.join(READABLE_VERSIONS)}); " + ("it was written by a newer pyllm: upgrade pyllm, or " if newer
                                                        else "") + "convert the model again with this version"
            )
        self.format_version = int(version)

        def obj(key: str, default: str | None = None) -> dict:
            if key not in meta and default is None:
                raise FormatError(f"{self.path}: metadata lacks '{key}'")
            value = loads_json(meta.get(key, default), f"{self.path}: metadata '{key}'")
            if not isinstance(value, dict):
                raise FormatError(f"{self.path}: metadata '{key}' must be a JSON object, got {type(value).__name__}")
            return value

        config = obj("pyllm.config")
        linears = obj("pyllm.linears")
        tokenizer = obj("pyllm.tokenizer")
        self.generation: dict = obj("pyllm.generation", "{}")
        self.source: dict = obj("pyllm.source", "{}")
        check_generation_defaults(self.generation, self.path)
        try:
            self.config = ModelConfig.from_file(config, self.format_version)
            self.tokenizer = TokenizerSpec(**tokenizer)
        except TypeError as e:  # missing or unknown keys
            raise FormatError(f"{self.path}: invalid pyllm metadata ({e})") from None
        try:
            self.config.validate()
            self.tokenizer.validate()
            self.tokenizer.check_ids(self.config.vocab_size)
        except FormatError as e:
            raise FormatError(f"{self.path}: {e}") from None
        self.linears: dict[str, tuple[str, int]] = {}
        for base, spec in linears.items():
            if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str) and _is_int(spec[1])):
                raise FormatError(f"{self.path}: linear entry for '{base}' must be [format, group_size], got {spec!r}")
            fmt, group = spec
            if fmt not in FORMATS:
                raise FormatError(f"{self.path}: '{base}' has unknown format {fmt!r} (known: {', '.join(FORMATS)})")
            if fmt in QUANT_FORMATS and not (0 < group <= MAX_GROUP_SIZE and group % BLOCK == 0):
                raise FormatError(f"{self.path}: '{base}' has invalid group size {group} (a positive multiple of {BLOCK})")
            if fmt not in QUANT_FORMATS and not 0 <= group <= MAX_GROUP_SIZE:
                raise FormatError(f"{self.path}: '{base}' has invalid group size {group}")
            self.linears[base] = (fmt, group)
        self.chat_template: str = meta.get("pyllm.chat_template", "")
        self._check_tensors()
        from ..adapters import load_from_file  # the adapters module imports this one

        self.adapters = load_from_file(meta, self.file.tensors, self.file.array, self.config, self.path)

    def _check_tensors(self) -> None:
        """Every tensor the engine will use exists with the dtype and shape its format implies, and every
        tensor but the padding, the tokenizer blob and the adapters is one of them."""
        t = self.file.tensors
        used: set[str] = set()
        # each layer has at least 8 tensors: bound the layer count before building per-layer tables
        if self.config.num_hidden_layers * 8 > len(t):
            raise FormatError(
                f"{self.path}: the config declares {self.config.num_hidden_layers} layers but the file holds only "
                f"{len(t)} tensors (truncated or mismatched config?)"
            )

        def expect(name: str, dtype: str, shape: tuple[int, ...]) -> None:
            if name not in t:
                raise FormatError(f"{self.path}: missing tensor '{name}'")
            if t[name].dtype != dtype or t[name].shape != shape:
                raise FormatError(
                    f"{self.path}: tensor '{name}' is {t[name].dtype} {list(t[name].shape)}, expected {dtype} {list(shape)}"
                )
            used.add(name)

        for base, (rows, cols) in self.config.linear_shapes().items():
            if base not in self.linears:
                raise FormatError(f"{self.path}: no format recorded for '{base}'")
            fmt, group = self.linears[base]
            for part, (dtype, shape) in packed_shapes(fmt, rows, cols, group).items():
                expect(f"{base}.{part}", dtype, shape)
        for name, shape in self.config.vector_shapes().items():
            expect(name, "F32", shape)
        # tensors of layers past the declared count: a config edited (or mismatched) to fewer layers
        # loaded and ran the first ones, the rest ignored
        layers = self.config.num_hidden_layers
        extra = sorted({int(m.group(1)) for name in t if (m := _LAYER_TENSOR.match(name)) and int(m.group(1)) >= layers})
        if extra:
            raise FormatError(f"{self.path}: the config declares {layers} layers but the file also holds tensors of "
                              f"layer {extra[0]}{' and more' if len(extra) > 1 else ''} (a mismatched config?)")
        blob = "tokenizer.json" if self.tokenizer.kind == "hf" else "tokenizer.model"
        if self.tokenizer.kind not in ("hf", "sentencepiece") or blob not in t or t[blob].dtype != "U8":
            raise FormatError(f"{self.path}: tokenizer of kind {self.tokenizer.kind!r} lacks its '{blob}' blob")
        # a tensor the model does not use: its config or a matrix's format edited to leave a part out
        # (attention_bias or qk_norm false, tie_word_embeddings true beside an lm_head, int4_asym read as
        # int4_sym beside its mins) loaded and ran without it, answering garbage
        unused = [n for n in t
                  if n not in used and n not in TOKENIZER_BLOBS and not n.startswith(("__pad__", "adapter."))]
        if unused:
            more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
            raise FormatError(f"{self.path}: tensor '{unused[0]}'{more} is no part of the model its config and "
                              f"linear formats describe (an edited config?)")

    def verify(self) -> int:
        """Checks every tensor's bytes against the file's checksums; returns the bytes checked.
        FormatError names the tensors that differ (or says the file has no checksums)."""
        return verify_checksums(self.file)

    def tokenizer_blob(self) -> bytes:
        return self.file.bytes("tokenizer.json" if self.tokenizer.kind == "hf" else "tokenizer.model")

    def engine_tensors(self) -> dict[str, tuple[str, list[int], int, int]]:
        """The tensor table the C++ engine re-checks: name -> (dtype, shape, begin, end)."""
        return {n: (i.dtype, list(i.shape), i.begin, i.end) for n, i in self.file.tensors.items()
                if not n.startswith(("__pad__", "adapter.")) and n not in TOKENIZER_BLOBS}

    def engine_config(self) -> dict:
        return self.config.engine_config()

    @property
    def file_size(self) -> int:
        return self.file.file_size

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
