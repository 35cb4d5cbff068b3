"""One loaded model used from several threads: whole requests on the model serialize, sessions (model.session())
interleave with a KV cache each, and either way every request gives the tokens it gives when run alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

# Different first tokens (SmolLM2 adds no BOS), so no prompt reuses another's cached prefix.
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "Water boils at",
           "My favourite colour is"]
N = 24
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tokens(target, prompt, n=N):
    return [r.token for r in target.stream(prompt, max_tokens=n, temperature=0.0) if r.token is not None]


def _in_threads(fn, items):
    out, errors = [None] * len(items), []

    def work(i, item):
        try:
            out[i] = fn(item)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, item)) for i, item in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return out


@pytest.fixture(scope="module")
def sequential(model):
    return [_tokens(model.session(), p) for p in PROMPTS]  # each from an empty cache


def test_model_from_four_threads_equals_sequential(model, sequential):
    assert _in_threads(lambda p: _tokens(model, p), PROMPTS) == sequential
    texts = _in_threads(lambda p: model.generate(p, max_tokens=N, temperature=0.0), PROMPTS)
    assert texts == [model.detokenize(t) for t in sequential]


def test_sessions_from_four_threads_equal_sequential(model, sequential):
    sessions = [model.session() for _ in PROMPTS]
    assert _in_threads(lambda sp: _tokens(*sp), list(zip(sessions, PROMPTS))) == sequential
    # each session kept its own history: the next request reuses its cached prompt
    r = list(sessions[1].stream(PROMPTS[1], max_tokens=1, temperature=0.0))
    assert r[-1].timings.cached_tokens == len(model.tokenize(PROMPTS[1]))


def _alternate(streams):
    """Consume two streams from two threads, strictly alternating their steps until one ends."""
    gate, turn = threading.Condition(), [0]  # whose step is next; -1: both run freely
    results = [None, None]

    def work(who):
        results[who] = []
        it = iter(streams[who])
        while True:
            with gate:
                gate.wait_for(lambda: turn[0] in (who, -1), timeout=60)
                r = next(it, None)
                if turn[0] != -1:
                    turn[0] = -1 if r is None else 1 - who  # the first to finish lets the other run freely
                gate.notify_all()
            if r is None:
                return
            if r.token is not None:
                results[who].append(r.token)

    threads = [threading.Thread(target=work, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_interleaved_streams_from_two_threads(model, sequential):
    kw = dict(max_tokens=N, temperature=0.0)
    # two sessions: steps strictly alternate, each on its own cache
    a, b = model.session(), model.session()
    assert _alternate([a.stream(PROMPTS[0], **kw), b.stream(PROMPTS[1], **kw)]) == sequential[:2]
    # two streams on the model itself, consumed by two threads: the second waits for the first to end
    streams = [model.stream(PROMPTS[2], **kw), model.stream(PROMPTS[3], **kw)]
    assert _in_threads(lambda st: [r.token for r in st if r.token is not None], streams) == sequential[2:]


def _reevaluated(model, prompt, n=N):
    """Greedy tokens when every step evaluates the whole sequence from an empty cache."""
    s = model.session()
    ids = model.tokenize(prompt)
    for _ in range(n):
        s.engine.reset()
        ids.append(int(s.engine.prefill(ids)[0].argmax()))
    return ids[-n:]


def test_one_thread_interleaving_two_streams_reevaluates(model):
    """Not a deadlock, and neither stream sees the other's tokens: each step finds the other's tokens in the shared
    cache and re-evaluates its own sequence, as a run that evaluates the whole sequence at every step does."""
    kw = dict(max_tokens=N, temperature=0.0)
    a, b = model.stream(PROMPTS[0], **kw), model.stream(PROMPTS[1], **kw)
    pairs = list(zip(a, b))
    out = [[x.token for x, _ in pairs if x.token is not None], [y.token for _, y in pairs if y.token is not None]]
    assert out == [_reevaluated(model, PROMPTS[0]), _reevaluated(model, PROMPTS[1])]


def test_flash_under_budget_from_four_threads(flash_path):
    """On a .flash under the half-model budget, in a fresh process: 4 threads on the model and 4 sessions, each
    equal to the sequential run, and the peak within the budget."""
    proc = subprocess.run([sys.executable, "-m", "tests.concurrency_run", flash_path, str(N), *PROMPTS],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print({k: v for k, v in r.items() if k not in ("sequential", "threads", "sessions")})
    assert all(t for t in r["sequential"])  # (a prompt may end early: end of generation)
    assert r["threads"] == r["sequential"]
    assert r["sessions"] == r["sequential"]
    assert r["peak_bytes"] <= r["budget"], (r["peak_bytes"], r["budget"])


def test_default_threads_leave_out_a_core_another_process_keeps_busy():
    """threads=0 (the default) takes the cores this process may use less those busy right now: beside a CPU-bound
    process, one fewer (a thread sharing its core holds up every parallel region: docs/RESULTS.md)."""
    import time

    from flashlm.options import LoadOptions, default_threads

    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("one core: nothing to leave out")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # the busy loop running
        assert default_threads() == cores - 1
        assert LoadOptions().resolved_threads() == cores - 1 and LoadOptions(threads=3).resolved_threads() == 3
    finally:
        hog.kill()
        hog.wait()
