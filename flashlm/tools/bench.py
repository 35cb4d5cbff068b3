"""`flashlm bench`: flashlm and llama.cpp side by side on the same GGUF, prompt and thread count.

Each engine runs in fresh processes of its own (so its peak memory is its own), one per timed repetition, the engines
alternating: a warm-up, then one timed run of: evaluate an n_prompt-token prompt, then n_gen greedy decode steps
driven from Python in the same way for both engines. Medians and spreads are reported, with ratios flashlm /
llama.cpp (the llama-bench pattern).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from flashlm.tools.memory import peak_rss_bytes

FALLBACK_TEXT = ("The quick brown fox jumps over the lazy dog. Language models predict the next token from the ones "
                 "before it, and a runtime's job is to do that quickly within the memory it is given. ")


def prompt_text() -> str:
    path = "/usr/share/common-licenses/GPL-3"
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return FALLBACK_TEXT * 200


class _FlashLM:
    def __init__(self, path, threads, ctx):
        from flashlm.model import load

        self.model = load(path, threads=threads, ctx_size=ctx)
        self.engine = self.model.engine

    def tokenize(self, text):
        return self.model.tokenize(text)

    def prompt(self, ids):
        self.engine.reset()
        return int(np.argmax(self.engine.prefill(ids)))

    def step(self, tok):
        return int(np.argmax(self.engine.step(tok)))


class _LlamaCpp:
    def __init__(self, path, threads, ctx):
        from llama_cpp import Llama

        # threads 0: llama-cpp-python's own default (half the logical CPUs)
        self.llm = Llama(model_path=path, n_ctx=ctx, n_threads=threads or None, n_threads_batch=threads or None,
                         n_batch=512, verbose=False)

    def tokenize(self, text):
        return self.llm.tokenize(text.encode(), add_bos=True, special=True)

    def _next(self):
        # Without logits_all, llama-cpp-python does not copy logits into .scores: read llama.cpp's last row.
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),))))

    def prompt(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return self._next()

    def step(self, tok):
        self.llm.eval([tok])
        return self._next()


ENGINES = {"flashlm": _FlashLM, "llama.cpp": _LlamaCpp}


def worker(engine: str, path: str, n_prompt: int, n_gen: int, threads: int, ctx: int) -> dict:
    """Runs in the child process: a warm-up, then one timed prompt and decode; returns the measurements."""
    t0 = time.perf_counter()
    e = ENGINES[engine](path, threads, ctx)
    load_ms = (time.perf_counter() - t0) * 1e3
    ids = e.tokenize(prompt_text())[:n_prompt]
    tok = e.prompt(ids[:16])  # warm-up
    for _ in range(4):
        tok = e.step(tok)
    t = time.perf_counter()
    tok = e.prompt(ids)
    prompt_tps = len(ids) / (time.perf_counter() - t)
    tokens = [tok]
    t = time.perf_counter()
    for _ in range(n_gen - 1):
        tok = e.step(tok)
        tokens.append(tok)
    decode_tps = (n_gen - 1) / (time.perf_counter() - t)
    return {"engine": engine, "load_ms": load_ms, "prompt_tokens": len(ids), "gen_tokens": n_gen,
            "prompt_tps": prompt_tps, "decode_tps": decode_tps, "peak_rss_mib": peak_rss_bytes() / 2 ** 20,
            "tokens": tokens}


def _spread(values: list[float]) -> str:
    return f"±{(max(values) - min(values)) / 2:.1f}" if len(values) > 1 else ""


BUSY_LOOP = "while True: pass"  # one CPU-bound process: what a compiler or a second program does beside the model


def _run_engines(engines: list[str], path: str, flash: str | None, args: list[str], reps: int, busy: int) -> dict:
    """`reps` rounds; in each, every engine in a fresh process of its own for one timed repetition, one engine
    after the other, with `busy` CPU-bound processes beside it (started before the engine, stopped after it).
    Alternating the engines round by round puts a burst of load from other tenants on both sides of a ratio: run
    all of one engine's repetitions, then the other's, and one burst moved a ratio by 20-30% (Gemma 3 decode 50
    vs 90 tok/s in two runs a minute apart, 2026-12-03)."""
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for _ in range(reps):
        for engine in engines:
            own = flash if flash and engine == "flashlm" else path
            hogs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
            try:
                proc = subprocess.run([sys.executable, "-m", "flashlm.tools.bench", engine, own, *args],
                                      capture_output=True, text=True)
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
            if proc.returncode != 0:
                raise RuntimeError(f"{engine} benchmark failed:\n{proc.stderr[-2000:]}")
            runs[engine].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {engine: _merge(r) for engine, r in runs.items()}


def _merge(runs: list[dict]) -> dict:
    """One engine's rounds as one result: medians of the speeds and load times, the largest peak memory."""
    out = dict(runs[-1])
    for key in ("prompt_tps", "decode_tps"):
        out[f"{key}_all"] = [r[key] for r in runs]
        out[key] = statistics.median(out[f"{key}_all"])
    out["load_ms"] = statistics.median(r["load_ms"] for r in runs)
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    return out


def _ratios(results: dict) -> dict | None:
    if "flashlm" not in results or "llama.cpp" not in results:
        return None
    a, b = results["flashlm"], results["llama.cpp"]
    return {"prompt": a["prompt_tps"] / b["prompt_tps"], "decode": a["decode_tps"] / b["decode_tps"],
            "peak_memory": a["peak_rss_mib"] / b["peak_rss_mib"]}


def run_bench(path: str, n_prompt: int, n_gen: int, threads: int, reps: int, ctx: int, engines: list[str],
              as_json: bool, flash: str | None = None, busy: int = 0) -> dict:
    """flash: flashlm runs this .flash conversion of `path` instead of `path` itself. busy > 0: a second pass of
    both engines with that many CPU-bound processes beside each (a busy machine), reported after the idle one."""
    from flashlm.errors import InvalidOptionError

    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise InvalidOptionError(f"unknown engine(s) {', '.join(unknown)} (known: {', '.join(ENGINES)})")
    if min(n_prompt, n_gen, reps) < 1 or threads < 0 or n_prompt + n_gen > ctx:
        raise InvalidOptionError("bench needs n_prompt, n_gen, repetitions >= 1, threads >= 0 and "
                                 "n_prompt + n_gen <= ctx")
    args = [str(n_prompt), str(n_gen), str(threads), str(ctx)]
    results = _run_engines(engines, path, flash, args, reps, 0)
    report = {"model": path, "flash": flash, "threads": threads, "n_prompt": n_prompt, "n_gen": n_gen, "repetitions": reps,
              "engines": results}
    ratios = _ratios(results)
    if ratios:
        a, b = results["flashlm"], results["llama.cpp"]
        same = sum(x == y for x, y in zip(a["tokens"], b["tokens"]))
        report["ratios"] = ratios
        report["greedy_tokens_equal"] = f"{same}/{len(a['tokens'])}"
    if busy:
        busy_results = _run_engines(engines, path, flash, args, reps, busy)
        report["busy"] = {"processes": busy, "engines": busy_results}
        if ratios:
            report["busy"]["ratios"] = _ratios(busy_results)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(f"model {os.path.basename(path)}{f' (flashlm: {os.path.basename(flash)})' if flash else ''}, "
              f"{threads or 'default'} threads, prompt {n_prompt} tokens, {n_gen} generated, "
              f"median of {reps}")
        print(f"{'engine':<10} {'prompt tok/s':>16} {'decode tok/s':>16} {'peak MiB':>9} {'load ms':>8}")
        for r in results.values():
            print(f"{r['engine']:<10} {r['prompt_tps']:>9.1f} {_spread(r['prompt_tps_all']):>6} "
                  f"{r['decode_tps']:>9.1f} {_spread(r['decode_tps_all']):>6} {r['peak_rss_mib']:>9.1f} "
                  f"{r['load_ms']:>8.0f}")
        if "ratios" in report:
            q = report["ratios"]
            print(f"ratio flashlm/llama.cpp: prompt {q['prompt']:.2f}x, decode {q['decode']:.2f}x, "
                  f"peak memory {q['peak_memory']:.2f}x; greedy tokens equal {report['greedy_tokens_equal']}")
        if busy:
            print(f"busy: {busy} CPU-bound process{'es' if busy > 1 else ''} beside each engine")
            for r in report["busy"]["engines"].values():
                idle = results[r["engine"]]["decode_tps"]
                print(f"{r['engine']:<10} {r['prompt_tps']:>9.1f} {_spread(r['prompt_tps_all']):>6} "
                      f"{r['decode_tps']:>9.1f} {_spread(r['decode_tps_all']):>6}   decode {r['decode_tps'] / idle:.2f}x "
                      "its idle speed")
            if "ratios" in report["busy"]:
                q = report["busy"]["ratios"]
                print(f"busy ratio flashlm/llama.cpp: prompt {q['prompt']:.2f}x, decode {q['decode']:.2f}x")
    return report


if __name__ == "__main__":
    engine, path, n_prompt, n_gen, threads, ctx = sys.argv[1:7]
    print(json.dumps(worker(engine, path, int(n_prompt), int(n_gen), int(threads), int(ctx))))
