"""The paper's whole mechanism on a sparse model at the half-model budget (issue 18's table): for each setting, a
fresh process inside a cgroup limited to the budget, the page cache dropped first, 64 greedy tokens.

    python -m labs.sparse_budget SPARSE.flash ORIGINAL.gguf [--windows 0,1,2,3,4,5,6,7,8] [--score exact] [-n 64]
        [--output-head exact|sketch|auto]

Rows: llama.cpp on ORIGINAL.gguf (the dense model a user has today) in the same limit; flashlm dense streaming of
SPARSE.flash (--sparsity off); flashlm reading only the neurons predicted active (--sparsity auto) with a sliding
window of k tokens for each k. The budget is the sparse store's runtime baseline plus half its file.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from flashlm.tools.bench_budget import drop_caches, run_limited
from labs.sparsity_table import half_model_budget


def run(engine: str, path: str, budget: int, n: int, ctx: int, sparsity: str = "off", score: str = "exact",
        window: int = 0, head: str = "exact") -> dict:
    drop_caches()
    cmd = [sys.executable, "-m", "flashlm.tools.bench_budget", engine, path, str(n), "2", str(ctx), str(budget),
           head, sparsity, score, str(window)]
    try:
        return run_limited(cmd, budget, 600)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}


def row(name: str, r: dict, dense: dict | None, llama: dict | None) -> str:
    if not r.get("decode_tps"):
        return f"| {name} | failed: {r.get('error', '')[:80]} | | | | | |"
    mb = r.get("read_mb_per_token")
    hit = r.get("window_hit_rate")
    vs_dense = f"{r['decode_tps'] / dense['decode_tps']:.2f}x" if dense and dense.get("decode_tps") else "-"
    vs_llama = f"{r['decode_tps'] / llama['decode_tps']:.2f}x" if llama and llama.get("decode_tps") else "-"
    reads = f"{mb:.1f}" + (f" ({mb / dense['read_mb_per_token']:.0%})" if dense and dense.get("read_mb_per_token")
                           else "") if mb is not None else "-"
    return (f"| {name} | {r['decode_tps']:.1f} | {reads} | {'-' if hit is None else f'{hit:.1%}'} | "
            f"{r.get('ffn_computed', 1.0):.0%} | {vs_dense} | {vs_llama} | {r['peak_bytes'] / 1e6:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sparse")
    ap.add_argument("original")
    ap.add_argument("--windows", default="0,1,2,3,4,5,6,7,8")
    ap.add_argument("--score", default="exact")
    ap.add_argument("--output-head", default="exact", help="exact, sketch or auto (every flashlm row)")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    a = ap.parse_args()
    budget = half_model_budget(a.sparse, a.ctx_size)
    print(f"budget {budget / 1e6:.1f} MB: the runtime baseline + 50% of {os.path.getsize(a.sparse) / 1e6:.1f} MB; "
          f"{a.n} greedy tokens, -c {a.ctx_size}, 2 threads, caches dropped before each run")
    print("| setting | tok/s | MB read / token (of dense) | window hit rate | FFN computed | vs dense | vs llama.cpp "
          "| cgroup peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    llama = run("llama.cpp", a.original, budget, a.n, a.ctx_size)
    print(row("llama.cpp, original model", llama, None, None), flush=True)
    dense = run("flashlm", a.sparse, budget, a.n, a.ctx_size, head=a.output_head)
    print(row("flashlm dense streaming", dense, None, llama), flush=True)
    for k in (int(w) for w in a.windows.split(",")):
        r = run("flashlm", a.sparse, budget, a.n, a.ctx_size, "auto", a.score, k, a.output_head)
        print(row(f"flashlm sparse ({a.score}), window {k}", r, dense, llama), flush=True)


if __name__ == "__main__":
    main()
