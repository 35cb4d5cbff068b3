"""Run in a fresh process (as a user would): greedy decode from a .flash under the half-model budget plus the CATS
scorer's rows plus EXTRA_MB, --sparsity SPARSITY with CATS scores, with a sliding window of W tokens; checks the
window's bookkeeping against the file's records at the end. Prints one JSON line.

    python -m tests.window_run MODEL.flash W N EXTRA_MB SPARSITY PROMPT
"""

import json
import sys

import numpy as np

import flashlm
from flashlm.flash_store.predictor import scorer_bytes
from flashlm.flash_store.reader import FlashStore
from flashlm.models import read_model
from tests.flash_budget_run import half_model_budget


def bookkeeping_errors(ffn, path: str) -> list[str]:
    """Every live row of every layer's window cache: one neuron once, found where it is, holding its own record;
    the hot prefix pinned in place."""
    errors, rb = [], ffn.record_bytes
    for i, cache in enumerate(ffn.caches):
        ids = cache.id_at[:cache.num_used]
        records = np.fromfile(path, np.uint8, ffn.n_ff * rb, offset=ffn.store.layers[i].offset).reshape(-1, rb)
        checks = {"unique": len(np.unique(ids)) == len(ids),
                  "map": np.array_equal(cache.slot_of[ids], np.arange(cache.num_used))
                  and (cache.slot_of >= 0).sum() == cache.num_used and bool(np.all(cache.id_at[cache.num_used:] == -1)),
                  "hot prefix": np.array_equal(ids[:ffn.hot], np.arange(ffn.hot)) and bool(cache.pinned[:ffn.hot].all()),
                  "records": np.array_equal(cache.records[:cache.num_used], records[ids])}
        errors += [f"layer {i}: {name}" for name, ok in checks.items() if not ok]
    return errors


def main():
    path, window, n, extra_mb, sparsity, prompt = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]),
                                                   sys.argv[5], sys.argv[6])
    f, _, args = read_model(path)
    extra = scorer_bytes(FlashStore(f, args.n_layers, args.n_ff, args.d_model, verify=False), "cats")
    f.close()
    budget = half_model_budget(path, 512) + extra + int(extra_mb * 1e6)
    m = flashlm.load(path, threads=2, ctx_size=512, memory_budget=budget, sparsity=sparsity, sparsity_score="cats",
                     window=window)
    responses = list(m.stream(prompt, max_tokens=n, temperature=0.0, ignore_eos=True))
    fl = responses[-1].timings.flash
    ffn = m.engine.executor.ffn
    print(json.dumps({"tokens": [r.token for r in responses], "budget": budget, "total": m.plan.total_bytes,
                      "hot": ffn.hot, "window_rows": m.plan.window_rows, "mb_per_token": fl.bytes_read / fl.tokens / 1e6,
                      "window_hit_rate": fl.window_hit_rate, "rows_moved": fl.rows_moved, "used": fl.used_fraction,
                      "errors": bookkeeping_errors(ffn, path)}))


if __name__ == "__main__":
    main()
