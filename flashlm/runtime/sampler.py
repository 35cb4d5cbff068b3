"""Token sampling, built once from SamplingOptions (mlx-lm's make_sampler pattern).

The chain and its order follow llama.cpp's default sampler: repetition penalty -> top-k -> top-p -> min-p ->
temperature -> draw. Temperature 0 is greedy (argmax after the penalty). A seed makes draws reproducible.

Draws come from Python's random.Random (Mersenne Twister, C, already loaded by the standard library) through the
candidates' cumulative probabilities, not numpy.random: importing numpy.random adds 2.9 MB of resident memory
after the memory plan is made (measured, psutil RSS), which a tight budget would have to hold as scratch.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np

from flashlm.options import SamplingOptions

Sampler = Callable[[np.ndarray, Sequence[int]], int]


def apply_repeat_penalty(logits: np.ndarray, history: Sequence[int], penalty: float, last_n: int) -> np.ndarray:
    if penalty == 1.0 or not history or last_n == 0:
        return logits
    recent = np.unique(np.asarray(history[-last_n:] if last_n > 0 else history, dtype=np.int64))
    logits = logits.copy()
    vals = logits[recent]
    logits[recent] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def filter_candidates(logits: np.ndarray, top_k: int, top_p: float, min_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and logits that survive top-k, top-p and min-p, sorted by logit, highest first."""
    n = logits.shape[0]
    if 0 < top_k < n:
        ids = np.argpartition(-logits, top_k - 1)[:top_k]
    else:
        ids = np.arange(n)
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    vals = logits[ids]
    if top_p < 1.0:
        cum = np.cumsum(_softmax(vals))
        keep = int(np.searchsorted(cum, top_p, side="left")) + 1  # smallest prefix with mass >= top_p
        ids, vals = ids[:keep], vals[:keep]
    if min_p > 0.0:
        probs = _softmax(vals)
        keep = max(1, int(np.count_nonzero(probs >= min_p * probs[0])))
        ids, vals = ids[:keep], vals[:keep]
    return ids, vals


def make_sampler(opts: SamplingOptions) -> Sampler:
    opts.validate()
    rng = random.Random(None if opts.seed < 0 else opts.seed)

    def sample(logits: np.ndarray, history: Sequence[int]) -> int:
        logits = apply_repeat_penalty(np.asarray(logits, dtype=np.float32).reshape(-1), history,
                                      opts.repeat_penalty, opts.repeat_last_n)
        if opts.temperature == 0.0:
            return int(np.argmax(logits))
        ids, vals = filter_candidates(logits, opts.top_k, opts.top_p, opts.min_p)
        probs = _softmax(vals.astype(np.float64) / opts.temperature)
        cum = np.cumsum(probs)
        return int(ids[min(len(ids) - 1, int(np.searchsorted(cum, rng.random() * cum[-1], side="right")))])

    return sample
