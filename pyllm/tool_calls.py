"""Tool calling: which format a chat template uses, parsing a reply into OpenAI tool calls, and the
grammar that forces a call when tool_choice asks for one.

Formats, chosen from the template's own text:
  hermes   (Hermes 2 Pro, Qwen2.5, ...)   <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>, one or more
  mistral  (Mistral 7B v0.3, Nemo, ...)   [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]
  mistral_args (Mistral Small 3.2, Magistral, Devstral, Ministral 3: tokenizer v11 on)
                                          [TOOL_CALLS]name[ARGS]{...}, one marker per call, with
                                          [CALL_ID]id before [ARGS] where the template writes one
  llama3   (Llama 3.1 / 3.2 JSON tools)   {"name": ..., "parameters": {...}}, optionally after <|python_tag|>
A template that never mentions `tools` has no tool support: tools given to it are refused
(ToolError), never silently dropped.

A reply's text outside its calls is its content, the same way in every format and whether the
reply is streamed or not (ToolCallStream sends the same text): the text before the first call, less
the whitespace that led up to it, then the text between and after the calls (less the whitespace
around them, and the separators between JSON calls; text after the calls keeps its own punctuation),
each on a line of its own. A Llama 3 reply without <|python_tag|> is a call
only when it opens with one.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
import threading
from collections import OrderedDict
from dataclasses import dataclass


class ToolError(ValueError):
    """Tools the model's chat template cannot take, or a tool that cannot be called. param: the
    request field at fault, as OpenAI's error names it ("tools", or "tools[k].function.parameters")."""

    def __init__(self, message: str, param: str = "tools"):
        super().__init__(message)
        self.param = param


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as the OpenAI API carries it
    id: str

    def as_openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


@dataclass
class Parsed:
    """A reply read for tool calls. content: its text outside the calls (the whole reply when it
    holds none); dropped: the reply was cut (max_tokens, a stop string) inside a call after complete
    ones, and that incomplete call was left out."""
    content: str
    calls: list[ToolCall]
    dropped: bool = False
    lead: str = ""  # the part of content before the first call (as joined into content)


class ToolFormat:
    """One tool-call convention. marker: the text that opens a call (None: the reply is the call).
    names: the functions the request declared (None: any); a call naming another is no call, so a
    reply that merely looks like one (a JSON answer with a "name" key) stays content. parallel False
    (the request's parallel_tool_calls): a reply's first call only, as OpenAI's API returns at most one."""

    name = ""
    marker: str | None = None

    def __init__(self, names=None, parallel: bool = True):
        self.names = None if names is None else frozenset(names)
        self.parallel = parallel

    @property
    def tags(self) -> tuple[str, ...]:
        """The tags the parser reads (special_tag_ids keeps those that are special tokens)."""
        return tuple(t for t in (self.marker, getattr(self, "end", None)) if t)

    def call_id(self) -> str:
        return "call_" + secrets.token_hex(12)

    def parse(self, text: str, cut: bool = False) -> tuple[str, list[ToolCall]]:
        """(the reply's text outside tool calls, the calls): split(text, cut) without `dropped`."""
        parsed = self.split(text, cut)
        return parsed.content, parsed.calls

    def split(self, text: str, cut: bool = False) -> Parsed:
        """The reply's calls and content. A call that is not valid JSON, not {"name": ...,
        "arguments"/"parameters": {...}}, or naming a function not in self.names, leaves the text as
        content and no calls.

        cut: the reply did not end by itself (max_tokens, or a stop string, cut it). Then a last
        call whose JSON (or marker) is incomplete, and a closing tag or list bracket cut short, are the cut's
        doing, not the model's: the complete calls before it are returned and it is left out
        (Parsed.dropped), where one bad call otherwise makes the whole reply text. Parallel forced
        calls cut by max_tokens lost every call this way, the complete ones too."""
        found = self._find(text, cut)
        calls = self._calls(found[1]) if found is not None else None
        if not calls:
            return Parsed(text, [])
        pieces, objects, dropped = found
        return Parsed(self._content(pieces), calls, dropped and self.parallel, self._content(pieces[:1]))

    def _find(self, text: str, cut: bool):
        """(the text outside the calls: before the first, between them, after the last; the calls'
        JSON objects; whether an incomplete last call was dropped), or None when text holds no
        calls in this format."""
        raise NotImplementedError

    def _content(self, pieces: list[str]) -> str:
        """The text outside the calls (the module's docstring says how it is joined)."""
        parts = [pieces[0].rstrip()] + [p.strip() for p in pieces[1:]]
        return "\n".join(p for p in parts if p)

    def call_grammar(self, parallel: bool) -> str:
        """The Lark start rule for one call (or several when parallel), in terms of the rules
        `call` (one call: call_rules's) and `marker` (the marker)."""
        raise NotImplementedError

    def call_rules(self, tools: list[dict], name: str | None) -> str:
        """The Lark rule `call`: one call to any of tools (or the one named), as its JSON object."""
        from .structured import TOOL_JSON_STYLE

        return f"call: %json {json.dumps({**call_schema(self, tools, name), 'x-guidance': TOOL_JSON_STYLE})}\n"

    def _calls(self, objects) -> list[ToolCall] | None:
        calls = []
        for obj in objects:
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return None
            if self.names is not None and obj["name"] not in self.names:
                return None
            arguments = obj.get("arguments", obj.get("parameters", {}))
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except (ValueError, RecursionError):
                    return None
            if not isinstance(arguments, dict):
                return None
            try:  # written back a few frames deeper than it was read: a depth just within reach is not
                arguments = json.dumps(arguments, ensure_ascii=False, allow_nan=False)  # NaN, 1e999: no JSON
                (obj["name"] + arguments).encode("utf-8")  # "\\ud800" read back as a lone surrogate: no text
            except (RecursionError, ValueError):  # (UnicodeEncodeError is a ValueError)
                return None
            calls.append(ToolCall(obj["name"], arguments, self.call_id()))
        return calls if self.parallel else calls[:1]


_BETWEEN = " \t\r\n;,"  # what may separate JSON calls written one after another


def _json_prefix(text: str, i: int, cut: bool, top: bool = True) -> tuple[list, int, bool]:
    """(the JSON values one after another in text from i, whitespace, ';' or ',' between them; where
    the last one ends; dropped). Reading stops at the first text that is no JSON value. cut (the
    text's end is a cut): a value still open there ("{..." or "[..." not closed) is the cut's doing:
    an open list of calls (top: a value, not an item of one) keeps its complete items, anything
    else open is left out (dropped True)."""
    decoder, values, end = json.JSONDecoder(), [], i
    while True:
        i = end
        while i < len(text) and text[i] in _BETWEEN:
            i += 1
        if i == len(text):
            return values, end, False
        try:
            value, end = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):  # RecursionError: a reply nested deeper than the parser goes
            if not cut or text[i] not in "[{":
                return values, end, False
            if text[i] == "{" or not top:
                return values, len(text), True
            items, inner, dropped = _json_prefix(text, i + 1, cut, top=False)
            if not dropped and text[inner:].strip(_BETWEEN):  # no cut list: text that is not JSON follows
                return values, end, False
            return values + [items], len(text), dropped
        values.append(value)


def _after_calls(text: str, end: int) -> str | None:
    """The text after a run of JSON calls ending at `end` (_json_prefix's), or None when what follows
    is a call that is not valid JSON (the reply is then text). The separators a format writes go
    between calls, inside the run; after the last one a separator is the reply's own text unless
    nothing but separators and whitespace follows ("{...};"): text after the calls starting
    ", and then ..." kept its words but lost its comma when every leading ';' and ',' was stripped."""
    rest = text[end:]
    following = rest.lstrip(_BETWEEN)
    if following[:1] in ("{", "["):
        return None
    return rest if following else ""


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


class Hermes(ToolFormat):
    name, marker, end = "hermes", "<tool_call>", "</tool_call>"

    def _find(self, text, cut):
        """Each call is one JSON value read from after its marker (so a string in it may hold
        "</tool_call>"), then the closing tag or the end of the reply (it ended there, or was cut
        inside the tag)."""
        i = text.find(self.marker)
        if i < 0:
            return None
        decoder, pieces, objects, dropped = json.JSONDecoder(), [text[:i]], [], False
        while True:
            j = _skip_space(text, i + len(self.marker))
            try:
                value, j = decoder.raw_decode(text, j)
            except (ValueError, RecursionError):
                if cut and self.marker not in text[i + len(self.marker):]:  # the last call, cut short
                    dropped = True
                    break
                return None
            objects.append(value)
            j = _skip_space(text, j)
            if text.startswith(self.end, j):
                j += len(self.end)
            elif self.end.startswith(text[j:]) and (cut or j == len(text)):
                j = len(text)
            else:
                return None
            i = text.find(self.marker, j)
            if i < 0 and cut and self.marker.startswith(text[j:].strip()) and text[j:].strip():
                dropped = True  # cut inside the next call's marker ("<tool_ca"): that call is the cut one
                pieces.append("")
                break
            pieces.append(text[j:] if i < 0 else text[j:i])
            if i < 0:
                break
        return pieces, objects, dropped

    def call_grammar(self, parallel):
        one = 'marker "\\n" call "\\n</tool_call>"'
        return f'start: {one}' + (f' ("\\n" {one})*' if parallel else "")


class Mistral(ToolFormat):
    name, marker = "mistral", "[TOOL_CALLS]"

    def call_id(self) -> str:  # Mistral's templates require 9 letters or digits
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))

    def _find(self, text, cut):
        start = text.find(self.marker)
        if start < 0:
            return None
        values, end, dropped = _json_prefix(text, start + len(self.marker), cut)
        after = _after_calls(text, end)
        if not values or after is None:  # a call that is not valid JSON: the reply is text
            return None
        objects = [o for v in values for o in (v if isinstance(v, list) else [v])]
        return [text[:start], after], objects, dropped

    def call_grammar(self, parallel):
        more = ' (", " call)*' if parallel else ""
        return f'start: marker " [" call{more} "]"'


class MistralArgs(Mistral):
    """Mistral's format from its tokenizer v11 on: each call is its marker, the function's name,
    [ARGS] and the arguments' JSON object ("[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}"), calls
    one after another. Templates that write [CALL_ID]id between the name and [ARGS] (Mistral Small
    3.2: with_call_id) have the forcing grammar write one too; the parser takes calls with or without
    it, and each call gets an id of ours (the model's may repeat). Source: the published templates
    (tests/data/chat_templates) and llama.cpp's Ministral 3 parser."""
    name, args_tag, id_tag = "mistral_args", "[ARGS]", "[CALL_ID]"

    def __init__(self, names=None, parallel: bool = True, with_call_id: bool = False):
        super().__init__(names, parallel)
        self.with_call_id = with_call_id

    @property
    def tags(self):
        return (self.marker, self.args_tag, self.id_tag)

    def _find(self, text, cut):
        """Each call is its head (name, tags) then one JSON value; what follows it up to the next marker
        (or the end) is text, unless it opens another JSON object (a call that is not valid: the
        reply is text). cut: a last call cut inside its head or its JSON is left out (dropped)."""
        i = text.find(self.marker)
        if i < 0:
            return None
        decoder, pieces, objects, dropped = json.JSONDecoder(), [text[:i]], [], False
        # a call's head after its marker: the function's name, an optional [CALL_ID]id, then [ARGS]
        heads = re.compile(r"\s*([^\s\[\]{}]+?)\s*(?:%s\s*([^\s\[\]{}]*?)\s*)?%s\s*"
                           % (re.escape(self.id_tag), re.escape(self.args_tag)))
        while True:
            j = i + len(self.marker)
            last = self.marker not in text[j:]
            head = heads.match(text, j)
            if head is None:
                if cut and last and self.args_tag not in text[j:]:  # cut inside the name or a tag
                    dropped = True
                    break
                return None
            try:
                value, end = decoder.raw_decode(text, head.end())
            except (ValueError, RecursionError):
                if cut and last:  # the last call's JSON, cut short
                    dropped = True
                    break
                return None
            objects.append({"name": head.group(1), "arguments": value})
            i = text.find(self.marker, end)
            after = text[end:] if i < 0 else text[end:i]
            if i < 0 and cut and after.strip() and self.marker.startswith(after.strip()):
                dropped = True  # cut inside the next call's marker ("[TOOL_CA"): that call is the cut one
                pieces.append("")
                break
            if after.lstrip()[:1] == "{":  # a second JSON value after a call's arguments: no valid call
                return None
            pieces.append(after)
            if i < 0:
                break
        return pieces, objects, dropped

    def call_grammar(self, parallel):
        return "start: marker call" + (" (marker call)*" if parallel else "")

    def call_rules(self, tools, name):
        """One rule per tool: its name, [CALL_ID] and 9 letters or digits (with_call_id), [ARGS],
        then its arguments' JSON (an object meeting its parameters)."""
        from .structured import TOOL_JSON_STYLE

        choices, rules = [], []
        for k, tool in enumerate(tools):
            function = tool["function"]
            if name is not None and function["name"] != name:
                continue
            schema = {**arguments_schema(function, k), "x-guidance": TOOL_JSON_STYLE}
            call_id = " call_id" if self.with_call_id else ""
            choices.append(f"call_{k}")
            rules.append(f"call_{k}: {json.dumps(function['name'])}{call_id} args_tag %json {json.dumps(schema)}")
        return f"call: {' | '.join(choices)}\n" + "\n".join(rules) + "\n" + (
            "call_id: id_tag /[A-Za-z0-9]{9}/\n" if self.with_call_id else "")


class Llama3(ToolFormat):
    name, marker = "llama3", "<|python_tag|>"

    def _find(self, text, cut):
        start = text.find(self.marker)
        body = start + len(self.marker) if start >= 0 else 0
        if not text[body:].lstrip().startswith("{"):
            return None
        values, end, dropped = _json_prefix(text, body, cut)
        after = _after_calls(text, end)
        if not values or after is None:  # a call that is not valid JSON: the reply is text
            return None
        return [text[:max(start, 0)], after], values, dropped

    def call_grammar(self, parallel):
        return "start: call" + (' ("; " call)*' if parallel else "")


def check_template_reads_tools(template: str | None) -> None:
    """ToolError unless the chat template reads `tools` (one that does not would drop them in silence)."""
    if not re.search(r"\btools\b", template or ""):
        raise ToolError("this model's chat template does not support tools (it never reads `tools`); "
                        "give a template that does (--chat-template), or leave tools out")


def tool_format(template: str, names=None, parallel: bool = True) -> ToolFormat:
    """The tool-call format of a chat template, whose calls may name only `names` (the request's
    functions; None: any), one call per reply unless parallel; ToolError when it takes no tools or
    its format is unknown."""
    check_template_reads_tools(template)
    if "<tool_call>" in template:
        return Hermes(names, parallel)
    if "[TOOL_CALLS]" in template and "[ARGS]" in template:
        return MistralArgs(names, parallel, with_call_id="[CALL_ID]" in template)
    if "[TOOL_CALLS]" in template:
        return Mistral(names, parallel)
    if "<|python_tag|>" in template or "ipython" in template or '"parameters"' in template:
        return Llama3(names, parallel)
    raise ToolError("the chat template takes tools but its tool-call format is none pyllm parses "
                    "(Hermes/Qwen <tool_call>, Mistral [TOOL_CALLS] [...] or [TOOL_CALLS]name[ARGS], Llama 3 JSON)")


def call_schema(fmt: ToolFormat, tools: list[dict], name: str | None = None) -> dict:
    """The JSON schema of one call to any of tools (or the one named). Each tool's parameters sit
    under the root's $defs (as tool_<k>), their own references ("#/$defs/...", "#") rewritten to
    point there, so that a schema with $defs (as Pydantic writes them) keeps its meaning, and their
    anchors renamed tool_<k>_<name> (two tools' same anchor name would be one anchor); the
    arguments are an object as well (a call's arguments always are: a tool whose parameters allow
    no object cannot be forced)."""
    key = "parameters" if isinstance(fmt, Llama3) else "arguments"
    options, defs = [], {}
    for k, tool in enumerate(tools):
        function = tool["function"]
        if name is not None and function["name"] != name:
            continue
        arguments = arguments_schema(function, k)
        defs.update(arguments.pop("$defs"))
        options.append({"type": "object", "properties": {"name": {"const": function["name"]}, key: arguments},
                        "required": ["name", key], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {"$defs": defs, **schema}


def arguments_schema(function: dict, k: int) -> dict:
    """The JSON schema of the arguments of a call to function (the k-th tool): an object meeting its
    parameters, which sit under $defs as tool_<k> with their references and anchors rebased there
    (call_schema says why)."""
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {"$defs": {f"tool_{k}": _rebase_refs(parameters, f"#/$defs/tool_{k}", f"tool_{k}_")},
            "allOf": [{"type": "object"}, {"$ref": f"#/$defs/tool_{k}"}]}


def check_tools(fmt: ToolFormat, tools: list[dict]) -> None:
    """Refuses (ToolError naming tools[k].function.parameters) a tool whose parameters are not a
    JSON schema that a call's arguments, an object, can meet: one llguidance cannot compile ({"type":
    "nonsense"}, a $ref to nowhere) or one that allows no object ({"type": "string"}). The same check
    holds in every tool_choice mode: a forced call's grammar is built from these schemas and refused
    them, while "auto" took them and let the model call a tool no valid call can reach (OpenAI
    refuses such tools whatever tool_choice says). Keywords llguidance does not implement
    (propertyNames) are ignored (structured.TOOL_JSON_STYLE). Without llguidance only the schema's
    "type" is checked (it must allow an object)."""
    try:
        from .structured import TOOL_JSON_STYLE, _first_line, _llguidance
        matcher = _llguidance().LLMatcher
    except RuntimeError:  # GrammarUnavailable: auto mode parses calls without llguidance
        matcher = None
    for k, tool in enumerate(tools):
        function = tool["function"]
        where = f"tools[{k}].function.parameters"
        if matcher is None:
            kind = (function.get("parameters") or {}).get("type", "object")
            if kind != "object" and not (isinstance(kind, list) and "object" in kind):
                raise ToolError(f"{where} (function {function['name']!r}) must be a JSON schema of an object "
                                f"(a call's arguments); its type is {kind!r}", where)
            continue
        schema = {**call_schema(fmt, [tool]), "x-guidance": TOOL_JSON_STYLE}
        try:
            error = _schema_error(matcher, json.dumps(schema, allow_nan=False))
        except (TypeError, ValueError, RecursionError) as e:
            error = str(e)
        if error:  # llguidance's pointers name the tool's schema where call_schema put it
            error = _first_line(error).replace("/$defs/tool_0", "")
            raise ToolError(f"{where} (function {function['name']!r}) is not a JSON schema a call's arguments (an "
                            f"object) can meet: {error}", where)


# llguidance's verdict on the last CHECKED_KEPT call schemas (keyed by their JSON's SHA-256): clients send
# the same tools with every request, and compiling a large schema again each time took seconds
CHECKED_KEPT = 1024
_checked: OrderedDict[bytes, str] = OrderedDict()
_checked_lock = threading.Lock()


def _schema_error(matcher, text: str) -> str:
    """llguidance's error for the JSON schema text ("" when it compiles), remembered."""
    key = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    with _checked_lock:
        if key in _checked:
            _checked.move_to_end(key)
            return _checked[key]
    try:
        error = matcher.validate_grammar(matcher.grammar_from_json_schema(text))
    except (TypeError, ValueError, RecursionError) as e:
        error = str(e)
    with _checked_lock:
        _checked[key] = error
        while len(_checked) > CHECKED_KEPT:
            _checked.popitem(last=False)
    return error


_DATA_KEYWORDS = ("const", "enum", "default", "examples")  # values there are data, not schemas
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # name -> schema


def _rebase_refs(schema, base: str, anchors: str = ""):
    """schema with each local JSON pointer reference ("#", "#/...") made relative to base instead of
    the root, and each anchor ("$anchor": "name", referred to as "#name") renamed anchors + name:
    anchors name a place in the whole document, and two tools' same anchor name was one of them. A
    schema with an "$id" is kept as it is: references in it are relative to it, wherever it sits."""
    if isinstance(schema, list):
        return [_rebase_refs(v, base, anchors) for v in schema]
    if not isinstance(schema, dict):
        return schema
    if isinstance(schema.get("$id"), str):  # a resource of its own: its references are relative to it
        return schema
    out = {}
    for k, v in schema.items():
        if k == "$ref" and isinstance(v, str) and (v == "#" or v.startswith("#/")):
            out[k] = base + v[1:]
        elif k == "$ref" and isinstance(v, str) and v.startswith("#"):
            out[k] = "#" + anchors + v[1:]
        elif k == "$anchor" and isinstance(v, str):
            out[k] = anchors + v
        elif k in _DATA_KEYWORDS:
            out[k] = v
        elif k in _SCHEMA_MAPS and isinstance(v, dict):
            out[k] = {name: _rebase_refs(sub, base, anchors) for name, sub in v.items()}
        else:
            out[k] = _rebase_refs(v, base, anchors)
    return out


def forced_call_grammar(fmt: ToolFormat, tools: list[dict], name: str | None, parallel: bool, tokenizer) -> str:
    """A Lark grammar (llguidance's dialect) that admits only tool calls in fmt: for tool_choice
    "required" (any tool) or a named function. A tag that is a special token of the tokenizer
    (Mistral's [TOOL_CALLS], [ARGS], [CALL_ID]) is written as that token."""
    grammar = fmt.call_grammar(parallel and name is None) + "\n" + fmt.call_rules(tools, name)
    # the rules' own words: without the JSON schemas and the quoted names (a function named "marker")
    words = re.sub(r'"(?:[^"\\]|\\.)*"', "", "\n".join(line.split("%json", 1)[0] for line in grammar.splitlines()))
    for rule, tag in (("marker", fmt.marker), ("args_tag", getattr(fmt, "args_tag", None)),
                      ("id_tag", getattr(fmt, "id_tag", None))):
        if tag and re.search(rf"\b{rule}\b", words):
            tag_id = special_token_id(tag, tokenizer)
            grammar += f"{rule}: <[{tag_id}]>\n" if tag_id is not None else f"{rule}: {json.dumps(tag)}\n"
    return grammar


class ToolCallStream:
    """Streams a reply's text while holding back what may be a tool call.

    feed(piece) returns the text that is certainly content; once the marker appears (or, for a
    format whose call is the whole reply, while the reply could still be one), the rest is held and
    finish(full_text) parses it. Trailing whitespace is held too (until text follows it): before a
    call it is no content, so the pieces sent and finish's rest add up to the content a reply not
    streamed has.

    marker_id: the marker's token id when it is a special token (Mistral's [TOOL_CALLS]): streamed
    pieces leave special tokens out, so the marker is seen among the piece's token ids instead."""

    def __init__(self, fmt: ToolFormat, marker_id: int | None = None):
        self.fmt = fmt
        self.marker_id = marker_id
        self.sent = 0
        self.holding = False
        self.dropped = False
        # The reply so far: the text sent, then `_pending` (not sent yet: whitespace, a marker's
        # possible start), then what is held once holding. Kept apart so that a piece costs its own
        # length, not the reply's: adding each piece to one string and looking for the marker in it
        # made a long reply quadratic (50,000 pieces: 2 s of the event loop). A marker can only
        # complete in _pending, as a marker's start is never sent.
        self._sent: list[str] = []
        self._pending = ""
        self._held: list[str] = []
        self._opening = ""  # the reply's first character other than whitespace

    @property
    def text(self) -> str:
        """The reply so far."""
        self._sent, self._held = ["".join(self._sent)], ["".join(self._held)]
        return self._sent[0] + self._pending + self._held[0]

    def feed(self, piece: str, token_ids=()) -> str:
        if not self._opening:
            self._opening = piece.lstrip()[:1]
        if self.marker_id is not None and self.marker_id in token_ids:
            self.holding = True  # where in this piece the marker stood is unknown: hold all of it
        elif not self.holding and isinstance(self.fmt, Llama3) and self._opening == "{":
            self.holding = True  # the reply may be a JSON call, to its end
        if self.holding:
            self._held.append(piece)
            return ""
        marker = self.fmt.marker
        start = max(0, len(self._pending) - len(marker or "") + 1)  # where a marker may complete now
        self._pending += piece
        at = self._pending.find(marker, start) if marker else -1
        if at >= 0:
            self.holding = True
            cut = at
        elif isinstance(self.fmt, Llama3) and not self._opening:
            return ""  # only whitespace so far: the reply may yet open with a JSON call
        else:
            cut = len(self._pending) - partial_suffix(self._pending, marker or "")
        while cut > 0 and self._pending[cut - 1].isspace():
            cut -= 1
        out, self._pending = self._pending[:cut], self._pending[cut:]
        self._sent.append(out)
        self.sent += len(out)
        return out

    def finish(self, full_text: str, cut: bool = False) -> tuple[str, list[ToolCall]]:
        """(content not yet sent, tool calls) for the whole reply; full_text is the reply decoded
        with its special tokens (a marker may be one); cut as ToolFormat.split's, whose `dropped`
        is left in self.dropped."""
        parsed = self.fmt.split(full_text, cut)
        content, calls, self.dropped = parsed.content, parsed.calls, parsed.dropped
        if calls:
            if content.startswith(self.text[:self.sent]):
                return content[self.sent:], calls
            # what was sent differs from the parsed text before the calls (full_text read otherwise than
            # the streamed pieces): it stands for that text, and the rest (the text after the calls,
            # once dropped here in silence) follows it
            return content[len(parsed.lead):], calls
        return self.text[self.sent:], []


def special_tag_ids(fmt: ToolFormat, tokenizer) -> frozenset:
    """The token ids of fmt's tags (its marker, Hermes's closing tag) that are special tokens of the
    tokenizer: the special tokens the parser reads (serve.reply_text)."""
    ids = (special_token_id(tag, tokenizer) for tag in fmt.tags)
    return frozenset(i for i in ids if i is not None)


def special_marker_id(fmt: ToolFormat, tokenizer) -> int | None:
    """The token id of fmt's marker when the tokenizer has it as a special token, else None."""
    return special_token_id(fmt.marker, tokenizer) if fmt.marker else None


def special_token_id(tag: str, tokenizer) -> int | None:
    """The token id of tag (a tool call's or a think block's) when the tokenizer has it as a special
    token, else None."""
    tag_id = tokenizer.token_to_id(tag)
    return tag_id if tag_id is not None and tag_id in tokenizer.special_ids else None


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of text that begins marker (a marker or tag cut by a piece's end)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
