"""Run in a fresh process: greedy tokens for prompts from a .flash under the half-model budget, sequentially, then
from one thread per prompt on the model, then from one thread per prompt each with its own session. Prints one
JSON line (see tests/test_concurrency.py).

    python -m tests.concurrency_run MODEL.flash N PROMPT...
"""

import json
import sys
import threading

import flashlm
from flashlm.tools.memory import peak_rss_bytes
from tests.flash_budget_run import half_model_budget


def _tokens(target, prompt, n):
    return [r.token for r in target.stream(prompt, max_tokens=n, temperature=0.0) if r.token is not None]


def _threads(fn, items):
    out = [None] * len(items)
    threads = [threading.Thread(target=lambda i=i, x=x: out.__setitem__(i, fn(x))) for i, x in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main():
    path, n, prompts = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    ctx = 512
    budget = half_model_budget(path, ctx)
    m = flashlm.load(path, threads=2, ctx_size=ctx, memory_budget=budget)
    sequential = []
    for p in prompts:
        m.engine.reset()
        sequential.append(_tokens(m, p, n))
    threads = _threads(lambda p: _tokens(m, p, n), prompts)
    sessions = _threads(lambda sp: _tokens(sp[0], sp[1], n), [(m.session(), p) for p in prompts])
    print(json.dumps({"budget": budget, "peak_bytes": peak_rss_bytes(), "sequential": sequential,
                      "threads": threads, "sessions": sessions}))


if __name__ == "__main__":
    main()
