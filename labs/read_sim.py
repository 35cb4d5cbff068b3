"""How many reads a sparse token needs, by residency policy and neuron order, without timing anything: the active
neurons of a ReLU store (relu(gate . x) > 0, teacher-forced over a text), replayed through a pinned hot prefix and
a cache of the recent tokens' neurons, each token's misses turned into read runs as `FlashStreamedFFN._read_cold`
makes them (`predictor.page_runs`: 512-byte sectors, gaps up to MERGE_GAP_BYTES read through).

    python -m labs.read_sim RELU.flash -f HELD_OUT.txt [--order-text CAL.txt] [-n 2048]
        [--caches 0:248,330:0,200:130,300:300]

Each cache is HOT:ROWS, per layer: HOT neurons of the stored (hottest-first) order pinned, ROWS more held by the
sliding window (`--window 3`, appended while there is room, as the runtime does) and, for comparison, by LRU.
With --order-text, the stored order is replaced by a co-activation order computed on that text (a greedy chain of
the most similar unplaced neuron, cosine similarity of firing patterns) and evaluated on the held-out one.
"""

from __future__ import annotations

import argparse

import numpy as np

from flashlm.flash_store.predictor import MERGE_GAP_BYTES, READ_UNIT, page_runs

CHUNK = 512  # collect_ffn_inputs' passes: each starts a fresh context (and an empty cache here)


def active_masks(path: str, text_path: str, n_tokens: int) -> np.ndarray:
    """(layers, T, n_ff) bool in stored neuron order."""
    import flashlm
    from flashlm.tools.calibrate import collect_ffn_inputs, gate_up

    m = flashlm.load(path, threads=2, ctx_size=CHUNK, batch_size=CHUNK)
    try:
        with open(text_path, encoding="utf-8", errors="ignore") as fh:
            ids = m.tokenize(fh.read())[:n_tokens]
        store = m.engine.executor.ffn.store
        return np.stack([gate_up(store, i, x)[0] > 0 for i, x in enumerate(collect_ffn_inputs(m, ids))])
    finally:
        m.close()


def chain_order(fires: np.ndarray, hot: int) -> np.ndarray:
    """The first `hot` neurons as stored, then an order where each next neuron is the unplaced one firing most like
    the last: (T, n) -> (n,)."""
    tail = chain(fires[:, hot:]) + hot
    return np.concatenate([np.arange(hot), tail])


def chain(fires: np.ndarray) -> np.ndarray:
    x = fires.astype(np.float32)
    f = x.sum(0) + 1e-3
    sim = (x.T @ x) / np.sqrt(np.outer(f, f))
    order, placed, cur = [], np.zeros(len(f), bool), int(np.argmax(f))
    for _ in range(len(f)):
        order.append(cur)
        placed[cur] = True
        if placed.all():
            break
        cur = int(np.argmax(np.where(placed, -np.inf, sim[cur])))
    return np.array(order)


def replay(masks: np.ndarray, hot: int, rows: int, policy: str, record_bytes: int, window: int = 3) -> dict:
    """Runs, bytes and neurons read per token (over tokens past each chunk's first `window`)."""
    runs = nbytes = neurons = counted = 0
    L, T, n = masks.shape
    for layer in masks:
        last_used = np.full(n, -1 << 30)
        cached = np.zeros(n, bool)
        for t in range(T):
            if t % CHUNK == 0:
                cached[:], last_used[:] = False, -1 << 30
            active = layer[t].copy()
            active[:hot] = False
            miss = np.flatnonzero(active & ~cached)
            if t % CHUNK >= window:
                r = page_runs(miss * record_bytes, record_bytes, READ_UNIT, MERGE_GAP_BYTES)
                runs, nbytes, neurons = runs + len(r), nbytes + sum(b - a for a, b in r), neurons + len(miss)
                counted += 1
            last_used[active] = t
            if policy == "window":  # drop what the last `window` tokens did not use, append while there is room
                cached &= last_used > t - window
                cached[miss[:max(0, rows - int(cached.sum()))]] = True
            else:  # LRU over `rows`
                cached[miss] = True
                over = int(cached.sum()) - rows
                if over > 0:
                    ids = np.flatnonzero(cached)
                    cached[ids[np.argsort(last_used[ids])[:over]]] = False
    tokens = counted / L
    return {"runs": runs / tokens, "mb": nbytes / tokens / 1e6, "neurons": neurons / tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-f", "--file", required=True)
    ap.add_argument("--order-text")
    ap.add_argument("-n", "--tokens", type=int, default=2048)
    ap.add_argument("--caches", default="0:248,330:0,200:130,300:300")
    a = ap.parse_args()
    import flashlm

    with flashlm.load(a.model, ctx_size=64) as m:
        record_bytes = m.engine.executor.ffn.store.record_bytes
    masks = active_masks(a.model, a.file, a.tokens)
    caches = [tuple(int(v) for v in spec.split(":")) for spec in a.caches.split(",")]
    cal = active_masks(a.model, a.order_text, a.tokens) if a.order_text else None
    print(f"{masks.shape[1]} tokens x {masks.shape[0]} layers, {1 - masks.mean():.1%} zeros, {record_bytes}-byte "
          f"records; per token:")
    print("| order | hot | cache rows | policy | neurons read | runs | MB read |")
    print("|---|---|---|---|---|---|---|")
    for name in ("stored (hottest first)", "co-activation chain") if cal is not None else ("stored (hottest first)",):
        for hot, rows in caches:
            ordered = masks if name.startswith("stored") else \
                np.stack([m[:, chain_order(c, hot)] for m, c in zip(masks, cal)])
            for policy in ("window", "lru") if rows else ("window",):
                r = replay(ordered, hot, rows, policy, record_bytes)
                print(f"| {name} | {hot} | {rows} | {policy if rows else '-'} | {r['neurons']:.0f} | {r['runs']:.0f} "
                      f"| {r['mb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
