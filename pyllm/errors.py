"""pyllm's error type: every failure that input (a file, a request, a template, a prompt) can cause.

PyllmError is a ValueError, so callers that caught ValueError keep working. Its kinds:
FormatError (a model, adapter or tokenizer file), TemplateError (a chat template), RequestError (an
HTTP request to `pyllm serve`), DataError (training data), LimitError (an input past a size or time
limit; docs/SECURITY.md lists them).

Libraries that pyllm calls on untrusted input raise their own types, some of them outside
Exception (the tokenizers library's PanicException derives from BaseException): `library_errors`
turns any of them into a PyllmError with a message, leaving only KeyboardInterrupt, SystemExit,
GeneratorExit, MemoryError and PyllmError itself to pass.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import Iterator


class PyllmError(ValueError):
    """An input pyllm refuses, with a message saying why."""


class LimitError(PyllmError):
    """An input larger, or slower to process, than a limit allows (the message names the limit)."""


class RequestError(PyllmError):
    """An HTTP request `pyllm serve` refuses: status is the HTTP status (400, or 408/413 for a
    body too slow or too large); param names the request field at fault, as OpenAI's error does, and
    code is OpenAI's error code where it has one ("context_length_exceeded")."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class ContextLengthWarning(UserWarning):
    """LLM(context_length=...) past the positions the model was trained on: rotary and ALiBi models
    run there, as in llama.cpp and transformers, but predict poorly."""


PASSING = (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError, PyllmError)


@contextlib.contextmanager
def library_errors(what: str, kind: type[PyllmError] = PyllmError, first_line: bool = False) -> Iterator[None]:
    """Turns anything a library raises inside the block into `kind` ("{what}: {type}: {message}");
    first_line: the message's first line only (transformers' run to five, with advice that does not apply)."""
    try:
        yield
    except PASSING:
        raise
    except BaseException as e:  # noqa: B036 - pyo3's PanicException is a BaseException
        message = (str(e).strip().splitlines() or [""])[0] if first_line else e
        raise kind(f"{what}: {type(e).__name__}: {message}") from e


MAX_TEXT_FILE_BYTES = 2**30  # a text file read whole (a perplexity corpus): past it, refused


def read_bytes(path: str, kind: type[PyllmError] = PyllmError, limit: int | None = None,
               regular: bool = False) -> bytes:
    """The bytes of a file read whole, at most `limit` of them: kind naming the file past it (a file
    that never ends, such as /dev/zero behind a model directory's name, was read until memory ran out);
    limit None: MAX_TEXT_FILE_BYTES. Opening never waits: a FIFO that no process writes reads as empty
    (open() waited for ever for a writer). regular: the file must be a regular file (a model
    directory's files), kind("{path} is a FIFO, not a regular file") otherwise. OSError (missing, a
    directory, unreadable) passes."""
    limit = MAX_TEXT_FILE_BYTES if limit is None else limit
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if regular and not stat.S_ISREG(mode):
            raise kind(f"{path} is {file_kind(mode)}, not a regular file")
        if stat.S_ISDIR(mode):  # (open(fd) would name the descriptor: "Is a directory: 4")
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        os.set_blocking(fd, True)  # a pipe with a writer (a shell's <(...)) is read to its end
    except BaseException:
        os.close(fd)
        raise
    with open(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise kind(f"{path} holds more than {limit} bytes: too long for what it should be")
    return data


def file_kind(mode: int) -> str:
    """What an st_mode names, for messages: "a directory", "a FIFO", "a character device", ..."""
    return ("a directory" if stat.S_ISDIR(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a regular file" if stat.S_ISREG(mode)
            else "not a regular file")


def read_text(path: str, kind: type[PyllmError] = PyllmError, limit: int | None = None,
              regular: bool = False) -> str:
    """The text of a UTF-8 file (a chat template, a perplexity text) of at most `limit` bytes (read_bytes,
    regular as there); kind naming the file and the first bad byte when it is not UTF-8."""
    return decode_text(read_bytes(path, kind, limit, regular), str(path), kind)


def decode_text(data: bytes, what: str, kind: type[PyllmError] = PyllmError) -> str:
    """data decoded as UTF-8, without a leading byte-order mark (Windows editors write one: it went into
    every prompt a --chat-template file rendered, a piped prompt, a perplexity text; train's data
    reader drops it too); kind("{what} is not UTF-8 text (byte N: reason)") otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise kind(f"{what} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    return text[1:] if text.startswith("\ufeff") else text
