"""A bounds check of a GGUF file's layout, run before the gguf package's reader sees the file.

GGUF (ggml's docs/gguf.md, version 2 and 3): magic "GGUF", u32 version, u64 tensor count, u64 metadata
count; each metadata pair a string key (u64 length + bytes), a u32 value type and its value (scalars of
1-8 bytes, a string, or an array: u32 element type, u64 count, the elements); then each tensor's info
(name string, u32 dimension count, u64 dimensions, u32 ggml type, u64 offset into the data section); the
data section starts at the next multiple of general.alignment (default 32).

gguf's reader trusts every count and length: an array that claims 2^60 elements in a 49-byte file
loops for ever while its memory grows, and a file cut short fails deep in numpy with a reshape error.
check_gguf_layout walks the same structure with every length checked against the bytes that are left,
and every tensor's extent against the file's size, and raises FormatError saying what runs past the end.
It also holds the tensors to llama.cpp's order (gguf.cpp): each one's data starts where the one before
it ends, rounded up to the alignment, so swapped or overlapping offsets (a model that reads one
matrix as another) are refused, as llama.cpp refuses them.
"""

from __future__ import annotations

import mmap
import os
import struct

from .safetensors import FormatError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGML_MAX_DIMS = 4  # ggml's: a tensor has at most 4 dimensions
MAX_ARRAY_NESTING = 8  # arrays of arrays (the format allows them; no model uses more than 1 level)
DEFAULT_ALIGNMENT = 32

# GGUF value types (gguf.constants.GGUFValueType) -> bytes of a scalar; 8 is STRING, 9 is ARRAY
SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
UINT32 = 4


class _Cursor:
    """Reads little-endian values from buf, each one checked against the bytes left."""

    def __init__(self, buf, path: str):
        self.buf, self.path, self.at = buf, path, 0

    def need(self, n: int, what: str) -> None:
        if n > len(self.buf) - self.at:
            raise FormatError(f"{self.path}: not a readable GGUF file: {what} at byte {self.at} needs {n:,} bytes, "
                              f"and the file has {len(self.buf) - self.at:,} left (cut short, or a length is wrong)")

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        value = struct.unpack_from(fmt, self.buf, self.at)[0]
        self.at += size
        return value

    def skip_string(self, what: str) -> int:
        """Passes a string (u64 length + bytes); returns where its bytes start."""
        n = self.unpack("<Q", f"the length of {what}")
        self.need(n, what)
        self.at += n
        return self.at - n

    def string(self, what: str) -> bytes:
        start = self.skip_string(what)
        return bytes(self.buf[start:self.at])

    def skip_value(self, value_type: int, what: str, depth: int = 0) -> None:
        if value_type in SCALAR_BYTES:
            self.need(SCALAR_BYTES[value_type], what)
            self.at += SCALAR_BYTES[value_type]
        elif value_type == STRING:
            self.skip_string(what)
        elif value_type == ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise FormatError(f"{self.path}: not a readable GGUF file: {what} nests arrays more than "
                                  f"{MAX_ARRAY_NESTING} deep")
            element_type = self.unpack("<I", f"the element type of {what}")
            count = self.unpack("<Q", f"the length of {what}")
            # every element takes at least a byte (a string: its 8-byte length), so a count past the
            # bytes left is refused before any element is read
            smallest = SCALAR_BYTES.get(element_type, 8 if element_type == STRING else 12)
            self.need(count * smallest, f"{what} ({count:,} elements)")
            if element_type in SCALAR_BYTES:
                self.at += count * smallest
            else:
                for i in range(count):
                    self.skip_value(element_type, f"{what}[{i}]", depth + 1)
        else:
            raise FormatError(f"{self.path}: not a readable GGUF file: {what} has unknown value type {value_type}")


def check_gguf_layout(path: str) -> None:
    """Raises FormatError when path is not a GGUF file whose metadata, tensor infos and tensor data all
    lie inside it (see the module's docstring); returns None for one that does. Reads the file through
    a read-only mapping: only the header and metadata pages are touched."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise FormatError(f"{path}: not a GGUF file ({size} bytes: shorter than a GGUF header)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cursor = _Cursor(buf, path)
            if bytes(buf[:4]) != GGUF_MAGIC:
                raise FormatError(f"{path}: not a GGUF file (it starts with {bytes(buf[:4])!r}, not b'GGUF')")
            cursor.at = 4
            version = cursor.unpack("<I", "the version")
            if version not in GGUF_VERSIONS and struct.unpack_from(">I", buf, 4)[0] in GGUF_VERSIONS:
                # quantized blocks keep their fp16 scales in the file's byte order, which numpy reads as
                # little-endian: NaN scales or, worse, wrong weights without a word. llama.cpp refuses such
                # files on these machines too
                raise FormatError(f"{path}: a big-endian GGUF file; pyllm reads little-endian ones (as llama.cpp "
                                  f"does on this machine): convert it in place first with "
                                  f"`gguf-convert-endian {path} little` (from the gguf package)")
            if version not in GGUF_VERSIONS:
                raise FormatError(f"{path}: GGUF version {version} (pyllm reads versions 2 and 3)")
            n_tensors = cursor.unpack("<Q", "the tensor count")
            n_metadata = cursor.unpack("<Q", "the metadata count")
            cursor.need(n_metadata * 12, f"{n_metadata:,} metadata pairs")  # each: key length, value type
            alignment = DEFAULT_ALIGNMENT
            for i in range(n_metadata):
                key = cursor.string(f"metadata key {i}").decode("utf-8", "replace")
                value_type = cursor.unpack("<I", f"the value type of metadata '{key}'")
                if key == "general.alignment" and value_type == UINT32:
                    alignment = cursor.unpack("<I", "general.alignment")
                    if alignment == 0 or alignment & (alignment - 1):
                        raise FormatError(f"{path}: general.alignment {alignment} is not a power of two")
                else:
                    cursor.skip_value(value_type, f"metadata '{key}'")
            cursor.need(n_tensors * 24, f"{n_tensors:,} tensor infos")  # name length, dims, type, offset
            tensors = []
            for i in range(n_tensors):
                name = cursor.string(f"tensor name {i}").decode("utf-8", "replace")
                n_dims = cursor.unpack("<I", f"the dimension count of tensor '{name}'")
                if not 1 <= n_dims <= GGML_MAX_DIMS:
                    raise FormatError(f"{path}: tensor '{name}' has {n_dims} dimensions (GGUF allows 1 to "
                                      f"{GGML_MAX_DIMS})")
                dims = [cursor.unpack("<Q", f"a dimension of tensor '{name}'") for _ in range(n_dims)]
                ggml_type = cursor.unpack("<I", f"the type of tensor '{name}'")
                offset = cursor.unpack("<Q", f"the data offset of tensor '{name}'")
                tensors.append((name, dims, ggml_type, offset))
            data_start = -(-cursor.at // alignment) * alignment
            expected = 0  # llama.cpp's rule (gguf.cpp): each tensor's data right after the one before, aligned
            for name, dims, ggml_type, offset in tensors:
                try:
                    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
                except (ValueError, KeyError):
                    raise FormatError(f"{path}: tensor '{name}' has unknown ggml type {ggml_type}") from None
                count = 1
                for d in dims:
                    count *= d
                if dims[0] % block:
                    raise FormatError(f"{path}: tensor '{name}' has rows of {dims[0]} values, not a multiple of "
                                      f"its type's block of {block}")
                nbytes = count // block * block_bytes
                if data_start + offset + nbytes > size:
                    raise FormatError(f"{path}: tensor '{name}' ({'x'.join(map(str, dims))}, {nbytes:,} bytes at "
                                      f"data offset {offset:,}) runs past the end of the file ({size:,} bytes): "
                                      f"the file is cut short or damaged")
                if offset != expected:  # swapped or overlapping tensors read as each other's weights, in silence
                    raise FormatError(f"{path}: tensor '{name}' has data offset {offset:,}, where the tensors before "
                                      f"it (each aligned to {alignment} bytes) end at {expected:,}: the file is "
                                      "damaged (llama.cpp refuses it too)")
                expected += -(-nbytes // alignment) * alignment
