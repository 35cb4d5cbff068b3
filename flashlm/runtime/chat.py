"""Chat: the model's own template (GGUF tokenizer.chat_template) rendered with jinja2 for OpenAI-style messages.

Rendering follows Hugging Face transformers' apply_chat_template: a sandboxed environment with trim_blocks and
lstrip_blocks, `raise_exception`, `strftime_now`, and bos_token / eos_token from the vocabulary. Multi-turn reuse of
the KV cache needs nothing here: the Engine reuses whatever prefix the new rendering shares with the cache.

A template is untrusted code from a downloaded file: it runs in jinja2's immutable sandbox, where reaching for a
Python internal (`__class__`, `__globals__`, ...) raises at once (jinja2 would otherwise render it as an empty
string), ranges are capped by the sandbox, and the rendered text is capped at RENDER_LIMIT_CHARS and RENDER_LIMIT_S
(checked as output is produced: a loop that never outputs is not bounded).
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from flashlm.errors import ChatTemplateError, InvalidOptionError

ROLES = ("system", "user", "assistant", "tool")
RENDER_LIMIT_CHARS = 4 << 20  # far beyond any context a prompt can fill
RENDER_LIMIT_S = 10.0

# For a model without a template of its own (a base model, most often): a plain transcript it can continue, and
# the stop string that ends its answer where it would start writing the user's next turn.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content }}\n\n"
    "{% elif m.role == 'user' %}User: {{ m.content }}\n"
    "{% else %}Assistant: {{ m.content }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
PLAIN_CHAT_STOP = "\nUser:"


def base_model_reason(file_template: str | None, name: str) -> str | None:
    """Why a model looks like a base model rather than one tuned to chat, or None. The sound signal is the file's
    own template: Hugging Face ships a chat template with the chat-tuned models and (mostly) not with base ones,
    and the GGUF conversion copies it (Gemma 3 270M has none, SmolLM2-135M-Instruct has one; names do not tell
    them apart: the latter's general.name is "Smollm2 135M 8k Lc100K Mix1 Ep2"). A name with "base" in it too."""
    words = "".join(c if c.isalnum() else " " for c in name.lower()).split()
    if not file_template:
        return "the model file has no chat template of its own"
    if "base" in words:
        return f"the model's name ({name!r}) says base"
    return None


def _sandbox():
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class StrictSandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj, attribute):
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    return StrictSandbox(trim_blocks=True, lstrip_blocks=True)


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

        def raise_exception(message):
            raise ChatTemplateError(f"chat template: {message}")

        def strftime_now(fmt):
            return datetime.datetime.now().strftime(fmt)

        env = _sandbox()
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        try:
            self._template = env.from_string(source)
        except (TemplateError, RecursionError, MemoryError) as e:
            raise ChatTemplateError(f"the model's chat template does not parse: {e}") from None
        self._template_error = TemplateError
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        messages = validate_messages(messages)
        out, size, deadline = [], 0, time.monotonic() + RENDER_LIMIT_S
        try:
            for piece in self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 bos_token=self.bos_token, eos_token=self.eos_token):
                out.append(piece)
                size += len(piece)
                if size > RENDER_LIMIT_CHARS or time.monotonic() > deadline:
                    raise ChatTemplateError(f"the model's chat template produced more than {RENDER_LIMIT_CHARS} "
                                            f"characters or ran over {RENDER_LIMIT_S:.0f} s")
        except ChatTemplateError:
            raise
        except (self._template_error, ArithmeticError, RecursionError, MemoryError, TypeError, ValueError,
                AttributeError, IndexError, KeyError) as e:  # raised by template code on its own data
            raise ChatTemplateError(f"the model's chat template failed to render: {type(e).__name__}: {e}") \
                from None
        return "".join(out)
