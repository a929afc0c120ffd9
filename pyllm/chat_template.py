"""Chat templates rendered the way transformers' apply_chat_template renders them, and built-in
templates for models that ship none.

The Jinja environment matches transformers (sandboxed, trim_blocks, lstrip_blocks, loopcontrols,
the `{% generation %}` tag, tojson without HTML escaping, raise_exception, strftime_now, a limited
dict() and a namespace() that refuses underscore names). Messages are OpenAI-style dicts
({"role", "content", ...}); extra keys (tools, documents, ...) pass through to the template.

Templates are untrusted input: a rendering is bounded in time and output (RenderLimits in
pyllm/limits.py). The deadline is checked at every line the compiled template runs (a trace
function on the rendering thread, on template code only), the output as it is produced, and a
string or list that `*` or `+` would make longer than the output limit is refused before it is made.
Every failure is a TemplateError.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import datetime
from functools import lru_cache

from .errors import PASSING, PyllmError
from .limits import RenderLimits


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
}


TEMPLATE_FILE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".json", ".txt", ".tmpl")


def resolve_chat_template(value: str) -> str:
    """A chat template from a built-in name, a file (Jinja text), or Jinja source itself.

    Raises FileNotFoundError for a path (it has a directory part or a template file suffix) that
    names no file, TemplateError for an unknown name or a template that is not valid Jinja."""
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    value = os.path.expanduser(value)
    if not os.path.isfile(value) and (os.sep in value or "/" in value or value.lower().endswith(TEMPLATE_FILE_SUFFIXES)):
        raise FileNotFoundError(f"chat template file {value} not found" +
                                (" (it is a directory)" if os.path.isdir(value) else ""))
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            text = f.read()
        if value.endswith(".json"):  # a tokenizer_config.json
            try:
                text = json.loads(text)["chat_template"]
            except (ValueError, KeyError, TypeError):
                raise TemplateError(f"{value}: not a tokenizer_config.json with a chat_template string") from None
            if not isinstance(text, str):
                raise TemplateError(f"{value}: chat_template is not a string")
        _compile(text)  # refuse a broken template now, not at the first chat
        return text
    raise TemplateError(f"unknown chat template {value!r}: give a built-in name "
                        f"({', '.join(BUILTIN_TEMPLATES)}), a Jinja file, or Jinja source")


# -- the Jinja environment ------------------------------------------------------------------------

def _raise_exception(message):
    raise TemplateError(f"the chat template refused the messages: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """dict() inside templates, without the class itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=16)
def _compile(source: str):
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
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "+", "**"])

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
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


class _RenderGuard:
    """Enforces RenderLimits on the rendering in this thread (see the module docstring)."""

    def __init__(self, limits: RenderLimits):
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateError(f"the chat template ran past its time limit of {self.limits.seconds:g} s")

    def _global(self, frame, event, arg):
        if frame.f_code.co_filename == "<template>":  # code Jinja compiled from a template
            self.check_time()
            return self._line
        return None

    def _line(self, frame, event, arg):
        if event == "line":
            self.check_time()
        return self._line

    def render(self, template, context: dict) -> str:
        previous = sys.gettrace()
        sys.settrace(self._global)
        _limits.value = self.limits
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
            _limits.value = None


class _ThreadLimits(threading.local):
    value: RenderLimits | None = None


_limits = _ThreadLimits()


def _check_binop(operator: str, left, right) -> None:
    """Refuses `*`, `+` and `**` results past the output limit before Python builds them."""
    most = (_limits.value or RenderLimits()).max_output_chars
    sized = (str, list, tuple)
    if operator == "*":
        seq, n = (left, right) if isinstance(left, sized) else (right, left)
        if isinstance(seq, sized) and isinstance(n, int) and len(seq) * n > most:
            raise TemplateError(f"the chat template builds a value longer than {most} (a repeated string or list)")
    elif operator == "+":
        if isinstance(left, sized) and isinstance(right, sized) and len(left) + len(right) > most:
            raise TemplateError(f"the chat template builds a value longer than {most} (a joined string or list)")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0 and \
                right * max(abs(left).bit_length(), 1) > 8 * most:
            raise TemplateError(f"the chat template computes a number of more than {8 * most} bits")


def normalize_messages(messages) -> list[dict]:
    """OpenAI chat messages as chat templates expect them (LLM.chat and the server both use this).

    role "developer" (OpenAI's newer name) becomes "system". content: a string stays; a list of
    parts ({"type": "text", "text": ...}) becomes their texts joined by newlines (vLLM's rule);
    None (an assistant turn that only calls tools) becomes "". tool_calls: each call's function.arguments, a JSON string in the API, becomes the object
    templates expect (left a string when it is not valid JSON). Other keys (name, tool_call_id,
    ...) pass through. Raises TemplateError for anything else (no role, a non-text part)."""
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
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise TemplateError(f"message {n}: only text content parts are supported (got {kind!r})")
                texts.append(part["text"])
            m["content"] = "\n".join(texts)
        elif content is None:
            m["content"] = ""
        elif not isinstance(content, str):
            raise TemplateError(f"message {n}: content must be a string, a list of text parts, or null")
        if m.get("tool_calls") is not None:
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
        except ValueError:
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


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, bos_token: str = "",
                eos_token: str = "", limits: RenderLimits | None = None, tools: list | None = None,
                documents: list | None = None, **extra) -> str:
    """Renders messages ([{"role", "content"}, ...]) into the model's prompt text, as apply_chat_template
    does: `tools` and `documents` are always defined (None when not given), reasoning is aliased (see
    _REASONING_FIELDS), and other keyword arguments (enable_thinking...) pass to the template.

    limits bounds the rendering's time and output (RenderLimits(), 10 s and 8 Mi characters, by
    default). Raises TemplateError for every failure: the template raised, broke a limit, or
    failed on the messages."""
    if not template:
        raise TemplateError("this model has no chat template: name one (chat_template= in Python, --chat-template "
                            f"on the command line; built in: {', '.join(BUILTIN_TEMPLATES)}) or use plain generation")
    if not isinstance(messages, (list, tuple)):
        raise TemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise TemplateError(f"each message needs a 'role' (got {m!r})")
    from jinja2 import TemplateError as JinjaError

    compiled = _compile(template)
    context = dict(messages=[_template_message(m) for m in messages], tools=tools, documents=documents,
                   add_generation_prompt=add_generation_prompt, bos_token=bos_token or "", eos_token=eos_token or "",
                   **extra)
    try:
        return _RenderGuard(limits or RenderLimits()).render(compiled, context)
    except TemplateError:
        raise
    except JinjaError as e:
        raise TemplateError(f"chat template failed: {e}") from None
    except PASSING:
        raise
    except BaseException as e:  # whatever the template's Python operations raise: e.g. content None + str
        raise TemplateError(f"chat template failed on these messages ({type(e).__name__}: {e})") from None


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
