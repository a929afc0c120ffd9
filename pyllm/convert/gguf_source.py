"""Reading GGUF files (llama.cpp's format) of pyllm's families as a conversion source.

Tensors are read with the `gguf` package (llama.cpp's own reader). Block formats that
pyllm stores without loss at group size 32 are kept exactly:
  Q8_0 (fp16 d, 32 x int8)        -> int8       value = q * d
  Q4_0 (fp16 d, 16 bytes nibbles) -> int4_sym   value = (q - 8) * d
  Q4_1 (fp16 d, fp16 m, 16 bytes) -> int4_asym  value = q * d + m
  Q5_0 (fp16 d, 32 high bits, 16 bytes nibbles) -> int8   value = (q - 16) * d, q - 16 in -16..15
(the nibble order inside a block, value j low and j + 16 high, is the same as pyllm's).
Each GGUF architecture's metadata keys and tensor layout are described in gguf_arch.py: a
pyllm tensor is a GGUF tensor, or a block of its rows (fused q/k/v, gate/up), possibly in another
row order (llama.cpp's q/k permutation undone, GLM's interleaved RoPE pairs). Rows are taken from
the raw blocks, which keeps quantized tensors lossless; the model runs Hugging Face's rotate-half
RoPE like every other pyllm file.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from ..errors import library_errors
from ..formats.packed import TokenizerSpec
from ..formats.safetensors import FormatError
from ..quant import BLOCK, PackedWeight, bf16_bits_to_f32, dequantize
from .gguf_arch import GGUFTensor, Metadata, for_gguf, gguf_config, gguf_tensors

# GGUF block type name -> (pyllm format, bytes of one 32-value block)
_LOSSLESS = {"Q8_0": ("int8", 34), "Q4_0": ("int4_sym", 18), "Q4_1": ("int4_asym", 20), "Q5_0": ("int8", 22)}
_FLOAT = {"F32": ("f32", 0), "F16": ("f16", 0), "BF16": ("bf16", 0)}
# Block types pyllm has no layout for, re-quantized (with the default, source-format conversion) to
# the nearest pyllm layout at least as fine as the source (close to its values, not on its grid: their
# sub-block scales and mins are not int8's): 5 to 8 bits -> int8, up to
# 4.5 bits -> int4_asym (the k-quants and i-quants carry mins or non-uniform grids).
# (Q8_1 and Q8_K are llama.cpp's activation types: neither it nor the gguf package reads them as weights)
_WIDE_BLOCKS = ("Q5_1", "Q5_K", "Q6_K")
_NARROW_BLOCKS = ("Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS",
                  "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0")


def requantized_format(kind: str) -> tuple[str, int, str] | None:
    """(pyllm format, group size, why) for a GGUF block type pyllm stores by re-quantizing, else None."""
    if kind in _WIDE_BLOCKS:
        return "int8", BLOCK, "pyllm has no 5-6 bit layout; int8 is finer (close to the file's values, not bit for bit)"
    if kind in _NARROW_BLOCKS:
        return "int4_asym", BLOCK, "pyllm has no layout for it; int4_asym group 32 is the nearest at least as fine"
    return None


def _readable(kind) -> bool:
    """Whether pyllm reads tensors of this GGML type: its own tables, or a block type the gguf package
    dequantizes (tried on one block of zeros: its table of them is private)."""
    if kind.name in _LOSSLESS or kind.name in _FLOAT or requantized_format(kind.name):
        return True
    from gguf import quants
    from gguf.constants import GGML_QUANT_SIZES

    if kind not in GGML_QUANT_SIZES:
        return False
    try:
        quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[kind][1]), np.uint8), kind)
    except Exception:  # NotImplementedError, or a reader of another shape: not one pyllm can use
        return False
    return True


def _unreadable(path: str, t) -> FormatError:
    kinds = ", ".join([*_FLOAT, *_LOSSLESS, *_WIDE_BLOCKS, *_NARROW_BLOCKS])
    return FormatError(f"{path}: tensor '{t.name}' has type {t.tensor_type.name}, which pyllm cannot read "
                       f"(supported: {kinds})")


def _place_rows(values: np.ndarray, place: GGUFTensor) -> np.ndarray:
    """The rows (first axis) of a whole GGUF tensor that make the pyllm tensor `place` describes."""
    if place.rows is not None:
        values = values[place.rows[0]:place.rows[1]]
    if place.order is not None:
        values = values[place.order]
    return np.ascontiguousarray(values)


class GGUFSource:
    """A .gguf file seen as a checkpoint with pyllm's tensor names (pyllm/convert/gguf_arch.py)."""

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
        if getattr(self.reader, "byte_order", "I") == "S":  # gguf >= 0.10: the file's numbers are swapped
            # quantized blocks keep their fp16 scales in the file's byte order, which numpy reads as little-endian:
            # NaN scales or, worse, wrong weights without a word. llama.cpp refuses such files on these machines too
            raise FormatError(f"{self.path}: a big-endian GGUF file; pyllm reads little-endian ones (as llama.cpp "
                              f"does on this machine): convert it in place first with "
                              f"`gguf-convert-endian {self.path} little` (from the gguf package)")
        self.fields = {k: f for k, f in self.reader.fields.items()}
        self.tensors = {t.name: t for t in self.reader.tensors}  # by GGUF name
        count = self._get("split.count")
        if isinstance(count, int) and not isinstance(count, bool) and count > 1:
            # gguf-split's shards: the first lacked the others' tensors ("lacks blk.9.attn_q.weight..."), the others
            # the metadata ("GGUF architecture None is not supported")
            no = self._get("split.no")
            which = f"shard {no + 1} of {count}" if isinstance(no, int) and not isinstance(no, bool) else \
                f"one of {count} shards"
            raise FormatError(f"{self.path}: {which} of a split GGUF model; pyllm reads a whole model from one file: "
                              "merge the shards first with llama.cpp's `llama-gguf-split --merge FIRST_SHARD.gguf "
                              "MERGED.gguf`")
        if self._get("general.type") == "adapter":  # convert_lora_to_gguf's output: was "lacks token_embd.weight"
            what = self._get("adapter.type")
            raise FormatError(f"{self.path}: a llama.cpp {what + ' ' if isinstance(what, str) else ''}adapter, not a "
                              "model; pyllm merges LoRA adapters in PEFT's format: pyllm convert BASE_DIR --lora "
                              "ADAPTER_DIR")
        self.gguf_arch = for_gguf(self._get("general.architecture"), self.path)
        for t in self.tensors.values():  # [64, 32, 2] was read as 32 rows: a head size from nowhere, refused by
            if any(int(d) != 1 for d in t.shape[2:]):  # rope.dimension_count's check, naming no tensor
                raise FormatError(f"{self.path}: tensor '{t.name}' has shape {[int(d) for d in reversed(t.shape)]}; "
                                  f"the tensors of a {self.gguf_arch.name} GGUF file are vectors and matrices")
        meta = Metadata(self.gguf_arch.name, self._get, {n: tuple(int(d) for d in t.shape)
                                                         for n, t in self.tensors.items()}, self.path)
        if "token_embd.weight" not in self.tensors:
            raise FormatError(f"{self.path}: GGUF file lacks token_embd.weight")
        self.config = gguf_config(self.gguf_arch, meta)
        self.places = gguf_tensors(self.gguf_arch, self.config, meta)  # pyllm name -> GGUFTensor
        unused = sorted(set(self.tensors) - {p.source for p in self.places.values()})
        if unused:  # a tensor the engine would ignore is a feature it does not implement
            raise FormatError(f"{self.path}: unexpected tensor '{unused[0]}' in a {self.gguf_arch.name} GGUF file")
        for t in self.tensors.values():  # before anything is written (a Q8_K one failed half-way, once
            if not _readable(t.tensor_type):  # announced as "re-quantized to int8")
                raise _unreadable(self.path, t)

    def _get(self, key: str, default=None):
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise FormatError(f"{self.path}: metadata '{key}' is malformed ({e})") from None

    def _typed(self, key: str, kind: type, default):
        """_get(key, default), FormatError naming the key when it is not a `kind` (a chat template
        that is a number, an add_bos_token that is the string "false", which bool() made True)."""
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise FormatError(f"{self.path}: GGUF metadata '{key}' must be a {kind.__name__}, got {shown}")
        return value

    def _array(self, key: str, kind: type | tuple | None, what: str) -> list | None:
        """_get(key): None when absent, else a list of `kind` entries (bool not an int; None: any
        entries), FormatError naming the key and the type otherwise (a string where an array belongs
        was read as its characters, an array of numbers where strings belong failed as a bare
        "cannot be read: AttributeError")."""
        value = self._get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise FormatError(f"{self.path}: GGUF metadata '{key}' must be an array of {what}, got {shown}")
        if kind is not None:
            for i, x in enumerate(value):
                if not isinstance(x, kind) or isinstance(x, bool):
                    raise FormatError(f"{self.path}: GGUF metadata '{key}' must be an array of {what}; "
                                      f"entry {i} is {x!r:.40}")
        return value

    # -- the checkpoint interface used by the conversion pipeline ---------------
    def has(self, name: str) -> bool:
        return name in self.places

    def _source(self, name: str):
        if name not in self.places:
            raise FormatError(f"{self.path}: no tensor '{name}' in a {self.gguf_arch.name} GGUF file")
        return self.tensors[self.places[name].source]

    def _raw_rows(self, name: str) -> tuple[str, np.ndarray]:
        """(GGUF type name, the tensor's raw rows [rows, bytes or values per row]; vectors [n])."""
        t = self._source(name)
        data = np.asarray(t.data)
        if len(t.shape) > 1:
            data = data.reshape(int(t.shape[1]), -1)
        return t.tensor_type.name, _place_rows(data, self.places[name])

    def where(self, name: str) -> str:
        """The file and GGUF tensor pyllm's tensor `name` is: "…/m.gguf: tensor 'blk.0.attn_q.weight' (as ...)"."""
        place = self.places.get(name)
        return f"{self.path}: tensor '{place.source if place else name}'" + (f" (as '{name}')" if place else "")

    def native_format(self, name: str) -> tuple[str, int] | None:
        kind = self._source(name).tensor_type.name
        if kind in _LOSSLESS:
            return _LOSSLESS[kind][0], BLOCK
        return _FLOAT.get(kind)

    def fallback_format(self, name: str) -> tuple[str, int] | None:
        """The layout a tensor without a native one is re-quantized to (see requantized_format)."""
        found = requantized_format(self._source(name).tensor_type.name)
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
        if raw.ndim == 1:  # a vector in blocks (a norm stored Q8_0): one row (raw.shape[1] was an IndexError)
            raw = raw.reshape(1, -1)
        rows, cols = raw.shape[0], int(self._source(name).shape[0])
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
        if kind == "Q5_0":  # ggml's dequantize_row_q5_0: value j's fifth bit is bit j of the little-endian qh
            high = np.ascontiguousarray(blocks[:, :, 2:6]).view("<u4")  # [rows, blocks, 1]
            low = blocks[:, :, 6:]
            q = np.concatenate([low & 0x0F, low >> 4], axis=2).astype(np.int16)
            q |= (((high >> np.arange(BLOCK, dtype=np.uint32)) & 1) << 4).astype(np.int16)
            return PackedWeight("int8", rows, cols, BLOCK, (q - 16).astype(np.int8).reshape(rows, cols), scales)
        mins = np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16).reshape(rows, -1)
        q = np.ascontiguousarray(blocks[:, :, 4:]).reshape(rows, cols // 2)
        return PackedWeight("int4_asym", rows, cols, BLOCK, q, scales, mins)

    def load(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, [rows, cols] (or [n] for vectors)."""
        t = self._source(name)
        kind = t.tensor_type.name
        if kind in _LOSSLESS:
            values = dequantize(self.load_native(name))
            return values.reshape(-1) if len(t.shape) == 1 else values
        if kind in ("F32", "F16", "BF16"):
            _, rows = self._raw_rows(name)
            return bf16_bits_to_f32(rows.view(np.uint16)) if kind == "BF16" else rows.astype(np.float32)
        from gguf import quants

        try:
            values = quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        except NotImplementedError:
            raise _unreadable(self.path, t) from None
        return _place_rows(values.reshape(tuple(int(d) for d in reversed(t.shape))), self.places[name])

    def close(self) -> None:
        self.reader = None

    # -- tokenizer and chat template ------------------------------------------
    def tokenizer(self) -> tuple[TokenizerSpec, bytes]:
        """The vocabulary as a tokenizer.json; FormatError for one the tokenizers library cannot build."""
        with library_errors(f"{self.path}: the GGUF tokenizer cannot be read", FormatError):
            return self._tokenizer()

    def _tokenizer(self) -> tuple[TokenizerSpec, bytes]:
        model = self._typed("tokenizer.ggml.model", str, None)
        tokens = self._array("tokenizer.ggml.tokens", str, "strings")
        if not tokens:
            raise FormatError(f"{self.path}: GGUF metadata has no tokenizer.ggml.tokens")
        first: dict = {}
        for i, t in enumerate(tokens):  # a vocabulary maps each text to one id: the other id decoded to nothing
            j = first.setdefault(t, i)
            if j != i:
                raise FormatError(f"{self.path}: tokenizer.ggml.tokens holds {t!r:.60} twice (ids {j} and {i}); "
                                  "one of them would decode to no text")
        types = self._get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if not isinstance(types, list) or len(types) != len(tokens) or not all(
                isinstance(k, int) and not isinstance(k, bool) for k in types):
            # zip() cut a short list: the control tokens past its end were matched as text, not as tokens
            shown = f"{len(types)} entries" if isinstance(types, list) else repr(types)[:40]
            raise FormatError(f"{self.path}: tokenizer.ggml.token_type must hold one integer per token "
                              f"({len(tokens)}), got {shown}")
        add_space_prefix = self._typed("tokenizer.ggml.add_space_prefix", bool, True)
        merges = self._array("tokenizer.ggml.merges", str, "strings ('left right')") or []
        for i, m in enumerate(merges):  # one pair each: a merge without its space failed in the tokenizers library
            if " " not in m[1:]:
                raise FormatError(f"{self.path}: GGUF metadata 'tokenizer.ggml.merges' must be an array of strings "
                                  f"('left right'); entry {i} is {m!r:.40}")
        scores = self._array("tokenizer.ggml.scores", None, "numbers")  # each entry: gguf_tokenizer_json
        pre = self._typed("tokenizer.ggml.pre", str, "default")
        try:
            blob = gguf_tokenizer_json(model, tokens, types, merges, scores, pre, add_space_prefix)
        except FormatError as e:
            raise FormatError(f"{self.path}: {e}; convert from the Hugging Face checkpoint instead") from None

        def token(key, needed=False):
            """(id, text) of a special token; an id that is not a token is ignored for unknown and padding
            (as llama.cpp does), refused for the ones generation uses (it was ignored in silence: no BOS
            added, a reply that never ends at its end-of-turn token)."""
            i = self._get(key)
            if i is None:
                return None, None
            if isinstance(i, bool) or not isinstance(i, int):
                raise FormatError(f"{self.path}: GGUF metadata '{key}' must be a token id, got {i!r:.60}")
            if 0 <= i < len(tokens):
                return i, tokens[i]
            if needed:
                raise FormatError(f"{self.path}: GGUF metadata '{key}' is {i}, not a token of its "
                                  f"{len(tokens)}-token vocabulary")
            return None, None
        bos_id, bos = token("tokenizer.ggml.bos_token_id", True)
        eos_id, eos = token("tokenizer.ggml.eos_token_id", True)
        _, unk = token("tokenizer.ggml.unknown_token_id")
        _, pad = token("tokenizer.ggml.padding_token_id")
        # every end-of-generation id the file declares: end of text, end of turn, end of message
        eos_ids = []
        for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
            i, _ = token(f"tokenizer.ggml.{key}", True)
            if i is not None and i not in eos_ids:
                eos_ids.append(i)
        # llama.cpp (and transformers' GGUF loader) add BOS to a SentencePiece vocabulary that does not say,
        # and llama.cpp to a Llama-3 BPE one (LLAMA_VOCAB_PRE_TYPE_LLAMA3): a Llama 3 file of 2024 without the
        # key ran without its BOS here, a model answering worse without a word
        add_bos = self._typed("tokenizer.ggml.add_bos_token", bool,
                              model == "llama" or (model == "gpt2" and pre in LLAMA3_PRE_TYPE))
        spec = TokenizerSpec(kind="hf", bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
                             bos_token_id=bos_id, eos_token_ids=eos_ids,
                             add_bos_token=bool(add_bos),
                             add_eos_token=self._typed("tokenizer.ggml.add_eos_token", bool, False))
        return spec, blob

    def chat_template(self) -> str:
        return self._typed("tokenizer.chat_template", str, "")

    def generation_defaults(self) -> dict:
        return {}


# -- tokenizer import: GGUF vocabularies -> a Hugging Face tokenizer.json, built as transformers'
# GGUF loader builds it (integrations/gguf), so ids are equal ---------------------------------------

# llama.cpp pre-tokenizer names whose regex is GPT-2's, with digits split one by one first
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact")
# Qwen2's split (its tokenizer.json's, llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2): single digits, and newlines and
# indentation kept apart from the words (GPT-2's split with digits, used here before, cut "\n    return" otherwise)
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen")
# Llama 3's split (llama.cpp's "llama-bpe" and its aliases)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral", "dbrx", "smaug-bpe")
# the names llama.cpp gives its LLAMA3 pre-tokenizer type: BOS added by default, and a word that is a token
# is that token whatever the merges say (ignore_merges, as Llama 3's own tokenizer.json sets it)
LLAMA3_PRE_TYPE = ("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def gguf_tokenizer_json(model: str | None, tokens: list[str], types: list[int], merges: list[str], scores,
                        pre: str, add_space_prefix: bool) -> bytes:
    """tokenizer.json bytes for a GGUF vocabulary: "gpt2" (byte-level BPE, pre-tokenizer by name) or
    "llama" (SentencePiece BPE with byte fallback). FormatError for anything else."""
    if model == "gpt2":
        tok = _bpe_tokenizer(tokens, merges, pre)
    elif model == "llama":
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise FormatError("a SentencePiece GGUF vocabulary needs one tokenizer.ggml.scores entry per token")
        for i, x in enumerate(scores):  # merges are ranked by score: a NaN left them in no defined order
            if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
                raise FormatError(f"tokenizer.ggml.scores[{i}] (token {tokens[i]!r:.40}) must be a number, got {x!r:.40}")
        tok = _sentencepiece_tokenizer(tokens, [float(x) for x in scores], merges, add_space_prefix)
    else:
        raise FormatError(f"GGUF tokenizer model {model!r} is not supported yet (supported: gpt2 byte-level BPE, "
                          "llama SentencePiece)")
    return _with_added_tokens(tok, tokens, types)


def _merge_pair(merge: str) -> tuple[str, str]:
    """A tokenizer.ggml.merges entry "left right" as its pair, cut at the first space after the first
    character (as llama.cpp cuts it: a left part may be a space)."""
    cut = merge.find(" ", 1)
    return merge[:cut], merge[cut + 1:]


def _bpe_tokenizer(tokens: list[str], merges: list[str], pre: str):
    """A byte-level BPE vocabulary with the pre-tokenizer llama.cpp's name stands for."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [_merge_pair(m) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in LLAMA3_PRE_TYPE))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt-2", "gpt2"):
        tok.pre_tokenizer = byte_level
    elif pre in _LLAMA3_PRE or pre in _QWEN2_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT if pre in _LLAMA3_PRE else _QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise FormatError(f"GGUF pre-tokenizer {pre!r} is not supported yet (supported: default, gpt2, "
                          f"{', '.join(_DIGIT_SPLIT_PRE + _QWEN2_PRE + _LLAMA3_PRE)})")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a token into two tokens,
    best score first (transformers' generate_merges with scores)."""
    from .checkpoint import every_two_token_splits

    vocab = {t: i for i, t in enumerate(tokens)}
    score_of = dict(zip(tokens, scores))
    found = []
    for token, splits in every_two_token_splits(score_of):
        score = score_of[token]
        local = [(left, right, score) for left, right in splits]
        found.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _sentencepiece_tokenizer(tokens: list[str], scores: list[float], merges: list[str], add_space_prefix: bool):
    """A SentencePiece BPE vocabulary (Llama 2, Mistral, TinyLlama...) as transformers' LlamaTokenizer
    builds it: byte fallback, "▁" for spaces, a prefix space on the first word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [_merge_pair(m) for m in merges] if merges else sentencepiece_merges(tokens, scores)
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
