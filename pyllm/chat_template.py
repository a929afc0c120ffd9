"""Chat templates rendered the way transformers' apply_chat_template renders them."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache


class TemplateError(ValueError):
    """The chat template failed to render (it raised, or it is not valid Jinja)."""


def _raise_exception(message):
    raise TemplateError(f"chat template error: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str):
    from jinja2 import TemplateSyntaxError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except TemplateSyntaxError as e:
        raise TemplateError(f"chat template is not valid Jinja: {e}") from None


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, bos_token: str = "",
                eos_token: str = "", **extra) -> str:
    """Renders messages ([{"role", "content"}, ...]) into the model's prompt text."""
    if not template:
        raise TemplateError("this model has no chat template; use generate() with a plain prompt")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise TemplateError(f"each message needs a 'role' (got {m!r})")
    from jinja2 import TemplateError as JinjaError

    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token or "", eos_token=eos_token or "", **extra)
    except TemplateError:
        raise
    except JinjaError as e:
        raise TemplateError(f"chat template failed: {e}") from None
