"""`flashlm perplexity` follows llama-perplexity's method; on the real model it agrees with llama.cpp's logits."""

from __future__ import annotations

import re

import numpy as np

from flashlm.tools.perplexity import _nll, perplexity

from .conftest import GPL3
from .test_bad_input import run_cli


def test_matches_llama_cpp_scored_the_same_way(model, reference, gpl_text):
    n_ctx, chunks = 128, 8  # 504 scored tokens
    ours = perplexity(model, gpl_text, n_ctx, max_chunks=chunks)
    tokens = reference.tokenize(gpl_text.encode(), add_bos=True, special=False)
    nlls = []
    for c in range(chunks):
        chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
        reference.reset()
        reference.eval(chunk)
        logits = np.array(reference.scores[:n_ctx])
        nlls.append(_nll(logits[n_ctx // 2:n_ctx - 1], np.asarray(chunk[n_ctx // 2 + 1:])))
    ref = float(np.exp(np.concatenate(nlls).mean()))
    print(f"PPL flashlm {ours.ppl:.4f} +/- {ours.stderr:.4f}, llama.cpp {ref:.4f}")
    assert ours.n_chunks == chunks and ours.n_scored == chunks * (n_ctx // 2 - 1)
    assert abs(ours.ppl / ref - 1) < 0.01
    assert 0 < ours.stderr < ours.ppl


def test_cli_prints_ppl_with_error(smollm_path):
    proc = run_cli("perplexity", "-m", smollm_path, "-f", GPL3, "-c", "128", "--chunks", "2")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"PPL = \d+\.\d+ \+/- \d+\.\d+ \(2 chunks of 128 tokens, 126 scored\)", proc.stdout)
