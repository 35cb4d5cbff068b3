"""`flashlm perplexity`: computed as llama.cpp's llama-perplexity does.

The text is tokenized once; it is cut into non-overlapping chunks of n_ctx tokens (the first token of each chunk
becomes BOS when the model adds one); each chunk is evaluated from an empty context and only the predictions in
its second half are scored, so every scored token sees at least n_ctx/2 tokens of context. PPL = exp(mean NLL),
with its standard error by the delta method (PPL * std(NLL) / sqrt(N)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flashlm.errors import InvalidOptionError


@dataclass
class PerplexityResult:
    ppl: float
    stderr: float
    n_chunks: int
    n_scored: int
    chunk_ppl: list[float]


def perplexity(model, text: str, n_ctx: int, max_chunks: int | None = None, progress=None) -> PerplexityResult:
    if n_ctx < 16:
        raise InvalidOptionError(f"perplexity needs a context of at least 16 tokens, got {n_ctx}")
    if n_ctx > model.n_ctx:
        raise InvalidOptionError(f"perplexity context {n_ctx} exceeds the model's loaded context {model.n_ctx}")
    tokens = model.tokenize(text, add_bos=True, parse_special=False)
    n_chunks = len(tokens) // n_ctx
    if max_chunks:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks == 0:
        raise InvalidOptionError(f"the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}")
    bos = model.tokenizer.bos_id
    adds_bos = bool(tokens) and tokens[0] == bos and bos >= 0
    first = n_ctx // 2
    nlls, chunk_ppl = [], []
    for c in range(n_chunks):
        chunk = list(tokens[c * n_ctx:(c + 1) * n_ctx])
        if adds_bos:
            chunk[0] = bos
        nll = model.score(chunk, first)  # a few rows of logits at a time: within a memory budget
        nlls.append(nll)
        chunk_ppl.append(float(np.exp(nll.mean())))
        if progress:
            progress(c + 1, n_chunks, float(np.exp(np.concatenate(nlls).mean())))
    all_nll = np.concatenate(nlls)
    ppl = float(np.exp(all_nll.mean()))
    stderr = ppl * float(all_nll.std(ddof=1)) / math.sqrt(len(all_nll)) if len(all_nll) > 1 else float("nan")
    return PerplexityResult(ppl, stderr, n_chunks, len(all_nll), chunk_ppl)
