"""A full context is explicit: "stop" ends with finish_reason "length" at exactly n_ctx tokens, "shift" keeps the
attention sinks plus a recent window (a cache equal to a fresh prefill of them) and goes on; a chat drops its oldest
turns; and a long run under a memory budget stays within it without growing (tools/long_run.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flashlm.errors import ContextLengthError
from flashlm.runtime.generate import SINK_TOKENS

COUNT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # greedy SmolLM2 counts on: no end of generation before the limit
CTX = 128
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small(smollm_path):
    import flashlm

    m = flashlm.load(smollm_path, threads=2, ctx_size=CTX)
    yield m
    m.close()


def _softmax(x):
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def test_stop_ends_with_length_at_the_context_limit(small):
    n_prompt = len(small.tokenize(COUNT))
    for max_tokens in (-1, 500):
        responses = list(small.stream(COUNT, max_tokens=max_tokens, temperature=0.0))
        generated = sum(r.token is not None for r in responses)
        assert responses[-1].finish_reason == "length"
        assert all(r.finish_reason is None for r in responses[:-1])
        assert n_prompt + generated == CTX
        assert responses[-1].timings.ctx_shifts == 0
    assert len(small.engine.tokens) == CTX - 1  # the last token was sampled, never evaluated


def _expected_shifts(n_prompt: int, n_gen: int) -> int:
    held, shifts = n_prompt, 0
    for _ in range(n_gen - 1):  # every generated token but the last is evaluated
        if held >= CTX:
            held, shifts = CTX // 2, shifts + 1
        held += 1
    return shifts


def test_shift_goes_on_and_keeps_sinks_plus_a_recent_window(small):
    prompt = small.tokenize(COUNT)
    responses = list(small.stream(COUNT, max_tokens=300, temperature=0.0, ctx_overflow="shift"))
    tokens = [r.token for r in responses if r.token is not None]
    text = "".join(r.text for r in responses)
    assert len(tokens) == 300 and responses[-1].finish_reason == "length"
    assert responses[-1].timings.ctx_shifts == _expected_shifts(len(prompt), 300) == 4
    numbers = [int(x) for x in text.replace(",", " ").split()]
    assert numbers == list(range(11, 11 + len(numbers)))  # still counting after 4 shifts
    kept = list(small.engine.tokens)
    full = prompt + tokens
    assert len(kept) <= CTX and kept[:SINK_TOKENS] == prompt[:SINK_TOKENS]
    assert kept[SINK_TOKENS:] == full[:-1][-(len(kept) - SINK_TOKENS):]
    # the cache holds what a fresh prefill of the kept tokens gives: next-token logits agree
    warm = small.engine.advance(kept, tokens[-1])
    cold = small.session().engine.prefill(kept + [tokens[-1]])
    p, q = _softmax(cold[0]), _softmax(warm[0])
    kl = float((p * (np.log(p) - np.log(q))).sum())
    print(f"KL(fresh prefill || shifted cache) = {kl:.5f}")
    assert kl < 0.05 and int(cold.argmax()) == int(warm.argmax())
    assert np.abs(warm - cold).max() < 0.05 * np.abs(cold).max()


def test_chat_history_overflow(smollm_path):
    import flashlm
    from flashlm.options import GenerationOptions, SamplingOptions

    ctx = 256
    m = flashlm.load(smollm_path, threads=2, ctx_size=ctx)
    system = {"role": "system", "content": "You are a helpful assistant."}
    topics = ["Paris", "the sea", "a forest", "a city at night", "winter", "a library", "a mountain"]
    session, messages, prompts, cached = m.session(), [system], [], []
    shift = GenerationOptions(max_tokens=48, ctx_overflow="shift", sampling=SamplingOptions(temperature=0.0))
    for topic in topics:
        messages.append({"role": "user", "content": f"Describe {topic}."})
        prompts.append(session.chat_prompt_ids(messages, shift))
        responses = list(session.chat(messages, stream=True, options=shift))
        cached.append(responses[-1].timings.cached_tokens)
        messages.append({"role": "assistant", "content": "".join(r.text for r in responses)})
    print("prompt tokens per turn", [len(p) for p in prompts], "reused from the cache", cached)
    head = m.chat_prompt_ids([system, messages[1]])
    head = head[:head.index(m.tokenize("<|im_start|>")[0], 1)]  # the system turn's tokens
    assert len(m.chat_prompt_ids(messages)) > ctx and session._dropped  # it outgrew the context, turns went
    assert session._dropped[:2] == messages[1:3]  # oldest first, whole turns
    assert all(p[:len(head)] == head for p in prompts)  # the system prompt stays
    assert all(len(p) <= ctx - ctx // 4 for p in prompts)
    # after a drop, the next turn drops the same turns while they fit: most of its prompt comes from the cache
    assert sum(c > len(head) + 32 for c, p in zip(cached[3:], prompts[3:])) >= 2
    with pytest.raises(ContextLengthError):  # "stop" drops nothing
        m.session().chat(messages + [{"role": "user", "content": "And?"}], max_tokens=8)
    m.close()


def test_long_run_under_budget_does_not_grow(flash_path):
    """400 tokens at -c 64 (11 shifts) on the .flash under the half-model budget, in a fresh process. (160 tokens
    were too few for the slope: 3.1-8.6 MB per 1,000 tokens from RSS noise alone; 480 gave 0.4-1.4.) Through
    end-of-sequence: a sampled end restarted the run and left 9 shifts after a change of float rounding."""
    ctx = 64
    # the budget's baseline is a fresh process's, not this test runner's
    budget = int(subprocess.run([sys.executable, "-c", "import sys; from tests.flash_budget_run import "
                                 f"half_model_budget as h; print(h(sys.argv[1], {ctx}))", flash_path],
                                capture_output=True, text=True, timeout=120, cwd=ROOT, check=True).stdout.split()[-1])
    proc = subprocess.run([sys.executable, "-m", "labs.long_run", "-m", flash_path, "--memory-budget",
                           f"{budget}B", "-n", "400", "-c", str(ctx), "--sample-every", "8", "--ignore-eos", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print({k: v for k, v in r.items() if k != "samples"})
    assert r["tokens"] == 400 and r["ctx_shifts"] >= 10
    assert r["peak_bytes"] <= budget
    assert abs(r["slope_mb_per_1k"]) < 5.0  # MB per 1,000 tokens after warm-up (a leak of 5 KB/token fails)
