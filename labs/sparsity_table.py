"""Sparsity settings side by side (issue 4's table): perplexity, share of the FFN computed and read per token, and
decode speed at a half-model budget, for each score and fraction, against dense streaming in the same run.

    python -m labs.sparsity_table MODEL.flash -f TEXT [--scores cats,predictor] [--fractions 0.2,0.3,0.4,0.5]
        [--chunks 4] [-n 64] [--budget half|SIZE]

Every measurement is its own `flashlm` process (perplexity without a budget, as the score does not depend on it;
generate --json under --memory-budget). The half-model budget is the runtime's baseline (a fresh process's RSS
at load, the KV cache for -c, the planner's scratch) plus half the file's size. A setting whose resident scorer does
not fit the budget is reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

PROMPT = "Explain how a computer reads a file from a disk, step by step."


def _flashlm(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashlm.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def half_model_budget(path: str, ctx: int) -> int:
    code = ("import flashlm, sys; from flashlm.flash_store.planner import SCRATCH_BYTES; "
            f"m = flashlm.load({path!r}, ctx_size={ctx}); p = m._loaded.plan; "
            "print(p.baseline_bytes + p.kv_bytes + SCRATCH_BYTES)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) + os.path.getsize(path) // 2


def perplexity(path: str, text: str, ctx: int, chunks: int, sparsity: str, score: str) -> str:
    p = _flashlm("perplexity", "-m", path, "-f", text, "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks),
                 "--sparsity", sparsity, "--sparsity-score", score, "-t", "2")
    m = re.search(r"PPL = ([0-9.]+)", p.stdout)
    return m.group(1) if m else f"failed: {p.stderr.strip()[-120:]}"


def decode(path: str, budget: int, n: int, ctx: int, sparsity: str, score: str) -> dict:
    p = _flashlm("generate", "-m", path, "-p", PROMPT, "-n", str(n), "--temp", "0", "-c", str(ctx), "-t", "2",
                 "--memory-budget", f"{budget}B", "--sparsity", sparsity, "--sparsity-score", score, "--json")
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    t = json.loads(p.stdout)["timings"]
    f = t["flash"]
    return {"tok_s": t["eval_tps"], "mb_read": f["bytes_read"] / max(1, f["tokens"]) / 1e6,
            "computed": f["used_fraction"], "peak_mib": t["peak_memory_mib"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-f", "--file", required=True)
    ap.add_argument("--scores", default="cats,predictor")
    ap.add_argument("--fractions", default="0.2,0.3,0.4,0.5")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("--budget", default="half")
    a = ap.parse_args()
    budget = half_model_budget(a.model, a.ctx_size) if a.budget == "half" else a.budget
    print(f"budget: {budget if isinstance(budget, str) else f'{budget / 1e6:.1f} MB'} (half-model: runtime baseline "
          f"+ 50% of {os.path.getsize(a.model) / 1e6:.1f} MB)" if a.budget == "half" else f"budget: {budget}")
    rows = [("dense", "off", "exact")] + [(f"{s} {f}", f, s) for s in a.scores.split(",")
                                          for f in a.fractions.split(",")]
    base_ppl = base_speed = None
    print("| setting | PPL | vs dense | FFN computed | MB read / token | tok/s | vs dense | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, frac, score in rows:
        ppl = perplexity(a.model, a.file, a.ctx_size, a.chunks, frac, score)
        d = decode(a.model, budget, a.n, a.ctx_size, frac, score)
        if name == "dense":
            base_ppl, base_speed = ppl, d
        rel = f"{float(ppl) / float(base_ppl) - 1:+.1%}" if ppl[0].isdigit() and base_ppl[0].isdigit() else "-"
        if "error" in d:
            print(f"| {name} | {ppl} | {rel} | - | - | {d['error'][:90]} | - | - |", flush=True)
            continue
        speed = f"{d['tok_s'] / base_speed['tok_s']:.2f}x" if "tok_s" in base_speed else "-"
        print(f"| {name} | {ppl} | {rel} | {d['computed']:.0%} | {d['mb_read']:.1f} | {d['tok_s']:.1f} | {speed} | "
              f"{d['peak_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
