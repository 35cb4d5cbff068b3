"""Long runs under a memory budget: does memory stay under the budget and stop growing once warmed up?

    python -m labs.long_run -m MODEL --memory-budget B -n 2000 -c 512            # one long generation
    python -m labs.long_run -m MODEL --memory-budget B --chat-turns 50 -c 512   # a multi-turn chat

The context is smaller than the run, so it overflows: with --ctx-overflow shift (the default here) generation keeps
the attention sinks plus a recent window and goes on, and the chat drops its oldest turns. The process's RSS is
sampled every --sample-every generated tokens; printed: the peak (VmHWM, load included) against the budget, and the
RSS slope after warm-up, a least-squares fit in MB per 1,000 generated tokens over the second half of the samples.
Exit status 1 when the peak exceeds the budget. An end of generation before -n tokens starts a new generation from
the last tokens (counted as restarts), so the run reaches -n.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

PROMPT = "Once upon a time, in a small village by the sea, there lived"
QUESTIONS = ["What is the capital of France?", "Tell me a short story about a cat.", "How do plants make food?",
             "Give me three tips for sleeping well.", "Why is the sky blue?", "What is a prime number?",
             "Write a haiku about autumn.", "How does a bicycle stay upright?", "What should I cook tonight?",
             "Explain what a computer program is."]


@dataclass
class LongRunResult:
    mode: str  # "generate" or "chat"
    tokens: int = 0  # generated
    turns: int = 0
    ctx_shifts: int = 0
    restarts: int = 0  # generate: new generations after an end of generation
    turns_dropped: int = 0  # chat: history messages (user and assistant) dropped at the end
    seconds: float = 0.0
    budget_bytes: int | None = None
    peak_bytes: int = 0
    samples: list[tuple[int, int]] = field(default_factory=list)  # (generated tokens so far, RSS bytes)

    @property
    def slope_mb_per_1k(self) -> float:
        """Least-squares RSS slope over the second half of the samples, MB per 1,000 generated tokens."""
        tail = self.samples[len(self.samples) // 2:]
        if len(tail) < 2 or tail[-1][0] == tail[0][0]:
            return 0.0
        x = np.array([t for t, _ in tail], np.float64) / 1e3
        y = np.array([b for _, b in tail], np.float64) / 1e6
        return float(np.polyfit(x, y, 1)[0])

    @property
    def within_budget(self) -> bool:
        return self.budget_bytes is None or self.peak_bytes <= self.budget_bytes


class _Sampler:
    def __init__(self, result: LongRunResult, every: int):
        import psutil

        self.process, self.result, self.every, self.next_at = psutil.Process(), result, every, 0

    def __call__(self, force: bool = False) -> None:
        if force or self.result.tokens >= self.next_at:
            self.result.samples.append((self.result.tokens, self.process.memory_info().rss))
            self.next_at = self.result.tokens + self.every


def run_generate(model, n_tokens: int, opts, sample: _Sampler, prompt: str = PROMPT) -> None:
    r = sample.result
    ids = model.tokenize(prompt)
    while r.tokens < n_tokens:
        tokens = []
        last = None
        seed = opts.sampling.seed + r.restarts if opts.sampling.seed >= 0 else -1  # a restart samples anew
        for last in model.stream(ids, opts, max_tokens=n_tokens - r.tokens, seed=seed):
            if last.token is not None and last.finish_reason != "stop":
                tokens.append(last.token)
                r.tokens += 1
                sample()
        r.ctx_shifts += last.timings.ctx_shifts
        if last.finish_reason == "stop" and r.tokens < n_tokens:  # end of generation: go on from the last tokens
            r.restarts += 1
            ids = (ids + tokens)[-(model.n_ctx // 2):]
        elif last.finish_reason == "length" and opts.ctx_overflow == "stop":
            break  # the context is full and may not shift


def run_chat(model, turns: int, opts, sample: _Sampler, system: str = "You are a helpful assistant.") -> None:
    r = sample.result
    session = model.session()
    messages = [{"role": "system", "content": system}]
    for k in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]})
        answer, last = [], None
        for last in session.chat(messages, stream=True, options=opts):
            answer.append(last.text)
            if last.token is not None and last.finish_reason != "stop":
                r.tokens += 1
                sample()
        r.ctx_shifts += last.timings.ctx_shifts
        messages.append({"role": "assistant", "content": "".join(answer)})
        r.turns += 1
        sample(force=True)
    r.turns_dropped = len(session._dropped)


def long_run(path: str, n_tokens: int = 2000, chat_turns: int = 0, budget: str | int | None = None,
             ctx_size: int = 512, ctx_overflow: str = "shift", max_turn_tokens: int = 96, threads: int = 2,
             temperature: float = 0.8, seed: int = 1, every: int = 25, ignore_eos: bool = False) -> LongRunResult:
    import flashlm
    from flashlm.options import GenerationOptions, LoadOptions, SamplingOptions
    from flashlm.tools.memory import peak_rss_bytes

    load = LoadOptions(threads=threads, ctx_size=ctx_size, memory_budget=budget).validate()
    model = flashlm.load(path, load)
    opts = GenerationOptions(max_tokens=max_turn_tokens if chat_turns else n_tokens, ctx_overflow=ctx_overflow,
                             ignore_eos=ignore_eos, sampling=SamplingOptions(temperature=temperature, seed=seed)
                             ).validate()
    result = LongRunResult("chat" if chat_turns else "generate", budget_bytes=load.memory_budget)
    sample = _Sampler(result, every)
    sample(force=True)
    t0 = time.perf_counter()
    if chat_turns:
        run_chat(model, chat_turns, opts, sample)
    else:
        run_generate(model, n_tokens, opts, sample)
    result.seconds = time.perf_counter() - t0
    sample(force=True)
    result.peak_bytes = peak_rss_bytes()
    model.close()
    return result


def report(r: LongRunResult) -> str:
    budget = f"{r.budget_bytes / 2**20:.1f} MiB" if r.budget_bytes else "none"
    what = f"{r.turns} chat turns, " if r.mode == "chat" else ""
    lines = [f"{what}{r.tokens} tokens generated in {r.seconds:.1f} s ({r.tokens / max(r.seconds, 1e-9):.1f} tok/s), "
             f"{r.ctx_shifts} context shifts"
             + (f", {r.restarts} restarts after end of generation" if r.mode == "generate" else
                f", {r.turns_dropped} oldest messages dropped from the history at the end"),
             f"peak memory  = {r.peak_bytes / 2**20:.1f} MiB (budget {budget}): "
             + ("within" if r.within_budget else "OVER"),
             f"RSS          = {r.samples[0][1] / 2**20:.1f} MiB after load, {r.samples[-1][1] / 2**20:.1f} MiB at the "
             f"end, {max(b for _, b in r.samples) / 2**20:.1f} MiB at most ({len(r.samples)} samples)",
             f"RSS slope    = {r.slope_mb_per_1k:+.3f} MB per 1,000 tokens over the second half"]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="GGUF or .flash (default: SmolLM2)")
    ap.add_argument("--memory-budget", default=None, help="e.g. 150MB (a .flash streams what does not fit)")
    ap.add_argument("-n", "--n-predict", type=int, default=2000, help="tokens to generate")
    ap.add_argument("--chat-turns", type=int, default=0, help="run a chat of this many turns instead")
    ap.add_argument("--max-turn-tokens", type=int, default=96, help="answer length cap per chat turn")
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("--ctx-overflow", choices=["stop", "shift"], default="shift")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--temp", type=float, default=0.8)
    ap.add_argument("-s", "--seed", type=int, default=1)
    ap.add_argument("--sample-every", type=int, default=25, help="generated tokens between RSS samples")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="generate through end-of-sequence (the context shifts then do not depend on the text)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = ap.parse_args(argv)
    path = args.model
    if path is None:
        from flashlm.loaders.default_model import default_model_path

        path = default_model_path()
    r = long_run(path, args.n_predict, args.chat_turns, args.memory_budget, args.ctx_size, args.ctx_overflow,
                 args.max_turn_tokens, args.threads, args.temp, args.seed, args.sample_every, args.ignore_eos)
    if args.json:
        print(json.dumps({**asdict(r), "slope_mb_per_1k": r.slope_mb_per_1k, "within_budget": r.within_budget}))
    else:
        print(report(r))
    sys.exit(0 if r.within_budget else 1)


if __name__ == "__main__":
    main()
