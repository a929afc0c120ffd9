"""Tool-call formats: chosen from the template, replies parsed into OpenAI tool calls (auto mode),
streamed content held back only where a call may begin, and the forcing grammar accepted by llguidance."""

from __future__ import annotations

import json
import os

import pytest

from pyllm.tool_calls import (Hermes, Llama3, Mistral, MistralArgs, ToolCallStream, ToolError, check_tools,
                              forced_call_grammar, tool_format)

TEMPLATES = os.path.join(os.path.dirname(__file__), "data", "chat_templates")


def _template(name):
    with open(os.path.join(TEMPLATES, name + ".jinja"), encoding="utf-8") as f:
        return f.read()


def test_format_is_chosen_from_the_template():
    assert isinstance(tool_format(_template("qwen2.5-base")), Hermes)
    assert isinstance(tool_format(_template("llama-3.1-json-tools")), Llama3)
    assert isinstance(tool_format(_template("mistral-v3-tools")), Mistral)
    for name in ("smollm2-135m-instruct", "llama-2-chat", "meta-llama-3-8b-instruct"):
        with pytest.raises(ToolError, match="does not support tools"):
            tool_format(_template(name))
    with pytest.raises(ToolError, match="format"):
        tool_format("{% for t in tools %}{{ t }}{% endfor %}")


def _args(call):
    return json.loads(call.arguments)


def test_hermes_replies():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}\n</tool_call>')
    content, calls = Hermes().parse(text)
    assert content == "Let me check."
    assert [(c.name, _args(c)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "UTC"})]
    assert len({c.id for c in calls}) == 2
    # cut off before the closing tag: still a call
    assert Hermes().parse('<tool_call>\n{"name": "f", "arguments": {}}')[1][0].name == "f"
    # not JSON, or not a call: left as text
    for bad in ("<tool_call>\n{not json}\n</tool_call>", '<tool_call>\n{"arguments": {}}\n</tool_call>',
                "no tools here"):
        assert Hermes().parse(bad) == (bad, [])


def test_replies_nested_deeper_than_the_json_parser_goes_are_text():
    """A reply (or a call's arguments string) nested deeper than Python's JSON parser goes raised
    RecursionError out of the parser (a 500 in the server): it is text, as any other unparsable call."""
    deep = "[" * 100_000 + "]" * 100_000
    for fmt, text in [(Hermes(), f"<tool_call>\n{deep}\n</tool_call>"),
                      (Hermes(), '<tool_call>\n{"name": "f", "arguments": ' + json.dumps(deep) + "}\n</tool_call>"),
                      (Mistral(), f"[TOOL_CALLS]{deep}"), (Llama3(), deep)]:
        assert fmt.parse(text) == (text, []), type(fmt).__name__
        assert fmt.parse(text[:len(text) // 2], cut=True) == (text[:len(text) // 2], []), type(fmt).__name__


def test_arguments_the_parser_reads_just_within_its_depth_are_no_500():
    """Arguments nested just within the depth Python's JSON parser reads were read, then written
    back (the arguments string) a few frames deeper, past it: RecursionError out of the parser (a 500
    in the server). Such a reply is text. Every depth near the limit, from a few stack depths."""
    import sys

    def at_depth(n, call):
        return call() if n == 0 else at_depth(n - 1, call)

    limit = sys.getrecursionlimit()
    for fmt in (Hermes(["f"]), Mistral(["f"]), Llama3(["f"])):
        key = "parameters" if isinstance(fmt, Llama3) else "arguments"
        for depth in range(limit - 60, limit + 2):
            call = '{"name": "f", "%s": {"a": %s}}' % (key, "[" * depth + "]" * depth)
            text = {"hermes": f"<tool_call>\n{call}\n</tool_call>",
                    "mistral": f"[TOOL_CALLS] [{call}]"}.get(fmt.name, call)
            for frames in range(4):
                for cut in (False, True):
                    content, calls = at_depth(frames, lambda: fmt.parse(text, cut))
                    assert (content, calls) == (text, []) or calls[0].name == "f", (fmt.name, depth)


@pytest.mark.parametrize("value", ['"\\ud800"', '"a\\udfffb"', "NaN", "-Infinity", "1e999", "[1, NaN]"])
def test_calls_whose_arguments_are_no_json_text_are_content(value):
    """A call the model wrote with a lone surrogate escape ("\\ud800": read back as a character that
    UTF-8 cannot hold; the server's answer failed to encode, mid-stream a cut connection) or NaN /
    Infinity / 1e999 (written back as NaN or Infinity, which JSON parsers refuse) is no call: text,
    in every format, in the arguments or in the name."""
    for fmt in (Hermes(), Mistral(), Llama3()):
        key = "parameters" if isinstance(fmt, Llama3) else "arguments"
        for call in ('{"name": "f", "%s": {"a": %s}}' % (key, value), '{"name": %s, "%s": {}}' % (value, key)):
            text = {"hermes": f"<tool_call>\n{call}\n</tool_call>", "mistral": f"[TOOL_CALLS] [{call}]"}.get(fmt.name,
                                                                                                             call)
            for cut in (False, True):
                content, calls = fmt.parse(text, cut)
                assert calls == [] and content == text, (fmt.name, call, cut)
                content.encode("utf-8")
    # the same values as text inside a string are arguments like any other
    content, calls = Hermes().parse('<tool_call>\n{"name": "f", "arguments": {"a": "NaN \\u00e9"}}\n</tool_call>')
    assert _args(calls[0]) == {"a": "NaN \u00e9"}


def test_mistral_replies():
    content, calls = Mistral().parse('[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, {"name": "b", '
                                     '"arguments": {}}]')
    assert content == "" and [c.name for c in calls] == ["a", "b"]
    assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)  # Mistral's templates insist
    assert Mistral().parse("[TOOL_CALLS] [{broken")[1] == []


def test_llama3_replies():
    content, calls = Llama3().parse('{"name": "get_weather", "parameters": {"city": "Rome"}}')
    assert content == "" and calls[0].name == "get_weather" and _args(calls[0]) == {"city": "Rome"}
    assert Llama3().parse('<|python_tag|>{"name": "f", "parameters": {}}')[1][0].name == "f"
    assert Llama3().parse("The answer is {not a call}")[1] == []


def test_calls_to_functions_the_request_did_not_declare_are_content():
    """A JSON answer with a "name" key ({"name": "Bob", "age": 3}) was a Llama 3 call to a function
    "Bob" with {} for arguments (its "age" dropped); a Hermes or Mistral call may name only a declared
    function too, or the reply stays text."""
    cases = [(Llama3, '{"name": "Bob", "age": 3}'), (Llama3, '<|python_tag|>{"name": "g", "parameters": {}}'),
             (Hermes, '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'),
             (Hermes, '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n'
                      '{"name": "g", "arguments": {}}\n</tool_call>'),
             (Mistral, '[TOOL_CALLS] [{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]')]
    for fmt, text in cases:
        assert fmt(["f"]).parse(text) == (text, []), (fmt.__name__, text)
        assert fmt().parse(text)[1], (fmt.__name__, text)  # no names given: any function, as before
        stream = ToolCallStream(fmt(["f"]))
        out = "".join(stream.feed(text[i:i + 5]) for i in range(0, len(text), 5))
        rest, calls = stream.finish(text)
        assert out + rest == text and calls == [], (fmt.__name__, text)
    assert Llama3(["get_weather"]).parse('{"name": "get_weather", "parameters": {}}')[1][0].name == "get_weather"
    assert isinstance(tool_format(_template("llama-3.1-json-tools"), ["f"]), Llama3)
    assert tool_format(_template("qwen2.5-base"), ["f"]).names == {"f"}


def test_stream_holds_back_only_what_may_be_a_call():
    stream = ToolCallStream(Hermes())
    out = [stream.feed(p) for p in ["Sure", ", checking", " <tool", "_call>\n{\"name\": \"f\", ", "\"arguments\": {}}"]]
    assert "".join(out) == "Sure, checking"  # the space before the call is no content
    rest, calls = stream.finish(stream.text)
    assert rest == "" and [c.name for c in calls] == ["f"]
    plain = ToolCallStream(Hermes())
    out = "".join(plain.feed(p) for p in ["a <to", "day we go"])
    rest, calls = plain.finish(plain.text)
    assert out + rest == "a <today we go" and calls == []
    llama = ToolCallStream(Llama3())
    assert llama.feed('{"name": "f",') == "" and llama.finish('{"name": "f", "parameters": {}}')[1]
    prose = ToolCallStream(Llama3())
    assert prose.feed("Hello") == "Hello"


@pytest.mark.parametrize("fmt, call", [
    (Hermes, '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'),
    (Mistral, '[TOOL_CALLS] [{"name": "f", "arguments": {}}]'),
    (Llama3, '<|python_tag|>{"name": "f", "parameters": {}}'),
])
def test_text_after_calls_is_kept_when_the_streamed_text_differs_from_the_parsed(fmt, call):
    """finish() is given the reply decoded otherwise than the pieces streamed (here a special token
    the pieces left out): the content's start did not match what was sent, and the text after the
    calls was dropped in silence. What was sent stands for the text before the calls; the rest follows."""
    stream = ToolCallStream(fmt(["f"]))
    sent = "".join(stream.feed(p) for p in ["Let me", " check. ", call, "\n\nBack soon."])
    assert sent == "Let me check."
    rest, calls = stream.finish("Let me<|x|> check. " + call + "\n\nBack soon.")
    assert (sent + rest, [c.name for c in calls]) == ("Let me check.\nBack soon.", ["f"])
    assert fmt(["f"]).parse("Let me check. " + call + "\n\nBack soon.")[0] == sent + rest  # as not streamed


def test_forcing_grammars_are_valid_llguidance_grammars(tiny_llama_f32):
    llguidance = pytest.importorskip("llguidance")
    import pyllm
    from pyllm.structured import ll_tokenizer

    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}},
             {"type": "function", "function": {"name": "g"}}]
    with pyllm.LLM(tiny_llama_f32, n_threads=1) as llm:
        for fmt in (Hermes(), Mistral(), Llama3()):
            for name, parallel in ((None, True), (None, False), ("g", False)):
                grammar = forced_call_grammar(fmt, tools, name, parallel, llm.tokenizer)
                matcher = llguidance.LLMatcher(ll_tokenizer(llm.tokenizer), grammar, log_level=0)
                assert not matcher.is_error(), (fmt.name, matcher.get_error())


def _forced_accepts(llguidance, ll, grammar, text):
    matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(ll.tokenize_str(text)) and matcher.is_accepting()


def test_forced_calls_keep_the_meaning_of_references_and_are_objects(tiny_llama_f32):
    """A tool whose parameters use $defs (as Pydantic writes them), definitions or "#" (a recursive
    schema) could not be forced: embedded under "arguments" its "#/$defs/..." pointed at the call's
    root (llguidance: "Pointer '/$defs/Unit' does not exist", a 400 for valid tools). And parameters
    that allow something other than an object ({"type": "string"}) forced a call whose arguments
    were a string: no tool call came back for tool_choice "required" (finish_reason "stop", the
    call as content). References now point at each tool's own schema, and arguments are objects."""
    llguidance = pytest.importorskip("llguidance")
    import pyllm
    from pyllm.structured import ll_tokenizer

    unit = {"$defs": {"Unit": {"enum": ["C", "F"]}}, "type": "object",
            "properties": {"unit": {"$ref": "#/$defs/Unit"}}, "required": ["unit"], "additionalProperties": False}
    old_style = {"definitions": {"N": {"type": "integer"}}, "type": "object",
                 "properties": {"n": {"$ref": "#/definitions/N"}}, "required": ["n"], "additionalProperties": False}
    tree = {"type": "object", "properties": {"child": {"$ref": "#"}}, "additionalProperties": False}
    either = {"anyOf": [{"type": "integer"}, {"type": "object", "properties": {"k": {"type": "integer"}},
                                                "required": ["k"], "additionalProperties": False}]}
    tools = [{"type": "function", "function": {"name": n, "parameters": p}}
             for n, p in [("temp", unit), ("count", old_style), ("tree", tree), ("either", either)]]
    with pyllm.LLM(tiny_llama_f32, n_threads=1) as llm:
        ll = ll_tokenizer(llm.tokenizer)
        for fmt in (Hermes(), Mistral(), Llama3()):
            for name in (None, "temp", "count", "tree", "either"):
                grammar = forced_call_grammar(fmt, tools, name, True, llm.tokenizer)
                matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
                assert not matcher.is_error(), (fmt.name, name, matcher.get_error())
        for fmt, key, wrap in ((Hermes(), "arguments", "<tool_call>\n{}\n</tool_call>"), (Llama3(), "parameters", "{}")):
            def accepts(name, arguments):
                grammar = forced_call_grammar(fmt, tools, name, False, llm.tokenizer)
                call = json.dumps({"name": name, key: arguments}, separators=(", ", ": "))
                return _forced_accepts(llguidance, ll, grammar, wrap.replace("{}", call, 1))
            assert accepts("temp", {"unit": "C"}) and not accepts("temp", {"unit": "K"})
            assert accepts("count", {"n": 3}) and not accepts("count", {"n": "3"})
            assert accepts("tree", {"child": {"child": {}}}) and not accepts("tree", {"child": {"x": 1}})
            assert accepts("either", {"k": 1}) and not accepts("either", 5)
        for parameters in ({"type": "string"}, {"type": "array"}, {"enum": [1, 2]}):
            odd = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
            matcher = llguidance.LLMatcher(ll, forced_call_grammar(Hermes(), odd, None, False, llm.tokenizer),
                                           log_level=0)
            assert matcher.is_error(), parameters  # cannot be forced: a 400 naming tools in the server


def test_forced_calls_keep_each_tools_anchors(tiny_llama_f32):
    """A reference to an anchor ("$ref": "#node" for "$anchor": "node") was rewritten as a pointer
    ("#/$defs/tool_0node"): such tools were refused (400, "Pointer ... does not exist"). Anchors name
    a place in the whole document, so two tools with the same anchor name shared one: a forced call
    to f (anchor: integer) took g's (boolean), '{"a": true}'. Each tool's anchors are its own now."""
    llguidance = pytest.importorskip("llguidance")
    import pyllm
    from pyllm.structured import ll_tokenizer

    def anchored(key, kind):
        return {"type": "object", "properties": {key: {"$ref": "#node"}}, "required": [key],
                "additionalProperties": False, "$defs": {"n": {"$anchor": "node", "type": kind}}}

    tools = [{"type": "function", "function": {"name": "f", "parameters": anchored("a", "integer")}},
             {"type": "function", "function": {"name": "g", "parameters": anchored("b", "boolean")}}]
    for fmt in (Hermes(), Mistral(), Llama3()):
        check_tools(fmt, tools)
    with pyllm.LLM(tiny_llama_f32, n_threads=1) as llm:
        ll = ll_tokenizer(llm.tokenizer)
        for fmt, key, wrap in ((Hermes(), "arguments", "<tool_call>\n{}\n</tool_call>"),
                               (Llama3(), "parameters", "{}")):
            for forced in (None, "f", "g"):
                grammar = forced_call_grammar(fmt, tools, forced, False, llm.tokenizer)

                def accepts(name, arguments):
                    call = json.dumps({"name": name, key: arguments}, separators=(", ", ": "))
                    return _forced_accepts(llguidance, ll, grammar, wrap.replace("{}", call, 1))
                if forced != "g":
                    assert accepts("f", {"a": 3}) and not accepts("f", {"a": True}), (fmt.name, forced)
                if forced != "f":
                    assert accepts("g", {"b": True}) and not accepts("g", {"b": 3}), (fmt.name, forced)


def test_forced_calls_keep_references_relative_to_an_id(tiny_llama_f32):
    """In a schema with an "$id" (a resource of its own) "#/$defs/X" and "#" mean that schema's own
    places; they were rewritten to point under the call's root, inside that resource: such tools
    were refused ("Pointer '/$defs/X' does not exist"), at the root of the parameters or nested."""
    llguidance = pytest.importorskip("llguidance")
    import pyllm
    from pyllm.structured import ll_tokenizer

    rooted = {"$id": "urn:example:f", "type": "object",
              "properties": {"a": {"$ref": "#/$defs/X"}, "kid": {"$ref": "#"}}, "required": ["a"],
              "additionalProperties": False, "$defs": {"X": {"type": "integer"}}}
    inner = {"$id": "urn:example:inner", "type": "object", "properties": {"c": {"$ref": "#/$defs/Y"}},
             "required": ["c"], "additionalProperties": False, "$defs": {"Y": {"type": "boolean"}}}
    nested = {"type": "object", "properties": {"b": inner}, "required": ["b"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "f", "parameters": rooted}},
             {"type": "function", "function": {"name": "g", "parameters": nested}}]
    for fmt in (Hermes(), Mistral(), Llama3()):
        check_tools(fmt, tools)
    with pyllm.LLM(tiny_llama_f32, n_threads=1) as llm:
        ll = ll_tokenizer(llm.tokenizer)
        for forced in (None, "f", "g"):
            grammar = forced_call_grammar(Llama3(), tools, forced, False, llm.tokenizer)

            def accepts(name, arguments):
                call = json.dumps({"name": name, "parameters": arguments}, separators=(", ", ": "))
                return _forced_accepts(llguidance, ll, grammar, call)
            if forced != "g":
                assert accepts("f", {"a": 3}) and accepts("f", {"a": 3, "kid": {"a": 4}})
                assert not accepts("f", {"a": True}) and not accepts("f", {"a": 3, "kid": {}})
            if forced != "f":
                assert accepts("g", {"b": {"c": True}}) and not accepts("g", {"b": {"c": 1}})


def test_stream_sees_a_special_token_marker_among_the_piece_tokens():
    """Streamed pieces leave special tokens out: a marker that is one (Mistral's [TOOL_CALLS], id 7
    here) is seen among the piece's token ids; text before it still comes back as content."""
    call = ' [{"name": "f", "arguments": {}}]'
    for pieces in ([("Sure.", [1]), (call, [7, 8, 9])], [("Sure", [1]), ("." + call, [2, 7, 8])]):
        stream = ToolCallStream(Mistral(["f"]), marker_id=7)
        out = "".join(stream.feed(text, ids) for text, ids in pieces)
        rest, calls = stream.finish("Sure.[TOOL_CALLS]" + call)
        assert out + rest == "Sure." and [c.name for c in calls] == ["f"], (out, rest)


def test_hermes_call_arguments_may_hold_the_tags():
    """A Hermes call was the text up to the first "</tool_call>": an argument string holding that
    tag (code or docs about tool calls; a forced call's grammar allows any string) cut the JSON in
    two, and the whole reply became content with no calls, even for tool_choice "required"."""
    for value in ("</tool_call>", "a</tool_call>\\n<tool_call>b", "<tool_call>", "x\\n</tool_call>"):
        arguments = {"text": json.loads(f'"{value}"')}
        one = "<tool_call>\n" + json.dumps({"name": "f", "arguments": arguments}) + "\n</tool_call>"
        for text in (one, "Sure.\n" + one + "\n" + one, one[:-len("\n</tool_call>")]):
            content, calls = Hermes(["f"]).parse(text)
            assert calls and all(_args(c) == arguments for c in calls), (value, text)
            assert content == ("Sure." if text.startswith("Sure.") else ""), (value, text)
            stream = ToolCallStream(Hermes(["f"]))
            out = "".join(stream.feed(text[i:i + 3]) for i in range(0, len(text), 3))
            rest, streamed = stream.finish(text)
            assert (out + rest).strip() == content and len(streamed) == len(calls), (value, text)
    # still text: a second JSON value, or other text before the closing tag
    for bad in ('<tool_call>\n{"name": "f", "arguments": {}} {"x": 1}\n</tool_call>',
                '<tool_call>\n{"name": "f", "arguments": {}} and more\n</tool_call>'):
        assert Hermes(["f"]).parse(bad) == (bad, [])


def test_parallel_tool_calls_false_gives_one_call():
    """parallel_tool_calls false (auto mode has no grammar to hold the model to one call) returned
    every call the model wrote; OpenAI's API gives at most one: the first."""
    two = [(Hermes, '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n'
                    '{"name": "g", "arguments": {}}\n</tool_call>'),
           (Mistral, '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]'),
           (Llama3, '{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}')]
    for fmt, text in two:
        assert [c.name for c in fmt(["f", "g"]).parse(text)[1]] == ["f", "g"], fmt.__name__
        calls = fmt(["f", "g"], parallel=False).parse(text)[1]
        assert [(c.name, _args(c)) for c in calls] == [("f", {"a": 1})], fmt.__name__
        stream = ToolCallStream(fmt(["f", "g"], parallel=False))
        stream.feed(text)
        assert [c.name for c in stream.finish(text)[1]] == ["f"], fmt.__name__
    for name in ("qwen2.5-base", "mistral-v3-tools", "llama-3.1-json-tools"):
        assert tool_format(_template(name), ["f"], parallel=False).parallel is False
        assert tool_format(_template(name), ["f"]).parallel is True


def test_check_tools_names_the_tool_whose_parameters_no_call_meets(monkeypatch):
    """check_tools refuses what forcing a call would (a schema llguidance cannot compile, one that
    allows no object), naming tools[k].function.parameters; without llguidance the schema's type
    alone is checked, and good tools pass either way."""
    refs = {"type": "object", "properties": {"x": {"$ref": "#/$defs/X"}}, "$defs": {"X": {"type": "integer"}}}
    good = [{"type": "function", "function": {"name": "f", "parameters": refs}},
            {"type": "function", "function": {"name": "g"}}]
    bad = {"type": "function", "function": {"name": "h", "parameters": {"type": "string"}}}
    for fmt in (Hermes(), Mistral(), Llama3()):
        check_tools(fmt, good)
        with pytest.raises(ToolError) as e:
            check_tools(fmt, good + [bad])
        assert e.value.param == "tools[2].function.parameters" and "'h'" in str(e.value)
    pytest.importorskip("llguidance")
    with pytest.raises(ToolError, match="Pointer '/nowhere'"):
        check_tools(Hermes(), [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}])
    import pyllm.structured

    def missing():
        raise pyllm.structured.GrammarUnavailable(pyllm.structured.MISSING)
    monkeypatch.setattr(pyllm.structured, "_llguidance", missing)
    check_tools(Hermes(), good)
    with pytest.raises(ToolError, match="type is 'string'") as e:
        check_tools(Hermes(), [bad])
    assert e.value.param == "tools[0].function.parameters"


def test_check_tools_compiles_a_tool_schema_once(monkeypatch):
    """Clients send the same tools with every request, and check_tools compiled each tool's schema
    again each time (a tool of 2,000 properties: 0.4 s, 128 of them in one request: a minute). Its
    verdict is remembered, the refusal too; another schema is compiled."""
    llguidance = pytest.importorskip("llguidance")
    compiled, real = [], llguidance.LLMatcher

    class Counting:  # llguidance.LLMatcher, counting the schemas validated
        def __getattr__(self, name):
            return getattr(real, name)

        def validate_grammar(self, grammar, *args):
            compiled.append(grammar)
            return real.validate_grammar(grammar, *args)

    monkeypatch.setattr(llguidance, "LLMatcher", Counting())
    big = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(300)}, "required": ["p7"]}
    tools = [{"type": "function", "function": {"name": "f", "parameters": big}},
             {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "minProperties": 3}}}]
    bad = {"type": "function", "function": {"name": "h", "parameters": {"type": "object", "properties": {
        "x": {"type": "bogus-type-for-this-test"}}}}}
    for _ in range(3):
        check_tools(Hermes(), tools)
        with pytest.raises(ToolError, match="Invalid type: bogus-type-for-this-test") as e:
            check_tools(Hermes(), [tools[0], bad])
        assert e.value.param == "tools[1].function.parameters"
    assert len(compiled) == 3
    check_tools(Llama3(), tools)  # its calls hold "parameters": other schemas
    assert len(compiled) == 5


CUT_CALLS = {  # three calls in each format, the third to be cut
    Hermes: '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n{"name": "g", '
            '"arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "f", "arguments": {"a": 3}}\n</tool_call>',
    Mistral: '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}, '
             '{"name": "f", "arguments": {"a": 3}}]',
    Llama3: '{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}; {"name": "f", "parameters": '
            '{"a": 3}}'}


def test_a_cut_reply_keeps_its_complete_calls():
    """Parallel calls cut by max_tokens (or a stop string) inside a later call lost every call, the
    complete ones too: the reply became text. Cut, the complete calls come back and the incomplete
    last one is left out (dropped); a reply that ended by itself with a broken call is still text,
    and a cut that leaves only the closing tag or bracket short loses no call."""
    for fmt, text in CUT_CALLS.items():
        third, short = text.rindex('{"name"'), len(text) - (1 if fmt is Mistral else 3)
        for end in (third + 1, third + 12, text.rindex('"a": 3') + 5, short):
            cut = text[:end]
            if end == short and fmt is not Llama3:  # only the closing tag or bracket is short
                assert [c.name for c in fmt(["f", "g"]).split(cut, cut=True).calls] == ["f", "g", "f"], fmt.__name__
                assert not fmt(["f", "g"]).split(cut, cut=True).dropped
                continue
            parsed = fmt(["f", "g"]).split(cut, cut=True)
            assert [(c.name, _args(c)) for c in parsed.calls] == [("f", {"a": 1}), ("g", {})], (fmt.__name__, cut)
            assert parsed.content == "" and parsed.dropped, (fmt.__name__, cut)
            assert fmt(["f", "g"]).parse(cut) == (cut, []), (fmt.__name__, cut)  # not cut: a broken reply
            stream = ToolCallStream(fmt(["f", "g"]))
            out = "".join(stream.feed(cut[i:i + 4]) for i in range(0, len(cut), 4))
            rest, calls = stream.finish(cut, cut=True)
            assert out + rest == "" and [c.name for c in calls] == ["f", "g"] and stream.dropped, fmt.__name__
        if fmt is Hermes:  # cut inside the third call's marker: that call is the cut one, not content
            for end in range(third - len("<tool_call>\n") + 1, third - 1):
                parsed, stream = fmt(["f", "g"]).split(text[:end], cut=True), ToolCallStream(fmt(["f", "g"]))
                assert (parsed.content, [c.name for c in parsed.calls], parsed.dropped) == ("", ["f", "g"], True), end
                out = "".join(stream.feed(text[i:min(i + 4, end)]) for i in range(0, end, 4))
                assert out + stream.finish(text[:end], cut=True)[0] == "", end
                more = text[:end] + " and so on"  # text follows: the marker's start is content
                assert fmt(["f", "g"]).parse(more, cut=True)[0] == text[third - 12:end] + " and so on"
        # one call only, and that one cut: no call, the text stays content
        first = text[:text.index('"a": 1') + 3]
        assert fmt(["f", "g"]).split(first, cut=True).calls == [], fmt.__name__
        # parallel_tool_calls false returns the first call only: nothing it would return was dropped
        assert not fmt(["f", "g"], parallel=False).split(text[:third + 12], cut=True).dropped
    # text that is no JSON after the calls is content, not a cut call
    after = CUT_CALLS[Mistral][:CUT_CALLS[Mistral].index(', {"name": "g"')] + "] oops {"
    parsed = Mistral(["f", "g"]).split(after, cut=True)
    assert [c.name for c in parsed.calls] == ["f"] and parsed.content == "oops {" and not parsed.dropped


def test_text_around_calls_is_content_alike_in_every_format_streamed_or_not():
    """Text around the calls was handled per format: Hermes kept the text before the calls and
    dropped the text after them, Mistral and Llama 3 made the whole reply text when any followed
    the calls, Llama 3 dropped the text before <|python_tag|>, and a stream sent the space before a
    call that the reply not streamed left out. Now every format gives the text before the calls,
    then the text after them on its own line, streamed or not."""
    calls = {Hermes: CUT_CALLS[Hermes], Mistral: CUT_CALLS[Mistral],
             Llama3: "<|python_tag|>" + CUT_CALLS[Llama3]}
    cases = [("Sure.\n", "", "Sure."), ("Sure. ", "\n\nDone.", "Sure.\nDone."), ("", " Done. ", "Done."),
             ("  Indented.\n", "\n", "  Indented."), ("\n", "\n", "")]
    for fmt, written in calls.items():
        for before, after, content in cases:
            text = before + written + after
            got, parsed = fmt(["f", "g"]).parse(text)
            assert (got, [c.name for c in parsed]) == (content, ["f", "g", "f"]), (fmt.__name__, text)
            for size in (1, 3, 7):
                stream = ToolCallStream(fmt(["f", "g"]))
                out = "".join(stream.feed(text[i:i + size]) for i in range(0, len(text), size))
                rest, streamed = stream.finish(text)
                assert out + rest == content and len(streamed) == 3, (fmt.__name__, size, text, out, rest)
    # Hermes: text between calls is content too
    one = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert Hermes(["f"]).parse(f"A.\n{one}\nthen\n{one}\nB.")[0] == "A.\nthen\nB."
    # a Llama 3 reply without <|python_tag|> is a call only when it opens with one
    assert Llama3(["f"]).parse('Sure. {"name": "f", "parameters": {}}')[1] == []
    # no call: the reply, whitespace and all
    for fmt in calls:
        stream = ToolCallStream(fmt(["f"]))
        out = "".join(stream.feed(p) for p in ("  Hello ", "there \n"))
        rest, got = stream.finish("  Hello there \n")
        assert out + rest == "  Hello there \n" == fmt(["f"]).parse("  Hello there \n")[0] and got == []


def test_text_after_json_calls_keeps_its_leading_punctuation():
    """Mistral and Llama 3 stripped every ';' and ',' from the start of the text after the calls: a
    reply going on ", and then ..." lost its comma (streamed or not). Only the separators between
    calls, and ones with nothing after them, are the format's."""
    calls = {Mistral: '[TOOL_CALLS] [{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]',
             Llama3: '<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "parameters": {}}'}
    cases = [(", and then I will check.", ", and then I will check."), ("; see above", "; see above"),
             (" ,, done", ",, done"), (";", ""), (" ;\n", ""), (",", "")]
    for fmt, written in calls.items():
        for after, content in cases:
            text = written + after
            got, parsed = fmt(["f", "g"]).parse(text)
            assert (got, [c.name for c in parsed]) == (content, ["f", "g"]), (fmt.__name__, text)
            for size in (1, 3, 7):
                stream = ToolCallStream(fmt(["f", "g"]))
                out = "".join(stream.feed(text[i:i + size]) for i in range(0, len(text), size))
                rest, streamed = stream.finish(text)
                assert out + rest == content and len(streamed) == 2, (fmt.__name__, size, text, out, rest)
        # a call that is not valid JSON after a separator still makes the reply text
        assert fmt(["f", "g"]).parse(written + "; {broken")[1] == []


def test_a_long_reply_streams_in_time_linear_in_its_length():
    """ToolCallStream added every piece to one string and looked for the marker in all of it: a long
    reply cost time quadratic in its length on the server's event loop (50,000 pieces: 2 s, 100,000:
    ~10 s). A piece now costs its own length (100,000 pieces: ~0.3 s)."""
    import time

    for fmt in (Hermes(["f"]), Mistral(["f"]), Llama3(["f"])):
        for opening in ("Sure, ", '{"name": "f", "parameters": {"a": "'):  # content, and a reply held whole
            stream = ToolCallStream(fmt)
            start = time.process_time()
            out = stream.feed(opening) + "".join(stream.feed("word ") for _ in range(100_000))
            assert time.process_time() - start < 4, (fmt.name, opening)
            assert out + stream.finish(stream.text, cut=True)[0] == opening + "word " * 100_000


# -- Mistral's format from its tokenizer v11 on: [TOOL_CALLS]name[ARGS]{...} -------------------------

ARGS_CALLS = '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[CALL_ID]abcDEF123[ARGS]{}[TOOL_CALLS]f[ARGS]{"a": 3}'


def test_mistral_args_format_is_chosen_from_the_published_templates():
    """Mistral Small 3.2, Magistral, Devstral and Ministral 3 write each call as
    [TOOL_CALLS]name[ARGS]{...} ([CALL_ID]id before [ARGS] in Mistral Small 3.2): their replies were
    read as the older [TOOL_CALLS] [{...}] format, so every call came back as content."""
    for name, with_call_id in (("mistral-small-3.2-24b-instruct-2506", True),
                               ("ministral-3-14b-reasoning-2512", False), ("mistral-args-tools", True)):
        fmt = tool_format(_template(name), ["f"], parallel=False)
        assert isinstance(fmt, MistralArgs) and fmt.with_call_id is with_call_id, name
        assert (fmt.names, fmt.parallel) == ({"f"}, False)
    for name in ("mistral-v3-tools", "mistral-nemo-instruct-2407"):
        assert type(tool_format(_template(name))) is Mistral, name


@pytest.mark.parametrize("name", ["mistral-small-3.2-24b-instruct-2506", "ministral-3-14b-reasoning-2512",
                                  "mistral-args-tools"])
def test_mistral_args_calls_the_template_writes_are_read_back(name):
    """The calls a published template writes into the conversation (what the model learnt to write)
    are read back by the parser as the same calls."""
    from pyllm.chat_template import render_chat

    template = _template(name)
    calls = [("get_weather", {"city": "Paris", "note": "[ARGS] {x}"}), ("get_time", {})]
    assistant = {"role": "assistant", "content": "", "tool_calls": [
        {"id": f"abcDEF12{k}", "type": "function", "function": {"name": n, "arguments": a}}
        for k, (n, a) in enumerate(calls)]}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather and time?"}]
    specials = dict(bos_token="<s>", eos_token="</s>")
    prompt = render_chat(template, messages, add_generation_prompt=True, **specials)
    whole = render_chat(template, messages + [assistant], **specials)
    assert whole.startswith(prompt)
    reply = whole[len(prompt):].removesuffix("</s>")
    assert reply.startswith("[TOOL_CALLS]get_weather") and ("[CALL_ID]abcDEF120[ARGS]" in reply) is (name != "ministral-3-14b-reasoning-2512")
    content, parsed = tool_format(template, ["get_weather", "get_time"]).parse(reply)
    assert content == "" and [(c.name, _args(c)) for c in parsed] == calls
    assert all(len(c.id) == 9 and c.id.isalnum() for c in parsed)  # the templates insist on 9 letters or digits


def test_mistral_args_replies():
    fmt = MistralArgs(["f", "g"])
    content, calls = fmt.parse("Sure. " + ARGS_CALLS + " Done.")
    assert content == "Sure.\nDone." and [(c.name, _args(c)) for c in calls] == [("f", {"a": 1}), ("g", {}), ("f", {"a": 3})]
    assert len({c.id for c in calls}) == 3 and all(len(c.id) == 9 and c.id.isalnum() for c in calls)
    # whitespace around the name and tags, text between calls, an argument string holding the tags
    spaced = '[TOOL_CALLS] f [ARGS] {"a": "[TOOL_CALLS]g[ARGS]{}"}\nthen\n[TOOL_CALLS]g[ARGS]{}'
    content, calls = fmt.parse(spaced)
    assert content == "then" and [(c.name, _args(c)) for c in calls] == [("f", {"a": "[TOOL_CALLS]g[ARGS]{}"}),
                                                                         ("g", {})]
    # arguments written as a JSON string of an object, as some templates render them
    assert _args(fmt.parse('[TOOL_CALLS]f[ARGS]"{\\"a\\": 2}"')[1][0]) == {"a": 2}
    # not a call: the whole reply is text
    for bad in ("[TOOL_CALLS]f{}", "[TOOL_CALLS][ARGS]{}", "[TOOL_CALLS]f g[ARGS]{}", "[TOOL_CALLS]f[ARGS]{broken",
                "[TOOL_CALLS]f[ARGS][1]", '[TOOL_CALLS]f[ARGS]"text"', '[TOOL_CALLS]f[ARGS]{"a": 1} {"b": 2}',
                "[TOOL_CALLS]h[ARGS]{}", '[TOOL_CALLS]f[ARGS]{}[TOOL_CALLS]h[ARGS]{}', "[TOOL_CALLS]",
                "no call here", "[ARGS]{}"):
        for cut in (False, True):
            parsed = fmt.split(bad, cut)
            assert (parsed.content, parsed.calls) == (bad, []), (bad, cut)
    # any function when the request names none; one call when parallel_tool_calls is false
    assert [c.name for c in MistralArgs().parse("[TOOL_CALLS]h[ARGS]{}")[1]] == ["h"]
    assert [c.name for c in MistralArgs(["f", "g"], parallel=False).parse(ARGS_CALLS)[1]] == ["f"]


def test_mistral_args_calls_that_are_no_json_text_are_content():
    """As in the other formats: arguments nested past the JSON parser's depth, NaN, Infinity, 1e999
    or a lone surrogate escape make the call no call, and the reply text."""
    deep = "[" * 100_000 + "]" * 100_000
    for arguments in ('{"a": %s}' % deep, '{"a": NaN}', '{"a": 1e999}', '{"a": "\\ud800"}', '{"a": [1, -Infinity]}'):
        text = "[TOOL_CALLS]f[ARGS]" + arguments
        for cut in (False, True):
            content, calls = MistralArgs(["f"]).parse(text, cut)
            assert (content, calls) == (text, []), (arguments[:20], cut)


def test_mistral_args_cut_reply_keeps_its_complete_calls():
    """Cut (max_tokens, a stop string) inside the third call, wherever: the first two come back and
    the third is left out (dropped), streamed or not; not cut, the same text is a broken reply."""
    fmt = MistralArgs(["f", "g"])
    third = ARGS_CALLS.rindex("[TOOL_CALLS]")
    for end in range(third + 1, len(ARGS_CALLS) - 1):
        cut = ARGS_CALLS[:end]
        parsed = fmt.split(cut, cut=True)
        assert [(c.name, _args(c)) for c in parsed.calls] == [("f", {"a": 1}), ("g", {})], cut
        assert parsed.content == "" and parsed.dropped, cut
        if end < third + len("[TOOL_CALLS]"):  # cut inside the marker: not cut, that is text after the calls
            assert fmt.parse(cut)[0] == cut[third:]
        else:
            assert fmt.parse(cut) == (cut, []), cut
        stream = ToolCallStream(MistralArgs(["f", "g"]))
        out = "".join(stream.feed(cut[i:i + 4]) for i in range(0, len(cut), 4))
        rest, calls = stream.finish(cut, cut=True)
        assert out + rest == "" and [c.name for c in calls] == ["f", "g"] and stream.dropped, cut
    # the only call cut: no call, the text stays content; one call only wanted: nothing it returns was dropped
    assert fmt.split(ARGS_CALLS[:12 + 4], cut=True).calls == []
    assert not MistralArgs(["f", "g"], parallel=False).split(ARGS_CALLS[:third + 5], cut=True).dropped


def test_mistral_args_streams_the_text_around_calls_as_content():
    cases = [("Sure.\n", "", "Sure."), ("Sure. ", "\n\nDone.", "Sure.\nDone."), ("", " Done. ", "Done."),
             ("\n", "\n", "")]
    for before, after, content in cases:
        text = before + ARGS_CALLS + after
        assert MistralArgs(["f", "g"]).parse(text)[0] == content
        for size in (1, 3, 7):
            stream = ToolCallStream(MistralArgs(["f", "g"]))
            out = "".join(stream.feed(text[i:i + size]) for i in range(0, len(text), size))
            rest, streamed = stream.finish(text)
            assert out + rest == content and len(streamed) == 3, (size, text, out, rest)
    # the marker a special token (id 7 here), left out of the streamed pieces
    stream = ToolCallStream(MistralArgs(["f"]), marker_id=7)
    out = stream.feed("Sure.", [1]) + stream.feed('f[ARGS]{"a": 1}', [7, 8, 9])
    rest, calls = stream.finish('Sure.[TOOL_CALLS]f[ARGS]{"a": 1}')
    assert out + rest == "Sure." and [c.name for c in calls] == ["f"]


def test_mistral_args_tags_that_are_special_tokens_are_kept_and_forced_as_tokens():
    """[TOOL_CALLS], [ARGS] and [CALL_ID] are special tokens of Mistral's tokenizers: the server keeps
    them in the reply it parses (special_tag_ids) and the forcing grammar writes them as tokens."""
    from pyllm.tool_calls import special_tag_ids

    class Tokenizer:
        ids = {"[TOOL_CALLS]": 5, "[ARGS]": 6, "[CALL_ID]": 7, "<tool_call>": 8}
        special_ids = frozenset({5, 6, 7})

        def token_to_id(self, text):
            return self.ids.get(text)

    assert special_tag_ids(MistralArgs(), Tokenizer()) == {5, 6, 7}
    assert special_tag_ids(Mistral(), Tokenizer()) == {5}
    assert special_tag_ids(Hermes(), Tokenizer()) == frozenset()
    tools = [{"type": "function", "function": {"name": "marker"}}]
    grammar = forced_call_grammar(MistralArgs(with_call_id=True), tools, None, True, Tokenizer())
    assert {"marker: <[5]>", "args_tag: <[6]>", "id_tag: <[7]>"} <= set(grammar.splitlines())
    grammar = forced_call_grammar(MistralArgs(), tools, None, True, Tokenizer())
    assert "id_tag" not in grammar and "call_0: \"marker\" args_tag %json" in grammar


def test_mistral_args_forcing_grammar_takes_each_tools_own_arguments(tiny_llama_f32):
    """The forcing grammar ties each function's name to its own parameters (the name and the
    arguments are apart in this format), writes [CALL_ID] and an id where the template does, and
    one call unless parallel."""
    llguidance = pytest.importorskip("llguidance")
    import pyllm
    from pyllm.structured import ll_tokenizer

    unit = {"$defs": {"Unit": {"enum": ["C", "F"]}}, "type": "object",
            "properties": {"unit": {"$ref": "#/$defs/Unit"}}, "required": ["unit"], "additionalProperties": False}
    count = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "temp", "parameters": unit}},
             {"type": "function", "function": {"name": "count", "parameters": count}},
             {"type": "function", "function": {"name": "ping"}}]
    with pyllm.LLM(tiny_llama_f32, n_threads=1) as llm:
        ll = ll_tokenizer(llm.tokenizer)
        for with_call_id in (False, True):
            fmt = MistralArgs(with_call_id=with_call_id)
            head = "[CALL_ID]abcDEF123[ARGS]" if with_call_id else "[ARGS]"

            def call(name, arguments):
                return f"[TOOL_CALLS]{name}{head}{json.dumps(arguments)}"

            for forced in (None, "temp", "count"):
                grammar = forced_call_grammar(fmt, tools, forced, True, llm.tokenizer)
                accepts = lambda text: _forced_accepts(llguidance, ll, grammar, text)  # noqa: E731
                if forced != "count":
                    assert accepts(call("temp", {"unit": "C"})) and not accepts(call("temp", {"unit": "K"}))
                    assert not accepts(call("temp", {"n": 1}))  # another tool's arguments
                if forced != "temp":
                    assert accepts(call("count", {"n": 3})) and not accepts(call("count", {"n": "3"}))
                assert not accepts(call("other", {})) and not accepts('[TOOL_CALLS] [{"name": "ping"}]')
                assert accepts(call("ping", {})) is (forced is None)
                other_head = call("ping", {}).replace(head, "[ARGS]" if with_call_id else "[CALL_ID]abcDEF123[ARGS]")
                assert not accepts(other_head)
            grammar = forced_call_grammar(fmt, tools, None, True, llm.tokenizer)
            assert _forced_accepts(llguidance, ll, grammar, call("ping", {}) + call("count", {"n": 1}))
            grammar = forced_call_grammar(fmt, tools, None, False, llm.tokenizer)
            assert not _forced_accepts(llguidance, ll, grammar, call("ping", {}) + call("count", {"n": 1}))
            check_tools(fmt, tools)
            with pytest.raises(ToolError):
                check_tools(fmt, [{"type": "function", "function": {"name": "s", "parameters": {"type": "string"}}}])
