"""Reading GGUF files (llama.cpp's format) of pyllm's families as a conversion source.

Tensors are read with the `gguf` package (llama.cpp's own reader). GGUF_TYPES says, one row per
GGML type, what becomes of its tensors: block formats that pyllm stores without loss at group size
32 are kept exactly, block for block:
  Q8_0 (fp16 d, 32 x int8)        -> int8       value = q * d
  Q4_0 (fp16 d, 16 bytes nibbles) -> int4_sym   value = (q - 8) * d
  Q4_1 (fp16 d, fp16 m, 16 bytes) -> int4_asym  value = q * d + m
  Q5_0 (fp16 d, 32 high bits, 16 bytes nibbles) -> int8   value = (q - 16) * d, q - 16 in -16..15
  MXFP4 (e8m0 e, 16 bytes of e2m1 codes)        -> int8   value = 2 x e2m1 (an integer) * 2^(e - 128)
  IQ4_NL (fp16 d, 16 bytes of grid codes)       -> int8   value = kvalues_iq4nl[q] * d (-127..113)
(the nibble order inside a block, value j low and j + 16 high, is the same as pyllm's); floats stay
as they are, NVFP4 goes to f16 (exact, larger), Q4_K and IQ4_XS keep their codes (int4_asym and int8
g32, their sub-block scales rounded to fp16), the other types pyllm has no layout for are re-quantized
with a notice, and the others are refused naming the tensor and its type. A split GGUF model
(gguf-split's shards) is read from all of its files (formats/gguf_split.py).
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
from dataclasses import dataclass

import numpy as np

from ..errors import library_errors
from ..formats.gguf_layout import check_gguf_layout
from ..formats.gguf_split import shard_path, split_name, split_parts
from ..formats.packed import TokenizerSpec
from ..formats.safetensors import FormatError
from ..quant import BLOCK, PackedWeight, bf16_bits_to_f32, dequantize
from .gguf_arch import CONFIG_TENSORS, GGUFTensor, Metadata, for_gguf, gguf_config, gguf_tensors

@dataclass(frozen=True)
class GGUFType:
    """What pyllm does with the tensors of one GGML type, when converting with the source's formats.
    layout: the pyllm (format, group size) they are stored in, None when they are refused.
    exact: whether that layout holds the file's values exactly (else they are re-quantized: close to
    them, not on their grid, said in a notice). why: the notice (also for an exact layout that is
    larger than the file's), or why they are refused. block_bytes: the bytes of one 32-value block
    that load_native copies into layout without a round trip through floats (0: decoded). codes: a
    layout that is not exact still holds the file's codes (load_codes), only its scales are rounded."""
    layout: tuple[str, int] | None
    exact: bool
    why: str = ""
    block_bytes: int = 0
    codes: bool = False


_REQUANT_WIDE = GGUFType(("int8", BLOCK), False, "pyllm has no 5-6 bit layout; int8 is finer, close to the file's "
                                                 "values (not bit for bit: about 1/16 of the file's own rounding "
                                                 "error added)")
_REQUANT_NARROW = GGUFType(("int4_asym", BLOCK), False, "pyllm has no layout for it; int4_asym group 32 is the "
                                                        "nearest at least as fine (close to the file's values)")
_ACTIVATIONS = GGUFType(None, False, "llama.cpp's type for activations, not weights")
_INTEGERS = GGUFType(None, False, "integer tensors are not weights of pyllm's families")

# One row per GGML type (gguf's GGMLQuantizationType; tests check that every one it knows has a row): how
# pyllm converts it. Q5_1/Q5_K/Q6_K go to int8, not f16: int8 keeps their quality (the added error is ~1/16
# of their own; the summary's NMSE shows it) at half f16's size and int8's speed.
GGUF_TYPES: dict[str, GGUFType] = {
    # floats: as they are
    "F32": GGUFType(("f32", 0), True),
    "F16": GGUFType(("f16", 0), True),
    "BF16": GGUFType(("bf16", 0), True),
    # 32-value blocks of one fp16 scale (and min): pyllm's layouts, block for block (load_native)
    "Q8_0": GGUFType(("int8", BLOCK), True, block_bytes=34),  # fp16 d, 32 x int8: q * d
    "Q4_0": GGUFType(("int4_sym", BLOCK), True, block_bytes=18),  # fp16 d, 16 bytes of nibbles: (q - 8) * d
    "Q4_1": GGUFType(("int4_asym", BLOCK), True, block_bytes=20),  # fp16 d, fp16 m, nibbles: q * d + m
    "Q5_0": GGUFType(("int8", BLOCK), True, block_bytes=22),  # fp16 d, 32 high bits, nibbles: (q - 16) * d
    "MXFP4": GGUFType(("int8", BLOCK), True, block_bytes=17),  # e8m0 e, nibbles: e2m1 x 2 (int) * 2^(e - 128)
    # 64-value blocks of four fp8 (e4m3) scales: their values have 6 significant bits, all in f16's range
    "NVFP4": GGUFType(("f16", 0), True, "pyllm has no layout with an fp8 scale per 16 values; f16 holds the file's "
                                        "values exactly, at 3.6 times its size (--quant int4 or int8 makes them "
                                        "smaller)"),
    # no pyllm layout: re-quantized to the nearest one at least as fine (their sub-block scales and mins,
    # or non-uniform grids, are not int8's or int4's)
    "Q5_1": _REQUANT_WIDE, "Q5_K": _REQUANT_WIDE, "Q6_K": _REQUANT_WIDE,
    # 256-value super-blocks of 8 sub-blocks of 32, each q * (d * sc) - dmin * m with q 0..15: int4_asym g32's
    # structure; re-quantizing it on a new grid added a fifth of its own error (NMSE ~1e-3 against its values)
    "Q4_K": GGUFType(("int4_asym", BLOCK), False, "their codes, each sub-block's scale and min rounded to fp16 "
                                                  "(pyllm has no 256-value super-blocks; NMSE below 1e-6 against the "
                                                  "file's values)", codes=True),
    # a 16-value non-uniform grid (ggml's kvalues_iq4nl, integers in -127..113) under one scale per 32 values:
    # int8 values at that scale. int4_asym's uniform grid added 2/3 of their own error (NMSE 4e-3 on 6e-3)
    "IQ4_NL": GGUFType(("int8", BLOCK), True, "pyllm has no layout for its non-uniform 4-bit grid; int8 holds the "
                                              "file's values exactly, at twice its size (--quant int4 makes them "
                                              "smaller)", block_bytes=18),
    "IQ4_XS": GGUFType(("int8", BLOCK), False, "their codes as int8 values (pyllm has no layout for their "
                                               "non-uniform 4-bit grid), each sub-block's scale rounded to fp16, at "
                                               "twice the file's size (--quant int4 makes them smaller)", codes=True),
    **{name: _REQUANT_NARROW for name in ("Q3_K", "Q2_K", "IQ3_S", "IQ3_XXS", "IQ2_S",
                                          "IQ2_XS", "IQ2_XXS", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0")},
    # refused
    "Q8_1": _ACTIVATIONS, "Q8_K": _ACTIVATIONS,
    "I8": _INTEGERS, "I16": _INTEGERS, "I32": _INTEGERS, "I64": _INTEGERS,
    "F64": GGUFType(None, False, "llama.cpp's converters write weights as F32, F16 or BF16; pyllm reads no F64"),
    "Q1_0": GGUFType(None, False, "the gguf package cannot decode it yet"),
}
_UNKNOWN = GGUFType(None, False, "a type this pyllm has no rule for")
_FLOATS = ("F32", "F16", "BF16")


def gguf_type(kind: str) -> GGUFType:
    """The row of GGML type `kind` (by name); a type without one is refused."""
    return GGUF_TYPES.get(kind, _UNKNOWN)


def requantized_format(kind: str) -> tuple[str, int, str] | None:
    """(pyllm format, group size, why) for a GGUF type pyllm stores by re-quantizing, else None."""
    row = gguf_type(kind)
    return (*row.layout, row.why) if row.layout is not None and not row.exact else None


def _unreadable(path: str, t) -> FormatError:
    kinds = ", ".join(name for name, row in GGUF_TYPES.items() if row.layout is not None)
    return FormatError(f"{path}: tensor '{t.name}' has type {t.tensor_type.name}, which pyllm cannot read: "
                       f"{gguf_type(t.tensor_type.name).why} (supported: {kinds})")


# MXFP4's e2m1 codes, doubled to integers (ggml's kvalues_mxfp4): the value of code c is _E2M1[c] * 2^(e - 128)
_E2M1 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)
# IQ4_NL's and IQ4_XS's grid (ggml's kvalues_iq4nl): the value of code c is _IQ4NL[c] * the block's scale
_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


def _nibble_codes(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes of one 32-value block -> its 32 codes, value j in the low nibble of byte j and
    value j + 16 in its high one (ggml's order for Q4_0..IQ4_XS, and pyllm's)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _grid_as_int8(codes: np.ndarray, scales: np.ndarray, rows: int, cols: int) -> PackedWeight:
    """int8 [rows, cols] of IQ4 grid codes [rows, groups, 32] at f32 scales [rows, groups]: a negative
    scale (ggml's quantizers pick its sign) is made positive with its values negated (-113..127)."""
    q = _IQ4NL[codes].astype(np.int16)
    sign = np.where(scales < 0, -1, 1)
    q = (q * sign[:, :, None]).astype(np.int8)
    return PackedWeight("int8", rows, cols, BLOCK, np.ascontiguousarray(q.reshape(rows, cols)),
                        np.abs(scales).astype(np.float16))


def _place_rows(values: np.ndarray, place: GGUFTensor) -> np.ndarray:
    """The rows (first axis) of a whole GGUF tensor that make the pyllm tensor `place` describes."""
    if place.rows is not None:
        values = values[place.rows[0]:place.rows[1]]
    if place.order is not None:
        values = values[place.order]
    return np.ascontiguousarray(values)


def open_gguf_reader(path: str):
    """gguf's reader of path; FormatError for a file it cannot read, whose layout runs past its end
    (formats/gguf_layout.py: gguf's reader trusts every length in the file), or of the other byte order."""
    from gguf import GGUFReader

    if not os.path.isfile(path):  # a FIFO or a device (a shard): opening it waited for a writer
        raise FormatError(f"{path} is not a regular file, not a GGUF file")
    check_gguf_layout(path)
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct errors, IndexError... on bad files
        raise FormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(fields, path: str, key: str, default=None):
    """A metadata value of one file (fields: its reader's), default when absent; FormatError naming
    file and key when it cannot be read."""
    field = fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except Exception as e:
        raise FormatError(f"{path}: metadata '{key}' is malformed ({e})") from None


def _split_keys(reader, path: str) -> tuple[int, int, int | None]:
    """(split.no, split.count, split.tensors.count or None) of a shard; FormatError naming the key
    when one is missing or not a number in range."""
    values = []
    for key in ("split.no", "split.count", "split.tensors.count"):
        value = _field(reader.fields, path, key)
        if value is None and key != "split.tensors.count":
            has_split = any(str(name).startswith("split.") for name in reader.fields)
            raise FormatError(f"{path}: a split GGUF shard (it has split.* metadata) without '{key}'" if has_split
                              else f"{path}: not a shard of a split GGUF (it has no '{key}' metadata): give the "
                                   "first shard of one set, with the others beside it")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise FormatError(f"{path}: GGUF metadata '{key}' must be a non-negative integer, got {value!r:.40}")
        values.append(value)
    no, count, total = values
    if not 0 <= no < count:
        raise FormatError(f"{path}: GGUF metadata 'split.no' is {no}, not a shard of the {count} that "
                          "'split.count' says")
    return no, count, total


class GGUFSource:
    """A .gguf file (or the shards of a split one) seen as a checkpoint with pyllm's tensor names
    (pyllm/convert/gguf_arch.py)."""

    def __init__(self, path: str | os.PathLike):
        try:
            from gguf import GGUFReader  # noqa: F401
        except ImportError:  # pragma: no cover - gguf is a dependency
            raise RuntimeError("reading GGUF needs the 'gguf' package (pip install gguf)") from None
        self.path = os.fspath(path)
        self.reader = open_gguf_reader(self.path)
        self.fields = {k: f for k, f in self.reader.fields.items()}
        self.files = [self.path]  # the files read: the shards of a split model, first first
        self.readers = [self.reader]
        if "split.count" in self.fields:  # gguf-split's shards: read together, as llama.cpp reads them
            self._read_split_set()
        self.tensors = {}  # by GGUF name
        self.tensor_files = {}  # GGUF name -> the file holding it
        for file, reader in zip(self.files, self.readers):
            for t in reader.tensors:
                if t.name in self.tensors:
                    raise FormatError(f"{file}: tensor '{t.name}' is also in {self.tensor_files[t.name]}: "
                                      "the shards are not one split model")
                self.tensors[t.name] = t
                self.tensor_files[t.name] = file
        if len(self.files) > 1 or "split.count" in self.fields:
            total = self._typed("split.tensors.count", int, None)
            if total is not None and total != len(self.tensors):
                raise FormatError(f"{self.path}: GGUF metadata 'split.tensors.count' is {total}, but the "
                                  f"{len(self.files)} shard(s) hold {len(self.tensors)} tensors")
        if self._get("general.type") == "adapter":  # convert_lora_to_gguf's output: was "lacks token_embd.weight"
            what = self._get("adapter.type")
            raise FormatError(f"{self.path}: a llama.cpp {what + ' ' if isinstance(what, str) else ''}adapter, not a "
                              "model; pyllm merges LoRA adapters in PEFT's format: pyllm convert BASE_DIR --lora "
                              "ADAPTER_DIR")
        self.gguf_arch = for_gguf(self._get("general.architecture"), self.path)
        for t in self.tensors.values():  # [64, 32, 2] was read as 32 rows: a head size from nowhere, refused by
            if any(int(d) != 1 for d in t.shape[2:]):  # rope.dimension_count's check, naming no tensor
                raise FormatError(f"{self._file(t.name)}: tensor '{t.name}' has shape "
                                  f"{[int(d) for d in reversed(t.shape)]}; "
                                  f"the tensors of a {self.gguf_arch.name} GGUF file are vectors and matrices")
        meta = Metadata(self.gguf_arch.name, self._get, {n: tuple(int(d) for d in t.shape)
                                                         for n, t in self.tensors.items()}, self.path,
                        self._float_vector)
        if "token_embd.weight" not in self.tensors:
            raise FormatError(f"{self.path}: GGUF file lacks token_embd.weight")
        self.config = gguf_config(self.gguf_arch, meta)
        self.places = gguf_tensors(self.gguf_arch, self.config, meta)  # pyllm name -> GGUFTensor
        unused = sorted(set(self.tensors) - {p.source for p in self.places.values()} - set(CONFIG_TENSORS))
        if unused:  # a tensor the engine would ignore is a feature it does not implement
            raise FormatError(f"{self.path}: unexpected tensor '{unused[0]}' in a {self.gguf_arch.name} GGUF file")
        for t in self.tensors.values():  # before anything is written (a Q8_K one failed half-way, once
            if gguf_type(t.tensor_type.name).layout is None:  # announced as "re-quantized to int8")
                raise _unreadable(self._file(t.name), t)

    def _read_split_set(self) -> None:
        """self.files, self.readers: every shard of the split model self.path is one of (it may be any),
        found by gguf-split's names; self.path, self.reader, self.fields: the first's, which holds the
        metadata. FormatError naming the shard that is missing, of another split set, or inconsistent."""
        given = self.path
        no, count, total = _split_keys(self.reader, given)
        if count == 1:  # a set of one: the whole model, whatever its name
            return
        found = split_name(given)
        if found is None or found[1:] != (no + 1, count):
            raise FormatError(f"{given}: shard {no + 1} of {count} of a split GGUF model, but not named as "
                              f"gguf-split names its shards ({os.path.basename(shard_path('PREFIX', no + 1, count))})"
                              ": its other shards cannot be found; rename the shards so, or merge them with "
                              "llama.cpp's `llama-gguf-split --merge FIRST_SHARD.gguf MERGED.gguf`")
        parts = split_parts(given)
        missing = [p for p in parts if not os.path.exists(p)]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise FormatError(f"{given}: shard {no + 1} of a GGUF model split in {count} files; missing: {shown}")
        readers = []
        for i, part in enumerate(parts):
            reader = self.reader if i == no else open_gguf_reader(part)
            part_no, part_count, part_total = _split_keys(reader, part)
            if (part_no, part_count) != (i, count):  # renamed, copied over another, of a set of another size
                raise FormatError(f"{part}: its GGUF metadata says shard {part_no + 1} of {part_count}, its name "
                                  f"shard {i + 1} of {count}: the shards are not one split model")
            if part_total != total:
                raise FormatError(f"{part}: GGUF metadata 'split.tensors.count' is {part_total}, {total} in "
                                  f"{given}: the shards are not one split model")
            readers.append(reader)
        self.files, self.readers = parts, readers
        self.path, self.reader = parts[0], readers[0]
        self.fields = {k: f for k, f in self.reader.fields.items()}
        arch = self._get("general.architecture")
        for part, reader in zip(parts[1:], readers[1:]):  # gguf-split writes it in the first only
            other = _field(reader.fields, part, "general.architecture")
            if other not in (None, "", arch):
                raise FormatError(f"{part}: a shard of a {other} model, {parts[0]} of a {arch} one: the shards "
                                  "are not one split model")

    def _float_vector(self, name: str) -> np.ndarray:
        """A vector tensor stored as F32 or F16 (hyper-parameters: rope_freqs), f32 [n]."""
        t = self.tensors[name]
        if t.tensor_type.name not in ("F32", "F16") or len(t.shape) != 1:
            raise FormatError(f"{self._file(name)}: tensor '{name}' is {t.tensor_type.name} of shape "
                              f"{[int(d) for d in reversed(t.shape)]}; a vector of F32 or F16 is expected")
        return np.asarray(t.data).astype(np.float32)

    def _file(self, name: str) -> str:
        """The file holding GGUF tensor `name` (a shard of a split model, or the file)."""
        return self.tensor_files.get(name, self.path)

    def _get(self, key: str, default=None):
        return _field(self.fields, self.path, key, default)

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
        source = place.source if place else name
        return f"{self._file(source)}: tensor '{source}'" + (f" (as '{name}')" if place else "")

    def native_format(self, name: str) -> tuple[str, int] | None:
        """The pyllm layout holding the tensor's values exactly (GGUF_TYPES), else None."""
        row = gguf_type(self._source(name).tensor_type.name)
        return row.layout if row.exact else None

    def fallback_format(self, name: str) -> tuple[str, int] | None:
        """The layout a tensor without a native one is re-quantized to (see requantized_format)."""
        found = requantized_format(self._source(name).tensor_type.name)
        return found[:2] if found else None

    def block_type_notices(self) -> list[str]:
        """One line per type present that is not stored as the file stores it (GGUF_TYPES' why): which,
        to what, and why; re-quantized or larger."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            if gguf_type(t.tensor_type.name).why:
                counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        lines = []
        for kind, n in sorted(counts.items()):
            row = gguf_type(kind)
            fmt, group = row.layout
            if row.exact:
                lines.append(f"pyllm: {n} {kind} tensor(s) stored as {fmt}, exactly: {row.why}")
            elif row.codes:
                lines.append(f"pyllm: {n} {kind} tensor(s) kept as {fmt} g{group}: {row.why}")
            else:
                lines.append(f"pyllm: {n} {kind} tensor(s) re-quantized to {fmt} g{group}: {row.why} "
                             "(--quant f16 keeps every tensor in f16 instead)")
        return lines

    def load_native(self, name: str) -> PackedWeight:
        """The tensor in its pyllm format, bit for bit (only for the GGUF_TYPES rows with block_bytes)."""
        kind, raw = self._raw_rows(name)
        block_bytes = gguf_type(kind).block_bytes
        if raw.ndim == 1:  # a vector in blocks (a norm stored Q8_0): one row (raw.shape[1] was an IndexError)
            raw = raw.reshape(1, -1)
        rows, cols = raw.shape[0], int(self._source(name).shape[0])
        if cols % BLOCK or raw.shape[1] != cols // BLOCK * block_bytes:
            raise FormatError(f"{self.where(name)} has an inconsistent {kind} size")
        blocks = raw.reshape(rows, cols // BLOCK, block_bytes)
        scales = np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16).reshape(rows, -1)
        if kind == "Q8_0":
            q = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(rows, cols)
            return PackedWeight("int8", rows, cols, BLOCK, q, scales)
        if kind == "Q4_0":
            q = np.ascontiguousarray(blocks[:, :, 2:]).reshape(rows, cols // 2)
            return PackedWeight("int4_sym", rows, cols, BLOCK, q, scales)
        if kind == "MXFP4":
            return self._mxfp4(name, blocks, rows, cols)
        if kind == "IQ4_NL":  # d * _IQ4NL[code]: exact in f32 with |d| and the sign in the codes
            return _grid_as_int8(_nibble_codes(blocks[:, :, 2:]), scales.astype(np.float32), rows, cols)
        if kind == "Q5_0":  # ggml's dequantize_row_q5_0: value j's fifth bit is bit j of the little-endian qh
            high = np.ascontiguousarray(blocks[:, :, 2:6]).view("<u4")  # [rows, blocks, 1]
            low = blocks[:, :, 6:]
            q = np.concatenate([low & 0x0F, low >> 4], axis=2).astype(np.int16)
            q |= (((high >> np.arange(BLOCK, dtype=np.uint32)) & 1) << 4).astype(np.int16)
            return PackedWeight("int8", rows, cols, BLOCK, (q - 16).astype(np.int8).reshape(rows, cols), scales)
        mins = np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16).reshape(rows, -1)
        q = np.ascontiguousarray(blocks[:, :, 4:]).reshape(rows, cols // 2)
        return PackedWeight("int4_asym", rows, cols, BLOCK, q, scales, mins)

    def codes_format(self, name: str) -> tuple[str, int] | None:
        """The layout load_codes gives the tensor in (GGUF_TYPES' codes rows), else None."""
        row = gguf_type(self._source(name).tensor_type.name)
        return row.layout if row.codes else None

    def load_codes(self, name: str) -> PackedWeight | None:
        """The tensor in its codes_format with the file's codes, the scales rounded to fp16; None when a
        scale is past fp16's range (then re-quantized)."""
        kind, raw = self._raw_rows(name)
        sizes = {"Q4_K": 144, "IQ4_XS": 136}  # bytes of a 256-value super-block
        if kind not in sizes:
            raise FormatError(f"{self.where(name)}: pyllm keeps the codes of {', '.join(sizes)} tensors only, "
                              f"not {kind}")
        rows, cols = raw.shape[0], int(self._source(name).shape[0])
        if cols % 256 or raw.shape[1] != cols // 256 * sizes[kind]:
            raise FormatError(f"{self.where(name)} has an inconsistent {kind} size")
        blocks = raw.reshape(rows, cols // 256, sizes[kind])
        packed = self._iq4_xs(blocks, rows, cols) if kind == "IQ4_XS" else self._q4_k(blocks, rows, cols)
        finite = all(np.isfinite(a).all() for a in (packed.scales, packed.mins) if a is not None)
        return packed if finite else None

    @staticmethod
    def _iq4_xs(blocks: np.ndarray, rows: int, cols: int) -> PackedWeight:
        """IQ4_XS super-blocks [rows, supers, 136] as int8 g32 (ggml's dequantize_row_iq4_xs: d f16, 16 bits
        of high scale bits, 4 bytes of low ones, then 8 x 16 bytes of codes; sub-block i's scale is
        d * (ls_i - 32), ls_i 6 bits)."""
        d = np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16).astype(np.float32)  # [rows, supers, 1]
        high = np.ascontiguousarray(blocks[:, :, 2:4]).view("<u2")  # [rows, supers, 1]
        low = blocks[:, :, 4:8]
        ls = np.concatenate([low & 0x0F, low >> 4], axis=2)[:, :, [0, 4, 1, 5, 2, 6, 3, 7]].astype(np.int32)
        ls |= ((high >> (2 * np.arange(8, dtype=np.uint16))) & 3).astype(np.int32) << 4
        with np.errstate(over="ignore"):
            scales = (d * (ls - 32)).reshape(rows, -1)
        codes = _nibble_codes(blocks[:, :, 8:].reshape(rows, cols // 256, 8, 16)).reshape(rows, cols // BLOCK, BLOCK)
        return _grid_as_int8(codes, scales, rows, cols)

    @staticmethod
    def _q4_k(blocks: np.ndarray, rows: int, cols: int) -> PackedWeight:
        """Q4_K super-blocks [rows, supers, 144] as int4_asym g32 (ggml's dequantize_row_q4_K: sub-block i
        is q * (d * sc_i) - dmin * m_i; sub-blocks 2k and 2k + 1 are the low and high nibbles of bytes
        32k..32k + 31)."""
        d = np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16).astype(np.float32)  # [rows, supers, 1]
        dmin = np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16).astype(np.float32)
        packed = blocks[:, :, 4:16]  # ggml's get_scale_min_k4: 6-bit sc and m of the 8 sub-blocks
        low, high = packed[:, :, 0:4], packed[:, :, 4:8]
        sc = np.concatenate([low & 63, (packed[:, :, 8:12] & 0xF) | (low >> 6) << 4], axis=2)
        m = np.concatenate([high & 63, (packed[:, :, 8:12] >> 4) | (high >> 6) << 4], axis=2)
        with np.errstate(over="ignore"):
            scales = (d * sc).astype(np.float16).reshape(rows, -1)
            mins = (-(dmin * m)).astype(np.float16).reshape(rows, -1)
        qs = blocks[:, :, 16:].reshape(rows, cols // 256, 4, 1, 32)
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(rows, cols // BLOCK, BLOCK)
        q = codes[:, :, :16] | codes[:, :, 16:] << 4  # pyllm's order: value j low, j + 16 high
        return PackedWeight("int4_asym", rows, cols, BLOCK, np.ascontiguousarray(q.reshape(rows, cols // 2)),
                            scales, mins)

    def _mxfp4(self, name: str, blocks: np.ndarray, rows: int, cols: int) -> PackedWeight:
        """MXFP4 blocks [rows, blocks, 17] as int8: value j is _E2M1[code j] * 2^(e - 128), code j the
        low nibble of byte j and code j + 16 its high one (pyllm's order). FormatError naming the tensor
        when a block's scale is outside fp16's powers of two (2^-24..2^15; none in llama.cpp's files)."""
        exponent = blocks[:, :, 0].astype(np.int32) - 128
        codes = blocks[:, :, 1:]
        q = _E2M1[np.concatenate([codes & 0x0F, codes >> 4], axis=2)]
        used = (q != 0).any(axis=2)  # a block of zeros holds them at any scale
        outside = used & ((exponent < -24) | (exponent > 15))
        if outside.any():
            row, block = (int(i[0]) for i in np.nonzero(outside))
            raise FormatError(f"{self.where(name)}: MXFP4 block {block} of row {row} has scale "
                              f"2^{exponent[row, block]}, outside pyllm's fp16 scales (2^-24..2^15)")
        scales = np.where(used, np.ldexp(np.float32(1), np.clip(exponent, -24, 15)), 0).astype(np.float16)
        return PackedWeight("int8", rows, cols, BLOCK, np.ascontiguousarray(q.reshape(rows, cols)), scales)

    def load(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, [rows, cols] (or [n] for vectors)."""
        t = self._source(name)
        kind = t.tensor_type.name
        if gguf_type(kind).block_bytes:
            values = dequantize(self.load_native(name))
            return values.reshape(-1) if len(t.shape) == 1 else values
        if kind in _FLOATS:
            _, rows = self._raw_rows(name)
            return bf16_bits_to_f32(rows.view(np.uint16)) if kind == "BF16" else rows.astype(np.float32)
        from gguf import quants

        try:
            values = quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        except NotImplementedError:
            raise _unreadable(self._file(t.name), t) from None
        return _place_rows(values.reshape(tuple(int(d) for d in reversed(t.shape))), self.places[name])

    def close(self) -> None:
        self.reader = None
        self.readers = []

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
# GGUF loader builds it (integrations/gguf), with the split llama.cpp runs for each tokenizer.ggml.pre
# name: for "smollm", "starcoder" and "refact" digits one by one, as llama.cpp and those models' own
# tokenizer.json split them (transformers' GGUF loader does not: "a  9" is 4 ids there, 3 here) ----

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
