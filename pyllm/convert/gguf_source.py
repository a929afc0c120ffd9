"""Reading llama-architecture GGUF files (llama.cpp's format) as a conversion source.

Tensors are read with the `gguf` package (llama.cpp's own reader). Block formats that
pyllm stores without loss at group size 32 are kept exactly:
  Q8_0 (fp16 d, 32 x int8)        -> int8       value = q * d
  Q4_0 (fp16 d, 16 bytes nibbles) -> int4_sym   value = (q - 8) * d
  Q4_1 (fp16 d, fp16 m, 16 bytes) -> int4_asym  value = q * d + m
(the nibble order inside a block, value j low and j + 16 high, is the same as pyllm's).
llama.cpp's converter permutes the rows of q/k for its interleaved RoPE; the inverse
permutation is applied here (to raw block rows, which keeps it lossless), so the
model uses Hugging Face's rotate-half RoPE like every other pyllm file.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..formats.packed import ModelConfig, TokenizerSpec
from ..formats.safetensors import FormatError
from ..quant import BLOCK, PackedWeight, bf16_bits_to_f32, dequantize

# GGUF tensor name -> Hugging Face name ("{i}" is the layer)
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}

# GGUF block type name -> (pyllm format, bytes of one 32-value block)
_LOSSLESS = {"Q8_0": ("int8", 34), "Q4_0": ("int4_sym", 18), "Q4_1": ("int4_asym", 20)}
_FLOAT = {"F32": ("f32", 0), "F16": ("f16", 0), "BF16": ("bf16", 0)}
# Block types pyllm has no layout for, re-quantized (with the default, source-format conversion) to
# the nearest pyllm layout that loses none of the source's precision: 5 to 8 bits -> int8, up to
# 4.5 bits -> int4_asym (the k-quants and i-quants carry mins or non-uniform grids).
_WIDE_BLOCKS = ("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_1", "Q8_K")
_NARROW_BLOCKS = ("Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS",
                  "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0")


def requantized_format(kind: str) -> tuple[str, int, str] | None:
    """(pyllm format, group size, why) for a GGUF block type pyllm stores by re-quantizing, else None."""
    if kind in _WIDE_BLOCKS:
        return "int8", BLOCK, "pyllm has no 5-6 bit layout; int8 keeps all of its precision"
    if kind in _NARROW_BLOCKS:
        return "int4_asym", BLOCK, "pyllm has no layout for it; int4_asym group 32 is the nearest at least as fine"
    return None


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation; acts on the first axis (rows), any trailing shape."""
    n = rows.shape[0]
    if n % (2 * n_head):
        raise FormatError(f"cannot undo the q/k permutation: {n} rows for {n_head} heads")
    return np.ascontiguousarray(
        rows.reshape(n_head, n // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape))


class GGUFSource:
    """A .gguf file seen as a checkpoint with Hugging Face tensor names."""

    def __init__(self, path: str | os.PathLike):
        try:
            from gguf import GGUFReader
        except ImportError:  # pragma: no cover - gguf is a dependency
            raise RuntimeError("reading GGUF needs the 'gguf' package (pip install gguf)") from None
        self.path = os.fspath(path)
        try:
            self.reader = GGUFReader(self.path)
        except Exception as e:  # the reader raises ValueError, struct errors, IndexError... on bad files
            raise FormatError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.fields = {k: f for k, f in self.reader.fields.items()}
        arch = self._get("general.architecture")
        if arch != "llama":
            raise FormatError(f"{self.path}: GGUF architecture {arch!r} is not supported (supported: llama)")
        self.tensors = {}
        for t in self.reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                raise FormatError(f"{self.path}: unexpected tensor '{t.name}'")
            self.tensors[name] = t
        self.config = self._config()

    def _get(self, key: str, default=None):
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise FormatError(f"{self.path}: metadata '{key}' is malformed ({e})") from None

    def _need(self, key: str):
        value = self._get(key)
        if value is None:
            raise FormatError(f"{self.path}: GGUF metadata lacks '{key}'")
        return value

    def _config(self) -> ModelConfig:
        heads = int(self._need("llama.attention.head_count"))
        hidden = int(self._need("llama.embedding_length"))
        tokens = self._get("tokenizer.ggml.tokens") or []
        vocab = int(self._get("llama.vocab_size", len(tokens)))
        embed = self.tensors.get("model.embed_tokens.weight")
        if embed is not None:
            vocab = int(embed.shape[1])
        config = ModelConfig(
            architecture="llama", vocab_size=vocab, hidden_size=hidden,
            intermediate_size=int(self._need("llama.feed_forward_length")),
            num_hidden_layers=int(self._need("llama.block_count")), num_attention_heads=heads,
            num_key_value_heads=int(self._get("llama.attention.head_count_kv", heads)),
            head_dim=int(self._get("llama.rope.dimension_count", hidden // heads)),
            rms_norm_eps=float(self._get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self._get("llama.rope.freq_base", 10000.0)),
            rope_scaling=self._rope_scaling(),
            tie_word_embeddings="lm_head.weight" not in self.tensors,
            max_position_embeddings=int(self._get("llama.context_length", 2048)),
        )
        config.validate()
        return config

    def _rope_scaling(self) -> dict | None:
        kind = self._get("llama.rope.scaling.type")
        if kind in (None, "none"):
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(self._need("llama.rope.scaling.factor"))}
        raise FormatError(f"{self.path}: rope scaling {kind!r} is not supported")

    # -- the checkpoint interface used by the conversion pipeline ---------------
    def has(self, name: str) -> bool:
        return name in self.tensors

    def _n_head_for(self, name: str) -> int | None:
        if ".self_attn.q_proj." in name:
            return self.config.num_attention_heads
        if ".self_attn.k_proj." in name:
            return self.config.num_key_value_heads
        return None

    def _raw_rows(self, name: str) -> tuple[str, np.ndarray]:
        t = self.tensors[name]
        kind = t.tensor_type.name
        data = np.asarray(t.data)
        rows = int(t.shape[1]) if len(t.shape) > 1 else 1
        data = data.reshape(rows, -1) if len(t.shape) > 1 else data
        n_head = self._n_head_for(name)
        if n_head is not None:
            data = _unpermute_rows(data, n_head)
        return kind, data

    def native_format(self, name: str) -> tuple[str, int] | None:
        kind = self.tensors[name].tensor_type.name
        if kind in _LOSSLESS:
            return _LOSSLESS[kind][0], BLOCK
        return _FLOAT.get(kind)

    def fallback_format(self, name: str) -> tuple[str, int] | None:
        """The layout a tensor without a native one is re-quantized to (see requantized_format)."""
        found = requantized_format(self.tensors[name].tensor_type.name)
        return found[:2] if found else None

    def block_type_notices(self) -> list[str]:
        """One line per re-quantized block type present: which, to what, and why."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            if requantized_format(t.tensor_type.name):
                counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        lines = []
        for kind, n in sorted(counts.items()):
            fmt, group, why = requantized_format(kind)
            lines.append(f"pyllm: {n} {kind} tensor(s) re-quantized to {fmt} g{group}: {why} "
                         "(--quant f16 keeps every tensor in f16 instead)")
        return lines

    def load_native(self, name: str) -> PackedWeight:
        """The tensor in its pyllm format, bit for bit (only for block types in _LOSSLESS)."""
        kind, raw = self._raw_rows(name)
        fmt, block_bytes = _LOSSLESS[kind]
        rows, cols = raw.shape[0], int(self.tensors[name].shape[0])
        if cols % BLOCK or raw.shape[1] != cols // BLOCK * block_bytes:
            raise FormatError(f"{self.path}: tensor '{name}' has an inconsistent {kind} size")
        blocks = raw.reshape(rows, cols // BLOCK, block_bytes)
        scales = np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16).reshape(rows, -1)
        if kind == "Q8_0":
            q = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(rows, cols)
            return PackedWeight("int8", rows, cols, BLOCK, q, scales)
        if kind == "Q4_0":
            q = np.ascontiguousarray(blocks[:, :, 2:]).reshape(rows, cols // 2)
            return PackedWeight("int4_sym", rows, cols, BLOCK, q, scales)
        mins = np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16).reshape(rows, -1)
        q = np.ascontiguousarray(blocks[:, :, 4:]).reshape(rows, cols // 2)
        return PackedWeight("int4_asym", rows, cols, BLOCK, q, scales, mins)

    def load(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, [rows, cols] (or [n] for vectors)."""
        if name not in self.tensors:
            raise FormatError(f"{self.path}: GGUF file lacks tensor '{name}'")
        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind in _LOSSLESS:
            return dequantize(self.load_native(name))
        shape = tuple(int(d) for d in reversed(t.shape))
        if kind in ("F32", "F16", "BF16"):
            _, rows = self._raw_rows(name)  # already unpermuted
            values = bf16_bits_to_f32(rows.view(np.uint16)) if kind == "BF16" else rows.astype(np.float32)
            return values.reshape(shape)
        from gguf import quants

        try:
            values = quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)
        except NotImplementedError:
            raise FormatError(f"{self.path}: tensor '{t.name}' has type {kind}, which pyllm cannot read "
                              "(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1 and the k-quants)") from None
        n_head = self._n_head_for(name)
        return _unpermute_rows(values, n_head) if n_head is not None else values

    def close(self) -> None:
        self.reader = None

    # -- tokenizer and chat template ------------------------------------------
    def tokenizer(self) -> tuple[TokenizerSpec, bytes]:
        model = self._get("tokenizer.ggml.model")
        tokens = self._get("tokenizer.ggml.tokens")
        if not tokens:
            raise FormatError(f"{self.path}: GGUF metadata has no tokenizer.ggml.tokens")
        types = self._get("tokenizer.ggml.token_type") or [1] * len(tokens)
        try:
            blob = gguf_tokenizer_json(model, tokens, types, self._get("tokenizer.ggml.merges") or [],
                                       self._get("tokenizer.ggml.scores"), self._get("tokenizer.ggml.pre", "default"),
                                       bool(self._get("tokenizer.ggml.add_space_prefix", True)))
        except FormatError as e:
            raise FormatError(f"{self.path}: {e}; convert from the Hugging Face checkpoint instead") from None

        def token(key):
            i = self._get(key)
            return (int(i), tokens[int(i)]) if i is not None and 0 <= int(i) < len(tokens) else (None, None)
        bos_id, bos = token("tokenizer.ggml.bos_token_id")
        eos_id, eos = token("tokenizer.ggml.eos_token_id")
        _, unk = token("tokenizer.ggml.unknown_token_id")
        _, pad = token("tokenizer.ggml.padding_token_id")
        # llama.cpp (and transformers' GGUF loader) add BOS to a SentencePiece vocabulary that does not say
        add_bos = self._get("tokenizer.ggml.add_bos_token", model == "llama")
        spec = TokenizerSpec(kind="hf", bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
                             bos_token_id=bos_id, eos_token_ids=[eos_id] if eos_id is not None else [],
                             add_bos_token=bool(add_bos),
                             add_eos_token=bool(self._get("tokenizer.ggml.add_eos_token", False)))
        return spec, blob

    def chat_template(self) -> str:
        return self._get("tokenizer.chat_template") or ""

    def generation_defaults(self) -> dict:
        return {}


# -- tokenizer import: GGUF vocabularies -> a Hugging Face tokenizer.json, built as transformers'
# GGUF loader builds it (integrations/gguf), so ids are equal ---------------------------------------

# llama.cpp pre-tokenizer names whose regex is GPT-2's, with digits split one by one first
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "qwen2")
# Llama 3's split (llama.cpp's "llama-bpe" and its aliases)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral", "dbrx", "smaug-bpe")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def gguf_tokenizer_json(model: str | None, tokens: list[str], types: list[int], merges: list[str], scores,
                        pre: str, add_space_prefix: bool) -> bytes:
    """tokenizer.json bytes for a GGUF vocabulary: "gpt2" (byte-level BPE, pre-tokenizer by name) or
    "llama" (SentencePiece BPE with byte fallback). FormatError for anything else."""
    if model == "gpt2":
        tok = _bpe_tokenizer(tokens, merges, pre)
    elif model == "llama":
        if scores is None or len(scores) != len(tokens):
            raise FormatError("a SentencePiece GGUF vocabulary needs one tokenizer.ggml.scores entry per token")
        tok = _sentencepiece_tokenizer(tokens, [float(x) for x in scores], merges, add_space_prefix)
    else:
        raise FormatError(f"GGUF tokenizer model {model!r} is not supported yet (supported: gpt2 byte-level BPE, "
                          "llama SentencePiece)")
    return _with_added_tokens(tok, tokens, types)


def _bpe_tokenizer(tokens: list[str], merges: list[str], pre: str):
    """A byte-level BPE vocabulary with the pre-tokenizer llama.cpp's name stands for."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt-2", "gpt2"):
        tok.pre_tokenizer = byte_level
    elif pre in _LLAMA3_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise FormatError(f"GGUF pre-tokenizer {pre!r} is not supported yet (supported: default, gpt2, "
                          f"{', '.join(_DIGIT_SPLIT_PRE + _LLAMA3_PRE)})")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a token into two tokens,
    best score first (transformers' generate_merges with scores)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in dict(zip(tokens, scores)).items():
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        found.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _sentencepiece_tokenizer(tokens: list[str], scores: list[float], merges: list[str], add_space_prefix: bool):
    """A SentencePiece BPE vocabulary (Llama 2, Mistral, TinyLlama...) as transformers' LlamaTokenizer
    builds it: byte fallback, "▁" for spaces, a prefix space on the first word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges] if merges else sentencepiece_merges(tokens, scores)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if add_space_prefix
                                                 else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _with_added_tokens(tok, tokens: list[str], types: list[int]) -> bytes:
    """CONTROL tokens matched whole as special tokens, USER_DEFINED ones as plain added tokens, as
    llama.cpp does; the tokenizer.json bytes."""
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL])
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    if user:
        tok.add_tokens(user)
    return json.dumps(json.loads(tok.to_str())).encode("utf-8")
