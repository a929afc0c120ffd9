"""A strict reader and an atomic, streaming writer for the safetensors container.

Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
({"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}),
then the data section; offsets are relative to its start.

The reader trusts nothing: every length, offset, dtype and shape is checked
against the file before any tensor is touched, so a truncated or hostile file
raises FormatError instead of reading out of bounds. Tensors are returned as
read-only numpy views of a memory map (no copy).

The writer refuses NaN and infinity in every float tensor (naming the tensor) and records a CRC-32
of every tensor's bytes in the metadata (CHECKSUM_KEY); verify_checksums() checks them all.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import tempfile
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from ..errors import PyllmError, file_kind

MAX_HEADER_BYTES = 100 * 1024 * 1024  # what the reference implementation allows
# tensors one file may list: a .pllm holds ~30 a layer (weights, scales, norms) and a checkpoint's
# shard fewer, so 1024 layers stay far below; a 100 MB header can list 1.3 million, which took 18 s
# to parse and check before the file was found to be no model at all
MAX_TENSORS = 1 << 17
# JSON values of a header, counted as its commas, brackets and braces before parsing (inside strings
# too, so an upper bound an escape cannot hide from): an entry takes ~10, and 100 MB of `[],` took
# Python's json 11 s whatever the entries; at this bound parsing takes well under a second
MAX_HEADER_ITEMS = 16 * MAX_TENSORS
ALIGNMENT = 64  # pyllm aligns the data section and every tensor to a cache line
# a tensor's shape as numpy holds one: at most 32 dimensions (numpy's own limit is 64), the non-zero ones
# multiplying to at most 2^56 (numpy checks their product times the item size against 64-bit signed
# integers, zeros skipped: [2^31, 2^31, 0] of 8-byte items is "too big")
MAX_DIMENSIONS = 32
MAX_ARRAY_SPAN = 1 << 56
# metadata key: JSON {tensor name: CRC-32 (zlib.crc32, IEEE) of its bytes as 8 hex digits}
CHECKSUM_KEY = "pyllm.checksums"
# metadata key: CRC-32 of the rest of the header (header_checksum), 8 hex digits
HEADER_CHECKSUM_KEY = "pyllm.header_checksum"
# bits that are all set in a non-finite number, for the float types stored as integers
NONFINITE_BITS = {"F16": 0x7C00, "BF16": 0x7F80}

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


class FormatError(PyllmError):
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


def loads_json(text: str, what: str):
    """json.loads of JSON text a file holds; what names it in messages ("{path}: metadata 'KEY'").
    FormatError for invalid JSON, nesting too deep to parse, and a key given twice in an object (which
    json.loads would settle as "the last one wins", another reader perhaps as the first)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise FormatError(f"{what} lists {e.args[0]!r} twice") from None
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{what} is not valid JSON ({type(e).__name__}: {e})") from None


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
            if not prefix:  # (a .gguf of 0 bytes was "too short to be a safetensors file")
                raise _fail(self.path, "the file is empty (0 bytes): an interrupted download or copy?")
            if len(prefix) < 8:
                raise _fail(self.path, "file is too short to be a safetensors file (is it truncated?)")
            header_len = int.from_bytes(prefix, "little")
            if prefix[:4] == b"GGUF":  # (its magic read as a length was "implausibly large (corrupt file?)")
                raise _fail(self.path, "is a GGUF file, not a safetensors (.pllm) file: convert it with `pyllm "
                                       "convert`, or give it to `pyllm run` / LLM(), which convert it into the cache")
            if header_len > MAX_HEADER_BYTES:
                raise _fail(self.path, f"header length {header_len} is implausibly large (corrupt file?)")
            if 8 + header_len > self.file_size:
                raise _fail(self.path, f"header length {header_len} runs past the end of the file (truncated?)")
            raw = f.read(header_len)
        if raw.count(b",") + raw.count(b"[") + raw.count(b"{") > MAX_HEADER_ITEMS:
            raise _fail(self.path, f"header holds more than {MAX_HEADER_ITEMS} JSON values, too many for a model "
                                   f"file of at most {MAX_TENSORS} tensors (corrupt file?)")
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
        if len(header) > MAX_TENSORS:
            raise _fail(self.path, f"header lists more than {MAX_TENSORS} tensors (corrupt file?)")
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
        # numpy holds at most 32 dimensions (here) whose non-zero ones multiply within 63 bits, a zero among
        # them too: [2^62, 2^62, 0] passed as 0 bytes, then failed to reshape ("cannot reshape array of size 0")
        span = 1
        for d in shape[:MAX_DIMENSIONS + 1]:
            span *= d or 1
            if span > MAX_ARRAY_SPAN:
                break
        if len(shape) > MAX_DIMENSIONS or span > MAX_ARRAY_SPAN:
            raise _fail(self.path, f"tensor '{name}' has a shape no array can hold {_short(shape)} (more than "
                                   f"{MAX_DIMENSIONS} dimensions, or non-zero ones whose product passes 2^56)")
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


def header_checksum(metadata: dict[str, str], tensors: dict[str, dict]) -> str:
    """CRC-32 (8 hex digits) of a header as canonical JSON (sorted keys, no spaces, ASCII), the metadata
    without HEADER_CHECKSUM_KEY and each tensor as {"dtype", "shape", "data_offsets"}: a change of any
    value or of the tensor table changes it, a reformatting of the JSON does not."""
    canonical = {name: {"dtype": t["dtype"], "shape": list(t["shape"]), "data_offsets": list(t["data_offsets"])}
                 for name, t in tensors.items()}
    canonical["__metadata__"] = {k: v for k, v in metadata.items() if k != HEADER_CHECKSUM_KEY}
    return f"{zlib.crc32(json.dumps(canonical, sort_keys=True, separators=(',', ':')).encode('ascii')):08x}"


def verify_header(f: SafetensorsFile) -> None:
    """FormatError when f's header differs from its HEADER_CHECKSUM_KEY (nothing to check in files
    written before it was added). Reads no tensor."""
    recorded = f.metadata.get(HEADER_CHECKSUM_KEY)
    tensors = {n: {"dtype": t.dtype, "shape": t.shape, "data_offsets": [t.begin, t.end]} for n, t in f.tensors.items()}
    if recorded is not None and recorded.lower() != header_checksum(f.metadata, tensors):
        raise _fail(f.path, f"the header does not match its checksum ({HEADER_CHECKSUM_KEY}): its metadata (the "
                            "config, formats, tokenizer settings, chat template...) or tensor table changed since it "
                            "was written (the file is corrupt)")


def verify_checksums(f: SafetensorsFile) -> int:
    """Checks the CRC-32 of every tensor of f against its CHECKSUM_KEY metadata; returns the number
    of bytes checked. FormatError names the tensors that differ, lack a checksum, or that the
    checksums name but the file lacks, a header that differs from its HEADER_CHECKSUM_KEY (files
    written before it was added have none: their header is not checked), and a file without
    checksums (written by an older pyllm)."""
    raw = f.metadata.get(CHECKSUM_KEY)
    if raw is None:
        raise _fail(f.path, "carries no checksums (written by a pyllm before they were added); convert it again")
    sums = loads_json(raw, f"{f.path}: metadata '{CHECKSUM_KEY}'")
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise _fail(f.path, f"metadata '{CHECKSUM_KEY}' is not a JSON object of hex strings")
    names = [n for n in f.tensors if not n.startswith("__pad__")]
    missing = sorted(set(names) - set(sums))
    extra = sorted(set(sums) - set(names))
    if missing or extra:
        raise _fail(f.path, f"the checksums do not list the file's tensors (without one: {missing[:5]}; "
                            f"not in the file: {extra[:5]})")
    verify_header(f)
    bad, checked = [], 0
    view = memoryview(f._mapped()) if f.file_size > f.data_offset else memoryview(b"")
    try:
        for name in names:
            t = f.tensors[name]
            chunk = view[f.data_offset + t.begin:f.data_offset + t.end]
            try:
                if f"{zlib.crc32(chunk):08x}" != sums[name].lower():
                    bad.append(name)
            finally:
                chunk.release()
            checked += t.nbytes
    finally:
        view.release()
    if bad:
        raise _fail(f.path, f"{len(bad)} tensor(s) do not match their checksums (the file is corrupt): "
                            + ", ".join(bad[:10]) + (" ..." if len(bad) > 10 else ""))
    return checked


def check_finite(name: str, dtype: str, value: np.ndarray, label: str | None = None) -> None:
    """Refuses NaN or infinity in a float tensor (16-bit floats may be given as their uint16 bits).
    label: how the message names the tensor (a source's file and tensor); "tensor 'name'" when None."""
    if dtype in NONFINITE_BITS and value.dtype == np.uint16:
        bits = NONFINITE_BITS[dtype]
        bad = int(np.count_nonzero((value & bits) == bits))
    elif value.dtype.kind == "f":
        bad = int(value.size - np.count_nonzero(np.isfinite(value)))
    else:
        return
    if bad:
        hint = "check the LoRA adapters' alpha and weights" if label and " merged)" in label else \
            "the file is damaged, or its weights overflowed"
        raise FormatError(f"{label or f'tensor {name!r}'} holds {bad} NaN or infinite value(s); nothing was written "
                          f"({hint})")


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
    the gaps, since safetensors forbids holes). Float tensors must be finite
    (FormatError naming the tensor otherwise); the CRC-32 of every tensor goes
    into the metadata (CHECKSUM_KEY), and one of the rest of the header
    (HEADER_CHECKSUM_KEY). The file appears under `path` only once complete
    and synced; until then it has no name (Linux: O_TMPFILE, linked in at the
    end), so a process killed mid-write leaves nothing behind. Elsewhere a
    temporary "NAME.PID.XXXX.partial" file is renamed into place. A path
    check_output_path refuses raises its OSError before anything is written.
    """
    path = check_output_path(os.fspath(path))
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
    sums = {p.name: "0" * 8 for p in plans}  # filled in as the tensors are written; same length
    header: dict = {"__metadata__": dict(metadata)}
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

    def header_bytes() -> bytes:
        header["__metadata__"][CHECKSUM_KEY] = json.dumps(sums, separators=(",", ":"))
        tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
        header["__metadata__"][HEADER_CHECKSUM_KEY] = header_checksum(header["__metadata__"], tensors)
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        return raw + b" " * (-(8 + len(raw)) % ALIGNMENT)

    raw = header_bytes()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _open_unnamed(path)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
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
                check_finite(p.name, p.dtype, value)
                data = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
                sums[p.name] = f"{zlib.crc32(data):08x}"
                f.write(data)
                if on_tensor is not None:
                    on_tensor(p, value)
            final = header_bytes()
            assert len(final) == len(raw)
            f.seek(8)
            f.write(final)
            f.flush()
            os.fsync(fd)
        if tmp is None:  # an unnamed file: give it a temporary name, then the final one
            tmp = _unique_name(path)
            _link_fd(fd, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            # a write that failed (a full disk, a file size limit) named no file: "[Errno 28] No space left
            # on device" after minutes of converting; the output's name, the partial file removed
            raise OSError(e.errno, e.strerror, os.fspath(path)) from None
        raise
    finally:
        os.close(fd)
    _fsync_directory(directory)  # make the rename itself durable
    return 8 + len(raw) + offset


def check_output_path(path: str) -> str:
    """path, when write_atomic can write a file there: not empty, not a directory (nor a name ending in
    "/"), not a device, FIFO or socket, in a directory that exists and may be written; OSError naming
    the path otherwise (checked before a conversion's work, not after it). The finished file is
    renamed over what the path names: `-o /dev/null` replaced the device with a regular file (as root)
    and `-o FIFO` the FIFO, and an empty path failed only after the work ("No such file ... -> ''")."""
    if not path:
        raise FileNotFoundError("cannot write a file at an empty path: give the output's file name")
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    if path.endswith(("/", os.sep)):
        raise IsADirectoryError(f"cannot write {path}: a name ending in '/' names a directory; give a file name")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None  # a new file (or a dangling link, replaced as a new file is)
    if mode is not None and not stat.S_ISREG(mode):
        raise FileExistsError(f"cannot write {path}: it is {file_kind(mode)}, which the finished file would replace (it is "
                              "written beside the path and renamed into place); give a file path")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: the directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: the directory {directory} is not writable")
    return path


def _open_unnamed(path: str) -> tuple[int, str | None]:
    """A new file to write beside path: (fd, None) for an unnamed one (Linux O_TMPFILE, where the
    file system supports it), else (fd, name) of a NAME.PID.XXXX.partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    if hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd"):
        try:
            return os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666), None
        except OSError:
            pass  # the file system has no unnamed files
    return partial_file(path)


def partial_file(path: str) -> tuple[int, str]:
    """(fd, name) of a new file "NAME.PID.XXXX.partial" beside path, to be renamed to it once written:
    unique (two writers never share one), with this process's id (one left by a killed process is
    told from one being written: model_cache.remove_stale_partials), and the mode open() gives."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{os.path.basename(path)}.{os.getpid()}.", suffix=".partial", dir=directory)
    except OSError as e:  # named the temporary file ("/proc/x.pllm.23791.panymd73.partial: No such file ...")
        raise OSError(e.errno, f"cannot create a file in {directory} ({e.strerror})", path) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file private (0600)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def _link_fd(fd: int, name: str) -> None:
    """Gives the unnamed file open as fd the name `name` (linkat through /proc/self/fd, following
    the link: os.link does not pass AT_SYMLINK_FOLLOW)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, at_symlink_follow = -100, 0x400
    if libc.linkat(at_fdcwd, f"/proc/self/fd/{fd}".encode(), at_fdcwd, os.fsencode(name), at_symlink_follow) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot name the written file: {os.strerror(err)}", name)


def _unique_name(path: str) -> str:
    """A name beside path that nothing uses now (for a moment: it is renamed to path at once)."""
    return f"{path}.{os.getpid()}.{os.urandom(4).hex()}.partial"


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
