"""Chat templates rendered in jinja2's immutable sandbox, with the helpers templates on the hub expect."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from functools import lru_cache

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# A template comes with the checkpoint and the messages with the caller: neither may make a render unbounded.
MAX_RENDER_SECONDS = 5.0
MAX_RENDER_CHARS = 8 * 2**20
_deadline = threading.local()


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with a time limit checked at every call the template makes."""

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        _check_time()
        return super().call(__context, __obj, *args, **kwargs)


def _check_time() -> None:
    end = getattr(_deadline, "at", None)
    if end is not None and time.monotonic() > end:
        raise TemplateError(f"the chat template took longer than {MAX_RENDER_SECONDS:g} s to render")


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str):
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = False, **variables) -> str:
    """Render one conversation (a list of {"role", "content"} dicts) with a chat template."""
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    compiled = _compile(template)
    _deadline.at = time.monotonic() + MAX_RENDER_SECONDS
    try:
        pieces, size = [], 0
        for piece in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **variables):
            size += len(piece)
            if size > MAX_RENDER_CHARS:
                raise TemplateError(f"the chat template rendered more than {MAX_RENDER_CHARS} characters")
            _check_time()
            pieces.append(piece)
        return "".join(pieces)
    finally:
        _deadline.at = None
