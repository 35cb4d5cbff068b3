"""Throughput of `flashlm serve`: K concurrent streaming clients (the official `openai` client), tokens/s.

    python -m labs.serve_bench -m MODEL [--memory-budget B] [-c 512] [--streams 1,4] [-n 128]

Starts the server in a subprocess (`--parallel` = the largest K, so every stream has a slot), sends one warm-up
request (-n tokens), then for each K runs K streaming completions at once (different prompts, -n tokens each with ignore_eos,
temperature 0) and prints per K: the aggregate tokens/s (all streams' tokens over the wall time from the first
request to the last token), the mean per-stream tokens/s, the mean time to first token, and the server's peak RSS
(VmHWM, load included) against the budget.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "Water boils at",
           "My favourite colour is", "The best way to learn a language is", "In the year 2050,",
           "The recipe for pancakes:", "Dear diary, today"]


def start_server(args, parallel: int):
    cmd = [sys.executable, "-m", "flashlm.cli", "serve", "-m", args.model, "--port", "0", "-t", str(args.threads),
           "-c", str(args.ctx), "--parallel", str(parallel)]
    if args.memory_budget:
        cmd += ["--memory-budget", args.memory_budget]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    while True:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit(f"the server exited ({proc.wait()})")
        print(line, end="", file=sys.stderr)
        found = re.search(r" on (http://\S+/v1) ", line)
        if found:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # drain the log
            return proc, found.group(1)


def one_stream(client, prompt: str, n: int, out: dict) -> None:
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = client.completions.create(model="x", prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for c in stream:
        if first is None and c.choices and c.choices[0].text:
            first = time.perf_counter()
        if c.usage is not None:
            tokens = c.usage.completion_tokens
    end = time.perf_counter()
    out.update(tokens=tokens, seconds=end - t0, ttft=(first or end) - t0, end=end, start=t0)


def run(client, k: int, n: int) -> dict:
    results = [{} for _ in range(k)]
    threads = [threading.Thread(target=one_stream, args=(client, PROMPTS[i % len(PROMPTS)], n, results[i]))
               for i in range(k)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - t0
    tokens = sum(r["tokens"] for r in results)
    return {"streams": k, "tokens": tokens, "wall_s": wall, "aggregate_tps": tokens / wall,
            "per_stream_tps": sum(r["tokens"] / r["seconds"] for r in results) / k,
            "ttft_s": sum(r["ttft"] for r in results) / k}


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--memory-budget", default=None)
    p.add_argument("-c", "--ctx", type=int, default=512)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--streams", default="1,4", help="concurrent streams per run, comma-separated")
    p.add_argument("-n", type=int, default=128, help="tokens per stream")
    args = p.parse_args()
    import openai

    ks = [int(k) for k in args.streams.split(",")]
    proc, url = start_server(args, max(ks))
    try:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        run(client, 1, args.n)  # warm-up: the first tokens after a load run several times slower
        print(f"model {args.model}, budget {args.memory_budget or 'none'}, -c {args.ctx}, -t {args.threads}, "
              f"--parallel {max(ks)}, {args.n} tokens per stream")
        for k in ks:
            r = run(client, k, args.n)
            print(f"{k} stream(s): {r['aggregate_tps']:.1f} tok/s aggregate, {r['per_stream_tps']:.1f} tok/s per "
                  f"stream, first token after {r['ttft_s'] * 1e3:.0f} ms, {r['tokens']} tokens in "
                  f"{r['wall_s']:.1f} s", flush=True)
        print(f"server peak RSS {peak_rss_mib(proc.pid):.1f} MiB")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
