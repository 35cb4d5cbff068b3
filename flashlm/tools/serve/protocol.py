"""The OpenAI wire format of `flashlm serve`: request bodies checked field by field into a CompletionRequest
(GenerationOptions and the prompt), and the response, chunk and error objects.

Unknown fields are refused (400 naming the field), as OpenAI's API does; fields flashlm cannot honour are accepted at
their neutral value only (`n: 1`, `presence_penalty: 0`, `logprobs: false`, ...) and refused otherwise, so a client
never silently gets something other than what it asked for. llama.cpp's extra sampling fields (`top_k`, `min_p`,
`repeat_penalty`, `repeat_last_n`, `ignore_eos`) are accepted, as llama-server accepts them.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flashlm.errors import InvalidOptionError
from flashlm.options import GenerationOptions, generation_options


class APIError(Exception):
    """An error answered as OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code or "invalid_value")


# -- field checkers: value -> the value flashlm uses, or APIError naming the field ---------------------------
def _number(lo: float, hi: float, lo_open: bool = False):
    def check(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _bad(name, f"expected a number, got {_json_type(v)}", "invalid_type")
        if v < lo or v > hi or (lo_open and v == lo):
            raise _bad(name, f"{v} is out of range ({'(' if lo_open else '['}{lo}, {hi}])")
        return float(v)
    return check


def _integer(lo: int, hi: int | None = None):
    def check(name, v):
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                raise _bad(name, f"expected an integer, got {_json_type(v)}", "invalid_type")
        if v < lo or (hi is not None and v > hi):
            raise _bad(name, f"{v} is out of range ([{lo}, {'inf' if hi is None else hi}])")
        return v
    return check


def _boolean(name, v):
    if not isinstance(v, bool):
        raise _bad(name, f"expected true or false, got {_json_type(v)}", "invalid_type")
    return v


def _string(name, v):
    if not isinstance(v, str):
        raise _bad(name, f"expected a string, got {_json_type(v)}", "invalid_type")
    return v


def _stop(name, v):
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad(name, "expected a string or a list of strings", "invalid_type")
    if not all(stops):
        raise _bad(name, "stop strings must not be empty")
    return tuple(stops)


def _stream_options(name, v):
    if not isinstance(v, dict):
        raise _bad(name, f"expected an object, got {_json_type(v)}", "invalid_type")
    unknown = set(v) - {"include_usage"}
    if unknown:
        raise _bad(f"{name}.{min(unknown)}", "unrecognized field", "unknown_parameter")
    return _boolean(f"{name}.include_usage", v.get("include_usage", False))


def _only(neutral: tuple, why: str):
    """A field flashlm cannot honour: accepted at its neutral values, refused otherwise."""
    def check(name, v):
        if not any(v == n and isinstance(v, bool) == isinstance(n, bool) for n in neutral):  # true is not 1
            raise _bad(name, f"{json_repr(v)} is not supported: {why}", "unsupported_value")
    return check


def _ignored(name, v):
    return None


def json_repr(v: Any) -> str:
    import json

    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_type(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


# field name -> (checker, the GenerationOptions / sampling key it sets, or None: checked only)
_Field = tuple[Callable[[str, Any], Any], "str | None"]
COMMON: dict[str, _Field] = {
    "model": (_string, None),  # any name: the one loaded model answers (llama-server does the same)
    "max_tokens": (_integer(0), "max_tokens"),
    "temperature": (_number(0.0, 2.0), "temperature"),
    "top_p": (_number(0.0, 1.0), "top_p"),
    "seed": (_integer(-1), "seed"),
    "stop": (_stop, "stop"),
    "stream": (_boolean, None),
    "stream_options": (_stream_options, None),
    "n": (_only((1,), "one choice per request (send several requests)"), None),
    "presence_penalty": (_only((0, 0.0), "use repeat_penalty"), None),
    "frequency_penalty": (_only((0, 0.0), "use repeat_penalty"), None),
    "logit_bias": (_only(({},), "no logit bias"), None),
    "user": (_string, None),
    # llama.cpp's sampling fields
    "top_k": (_integer(0), "top_k"),
    "min_p": (_number(0.0, 1.0), "min_p"),
    "repeat_penalty": (_number(0.0, math.inf, lo_open=True), "repeat_penalty"),
    "repeat_last_n": (_integer(-1), "repeat_last_n"),
    "ignore_eos": (_boolean, "ignore_eos"),
}
CHAT: dict[str, _Field] = {
    **COMMON,
    "messages": (_ignored, None),  # checked by chat_messages
    "max_completion_tokens": (_integer(0), "max_tokens"),
    "logprobs": (_only((False,), "no log probabilities"), None),
    "top_logprobs": (_only((0,), "no log probabilities"), None),
    "response_format": (_only(({"type": "text"},), "plain text only"), None),
    "tools": (_only(([],), "no tool calls"), None),
    "tool_choice": (_only(("none",), "no tool calls"), None),
    "parallel_tool_calls": (_boolean, None),
}
TEXT: dict[str, _Field] = {
    **COMMON,
    "prompt": (_ignored, None),  # checked by text_prompt
    "logprobs": (_only((0, False), "no log probabilities"), None),
    "echo": (_only((False,), "the prompt is not echoed"), None),
    "best_of": (_only((1,), "one candidate per request"), None),
    "suffix": (_only(("",), "no insertion"), None),
}


@dataclass
class CompletionRequest:
    chat: bool  # /v1/chat/completions (else /v1/completions)
    messages: list[dict] | None  # chat: [{"role", "content"}] with string contents
    prompt: str | list[int] | None  # completions: text or token ids
    options: GenerationOptions
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


def parse_request(body: Any, chat: bool, defaults: GenerationOptions) -> CompletionRequest:
    """A decoded JSON body -> CompletionRequest; APIError (400, naming the field) for anything wrong."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_json_type(body)}")
    spec = CHAT if chat else TEXT
    required = "messages" if chat else "prompt"
    if required not in body:
        raise APIError(400, f"missing required parameter: '{required}'", param=required, code="missing_required")
    overrides, stream, include_usage = {}, False, False
    for name, value in body.items():
        if name not in spec:
            raise APIError(400, f"unrecognized request argument supplied: {name}", param=name,
                           code="unknown_parameter")
        if value is None:  # null: the default, as OpenAI reads it
            continue
        check, key = spec[name]
        v = check(name, value)
        if key is not None:
            overrides[key] = v
        elif name == "stream":
            stream = v
        elif name == "stream_options":
            include_usage = v
    try:
        options = generation_options(defaults, **overrides)
    except InvalidOptionError as e:  # the checks above mirror validate(); kept as a net
        raise APIError(400, str(e)) from None
    return CompletionRequest(chat, chat_messages(body["messages"]) if chat else None,
                             None if chat else text_prompt(body["prompt"]), options, stream, include_usage)


def chat_messages(messages: Any) -> list[dict]:
    """OpenAI messages -> [{"role", "content"}] with string contents ("developer" is "system"; text parts joined)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "expected a non-empty array of messages", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, f"expected an object, got {_json_type(m)}", "invalid_type")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise _bad(f"{where}.role", f"expected one of system, developer, user, assistant, tool; got "
                       f"{json_repr(role)}")
        if m.get("tool_calls"):
            raise _bad(f"{where}.tool_calls", "tool calls are not supported", "unsupported_value")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise _bad(f"{where}.content[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...}) are "
                               "supported", "unsupported_value")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise _bad(f"{where}.content", f"expected a string or an array of text parts, got {_json_type(content)}",
                       "invalid_type")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def text_prompt(prompt: Any) -> str | list[int]:
    """A completions prompt: a string, token ids, or a one-element array of either (one prompt per request)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise _bad("prompt", "expected a string, an array of token ids, or a one-element array of either (one prompt "
               "per request)", "invalid_type")


# -- responses ----------------------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion(req: CompletionRequest, rid: str, model_id: str, text: str, finish_reason: str,
               use: dict) -> dict:
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion", "created": int(time.time()),
            "model": model_id, "choices": [choice], "usage": use}


def chunk(req: CompletionRequest, rid: str, model_id: str, created: int, text: str | None,
          finish_reason: str | None = None, role: bool = False) -> dict:
    """One streamed chunk. Chat: the first carries delta.role, the last an empty delta and the finish reason."""
    if req.chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    out = {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": created,
           "model": model_id, "choices": [choice]}
    if req.include_usage:
        out["usage"] = None
    return out


def usage_chunk(req: CompletionRequest, rid: str, model_id: str, created: int, use: dict) -> dict:
    """stream_options.include_usage: the last chunk before [DONE], no choices and the request's usage."""
    return {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": created,
            "model": model_id, "choices": [], "usage": use}
