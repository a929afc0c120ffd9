"""A strict reader and an atomic, streaming writer for the safetensors container.

Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
({"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}),
then the data section; offsets are relative to its start.

The reader trusts nothing: every length, offset, dtype and shape is checked
against the file before any tensor is touched, so a truncated or hostile file
raises FormatError instead of reading out of bounds. Tensors are returned as
read-only numpy views of a memory map (no copy).
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

MAX_HEADER_BYTES = 100 * 1024 * 1024  # what the reference implementation allows
ALIGNMENT = 64  # pyllm aligns the data section and every tensor to a cache line

# safetensors dtype -> numpy dtype of the raw elements (BF16 stays as its uint16 bits)
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


class FormatError(ValueError):
    """A model file is malformed, truncated or of an unsupported kind."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _fail(path: str, why: str) -> FormatError:
    return FormatError(f"{path}: {why}")


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook: a key given twice is an error, not "the last one wins"."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class SafetensorsFile:
    """A validated, memory-mapped safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise FileNotFoundError(f"cannot read {self.path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):  # a directory, FIFO or device: opening could block or mislead
            raise _fail(self.path, "not a regular file")
        self.file_size = st.st_size
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(self.path, "file is too short to be a safetensors file (is it truncated?)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > MAX_HEADER_BYTES:
                raise _fail(self.path, f"header length {header_len} is implausibly large (corrupt file?)")
            if 8 + header_len > self.file_size:
                raise _fail(self.path, f"header length {header_len} runs past the end of the file (truncated?)")
            raw = f.read(header_len)
        self.data_offset = 8 + header_len
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
        except _DuplicateKey as e:
            raise _fail(self.path, f"header lists {e.args[0]!r} twice") from None
        except (ValueError, RecursionError) as e:
            # ValueError covers bad UTF-8, bad JSON and integers too long to convert;
            # RecursionError, absurdly deep nesting
            raise _fail(self.path, f"header is not valid JSON ({type(e).__name__}: {e})") from None
        if not isinstance(header, dict):
            raise _fail(self.path, "header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise _fail(self.path, "__metadata__ must map strings to strings")
        for text in (*metadata, *metadata.values(), *header):
            if not _is_utf8(text):
                raise _fail(self.path, f"header string {text[:40]!r} is not valid Unicode (lone surrogate escape)")
        self.metadata: dict[str, str] = metadata
        self.tensors: dict[str, TensorInfo] = {}
        data_len = self.file_size - self.data_offset
        for name, entry in header.items():
            self.tensors[name] = self._check_entry(name, entry, data_len)
        spans = sorted((t.begin, t.end, n) for n, t in self.tensors.items() if t.nbytes)
        for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise _fail(self.path, f"tensors '{name_a}' and '{name_b}' overlap")
        self._map: mmap.mmap | None = None

    def _check_entry(self, name: str, entry, data_len: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise _fail(self.path, f"entry for '{name}' is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise _fail(self.path, f"tensor '{name}' has unsupported dtype {_short(dtype)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise _fail(self.path, f"tensor '{name}' has an invalid shape {_short(shape)}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        ):
            raise _fail(self.path, f"tensor '{name}' has invalid data_offsets {_short(offsets)}")
        begin, end = offsets
        # Python ints cannot overflow, but a long list of huge dimensions would
        # make the product slow to compute: stop once it exceeds any possible size.
        numel = 0 if 0 in shape else 1
        for d in shape if numel else ():
            numel *= d
            if numel > data_len:
                break
        expected = numel * DTYPES[dtype].itemsize
        if end < begin:
            raise _fail(self.path, f"tensor '{name}' ends before it begins")
        if expected > data_len:
            raise _fail(
                self.path,
                f"tensor '{name}' of {dtype} {_short(shape)} needs more bytes than the {data_len}-byte data section holds",
            )
        if end - begin != expected:
            raise _fail(
                self.path, f"tensor '{name}' occupies {end - begin} bytes but {dtype} {_short(shape)} needs {expected}"
            )
        if end > data_len:
            raise _fail(
                self.path,
                f"tensor '{name}' ends at byte {end} of a {data_len}-byte data section (truncated file?)",
            )
        return TensorInfo(dtype, tuple(shape), begin, end)

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if len(self._map) != self.file_size:
                raise _fail(self.path, "file changed size while being opened")
        return self._map

    def array(self, name: str) -> np.ndarray:
        """Read-only numpy view of a tensor (BF16 as uint16 bits)."""
        if name not in self.tensors:
            raise KeyError(f"{self.path} has no tensor '{name}'")
        t = self.tensors[name]
        return np.frombuffer(
            self._mapped(), dtype=DTYPES[t.dtype], count=t.nbytes // DTYPES[t.dtype].itemsize,
            offset=self.data_offset + t.begin,
        ).reshape(t.shape)

    def bytes(self, name: str) -> bytes:
        return self.array(name).tobytes()

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # numpy views still alive; the map closes when they go
            self._map = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class PlannedTensor:
    """A tensor to write: its layout now, its values later (produce() is called once, in order)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n


def write_atomic(path: str | os.PathLike, metadata: dict[str, str], tensors: Iterable[PlannedTensor],
                 on_tensor: Callable[[PlannedTensor, np.ndarray], None] | None = None) -> int:
    """Writes a safetensors file tensor by tensor; returns its size in bytes.

    The header is laid out first from the planned shapes, then each tensor is
    produced and written, so peak memory is about one tensor. Data and each
    tensor start on a 64-byte boundary (padding tensors named "__pad__.N" fill
    the gaps, since safetensors forbids holes). The file appears under `path`
    only once complete (temporary file + fsync + rename).
    """
    path = os.fspath(path)
    plans = list(tensors)
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map strings to strings")
    for p in plans:
        if not isinstance(p.name, str) or p.name == "__metadata__" or p.name.startswith("__pad__"):
            raise ValueError(f"tensor name {p.name!r} is reserved")
        if not isinstance(p.dtype, str) or p.dtype not in DTYPES:
            raise ValueError(f"tensor '{p.name}': unknown dtype {p.dtype!r} (choose from {', '.join(DTYPES)})")
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in p.shape):
            raise ValueError(f"tensor '{p.name}': invalid shape {p.shape!r}")
    header: dict = {"__metadata__": metadata}
    layout: list[tuple[PlannedTensor | None, int]] = []  # (tensor or padding, bytes)
    offset = 0
    for i, p in enumerate(plans):
        pad = -offset % ALIGNMENT
        if pad:
            header[f"__pad__.{i}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            layout.append((None, pad))
            offset += pad
        header[p.name] = {"dtype": p.dtype, "shape": [int(d) for d in p.shape],
                          "data_offsets": [offset, offset + p.nbytes]}
        layout.append((p, p.nbytes))
        offset += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % ALIGNMENT)

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".partial", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file private (0600); give the result the mode a plain open() would
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for p, nbytes in layout:
                if p is None:
                    f.write(b"\0" * nbytes)
                    continue
                value = np.asarray(p.produce())
                if not value.flags.c_contiguous:  # (np.ascontiguousarray would turn a scalar into shape (1,))
                    value = value.copy(order="C")
                # 16-bit floats may come as their raw uint16 bits
                raw_bits_ok = p.dtype in ("F16", "BF16") and value.dtype == np.uint16
                if value.dtype.newbyteorder("<") != DTYPES[p.dtype].newbyteorder("<") and not raw_bits_ok:
                    raise ValueError(f"tensor '{p.name}': produced {value.dtype}, planned {p.dtype}")
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"tensor '{p.name}': produced shape {value.shape}, planned {p.shape}")
                f.write(value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes())
                if on_tensor is not None:
                    on_tensor(p, value)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)  # make the rename itself durable
    return 8 + len(raw) + offset


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it the racy way
    os.umask(mask)
    return mask


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
