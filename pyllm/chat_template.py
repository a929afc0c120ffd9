"""Chat templates rendered the way transformers' apply_chat_template renders them, and built-in
templates for models that ship none.

The Jinja environment matches transformers (sandboxed, trim_blocks, lstrip_blocks, loopcontrols,
the `{% generation %}` tag, tojson without HTML escaping, raise_exception, strftime_now, a limited
dict() and a namespace() that refuses underscore names). Messages are OpenAI-style dicts
({"role", "content", ...}); extra keys (tools, documents, ...) pass through to the template.

Templates are untrusted input: a rendering is bounded in time and output (RenderLimits in
pyllm/limits.py). The deadline is checked by a trace function on the rendering thread at every
function call the rendering makes and at every line of the compiled template and of Jinja's filters
and utils (lipsum, batch and slice loop there); the output as it is produced; and a value one
operation would make longer than the output limit is refused before Python builds it: `*`, `+`,
`~` and `%` on strings, bytes and lists, `*` and `**` on integers (MAX_INT_BITS), the methods of strings,
bytes and integers (any integer argument past the limit; replace, translate, join and expandtabs by
the size they would build; format widths and precisions), the filters center, indent, format,
join, replace, batch, slice, wordwrap (its wrapstring) and urlize (its target and rel), tojson's
indent and lipsum's size, str.encode and bytes.decode by the most their codec writes per character; and what every filter and method returns (urlencode, pprint,
utf-16, hex: a few times their input, again at each step of a loop); and what the rendering builds in
all (limits.MAX_TEMPLATE_WORK times the output limit: values each within it, kept under many names, in a
recursive macro's frames or in a list of a map). dict(), dict.fromkeys(), namespace() and |sum of lists
insert or add one item at a time, the deadline checked between (one C call of them ran for minutes); filters
run only while rendering (Jinja folds a filter of constants while compiling). Every failure is a TemplateError.
"""

from __future__ import annotations

import json
import os
import re
import string
import sys
import threading
import time
from datetime import datetime
from functools import lru_cache
from typing import Callable

from .errors import PASSING, PyllmError, read_text
from .limits import MAX_CHAT_TEMPLATE_BYTES, MAX_TEMPLATE_NESTING, MAX_TEMPLATE_WORK, RenderLimits


class TemplateError(PyllmError):
    """The chat template failed to render (it raised, or it is not valid Jinja)."""


# -- built-in templates -------------------------------------------------------------------------

def _alpaca(response_header: str) -> str:
    """Alpaca prompts: the preamble with or without input (chosen by the first user message's "input"
    key), "### Instruction:", an optional "### Input:", then the response header. A system message
    replaces the preamble. Later turns (a pyllm extension; Alpaca itself is single-turn) follow the
    reply after a blank line. The response header is always written, so add_generation_prompt has no
    effect."""
    with_input = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\\n\\n")
    without_input = ("Below is an instruction that describes a task. Write a response that appropriately "
                     "completes the request.\\n\\n")
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{{- messages[0]['content'] + '\\n\\n' -}}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set turns = messages -%}"
        f"{{%- if turns and turns[0]['input'] is defined and turns[0]['input'] -%}}{{{{- '{with_input}' -}}}}"
        f"{{%- else -%}}{{{{- '{without_input}' -}}}}{{%- endif -%}}"
        "{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}"
        "{%- if message['input'] is defined and message['input'] -%}"
        "{{- '### Input:\\n' + message['input'] + '\\n\\n' -}}{%- endif -%}"
        f"{{{{- '### Response:{response_header}' -}}}}"
        "{%- elif message['role'] == 'assistant' -%}{{- message['content'] + '\\n\\n' -}}"
        "{%- else -%}{{- raise_exception('the Alpaca template takes an optional first system message, then user "
        "and assistant messages (got role ' + message['role'] + ')') -}}"
        "{%- endif -%}{%- endfor -%}"
    )


BUILTIN_TEMPLATES = {
    # Alpaca-LoRA (templates/alpaca.json): "### Response:\n"
    "alpaca": _alpaca("\\n"),
    # Stanford Alpaca (train.py PROMPT_DICT): "### Response:" with no newline
    "alpaca-stanford": _alpaca(""),
    # ChatML as OpenHermes-2.5 writes it (no default system message)
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' "
        "+ '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # meta-llama/Llama-2-7b-chat-hf
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
        "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
        "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
        "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    # meta-llama/Meta-Llama-3-8B-Instruct (Llama 3, 3.1 and 3.2 without tools)
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # mistralai/Mistral-7B-Instruct-v0.1 ([INST] turns, no system role)
    "mistral-instruct": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    ),
    # HuggingFaceH4/zephyr-7b-beta (the alignment-handbook's default template)
    "zephyr": (
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
        "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
        "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
    ),
    # google/gemma-3-*-it: Gemma's turns (as gemma-7b-it and gemma-2 write them), a system message folded into
    # the first user turn where Gemma 1/2's templates refuse it
    "gemma": (
        "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
        "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n    {%- else -%}\n"
        "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n    {%- endif -%}\n"
        "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
        "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
        "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
        "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
        "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
        "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
        "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
        "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
        "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
        "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
        "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
        "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\\n' }}\n"
        "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\\n'}}\n{%- endif -%}\n"
    ),
    # microsoft/Phi-3.5-mini-instruct (Phi-3's <|user|> ... <|end|> turns)
    "phi3": (
        "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + "
        "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + "
        "'<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    # Qwen/Qwen2-7B-Instruct and Qwen1.5's chat models: ChatML with a default system message
    "qwen": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
        "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}

# Other spellings of the built-in names: llama-cpp-python's chat_format names (llama-2, llama-3,
# mistral-instruct, ...) and llama.cpp's --chat-template names (llama2, llama3, phi3, ...) both
# work, as do "_" for "-" and any case (resolve_chat_template folds those).
CHAT_TEMPLATE_ALIASES = {
    "llama-2": "llama2", "llama-3": "llama3", "phi-3": "phi3", "gemma2": "gemma", "gemma3": "gemma",
    "mistral": "mistral-instruct", "mistral-v1": "mistral-instruct", "qwen2": "qwen",
}


def builtin_template_name(value: str) -> str | None:
    """The built-in template `value` names (in any of its spellings), or None."""
    key = value.strip().lower().replace("_", "-")
    key = CHAT_TEMPLATE_ALIASES.get(key, key)
    return key if key in BUILTIN_TEMPLATES else None


# The end-of-turn marker a built-in template writes after each reply where it is not the model's
# end-of-sequence token (those writing eos_token end with the model's own): a template chosen for a
# model trained on another format (chatml for a Llama 2 base) had the reply run on past the marker, written
# as text or as a token the model does not declare as its end, into the next turn. llama-cpp-python's chat
# formats stop there (their `stop`).
TEMPLATE_STOPS = {"chatml": ["<|im_end|>"], "qwen": ["<|im_end|>"], "llama3": ["<|eot_id|>"],
                  "gemma": ["<end_of_turn>"], "phi3": ["<|end|>"]}


def template_stop(template: str | None) -> list[str]:
    """The stop strings of `template` when it is a built-in one (TEMPLATE_STOPS), else []."""
    name = next((n for n, text in BUILTIN_TEMPLATES.items() if text == template), None) if template else None
    return list(TEMPLATE_STOPS.get(name, []))


def builtin_template_names() -> str:
    """The built-in names for a message: "alpaca, ..., qwen (also llama-2, ...)"."""
    return f"{', '.join(BUILTIN_TEMPLATES)} (also {', '.join(CHAT_TEMPLATE_ALIASES)})"


TEMPLATE_FILE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".json", ".txt", ".tmpl")


def config_template(template) -> str:
    """tokenizer_config.json's chat_template: a string, or transformers' named templates (a list of
    {"name", "template"}: "default", else the first); "" for none. TemplateError for anything else."""
    if template is None or isinstance(template, str):
        return template or ""
    if isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                          and isinstance(t.get("template"), str) for t in template):
        named = {t["name"]: t["template"] for t in template}
        return named.get("default") or next(iter(named.values()), "")
    raise TemplateError("chat_template is not a string or a list of {\"name\", \"template\"} strings")


def _is_readable_file(path: str) -> bool:
    """A path that names something to read a template from: a file, a pipe (`<(cat t.jinja)`), a
    character device; not a directory or nothing."""
    return os.path.exists(path) and not os.path.isdir(path)


def resolve_chat_template(value: str) -> str:
    """A chat template from a built-in name, a file (Jinja text), or Jinja source itself.

    Raises FileNotFoundError for a path (it has a directory part or a template file suffix) that
    names no file, TemplateError for an unknown name, an empty file or a template that is not valid
    Jinja, TypeError for a value that is neither a str nor a path (os.PathLike, taken as a file)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
        if isinstance(value, bytes):
            value = os.fsdecode(value)
        if not _is_readable_file(value):
            raise FileNotFoundError(f"chat template file {value} not found" +
                                    (" (it is a directory)" if os.path.isdir(value) else ""))
    if not isinstance(value, str):
        raise TypeError("chat_template must be a built-in name, a Jinja file's path or Jinja source; got "
                        f"{type(value).__name__}")
    name = builtin_template_name(value)
    if name is not None:
        return BUILTIN_TEMPLATES[name]
    if "{{" in value or "{%" in value:
        _compile(value)  # refuse a broken template now, as for a file
        return value
    value = os.path.expanduser(value)
    if not _is_readable_file(value) and (os.sep in value or "/" in value
                                         or value.lower().endswith(TEMPLATE_FILE_SUFFIXES)):
        raise FileNotFoundError(f"chat template file {value} not found" +
                                (" (it is a directory)" if os.path.isdir(value) else ""))
    if _is_readable_file(value):
        text = read_text(value, TemplateError, MAX_CHAT_TEMPLATE_BYTES)
        if value.endswith(".json"):  # a tokenizer_config.json
            try:
                text = config_template(json.loads(text)["chat_template"])
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                detail = str(e) if isinstance(e, TemplateError) else "not a tokenizer_config.json with a chat_template"
                raise TemplateError(f"{value}: {detail}") from None
        if not text.strip():  # it would render every conversation as an empty prompt
            raise TemplateError(f"{value}: the chat template is empty")
        try:
            _compile(text)  # refuse a broken template now, not at the first chat
        except TemplateError as e:
            raise TemplateError(f"the chat template file {value}: {e}") from None
        return text
    raise TemplateError(f"unknown chat template {value!r}: give a built-in name "
                        f"({builtin_template_names()}), a Jinja file, or Jinja source")


def check_chat_template(source: str) -> None:
    """Raises TemplateError when `source` is not a Jinja template the sandbox compiles."""
    _compile(source)


# -- the Jinja environment ------------------------------------------------------------------------

MAX_ERROR_CHARS = 1000  # of a message a template writes (raise_exception's) or provokes, in a TemplateError


def _excerpt(text) -> str:
    """text (a template's own words, or an error its values provoked) short enough for one error line:
    raise_exception('x' * 10**6) made a TemplateError, a server's 400 and its log line a megabyte long."""
    text = str(text)
    return text if len(text) <= MAX_ERROR_CHARS else f"{text[:MAX_ERROR_CHARS]}... ({len(text)} characters)"


def _raise_exception(message):
    raise TemplateError(f"the chat template refused the messages: {_excerpt(message)}")


MAX_JSON_INDENT = 64  # characters of tojson's indent (templates use 2 or 4)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    if isinstance(indent, (int, str)) and not isinstance(indent, bool) and \
            (len(indent) if isinstance(indent, str) else indent) > MAX_JSON_INDENT:
        raise TemplateError(f"tojson's indent is at most {MAX_JSON_INDENT}")
    text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    # at most 6 characters per character of a value within the limit; a string of quotes doubles each time
    _check_size(len(text), "tojson's text")
    return text


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """dict() inside templates, without the class itself."""

    def __call__(self, *args, **kwargs):
        return _new_dict(*args, **kwargs)

    def fromkeys(self, iterable, value=None):
        return _new_dict((key, value) for key in iterable)


def _new_dict(*args, **kwargs) -> dict:
    """dict(*args, **kwargs), its keys inserted one by one with the deadline checked between them: keys whose
    hashes collide (the integers k * (2**61 - 1), 100,000 of them from one range) make each insertion
    compare with all before it, and dict() or dict.fromkeys() of them ran minutes in one C call."""
    if len(args) > 1:
        raise TypeError(f"dict expected at most 1 argument, got {len(args)}")
    result = {}
    if args and isinstance(args[0], dict):  # (copied as it is: its keys went through here when it was built)
        result.update(args[0])
    elif args:
        source = args[0]
        pairs = ((k, source[k]) for k in source.keys()) if hasattr(source, "keys") else source
        for i, pair in enumerate(pairs):
            if i % 64 == 0:
                _check_time()
            pair = list(pair)
            if len(pair) != 2:
                raise ValueError(f"dictionary update sequence element #{i} has length {len(pair)}; 2 is required")
            result[pair[0]] = pair[1]
    result.update(kwargs)  # (string keys)
    return result


def _compile(source: str):
    """The template compiled in the sandbox (kept for the next call); TemplateError past
    MAX_CHAT_TEMPLATE_BYTES: a template inside tokenizer_config.json or a GGUF file was bounded by
    nothing, and Jinja took 273 s and 18 GB to compile 28 MB of one (a model's load checks it)."""
    size = len(source.encode("utf-8", "surrogatepass")) if isinstance(source, str) else 0
    if size > MAX_CHAT_TEMPLATE_BYTES:
        raise TemplateError(f"the chat template is {size} bytes long, past limits.MAX_CHAT_TEMPLATE_BYTES "
                            f"({MAX_CHAT_TEMPLATE_BYTES}; released templates take 1-20 KB)")
    return _compile_bounded(source)


@lru_cache(maxsize=16)
def _compile_bounded(source: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """{% generation %}...{% endgeneration %}: transformers marks assistant text with it; renders the body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = _new_dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            if isinstance(value, (str, bytes)) or _is_container(value):  # a flag (true, 3) weighs 1 whatever it was
                _weights_changed()  # a namespace is the one container a template can change
            old = (_namespace_attrs(self) or {}).get(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)
            if old is not None and old is not value:
                _released(old)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")

    class CodeGenerator(jinja2.compiler.CodeGenerator):
        @jinja2.compiler.optimizeconst
        def visit_Concat(self, node, frame):  # `a ~ b`: through checked_concat (Jinja writes str_join)
            self.write("environment.checked_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

        @jinja2.compiler.optimizeconst
        def visit_Getitem(self, node, frame):  # s[1:]: through sliced (Jinja slices in place), a new value counted
            if not isinstance(node.arg, nodes.Slice):
                return super().visit_Getitem(node, frame)
            self.write("environment.sliced(")
            self.visit(node.node, frame)
            self.write(", ")
            for part in (node.arg.start, node.arg.stop, node.arg.step):
                if part is None:
                    self.write("None")
                else:
                    self.visit(part, frame)
                self.write(", ")
            self.write(")")

        def visit_List(self, node, frame):  # [a, b]: through checked_value (a value held twice doubles)
            self.write("environment.checked_value(")
            super().visit_List(node, frame)
            self.write(")")

        def visit_Dict(self, node, frame):
            self.write("environment.checked_value(")
            super().visit_Dict(node, frame)
            self.write(")")

        def visit_Tuple(self, node, frame):
            if node.ctx != "load":  # an assignment target (`for a, b in`, `set a, b =`)
                return super().visit_Tuple(node, frame)
            self.write("environment.checked_value(")
            super().visit_Tuple(node, frame)
            self.write(")")

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "+", "**", "%"])
        code_generator_class = CodeGenerator

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return _built(super().call_binop(context, operator, left, right), (left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
            args = _check_call(__obj, args, kwargs)
            # dict(a=x, b=x), namespace(); a method whose value is a multiple of its input (encode, hex)
            return _checked_result(super().call(__context, __obj, *args, **kwargs), __obj, args)

        @staticmethod
        def checked_value(value):
            return _checked_value(value)

        @staticmethod
        def sliced(value, start, stop, step):
            return _built(value[start:stop:step], (value,))  # (s[1:] under many names: new strings, each counted)

        def wrap_str_format(self, value):
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None

            def checked(*args, **kwargs):
                _check_format(value.__self__, args, kwargs)
                return wrapped(*args, **kwargs)
            return checked

        @staticmethod
        def concat(parts) -> str:  # a macro's, caller's or {% set %} block's text: doubled forty times over
            parts = list(parts)
            _check_size(sum(map(len, parts)), "a macro's or block's text")
            return _built("".join(parts))

        @staticmethod
        def checked_concat(values) -> str:
            parts = [v if isinstance(v, str) else str(v) for v in values]
            _check_size(sum(map(len, parts)), "a string joined with ~")
            return _built("".join(parts))

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    _bound_filters(env.filters)
    env.globals["lipsum"] = _lipsum
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = Namespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template is not valid Jinja: {e}") from None
    except PASSING:
        raise
    except BaseException as e:  # e.g. RecursionError on absurdly deep nesting
        raise TemplateError(f"chat template cannot be compiled ({type(e).__name__}: {e})") from None


@lru_cache(maxsize=1)
def _looping_code() -> frozenset:
    """Files whose lines the deadline is checked at: code Jinja compiled from a template, and the
    Jinja modules whose filters and globals loop as long as their arguments say (batch, slice,
    lipsum, ...). Elsewhere it is checked at every function call."""
    import jinja2.filters
    import jinja2.utils

    return frozenset(["<template>", jinja2.filters.__file__, jinja2.utils.__file__])


class _RenderGuard:
    """Enforces RenderLimits on the rendering in this thread (see the module docstring)."""

    def __init__(self, limits: RenderLimits):
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.looping = _looping_code()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateError(f"the chat template ran past its time limit of {self.limits.seconds:g} s")

    def _global(self, frame, event, arg):  # every function the rendering calls
        self.check_time()
        return self._line if frame.f_code.co_filename in self.looping else None

    def _line(self, frame, event, arg):
        if event == "line":
            self.check_time()
        return self._line

    def render(self, template, context: dict) -> str:
        previous = sys.gettrace()
        sys.settrace(self._global)
        _limits.value, _limits.guard = self.limits, self
        _limits.built = 0
        _weights.stable, _weights.volatile = {}, {}
        try:
            out, size = [], 0
            for chunk in template.generate(**context):
                size += len(chunk)
                if size > self.limits.max_output_chars:
                    raise TemplateError(f"the chat template's output exceeds {self.limits.max_output_chars} characters")
                out.append(chunk)
            return "".join(out)
        finally:
            sys.settrace(previous)
            _limits.value = _limits.guard = None
            _weights.stable = _weights.volatile = None


class _ThreadLimits(threading.local):
    value: RenderLimits | None = None
    guard: _RenderGuard | None = None  # the rendering in this thread (_check_time)
    built: int = 0  # characters and elements the rendering in this thread has built (_built)


_limits = _ThreadLimits()


def _check_time() -> None:
    """The deadline of the rendering in this thread, checked inside a loop of this module (the trace checks it
    at function calls, and at lines of the template and of Jinja's filters only)."""
    if _limits.guard is not None:
        _limits.guard.check_time()


def _most() -> int:
    return (_limits.value or RenderLimits()).max_output_chars


def _check_size(size: int, what: str) -> None:
    most = _most()
    if size > most:
        raise TemplateError(f"the chat template builds a value longer than {most} ({what})")


def _namespace_attrs(value) -> dict | None:
    attrs = getattr(value, "_Namespace__attrs", None)  # jinja2.utils.Namespace (its repr shows them)
    return attrs if isinstance(attrs, dict) else None


def _is_container(value) -> bool:
    return isinstance(value, _SEQUENCES) or isinstance(value, dict) or _namespace_attrs(value) is not None


# lists, tuples and dict views (d.items() writes out every item, as the dict does)
_SEQUENCES = (list, tuple, type({}.keys()), type({}.values()), type({}.items()))


_LEAVES = (str, bytes, int, float, bool, type(None))


class _Weights(threading.local):
    # id -> (container, weight, holds a namespace) for the rendering in this thread: lists, tuples and
    # dicts cannot change inside the sandbox, so only what is or holds a namespace can go stale
    stable: dict | None = None
    volatile: dict | None = None


_weights = _Weights()


def _weights_changed() -> None:
    """A namespace was given a container or a string: the weights of what holds a namespace are redone."""
    if _weights.volatile is not None:
        _weights.volatile.clear()


def _weight(value) -> int:
    """The size of a value written out in full: 1 per element, a string's length, a container held
    twice counted twice (a list that holds one list twice, forty times over, is 2**40 elements to
    str(), tojson, ==, hash or `in`, each one uninterruptible C call). Weights are kept for the
    rendering (those holding a namespace until a namespace is given a container or string); raises
    TemplateError past the output limit, as soon as it is passed, or nested deeper than
    MAX_TEMPLATE_NESTING (hash() of a tuple nested 200,000 deep, which a template builds in seconds,
    recurses in C with no depth check: it overflowed the C stack and killed the process)."""
    if isinstance(value, (str, bytes)):  # Markup (|escape, macros) included
        return len(value)
    if type(value) in _LEAVES:
        return 1
    stable = _weights.stable if _weights.stable is not None else {}
    volatile = _weights.volatile if _weights.volatile is not None else {}
    entry = stable.get(id(value)) or volatile.get(id(value))
    if entry is not None:
        return entry[1]
    if not _is_container(value):
        return 1
    most = _most()
    stack, open_ = [(value, False)], set()
    while stack:
        item, children_done = stack.pop()
        if isinstance(item, dict):
            children, holds_namespace = [*item.keys(), *item.values()], False
        elif isinstance(item, (list, tuple)):
            children, holds_namespace = item, False
        elif isinstance(item, _SEQUENCES[-1]):  # an items view makes a new pair each time: its keys and values
            children, holds_namespace = [x for pair in item for x in pair], False
        elif isinstance(item, _SEQUENCES):
            children, holds_namespace = list(item), False
        else:
            children, holds_namespace = list(_namespace_attrs(item).values()), True
        if children_done:
            total, depth = 1, 1
            for child in children:
                if isinstance(child, (str, bytes)):
                    total += len(child)
                elif type(child) in _LEAVES:
                    total += 1
                else:
                    entry = stable.get(id(child)) or volatile.get(id(child))
                    if entry is not None:
                        total += entry[1]
                        holds_namespace = holds_namespace or entry[2]
                        depth = max(depth, entry[3] + 1)
                    elif _is_container(child):  # a namespace that holds itself: counted once
                        holds_namespace = True
                    else:
                        total += 1
                if total > most:
                    raise TemplateError(f"the chat template builds a value larger than {most} elements or "
                                        "characters written out (a list or dict holding another many times)")
            if depth > MAX_TEMPLATE_NESTING:
                raise TemplateError(f"the chat template builds a value nested more than {MAX_TEMPLATE_NESTING} "
                                    "deep (limits.MAX_TEMPLATE_NESTING: lists, tuples, dicts or namespaces "
                                    "inside one another)")
            (volatile if holds_namespace else stable)[id(item)] = (item, total, holds_namespace, depth)
            open_.discard(id(item))
            continue
        if id(item) in open_ or id(item) in stable or id(item) in volatile:
            continue
        open_.add(id(item))
        stack.append((item, True))
        for child in children:
            if type(child) not in _LEAVES and not isinstance(child, (str, bytes)) and id(child) not in open_ and id(child) not in stable and \
                    id(child) not in volatile and _is_container(child):
                stack.append((child, False))
    entry = stable.get(id(value)) or volatile.get(id(value))
    return entry[1]


def _checked_value(value):
    if _is_container(value):
        _weight(value)
    return value


def _checked_result(value, fn, args=()):
    """value, what a function, method or filter returned, refused past the output limit: a value a
    few times its input's size (utf-16, unicode_escape, hex, pprint, urlencode) would otherwise grow
    that many times over at each step of a loop. Counted among what the rendering builds (_built),
    unless it is one of the values given (|string of a string, |default) or an element a container's
    method returns (dict.get)."""
    if isinstance(value, (str, bytes)):
        _check_size(len(value), f"what {getattr(fn, '__name__', 'a call')} returns")
    owner = getattr(fn, "__self__", None)
    if not (isinstance(value, (str, bytes)) and (isinstance(owner, (dict, list, tuple)) or _is_container(owner))):
        _built(value, (owner, *args))
    return _checked_value(value)


def _size(value) -> int:
    """What _built counts of a value: a string's characters, a container's elements (not theirs: held
    already, or counted when built), an integer's bytes."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, (list, tuple, dict)):
        return len(value)
    if _is_int(value):
        return value.bit_length() // 8
    return 0


def _built(value, given=()):
    """value, a value the rendering built (by an operator, a call, a filter, a macro), counted: TemplateError
    once what the rendering has built passes MAX_TEMPLATE_WORK times its output limit. Each value stays
    within the output limit, but together they took all memory (see limits.MAX_TEMPLATE_WORK)."""
    if _limits.value is None or any(value is g for g in given):
        return value
    _limits.built += _size(value)
    most = MAX_TEMPLATE_WORK * _most()
    if _limits.built > most:
        raise TemplateError(f"the chat template builds more than {most} characters or elements in all (limits."
                            f"MAX_TEMPLATE_WORK = {MAX_TEMPLATE_WORK} times its output limit: values made again and "
                            "again, or kept under many names, in a recursive macro's calls or in a list of a map)")
    return value


def _released(old) -> None:
    """A namespace attribute's previous value, replaced: its size is given back to _built when nothing else
    holds it (this function's own reference and getrefcount's argument), as its memory is."""
    if _limits.value is not None and sys.getrefcount(old) <= 3:
        _limits.built = max(0, _limits.built - _size(old))


MAX_INT_BITS = 2**20  # integers a template computes (315,653 digits; str() refuses past 4,300)


def _check_bits(bits: int) -> None:
    """Refuses an integer result of more than MAX_INT_BITS: one multiplication of two such numbers
    takes milliseconds, of two 2**26-bit numbers seconds (the deadline cannot stop one operation)."""
    if bits > MAX_INT_BITS:
        raise TemplateError(f"the chat template computes a number of more than {MAX_INT_BITS} bits")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_binop(operator: str, left, right) -> None:
    """Refuses `*`, `+`, `**` and `%` results past the output limit before Python builds them."""
    sized = (str, bytes, list, tuple)
    if operator == "*":
        if _is_int(left) and _is_int(right):
            _check_bits(left.bit_length() + right.bit_length())
            return
        seq, n = (left, right) if isinstance(left, sized) else (right, left)
        if isinstance(seq, sized) and isinstance(n, int):
            _check_size(len(seq) * n, "a repeated string or list")
            if not isinstance(seq, (str, bytes)):
                _check_size(_weight(seq) * n, "a repeated list")
    elif operator == "+":
        if isinstance(left, sized) and isinstance(right, sized):
            _check_size(len(left) + len(right), "a joined string or list")
            if not isinstance(left, (str, bytes)) and not isinstance(right, (str, bytes)):
                _check_size(_weight(left) + _weight(right), "a joined list")
    elif operator == "**":
        if _is_int(left) and _is_int(right) and abs(left) > 1 and right > 0:
            _check_bits(right * max(abs(left).bit_length(), 1))
    elif operator == "%" and isinstance(left, (str, bytes)):
        _check_printf(left if isinstance(left, str) else left.decode("latin-1"), right)


# a printf conversion: its width and precision (digits, or * for an argument)
_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_number_text(digits: str, what: str) -> None:
    if digits and (len(digits) > 12 or int(digits) > _most()):
        raise TemplateError(f"the chat template formats with a {what} of {digits[:20]}, past {_most()}")


def _check_ints(values, what: str) -> None:
    for value in values:
        if _is_int(value) and value > _most():
            raise TemplateError(f"the chat template passes {value} to {what}, past {_most()}")


def _check_printf(fmt: str, args) -> None:
    """fmt % args: widths and precisions (given, or * from args) within the output limit."""
    star = False
    for width, precision in _PRINTF.findall(fmt):
        for digits in (width, precision):
            star = star or digits == "*"
            _check_number_text("" if digits == "*" else digits, "width or precision")
    if star:
        _check_ints(args if isinstance(args, tuple) else (args,), "a * width")
    values = list(args) if isinstance(args, tuple) else list(args.values()) if isinstance(args, dict) else [args]
    _check_size(len(fmt) + len(_PRINTF.findall(fmt)) * _largest_text(values), "a formatted string")


def _check_format(fmt: str, args, kwargs) -> None:
    """fmt.format(*args, **kwargs) / format_map: widths and precisions within the output limit."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises the same error itself
    values = list(args) + list(kwargs.values()) + [v for a in args if isinstance(a, dict) for v in a.values()]
    # each field writes one argument (or a part of one): '{}{}'.format(s, s) doubled s, forty times over
    _check_size(len(fmt) + sum(name is not None for _, name, _, _ in fields) * _largest_text(values),
                "a formatted string")
    for _, _, spec, _ in fields:
        if not spec:
            continue
        if "{" in spec:  # a width from an argument
            _check_ints(list(args) + list(kwargs.values()) + [
                v for a in args if isinstance(a, dict) for v in a.values()], "a nested format width")
        for digits in re.findall(r"\d+", spec):
            _check_number_text(digits, "width or precision")


def _largest_text(values) -> int:
    """The longest str() of values (containers by their weight, which bounds their text)."""
    return max([len(v) if isinstance(v, str) else _weight(v) * 8 if _is_container(v) else len(str(v))
                for v in values] or [0])


def _text_size(items) -> int:
    """Characters of str(item) for each item, stopping once past the limit."""
    total, most = 0, _most()
    for item in items:
        total += len(item) if isinstance(item, str) else len(str(item))
        if total > most:
            break
    return total


def _check_call(obj, args: tuple, kwargs: dict) -> tuple:
    """Refuses a method of a str, bytes or int called from a template whose result would pass the
    output limit (any integer argument past it: widths, counts, lengths; replace, translate and
    join by the size they would build). Returns args (join's iterable as a list, checked)."""
    owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
    if not isinstance(owner, (str, bytes, int)) or isinstance(owner, bool):
        return args
    _check_ints(list(args) + list(kwargs.values()), f"{type(owner).__name__}.{name}")
    if isinstance(owner, (str, bytes)):
        if name in ("encode", "decode"):  # checked before: one character can become ~90 (namereplace)
            _check_size(len(owner) * _codec_growth(args, kwargs), f"{type(owner).__name__}.{name}")
        if name == "expandtabs":
            size = kwargs.get("tabsize", args[0] if args else 8)
            if _is_int(size):
                _check_size(len(owner) + owner.count(b"\t" if isinstance(owner, bytes) else "\t") * size,
                            "expanded tabs")
        elif name == "replace" and len(args) >= 2 and type(args[0]) is type(args[1]) is type(owner):
            count = owner.count(args[0]) if args[0] else len(owner) + 1
            _check_size(len(owner) + count * max(0, len(args[1]) - len(args[0])), "a replacement")
        elif name == "translate" and args and isinstance(args[0], dict):
            longest = max((len(v) for v in args[0].values() if isinstance(v, (str, bytes))), default=1)
            _check_size(len(owner) * max(longest, 1), "a translation")
        elif name == "join" and args:
            items = list(args[0])
            _check_size(_text_size(items) + len(owner) * max(len(items) - 1, 0), "a joined list")
            return (items,) + args[1:]
    return args


def _codec_growth(args: tuple, kwargs: dict) -> int:
    """The most characters or bytes str.encode / bytes.decode may write for one of its input's."""
    encoding = str(kwargs.get("encoding", args[0] if args else "utf-8")).lower()
    errors = str(kwargs.get("errors", args[1] if len(args) > 1 else "strict")).lower()
    if "namereplace" in errors:
        return 100  # \N{...}: the longest character name is 88 letters
    if "escape" in encoding or "replace" in errors or "punycode" in encoding:
        return 10  # \U0010ffff, &#1114111;
    return 4  # UTF-8, UTF-16, UTF-32


def _bound_filters(filters: dict) -> None:
    """Jinja's filters that build values from size arguments, checked before they do."""
    import jinja2.filters as jf

    def center(value, width=80):
        _check_ints([width], "center")
        return jf.do_center(value, width)

    def indent(s, width=4, first=False, blank=False):
        lines = str(s).count("\n") + 1
        per_line = width if _is_int(width) else len(str(width))
        _check_size(len(str(s)) + lines * per_line, "an indented text")
        return jf.do_indent(s, width, first, blank)

    def format_(value, *args, **kwargs):
        if isinstance(value, str):
            _check_printf(value, args if args else kwargs)
        return jf.do_format(value, *args, **kwargs)

    @jf.pass_environment
    def join(environment, value, d="", attribute=None):
        items = list(value)
        if attribute is not None:
            items = list(map(jf.make_attrgetter(environment, attribute), items))
        _check_size(_text_size(items) + len(str(d)) * max(len(items) - 1, 0), "a joined list")
        return str(d).join(map(str, items))

    @jf.pass_eval_context
    def replace(eval_ctx, s, old, new, count=None):
        s, old, new = str(s), str(old), str(new)
        _check_call(s.replace, (old, new), {})
        return jf.do_replace(eval_ctx, s, old, new, count)

    @jf.pass_environment
    def wordwrap(environment, s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True):
        # a wrapstring written between lines: 'y' * 8000000 between 200 lines of one letter was 1.6 GB before
        # the value's check. At most a line per whitespace character and per `width` characters, plus one
        text, sep = str(s), str(wrapstring) if wrapstring is not None else "\n"
        if len(sep) > 1 and _is_int(width) and width > 0:
            lines = sum(text.count(c) for c in string.whitespace) + len(text) // width + 1
            _check_size(len(text) + lines * (len(sep) - 1), "a wrapped text")
        return jf.do_wordwrap(environment, s, width, break_long_words, wrapstring, break_on_hyphens)

    @jf.pass_eval_context
    def urlize(eval_ctx, value, trim_url_limit=None, nofollow=False, target=None, rel=None, extra_schemes=None):
        # target and rel are written into each link: 10,000 links with an 8 MB target took 3.6 GB in 10 s. A
        # link has a '.', ':' or '@' (www.a, http://a, a.com, a@b.c) of its own
        attrs = len(str(target or "")) + len(str(rel or ""))
        if attrs:
            text = str(value)
            _check_size(len(text) + (text.count(".") + text.count(":") + text.count("@") + 1) * attrs,
                        "a urlized text")
        return jf.do_urlize(eval_ctx, value, trim_url_limit, nofollow, target, rel, extra_schemes)

    @jf.pass_environment
    def sum_(environment, iterable, attribute=None, start=0):
        if attribute is not None:
            iterable = map(jf.make_attrgetter(environment, attribute), iterable)
        if not isinstance(start, (list, tuple)):  # numbers (sum refuses strings and bytes itself)
            return sum(iterable, start)
        # lists or tuples: sum() in C copies the total at each step (100,000 lists of 80 ran for hours, in one
        # call the deadline cannot interrupt); added here one by one, each sum checked as `+` is
        total = start
        for item in iterable:
            _check_binop("+", total, item)
            total = total + item
        return total

    def batch(value, linecount, fill_with=None):
        _check_ints([linecount], "batch")
        if fill_with is not None and _is_int(linecount):  # up to linecount - 1 copies of it
            _check_size(_weight(fill_with) * linecount, "a batch's filling")
        return jf.do_batch(value, linecount, fill_with)

    def slice_(value, slices, fill_with=None):
        _check_ints([slices], "slice")
        if fill_with is not None and _is_int(slices):  # up to one copy per slice
            _check_size(_weight(fill_with) * slices, "a slice's filling")
        return jf.sync_do_slice(value, slices, fill_with)

    filters.update(center=center, indent=indent, format=format_, join=join, replace=replace, batch=batch,
                   slice=slice_, sum=sum_, wordwrap=wordwrap, urlize=urlize)
    for name, f in filters.items():  # every filter's value checked (urlencode, pprint, forceescape grow theirs)
        filters[name] = _result_checked(f)


def _result_checked(f):
    """The filter f, its value checked, and run only while a template renders: marked pass_context, as Jinja
    folds a filter of constants (`'x'|center(8000000)|wordwrap(1)`) at compile time otherwise, with no deadline
    and none of the rendering's limits (that one compiled for ever; a dozen such constants took a gigabyte
    that the compiled template's cache kept). f is given what it asks for (context, eval_ctx, environment)."""
    import functools

    from jinja2 import pass_context
    from jinja2.utils import _PassArg

    wants = _PassArg.from_obj(f)

    @pass_context
    @functools.wraps(f)
    def checked(context, *args, **kwargs):
        first = {_PassArg.context: (context,), _PassArg.eval_context: (context.eval_ctx,),
                 _PassArg.environment: (context.environment,)}.get(wants, ())
        return _checked_result(f(*first, *args, **kwargs), f, args)
    return checked


def _lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 - Jinja's names
    from jinja2.utils import generate_lorem_ipsum

    if _is_int(n) and _is_int(max):
        _check_size(n * max * 16, "lorem ipsum")  # words of up to ~15 letters and a space
    return generate_lorem_ipsum(n, html, min, max)


def normalize_messages(messages) -> list[dict]:
    """OpenAI chat messages as chat templates expect them (LLM.chat and the server both use this).

    role "developer" (OpenAI's newer name) becomes "system". content: a string stays; a list of
    parts ({"type": "text", "text": ...}) becomes their texts joined by newlines (vLLM's rule);
    None (an assistant turn that only calls tools) becomes "". tool_calls: each call's function.arguments, a JSON string in the API, becomes the object
    templates expect (left a string when it is not valid JSON). Other keys (name, tool_call_id,
    ...) pass through. Raises TemplateError for anything else (no role, a non-text part), PyllmError
    for content that is not Unicode text (a lone surrogate), with its position in that content."""
    from .tokenizer import check_text

    if not isinstance(messages, (list, tuple)) or not messages:
        raise TemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise TemplateError(f"message {n} needs a 'role' string (got {m!r:.80})")
        m = dict(m)
        if m["role"] == "developer":  # OpenAI's newer name for the system role
            m["role"] = "system"
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise TemplateError(f"message {n}: only text content parts are supported (got {kind!r:.40})")
                if not isinstance(part.get("text"), str):
                    raise TemplateError(f"message {n}: a text content part needs a 'text' string "
                                        f"(got {part.get('text')!r:.40})")
                texts.append(part["text"])
            m["content"] = "\n".join(texts)
        elif content is None:
            m["content"] = ""
        elif not isinstance(content, str):
            raise TemplateError(f"message {n}: content must be a string, a list of text parts, or null")
        # here, not in the tokenizer: its error counted the position in the whole rendered prompt
        check_text(m["content"], f"message {n}'s content")
        if m.get("tool_calls") is not None:
            if not isinstance(m["tool_calls"], (list, tuple)):  # a dict's keys or a string's letters were "calls"
                raise TemplateError(f"message {n}: tool_calls must be a list of tool calls (got "
                                    f"{type(m['tool_calls']).__name__})")
            m["tool_calls"] = [_template_tool_call(call, n) for call in m["tool_calls"]]
        out.append(m)
    return out


def _template_tool_call(call, n: int) -> dict:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise TemplateError(f"message {n}: each tool call needs a 'function' object")
    function = dict(call["function"])
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's parser goes
            pass
    return {**call, "function": function}


# a message's reasoning under any of these names reaches the template under all of them (transformers'
# _alias_reasoning_fields: Qwen3's template reads reasoning_content, gpt-oss's thinking)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _template_message(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return dict(message)
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


# the variables render_chat sets itself (or takes as its own arguments): a template variable of one of these
# names given beside them was Python's TypeError "got multiple values for keyword argument"
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker of where the final message's text ends


def render_continuing(render: Callable[[list[dict]], str], messages: list[dict]) -> str:
    """The rendering of messages (normalized: normalize_messages) that ends right after the final
    message's text, for the reply to continue it (an assistant prefill), as transformers'
    apply_chat_template(continue_final_message=True) makes it: render(messages) is called with a
    marker after that text (render: without a generation prompt), and the text is cut at the marker,
    trailing space included where the template kept the space after the marker, stripped where the
    template trimmed the text. TemplateError where the template drops the text or the marker."""
    final = messages[-1]
    content = final.get("content") or ""
    marked = [*messages[:-1], {**final, "content": content + CONTINUE_TAG}]
    text = render(marked)
    tag = CONTINUE_TAG.strip()
    if tag not in text or content.strip() not in text:
        raise TemplateError("continue_final_message: the chat template does not write the last message's text as "
                            "given, so the reply cannot continue it")
    end = text.rindex(tag)
    return text[:end] if text.startswith(CONTINUE_TAG, end) else text[:end].rstrip()


RESERVED_VARIABLES = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token", "unk_token",
                                "pad_token", "tools", "limits", "origin", "template"})


def check_template_variables(variables) -> dict:
    """variables (chat_template_kwargs: more variables for the template, {"enable_thinking": False}) as
    a dict; TemplateError when it is no dict of names to values, or names a variable pyllm sets itself
    (RESERVED_VARIABLES: messages, tools, add_generation_prompt, the special tokens, ...)."""
    if variables is None:
        return {}
    if not isinstance(variables, dict):
        raise TemplateError(f"chat_template_kwargs must be a dict of template variables, not {type(variables).__name__}")
    for name in variables:
        if not isinstance(name, str):
            raise TemplateError(f"chat_template_kwargs: a template variable's name is a string, not {name!r}")
        if name in RESERVED_VARIABLES:
            what = "give tools as tools=" if name == "tools" else "pyllm sets it"
            raise TemplateError(f"chat_template_kwargs: {name!r} is not a variable to give ({what})")
    return dict(variables)


def placeholder_characters(strings: list[str], used: set[str]) -> dict[str, str]:
    """Each of `strings` (special-token strings written in messages) -> a private-use character
    (U+F0000 on) that none of `used` (the characters of the messages and the template) is, to stand
    for it while the template renders: the template's own special tokens stay special, the messages'
    strings become plain text after (LLM.chat_prompt_ids, and training's tokenization of records).
    PyllmError when too few characters are free (zip stopped short: a string stayed special)."""
    free = (chr(c) for c in range(0xF0000, 0x10FFFE) if chr(c) not in used)
    chosen = dict(zip(strings, free))
    if len(chosen) < len(strings):
        raise PyllmError("the messages and chat template hold every private-use character U+F0000 to U+10FFFD, "
                         "which stand for the special-token strings written in the messages "
                         f"({', '.join(strings)[:200]}) while the template renders")
    return chosen


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, bos_token: str = "",
                eos_token: str = "", limits: RenderLimits | None = None, tools: list | None = None,
                documents: list | None = None, origin: str | None = None, **extra) -> str:
    """Renders messages ([{"role", "content"}, ...]) into the model's prompt text, as apply_chat_template
    does: `tools` and `documents` are always defined (None when not given), reasoning is aliased (see
    _REASONING_FIELDS), and other keyword arguments (enable_thinking...) pass to the template.

    limits bounds the rendering's time and output (RenderLimits(), 10 s and 8 Mi characters, by
    default). Raises TemplateError for every failure: the template raised, broke a limit, or
    failed on the messages; a failure of the template begins with origin, where it comes from
    (chat_template_origin), when given."""
    if not template:
        raise TemplateError("this model has no chat template: name one (chat_template= in Python, --chat-template "
                            f"on the command line; built in: {builtin_template_names()}) or use plain generation")
    if not isinstance(messages, (list, tuple)):
        raise TemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise TemplateError(f"each message needs a 'role' (got {m!r})")
    if limits is not None and not isinstance(limits, RenderLimits):
        raise TypeError(f"render_limits must be a pyllm.limits.RenderLimits, not {type(limits).__name__}")
    context = dict(messages=[_template_message(m) for m in messages], tools=tools, documents=documents,
                   add_generation_prompt=add_generation_prompt, bos_token=bos_token or "", eos_token=eos_token or "",
                   **extra)
    try:
        return _render(template, context, limits)
    except TemplateError as e:
        if origin:  # which template broke a limit or raised: the model's own, or the one given in its place
            raise TemplateError(f"{origin}: {e}") from None
        raise


def chat_template_origin(value, model_path: str) -> str:
    """Where LLM(model_path, chat_template=value)'s chat template comes from, for its errors: a built-in
    name, a file, Jinja source given, or (value None) the template stored in the model file (from its
    checkpoint's tokenizer_config.json or chat_template.jinja, or its GGUF file's metadata)."""
    if not value:
        return f"the chat template stored in {os.path.basename(model_path)}"
    if isinstance(value, str) and builtin_template_name(value) is not None:
        return f"the built-in chat template {builtin_template_name(value)!r}"
    if isinstance(value, os.PathLike) or ("{{" not in value and "{%" not in value):
        return f"the chat template file {os.fspath(value)}"
    return "the chat template given (chat_template=, --chat-template)"


def _render(template: str, context: dict, limits: RenderLimits | None) -> str:
    from jinja2 import TemplateError as JinjaError

    compiled = _compile(template)
    try:
        return _RenderGuard(limits or RenderLimits()).render(compiled, context)
    except TemplateError:
        raise
    except JinjaError as e:
        raise TemplateError(f"chat template failed: {_excerpt(e)}") from None
    except PASSING:
        raise
    except BaseException as e:  # whatever the template's Python operations raise: e.g. content None + str
        raise TemplateError(f"chat template failed on these messages ({type(e).__name__}: {_excerpt(e)})") from None


def default_system_message(template: str, **tokens) -> str | None:
    """The system message `template` writes when the messages bring none (SmolLM2's "You are a
    helpful AI assistant named SmolLM..."), or None.

    Found by rendering one user message with and without a system message: the default is what
    stands, in the render without one, where the given system message stood in the other."""
    user, system = "\x00pyllm-user\x00", "\x00pyllm-system\x00"
    try:
        alone = render_chat(template, [{"role": "user", "content": user}], add_generation_prompt=False, **tokens)
        given = render_chat(template, [{"role": "system", "content": system}, {"role": "user", "content": user}],
                            add_generation_prompt=False, **tokens)
    except TemplateError:  # a template that takes no system message
        return None
    if alone.count(user) != 1 or given.count(system) != 1 or given.count(user) != 1:
        return None
    before, after = given.split(system)
    between = after[:after.index(user)]
    head = alone[:alone.index(user)]
    if len(head) <= len(before) + len(between) or not head.startswith(before) or not head.endswith(between):
        return None
    return head[len(before):len(head) - len(between)].strip() or None
