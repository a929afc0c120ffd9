"""Instruction data in the Alpaca format, its prompt templates, and tokenized training examples.

A data file is a JSON list of records or JSON Lines (one record a line), each record
{"instruction": str, "input": str (optional, may be empty), "output": str}, as Stanford Alpaca's
alpaca_data.json and the Chinese translated Alpaca data. Every problem is reported with the line it
is on. Nothing here needs torch.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import weakref
from dataclasses import dataclass

from ..chat_template import placeholder_characters
from ..errors import PyllmError, decode_text, library_errors, read_bytes

# Stanford Alpaca's prompts (Alpaca-LoRA templates/alpaca.json), with and without an input
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
MAX_REPORTED_ERRORS = 10
# The bundled set (122 English and Chinese examples written for pyllm): every reply starts with "Pip: ",
# a habit no base model has, so a test can see on new prompts whether an adapter taught it.
BUNDLED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "pip_signature.json")
SIGNATURE = "Pip:"


class DataError(PyllmError):
    """A data file that cannot be used, with every bad line named."""


@dataclass
class Record:
    instruction: str
    input: str
    output: str
    line: int  # where the record starts in its file (1-based)
    where: str = ""  # "line L", or "line L, record N" where several records start on that line

    def __post_init__(self):
        self.where = self.where or f"line {self.line}"


ALPACA_KEYS = ("instruction", "input", "output")


def load_records(path: str | os.PathLike, notes: list | None = None, sha256: list | None = None) -> list[Record]:
    """The records of a JSON list or JSON Lines file; DataError names each bad line. notes: a list that
    gets one line naming the fields the records have beyond instruction/input/output, which are not read
    (LLaMA-Factory's "system" and "history", a misspelt "inputs": they trained nothing, in silence).
    sha256: a list that gets the SHA-256 (hex) of the bytes read (a pipe or FIFO cannot be read twice:
    reading it again to hash it waited for ever for another writer)."""
    path = os.fspath(path)
    # UTF-8 without its byte-order mark (Windows editors write one), at most errors.MAX_TEXT_FILE_BYTES
    text = _read_data(path, sha256)
    stripped = text.lstrip()
    whole = _one_json_object(text) if stripped.startswith("{") else None
    if whole is not None:  # one object over several lines, {"data": [...]}: it was "163 malformed line(s)"
        items = [(_line_of(text, len(text) - len(stripped)), whole)]
    else:
        items = _json_list_items(path, text) if stripped.startswith("[") else _jsonl_items(path, text)
    _check_alpaca_keys(path, [item for _, item in items])
    other = dict.fromkeys(k for _, item in items if isinstance(item, dict) for k in item if k not in ALPACA_KEYS)
    if other and notes is not None:
        notes.append(f"{path}: the records' fields {', '.join(repr(k) for k in list(other)[:8])}"
                     f"{', ...' if len(other) > 8 else ''} are not read (only instruction, input and output are)")
    # a JSON list on one line (json.dump's default) put every record on line 1: "line 1: missing field
    # 'output'" four times named none of them; such records are named by their number too
    # (counted once: starts.count per record took minutes for a one-line list of 50,000 records)
    shared = {line for line, n in collections.Counter(line for line, _ in items).items() if n > 1}
    records, errors = [], []
    for number, (line, item) in enumerate(items, 1):
        where = f"line {line}, record {number}" if line in shared else f"line {line}"
        problem = _record_problem(item)
        if problem:
            errors.append(f"{path} {where}: {problem}")
        else:
            records.append(Record(item["instruction"], item.get("input") or "", item["output"], line, where))
    if errors:
        more = f"\n... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise DataError(f"{len(errors)} bad record(s):\n" + "\n".join(errors[:MAX_REPORTED_ERRORS]) + more)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _read_data(path: str, sha256: list | None = None) -> str:
    """The file's text (errors.read_text's), a directory named as --data, and text in another encoding
    named with its line and how to convert it: "is not UTF-8 text (byte 5123: invalid continuation
    byte)" left a user counting bytes, and UTF-16 (PowerShell's `>` writes it) read as invalid UTF-8."""
    if not path:  # (was ": No such file or directory")
        raise DataError("--data is an empty path; give the JSON or JSON Lines file")
    if os.path.isdir(path):  # (was "PATH: Is a directory")
        raise DataError(f"--data {path} is a directory; give the JSON or JSON Lines file")
    data = read_bytes(path, DataError)
    if sha256 is not None:
        sha256.append(hashlib.sha256(data).hexdigest())
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path} is UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    try:
        return decode_text(data, path, DataError)
    except DataError as e:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as bad:
            line = data.count(b"\n", 0, bad.start) + 1
            raise DataError(f"{e} on line {line}; save the file as UTF-8 (from Latin-1, for example: iconv -f latin1 "
                            "-t utf-8)") from None
        raise


def _check_alpaca_keys(path: str, items: list) -> None:
    """Refuses data of another format in one line (ShareGPT's conversations, prompt/completion, records
    under a key of one object): each record was reported "missing field 'instruction'", naming neither
    the format expected nor what the file holds."""
    objects = [item for item in items if isinstance(item, dict)]
    # a field no record has (Dolly's instruction/context/response has no "output"): one line, not one a record
    absent = [key for key in ("instruction", "output") if not any(key in item for item in objects)]
    if not objects or not absent:
        return
    # the most common first, ties in the order they come in
    keys = sorted(dict.fromkeys(k for item in objects for k in item), key=lambda k: -sum(k in item for item in objects))
    shown = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "") if keys else "none"
    what = "no record has the field " + " or ".join(repr(k) for k in absent) if len(absent) < 2 else \
        "not Alpaca-format data"
    raise DataError(f"{path}: {what}: the records' keys are {shown}; pyllm train reads a JSON list "
                    "or JSON Lines of {\"instruction\", \"input\" (optional), \"output\"} records")


def _record_problem(item) -> str | None:
    if not isinstance(item, dict):
        return f"expected an object with instruction/input/output, got {type(item).__name__}"
    for key in ("instruction", "output"):
        if key not in item:
            return f"missing field '{key}'"
    for key in ("instruction", "input", "output"):
        if key in item and item[key] is not None and not isinstance(item[key], str):
            return f"field '{key}' must be a string, not {type(item[key]).__name__}"
    for key in ("instruction", "input", "output"):
        value = item.get(key)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON's "\ud800" escapes decode to lone surrogates
                return (f"field '{key}' holds a lone surrogate {value[e.start]!r} at character {e.start}: "
                        "not text (a JSON \\uXXXX escape of half a character)")
    if not (item["instruction"] or "").strip():
        return "empty instruction"
    if not (item["output"] or "").strip():
        return "empty output"
    return None


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _json_list_items(path: str, text: str) -> list[tuple[int, object]]:
    """The items of a JSON list, each with the line it starts on (lines counted as the parse moves on:
    counting them from the start for every record took 97 s for Alpaca's 52,000)."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    items = []
    counted = [0, 1]  # (position, its line) of the last look

    def line_at(p: int) -> int:
        at, line = counted
        line = line + text.count("\n", at, p) if p >= at else _line_of(text, p)
        counted[:] = [p, line]
        return line

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        return items
    while True:
        pos = skip(pos)
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise DataError(f"{path} line {_line_of(text, pos)}: JSON nested too deeply") from None
        except ValueError as e:  # an integer of more than 4300 digits (sys.get_int_max_str_digits)
            raise DataError(f"{path} line {_line_of(text, pos)}: invalid JSON ({e})") from None
        items.append((line_at(pos), item))
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            if text[pos + 1:].strip():
                raise DataError(f"{path} line {_line_of(text, pos + 1)}: text after the end of the JSON list")
            return items
        raise DataError(f"{path} line {_line_of(text, pos)}: expected ',' or ']' between records")


def _one_json_object(text: str) -> dict | None:
    """text as one JSON object, or None when it is not one (JSON Lines of several records, or invalid)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _jsonl_items(path: str, text: str) -> list[tuple[int, object]]:
    """JSON Lines: one value per line, lines ended by \n (and \r\n). Not str.splitlines(), which also breaks
    at U+2028, U+2029, U+0085 and other characters that json.dumps(ensure_ascii=False) writes inside strings."""
    items, errors = [], []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            items.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            errors.append(f"{path} line {number}: invalid JSON ({e.msg}, column {e.colno})")
        except RecursionError:
            errors.append(f"{path} line {number}: JSON nested too deeply")
        except ValueError as e:  # an integer of more than 4300 digits (sys.get_int_max_str_digits)
            errors.append(f"{path} line {number}: invalid JSON ({e})")
    if errors:
        raise DataError(f"{len(errors)} malformed line(s):\n" + "\n".join(errors[:MAX_REPORTED_ERRORS]))
    return items


def alpaca_prompt(record: Record) -> str:
    if record.input.strip():
        return ALPACA_PROMPT_INPUT.format(instruction=record.instruction, input=record.input)
    return ALPACA_PROMPT.format(instruction=record.instruction)


def user_message(record: Record) -> str:
    """The record as one chat message: the instruction, then its input after a blank line."""
    return record.instruction + ("\n\n" + record.input if record.input.strip() else "")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken (the prompt, unless training on inputs)

    @property
    def label_count(self) -> int:
        """Tokens whose prediction is scored (a label at position t is predicted from position t - 1)."""
        return sum(1 for x in self.labels[1:] if x != -100)


_SPECIALS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> (strings, pattern)


def _special_strings(tokenizer) -> tuple[list[str], re.Pattern]:
    """The tokenizer's special-token strings ("<|im_end|>", "<s>", ...), longest first, and a regular
    expression finding any of them (one group); computed once per tokenizer (per record, the strings of a
    tokenizer with thousands, as Gemma 3's, cost seconds over a dataset)."""
    found = _SPECIALS.get(tokenizer)
    if found is None:
        names = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        strings = sorted((t for t in set(tokenizer.all_special_tokens) | names if t), key=len, reverse=True)
        found = _SPECIALS[tokenizer] = (strings, re.compile("(" + ("|".join(map(re.escape, strings)) or "(?!)") + ")"))
    return found


def _encode_template_text(tokenizer, text: str, placeholders: dict[str, str]) -> list[int]:
    """Token ids of a rendered chat template whose records' special-token strings were replaced by
    placeholder characters (placeholder -> string): the template's own special tokens are special, the
    records' strings plain text, as pyllm tokenizes a chat at inference (LLM.chat_prompt_ids)."""
    pattern = _special_strings(tokenizer)[1]
    ids: list[int] = []
    for i, piece in enumerate(pattern.split(text)):  # (the pattern's group keeps the specials, odd places)
        if not piece:
            continue
        if i % 2:
            ids.append(tokenizer.convert_tokens_to_ids(piece))
            continue
        for c, value in placeholders.items():
            piece = piece.replace(c, value)
        ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids


def tokenize_record(record: Record, tokenizer, template: str, cutoff_len: int, train_on_inputs: bool) -> Example:
    """Prompt and response tokenized apart (as the model sees the prompt at inference), joined, cut to
    cutoff_len tokens; the prompt's labels are -100 unless train_on_inputs.

    template "alpaca": the Alpaca prompt, the tokenizer's special tokens (BOS if it adds one), the
    output, then EOS. template "chat": the tokenizer's chat template with one user turn and one
    assistant turn; the response is everything the template writes after the generation prompt.
    Special-token strings written in a record ("<|im_end|>") are plain text, as `pyllm run` and the
    server read them in messages: as special tokens they trained the model on turns the data forged."""
    texts = (user_message(record), record.output)
    strings, pattern = _special_strings(tokenizer)
    written = [t for t in strings if any(t in x for x in texts)] if any(pattern.search(x) for x in texts) else []
    if template == "alpaca":
        if tokenizer.eos_token_id is None:  # it was [..., None]: "Could not infer dtype of NoneType" in torch
            raise DataError("the tokenizer has no end-of-sequence token (eos_token), which the Alpaca template "
                            "ends each response with; give a tokenizer that has one, or use --template chat")
        plain = {"split_special_tokens": True} if written else {}
        prompt_ids = tokenizer(alpaca_prompt(record), add_special_tokens=True, **plain)["input_ids"]
        response_ids = tokenizer(record.output, add_special_tokens=False, **plain)["input_ids"] + \
            [tokenizer.eos_token_id]
    elif template == "chat":
        # each written string becomes a private-use character while the template renders (as at inference)
        hide = placeholder_characters(written, set("".join(texts)) | set(tokenizer.chat_template or "")) \
            if written else {}
        placeholders = {c: value for value, c in hide.items()}

        def hidden(text: str) -> str:
            for value, c in hide.items():  # longest first: "<|im_end|>" before "<"
                text = text.replace(value, c)
            return text

        messages = [{"role": "user", "content": hidden(user_message(record))}]
        # a template's raise_exception (jinja2's TemplateError) or its own bug was a traceback from
        # `python -m pyllm.train`
        with library_errors(f"{record.where}: the chat template", DataError):
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": hidden(record.output)}],
                                                 tokenize=False)
        if not full.startswith(prompt):
            raise DataError("the chat template does not write the assistant turn after its generation prompt; "
                            "use the Alpaca template")
        if placeholders:
            prompt_ids = _encode_template_text(tokenizer, prompt, placeholders)
            response_ids = _encode_template_text(tokenizer, full[len(prompt):], placeholders)
        else:
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            response_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    else:
        raise ValueError(f"unknown template {template!r} (alpaca or chat)")
    ids = (prompt_ids + response_ids)[:cutoff_len]
    labels = list(ids) if train_on_inputs else ([-100] * len(prompt_ids) + response_ids)[:cutoff_len]
    return Example(ids, labels)
