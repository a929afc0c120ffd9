"""Structured output: JSON (any object, or a JSON schema), regular expressions and Lark grammars,
enforced token by token with llguidance (the constrained-decoding library llama.cpp and vLLM use).

GrammarProcessor is a logits processor (pyllm.sampling): it sets the score of every token the
grammar forbids at this point to -inf. Its mask for the next token is computed in a worker thread
(llguidance releases the GIL) while the engine runs the step that produces the next logits, so the
grammar costs decoding time only when it takes longer than one forward pass.

llguidance is optional (the serve and grammar extras): without it, plain generation works and a
request for structured output raises GrammarUnavailable (a RuntimeError) with the install command.
A grammar llguidance refuses raises ValueError when it is given; one that cannot be followed while
generating (it allows no text at all, or its lexer grows past llguidance's limits at some token)
raises GrammarError (a PyllmError) at that point: before any output when it fails at the start.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import PyllmError
from .tokenizer import check_text

MISSING = "structured output needs llguidance: pip install 'pyllm[grammar]' (or pip install llguidance)"
RESPONSE_FORMATS = ("text", "json_object", "json_schema", "regex", "grammar")
# JSON as OpenAI writes it: ", " and ": " between items, no other whitespace (llguidance's JSON
# options; a schema's own "x-guidance" options win)
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# tool parameters: keywords llguidance does not implement (propertyNames, of zod records and MCP tools) are
# ignored, as llama.cpp's and vLLM's grammars ignore them: a forced call is JSON of the schema's shape, not
# held to those keywords (they refused the whole request, whatever tool_choice said)
TOOL_JSON_STYLE = {**JSON_STYLE, "lenient": True}
# compiled grammars kept per tokenizer (the most recently used): a request's n choices, its prompts and
# the next requests with the same schema copy one (about 0.1 ms) instead of compiling it again (a second
# and 30 MB for a schema of 10,000 properties, each time)
COMPILED_KEPT = 8
ERROR_CHARS = 500  # of an llguidance error message


class GrammarUnavailable(RuntimeError):
    """Structured output was asked for and llguidance is not installed."""


class GrammarError(PyllmError):
    """The grammar cannot be followed (llguidance's matcher stopped with an error)."""


class GrammarInvalid(PyllmError):
    """llguidance refuses the grammar (a Lark grammar, regular expression or JSON schema it cannot compile)."""


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401 - the bitmask helpers
    except ImportError:
        raise GrammarUnavailable(MISSING) from None
    return llguidance


# JSON Schema keywords whose value is a schema, a list of schemas or a map of names to schemas
_SCHEMA_KEYWORDS = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames",
                    "unevaluatedProperties", "unevaluatedItems")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def strict_schema(schema):
    """schema as OpenAI's strict structured outputs read it: every object schema with properties and no
    additionalProperties allows no others (OpenAI refuses a strict schema without additionalProperties
    false; pyllm adds it, and keeps what a schema states). Subschemas are found by keyword (JSON Schema
    2020-12), so a property named "properties" is not taken for the keyword. A copy; RecursionError for
    nesting deeper than Python's stack."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    for key in _SCHEMA_KEYWORDS:
        if isinstance(out.get(key), dict):
            out[key] = strict_schema(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [strict_schema(s) for s in out[key]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: strict_schema(s) for name, s in out[key].items()}
    return out


def grammar_from(response_format: dict | None = None, grammar: str | None = None) -> str | None:
    """The llguidance grammar for OpenAI's response_format or a Lark grammar, or None for free text.

    response_format: {"type": "text"}; {"type": "json_object"} (any JSON object; with "schema": {...},
    llama.cpp's and llama-cpp-python's form, an object that schema allows);
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}} (no schema: any JSON;
    strict true: objects allow no properties they do not list, strict_schema);
    pyllm's extensions {"type": "regex", "regex": "..."} and {"type": "grammar", "grammar": "<Lark>"}.
    Raises ValueError for a malformed response_format or both arguments at once; GrammarUnavailable
    without llguidance."""
    if response_format is not None and not isinstance(response_format, dict):
        raise ValueError("response_format must be an object such as {'type': 'json_object'}")
    if response_format is not None and "type" not in response_format:  # ({} ran unconstrained, in silence)
        raise ValueError(f"response_format needs a 'type' ({', '.join(RESPONSE_FORMATS)}); got {response_format!r:.80}")
    kind = (response_format or {}).get("type", "text")
    if kind not in RESPONSE_FORMATS:
        raise ValueError(f"response_format type must be one of {', '.join(RESPONSE_FORMATS)}; got {kind!r}")
    if (response_format or {}).get("schema") is not None and kind != "json_object":  # it was ignored
        raise ValueError("response_format's schema is taken with type 'json_object' only (llama.cpp's form); type "
                         f"{kind!r} would ignore it" + (": give json_schema.schema" if kind == "json_schema" else ""))
    if grammar is not None and kind != "text":
        raise ValueError("give either response_format or grammar, not both")
    if grammar is None and kind == "text":
        return None
    LLMatcher = _llguidance().LLMatcher
    if grammar is not None:
        return LLMatcher.grammar_from_lark(_lark(_string(grammar, "grammar"), "grammar"))
    if kind == "json_object" and response_format.get("schema") is not None:
        # llama.cpp's server and llama-cpp-python take a json_object's schema here (it was ignored: any object)
        kind, response_format = "json_schema", {"json_schema": {"schema": response_format["schema"]}}
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_STYLE)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        # OpenAI's schema is optional, as the server takes it: none (or null) allows any JSON value
        schema = (spec.get("schema") if spec.get("schema") is not None else {}) if isinstance(spec, dict) else None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}; got "
                             + (f"a schema of type {type(schema).__name__}" if isinstance(spec, dict) else
                                f"json_schema of type {type(spec).__name__}"))
        if schema is False:
            raise GrammarInvalid("the grammar is not valid: the JSON schema false allows no value")
        if isinstance(spec, dict) and spec.get("strict") is True:
            try:
                schema = strict_schema(schema)
            except RecursionError:
                raise GrammarInvalid("the grammar is not valid: the JSON schema is nested too deeply") from None
        try:  # Python values JSON has not (a set, bytes, NaN, a tuple as key) were json's bare TypeError
            text = json.dumps({} if schema is True else schema, allow_nan=False, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError) as e:
            raise GrammarInvalid(f"the grammar is not valid: the JSON schema is not JSON: {e}") from None
        _unicode(text, "the JSON schema (as JSON text)")
        try:  # the schema true allows any value, as {} does (llguidance takes options only on an object)
            return LLMatcher.grammar_from_json_schema(text, defaults=JSON_STYLE)
        except (ValueError, RecursionError) as e:
            raise GrammarInvalid(f"the grammar is not valid: {_first_line(str(e))}") from None
    try:
        if kind == "regex":
            return LLMatcher.grammar_from_regex(_string(response_format.get(kind), "response_format regex"))
        return LLMatcher.grammar_from_lark(_lark(_string(response_format.get(kind), "response_format grammar"),
                                                 "response_format grammar"))
    except PyllmError:
        raise
    except ValueError as e:
        if "must be a non-empty string" in str(e):
            raise
        raise GrammarInvalid(f"the grammar is not valid: {_first_line(str(e))}") from None


def _lark(text: str, what: str) -> str:
    """A grammar in Lark syntax: GBNF (llama.cpp's grammars, what llama-cpp-python's LlamaGrammar reads:
    `root ::= ...`) is converted by llguidance's own converter; it was "the grammar is not valid: 1(7):
    Expected token '_', found '='". Lark (a `start:` rule) is given as it is."""
    if "::=" not in text:
        return text
    try:
        from llguidance.gbnf_to_lark import any_to_lark
    except ImportError:  # an llguidance without the converter: Lark only
        return text
    try:
        return any_to_lark(text)
    except Exception as e:  # its parser's own errors (ValueError, IndexError, ...): one line naming the grammar
        raise GrammarInvalid(f"the grammar is not valid: {what} looks like GBNF (`root ::= ...`), which could not "
                             f"be converted to Lark: {_first_line(str(e)) or type(e).__name__}") from None


def _string(value, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    return _unicode(value, what)


def _unicode(text: str, what: str) -> str:
    """text, or GrammarInvalid naming its first lone surrogate (a str can hold one; llguidance takes
    UTF-8: a Lark grammar holding one was a bare UnicodeEncodeError, a schema's llguidance's
    "unexpected end of hex escape")."""
    try:
        return check_text(text, what)
    except PyllmError as e:
        raise GrammarInvalid(f"the grammar is not valid: {e}") from None


# -- llguidance's view of a pyllm tokenizer -------------------------------------------------------

_lock = threading.Lock()


def ll_tokenizer(tokenizer):
    """llguidance's LLTokenizer for a pyllm Tokenizer (built once, about a second for 50k tokens,
    and cached on it). llguidance tokenizes the text a grammar forces (a schema's const, a regex's
    literal) with the tokenizer it is given: a Hugging Face tokenizer.json maps a special token's text
    there to the special token, so a const "a<|im_end|>b" was written as "a" and the end-of-turn
    token, which ended the reply. It is given pyllm's own tokenizer instead, reading such text
    as plain text (Tokenizer.encode's parse_special=False), as the chat path reads message content."""
    cached = getattr(tokenizer, "_ll_tokenizer", None)
    if cached is not None:
        return cached
    llg = _llguidance()
    if not tokenizer.eos_ids:
        raise ValueError("structured output needs a model with an end-of-sequence token")
    with _lock:
        ll = llg.LLTokenizer(llg.TokenizerWrapper(_TokenizerView(tokenizer)), n_vocab=tokenizer.vocab_size,
                             eos_token=tokenizer.eos_ids)
        tokenizer._ll_tokenizer = ll
    return ll


class _TokenizerView:
    """What llguidance's TokenizerWrapper reads: each token's bytes, the special ids, and an encoder
    that reads a special token's text as plain text."""

    def __init__(self, tokenizer):
        self.eos_token_id = tokenizer.eos_ids[0]
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.special_ids)
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False, parse_special=False)


# -- the processor -------------------------------------------------------------------------------

_executor: ThreadPoolExecutor | None = None


def _worker() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pyllm-grammar")
    return _executor


def _first_line(message: str) -> str:
    """llguidance's error without the parser state dump it appends; a first line that only
    announces the error ("regex parse error:") gets the "error: ..." line that says what it is; a
    JSON schema too deep is said to be. At most ERROR_CHARS characters: llguidance quotes a bad regex
    whole (megabytes in a request), so a longer line keeps its start (where) and end (what is wrong)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    detail = next((line for line in lines[1:] if line.startswith("error:")), None)
    line = f"{lines[0]} {detail[len('error:'):].strip()}" if lines[0].endswith(":") and detail else lines[0]
    if "recursion limit exceeded at line" in line:  # serde_json's, reading a JSON schema
        line += " (JSON nested deeper than the 128 levels llguidance reads)"
    if len(line) > ERROR_CHARS:
        cut = len(line) - ERROR_CHARS + 40
        line = f"{line[:ERROR_CHARS // 3]} [... {cut} characters ...] {line[ERROR_CHARS // 3 + cut:]}"
    return line


def _matcher(tokenizer, ll, grammar: str):
    """A fresh llguidance matcher for grammar: a copy of the one compiled before for tokenizer (its
    last COMPILED_KEPT grammars are kept, each in its start state), else compiled now and kept.
    GrammarInvalid when llguidance refuses the grammar."""
    llg = _llguidance()
    with _lock:
        kept = tokenizer.__dict__.setdefault("_ll_matchers", OrderedDict())
        compiled = kept.get(grammar)
        if compiled is not None:
            kept.move_to_end(grammar)
            return compiled.deep_copy()
    matcher = llg.LLMatcher(ll, grammar, log_level=0)  # (outside the lock: compiling can take seconds)
    if matcher.is_error():
        raise GrammarInvalid(f"the grammar is not valid: {_first_line(matcher.get_error())}")
    with _lock:
        kept[grammar] = matcher.deep_copy()
        while len(kept) > COMPILED_KEPT:
            kept.popitem(last=False)
    return matcher


class GrammarProcessor:
    """Masks the tokens a grammar forbids. Raises GrammarInvalid for a grammar llguidance refuses,
    GrammarError for one that allows no text at the start (here) or later (from __call__/accept).

    accept(token) (called by the generation loop after each generated token) advances the grammar
    and starts computing the next mask in a worker thread; __call__ waits for it and applies it.
    ready() and when_ready() let the server's scheduler run other sequences meanwhile."""

    def __init__(self, tokenizer, grammar: str, vocab_size: int):
        llg = _llguidance()
        self._np = llg.numpy
        self.tokenizer = ll_tokenizer(tokenizer)
        self.matcher = _matcher(tokenizer, self.tokenizer, grammar)
        self.vocab_size = vocab_size
        self.mask = self._np.allocate_token_bitmask(1, self.tokenizer.vocab_size)
        self._fill()  # the first mask now: a grammar that allows nothing fails before any output
        self._next = _worker().submit(lambda: None)

    def _fill(self) -> None:
        self._np.fill_next_token_bitmask(self.matcher, self.mask)
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise GrammarError(f"the grammar cannot be followed ({_first_line(self.matcher.get_error())}): it allows "
                               "no text here, or grew past the matcher's limits")

    def _advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            self._check()
            raise GrammarError(f"the grammar refused token {token}")
        self._fill()

    def ready(self) -> bool:
        """Whether the mask for the next token is there (__call__ would not wait for it)."""
        return self._next.done()

    def when_ready(self, callback) -> None:
        """Calls callback() once ready() is true (at once when it is; else from the worker thread)."""
        self._next.add_done_callback(lambda _: callback())

    def accept(self, token: int) -> None:
        self._next.result()
        self._next = _worker().submit(self._advance, int(token))

    def __call__(self, ids, scores: np.ndarray) -> np.ndarray:
        self._next.result()
        self._check()
        n = min(scores.size, self.tokenizer.vocab_size)
        allowed = np.unpackbits(self.mask.view(np.uint8), bitorder="little")[:n]
        scores[:allowed.size][allowed == 0] = -np.inf
        scores[allowed.size:] = -np.inf
        return scores
