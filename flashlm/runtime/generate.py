"""The generation loop: a generator of typed responses (mlx-lm's generate_step / stream_generate pattern).

prompt ids -> Engine.prefill (reusing the cached prefix) -> sample -> Engine.advance ... until an end-of-generation
token, a stop string, max_tokens, or a full context. Text is streamed through StreamDecoder (whole UTF-8 characters
only) and held back while it could still be the start of a stop string.

A full context (prompt + generated tokens = n_ctx) ends the response with finish_reason "length" (ctx_overflow
"stop"), or with "shift" the cache is rebuilt as the first SINK_TOKENS tokens (attention sinks, StreamingLLM) plus
the most recent tokens, half the context in all, and generation goes on. The rebuild re-evaluates those tokens
(a prefill that reuses the sinks), so what follows equals a fresh run on [sinks + window]: exact on every executor
and cache dtype, where re-rotating the cached keys to their new positions would keep states computed against
tokens no longer in the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

from flashlm.errors import ContextLengthError
from flashlm.loaders.tokenizer import StreamDecoder, Tokenizer
from flashlm.options import GenerationOptions
from flashlm.runtime.executor import Engine
from flashlm.runtime.sampler import make_sampler


@dataclass
class Timings:
    prompt_tokens: int = 0  # tokens evaluated (after prefix reuse)
    prompt_ms: float = 0.0
    eval_tokens: int = 0  # tokens generated
    eval_ms: float = 0.0
    cached_tokens: int = 0  # prompt tokens reused from the KV cache
    ctx_shifts: int = 0  # context shifts (ctx_overflow="shift"); their re-evaluation time is in eval_ms
    flash: object = None  # streaming.FlashTimings when the model streams from a flash store (last response only)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_ms * 1e3 if self.prompt_ms > 0 else 0.0

    @property
    def eval_tps(self) -> float:
        return self.eval_tokens / self.eval_ms * 1e3 if self.eval_ms > 0 else 0.0


@dataclass
class GenerationResponse:
    """One step of a stream: the new text (may be empty), the token, and on the last step the finish reason."""

    text: str
    token: int | None
    finish_reason: str | None  # None while running, then "stop" (EOG or stop string) or "length"
    timings: Timings = field(default_factory=Timings)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class _StopFilter:
    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.pending, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out
        keep = _held_back(self.pending, self.stops)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def check_prompt(n_prompt: int, n_ctx: int) -> None:
    if n_prompt == 0:
        raise ContextLengthError("the prompt is empty (no tokens to start from)")
    if n_prompt >= n_ctx:
        raise ContextLengthError(f"the prompt is {n_prompt} tokens, which does not fit the context of {n_ctx} "
                                 "tokens (raise -c/--ctx-size or shorten the prompt)")


SINK_TOKENS = 4


def shifted_context(tokens: list[int], n_ctx: int) -> list[int]:
    """What a context shift keeps: the first SINK_TOKENS tokens and the most recent ones, n_ctx // 2 in all."""
    keep = max(SINK_TOKENS + 1, n_ctx // 2)
    return tokens[:SINK_TOKENS] + tokens[len(tokens) - (keep - SINK_TOKENS):]


def stream_generate(engine: Engine, tokenizer: Tokenizer, prompt_ids: list[int],
                    opts: GenerationOptions) -> Iterator[GenerationResponse]:
    opts.validate()
    check_prompt(len(prompt_ids), engine.n_ctx)
    sample = make_sampler(opts.sampling)
    timings = Timings()
    t0 = time.perf_counter()
    logits = engine.prefill(prompt_ids)
    timings.prompt_ms = (time.perf_counter() - t0) * 1e3
    timings.prompt_tokens = engine.last_prompt_tokens
    timings.cached_tokens = len(prompt_ids) - engine.last_prompt_tokens
    decoder, stops = StreamDecoder(tokenizer), _StopFilter(opts.stop)
    history = list(prompt_ids)
    context = list(prompt_ids)  # what this request's KV cache holds (another request may use the Engine between steps)
    shift = opts.ctx_overflow == "shift"
    limit = opts.max_tokens if opts.max_tokens >= 0 else (-1 if shift else engine.n_ctx)
    if limit == 0:
        yield GenerationResponse("", None, "length", timings)
        return
    while True:
        t = time.perf_counter()
        token = sample(logits, history)
        timings.eval_ms += (time.perf_counter() - t) * 1e3
        if tokenizer.is_eog(token) and not opts.ignore_eos:
            yield GenerationResponse(stops.feed(decoder.flush()) + stops.flush(), token, "stop", timings)
            return
        history.append(token)
        text = stops.feed(decoder.add(token))
        timings.eval_tokens += 1
        if stops.stopped:
            yield GenerationResponse(text, token, "stop", timings)
            return
        # max_tokens reached, or the context is full (prompt + generated = n_ctx) and it may not shift
        if timings.eval_tokens == limit or (not shift and len(history) >= engine.n_ctx):
            yield GenerationResponse(text + stops.feed(decoder.flush()) + stops.flush(), token, "length", timings)
            return
        yield GenerationResponse(text, token, None, timings)
        t = time.perf_counter()
        if len(context) >= engine.n_ctx:  # no room left for this token: keep the sinks and a recent window
            context = shifted_context(context + [token], engine.n_ctx)
            logits = engine.prefill(context)
            timings.ctx_shifts += 1
        else:
            logits = engine.advance(context, token)
            context.append(token)
        timings.eval_ms += (time.perf_counter() - t) * 1e3
