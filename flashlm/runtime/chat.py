"""Chat: the model's own template (GGUF tokenizer.chat_template) rendered with jinja2 for OpenAI-style messages.

Rendering follows Hugging Face transformers' apply_chat_template: a sandboxed environment with trim_blocks and
lstrip_blocks, `raise_exception`, `strftime_now`, and bos_token / eos_token from the vocabulary. Multi-turn reuse of
the KV cache needs nothing here: the Engine reuses whatever prefix the new rendering shares with the cache.
"""

from __future__ import annotations

import datetime
from typing import Any

from ..errors import ChatTemplateError, InvalidOptionError

ROLES = ("system", "user", "assistant", "tool")


def validate_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidOptionError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidOptionError(f"message {i} must be a dict with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise InvalidOptionError(f"message {i} has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
    return list(messages)


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = ""):
        if not source:
            raise ChatTemplateError("the model has no chat template (tokenizer.chat_template is missing)")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ChatTemplateError(f"chat template: {message}")

        def strftime_now(fmt):
            return datetime.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"the model's chat template does not parse: {e}") from None
        self._template_error = TemplateError
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        messages = validate_messages(messages)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except self._template_error as e:
            raise ChatTemplateError(f"the model's chat template failed to render: {e}") from None
