"""What the sketch output head costs in fidelity, against the exact head on the same .flash file.

    python -m labs.head_fidelity MODEL.flash [-f TEXT] [-n TOKENS] [--candidates K]

Teacher-forced over the first TOKENS tokens of TEXT: top-1 agreement, perplexity of both heads, how often the exact
top-1 is among the sketch's candidates; then greedy generations of 64 tokens from three prompts, compared token by
token. Both runs use the flash executor with no budget, so the head is the only difference.
"""

from __future__ import annotations

import argparse

import numpy as np

PROMPTS = ["The GNU General Public License is", "Once upon a time, in a small village,",
           "The three primary colours are"]


def _nll(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    x = logits[:-1].astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(-1))
    return lse - x[np.arange(len(ids) - 1), ids[1:]]


def compare(path: str, text: str, n_tokens: int, candidates: int | None = None, n_gen: int = 64) -> dict:
    import flashlm

    exact = flashlm.load(path, threads=2, ctx_size=max(1024, n_tokens + 1))
    sketch = flashlm.load(path, threads=2, ctx_size=max(1024, n_tokens + 1), output_head="sketch")
    head = sketch.engine.executor.head_stream
    if candidates:
        head.candidates = candidates
    ids = exact.tokenize(text)[:n_tokens]
    head.record = []
    a, b = exact.logits(ids), sketch.logits(ids)
    top_a = a[:-1].argmax(-1)
    in_candidates = float(np.mean([t in cand for cand, t in zip(head.record, top_a)]))
    head.record = None
    out = {"tokens": len(ids), "candidates": head.candidates, "cache_rows": head.cache_rows,
           "top1_agreement": float((top_a == b[:-1].argmax(-1)).mean()),
           "ppl_exact": float(np.exp(_nll(a, ids).mean())), "ppl_sketch": float(np.exp(_nll(b, ids).mean())),
           "exact_top1_in_candidates": in_candidates, "greedy": []}
    for p in PROMPTS:
        ga = [r.token for r in exact.stream(p, max_tokens=n_gen, temperature=0) if r.token is not None]
        gb = [r.token for r in sketch.stream(p, max_tokens=n_gen, temperature=0) if r.token is not None]
        same = next((i for i, (x, y) in enumerate(zip(ga, gb)) if x != y), min(len(ga), len(gb)))
        out["greedy"].append({"prompt": p, "equal_prefix": same, "of": len(ga)})
    exact.close()
    sketch.close()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-f", "--file", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("-n", "--tokens", type=int, default=513)
    ap.add_argument("--candidates", type=int, default=None)
    args = ap.parse_args(argv)
    with open(args.file, encoding="utf-8") as f:
        r = compare(args.model, f.read(), args.tokens, args.candidates)
    print(f"{r['tokens']} tokens, {r['candidates']} candidates, {r['cache_rows']} cached rows")
    print(f"top-1 agreement with the exact head  {r['top1_agreement']:.4f}")
    print(f"exact top-1 among the candidates     {r['exact_top1_in_candidates']:.4f}")
    print(f"perplexity exact {r['ppl_exact']:.4f}  sketch {r['ppl_sketch']:.4f}  "
          f"ratio {r['ppl_sketch'] / r['ppl_exact']:.4f}")
    for g in r["greedy"]:
        print(f"greedy {g['prompt']!r}: first {g['equal_prefix']} of {g['of']} tokens equal")


if __name__ == "__main__":
    main()
