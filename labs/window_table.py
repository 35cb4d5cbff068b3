"""The window trade-off of "LLM in a flash" (Fig. 4): for window sizes k, the fraction of the FFN a token must read
(selected neurons not used by the previous k-1 tokens) and the cache needed to hold the last k tokens' neurons.

    python -m labs.window_table MODEL.flash -f TEXT [--sparsity 0.4] [--score exact] [-n 512]

Selections come from the model's own sparse forward pass (teacher-forced over the text), per layer and token.
"""

from __future__ import annotations

import argparse

import numpy as np


def window_table(masks: np.ndarray, windows=range(1, 9)) -> list[tuple[int, float, float]]:
    """masks (layers, T, n) bool -> [(k, read fraction per token, mean cache fraction)] averaged over layers."""
    L, T, n = masks.shape
    rows = []
    for k in windows:
        read, cache = [], []
        for t in range(k, T):
            recent = masks[:, t - k + 1:t].any(1) if k > 1 else np.zeros((L, n), bool)
            read.append((masks[:, t] & ~recent).mean())
            cache.append(masks[:, t - k + 1:t + 1].any(1).mean())
        rows.append((k, float(np.mean(read)), float(np.mean(cache))))
    return rows


def collect_masks(path: str, text: str, sparsity: float, score: str, n_tokens: int) -> np.ndarray:
    import flashlm
    from flashlm.flash_store.predictor import topk_mask

    m = flashlm.load(path, threads=2, ctx_size=n_tokens, batch_size=n_tokens, sparsity=sparsity,
                     sparsity_score=score)
    ffn = m.engine.executor.ffn
    masks = []

    def record(i, x):  # the selection the scorer makes for this input
        masks.append(topk_mask(ffn.scorer.scores(ffn.kernel, i, x), ffn.keep))

    ffn.observers.append(record)
    m.logits(m.tokenize(text)[:n_tokens])
    m.close()
    return np.stack(masks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-f", "--file", required=True)
    ap.add_argument("--sparsity", type=float, default=0.4)
    ap.add_argument("--score", default="exact")
    ap.add_argument("-n", "--tokens", type=int, default=512)
    a = ap.parse_args()
    with open(a.file, encoding="utf-8") as fh:
        text = fh.read()
    masks = collect_masks(a.model, text, a.sparsity, a.score, a.tokens)
    print(f"sparsity {a.sparsity} ({a.score}), {masks.shape[1]} tokens x {masks.shape[0]} layers")
    print(" k | FFN read per token | cache (fraction of the FFN)")
    for k, read, cache in window_table(masks):
        print(f"{k:2d} | {read:18.1%} | {cache:.1%}")


if __name__ == "__main__":
    main()
