"""`flashlm perplexity` follows llama-perplexity's method; on the real model it agrees with llama.cpp's logits."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np

from flashlm.runtime.executor import token_nll
from flashlm.tools.perplexity import perplexity

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
        nlls.append(token_nll(logits[n_ctx // 2:n_ctx - 1], np.asarray(chunk[n_ctx // 2 + 1:])))
    ref = float(np.exp(np.concatenate(nlls).mean()))
    print(f"PPL flashlm {ours.ppl:.4f} +/- {ours.stderr:.4f}, llama.cpp {ref:.4f}")
    assert ours.n_chunks == chunks and ours.n_scored == chunks * (n_ctx // 2 - 1)
    assert abs(ours.ppl / ref - 1) < 0.01
    assert 0 < ours.stderr < ours.ppl


def test_cli_prints_ppl_with_error(smollm_path):
    proc = run_cli("perplexity", "-m", smollm_path, "-f", GPL3, "-c", "128", "--chunks", "2")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"PPL = \d+\.\d+ \+/- \d+\.\d+ \(2 chunks of 128 tokens, 126 scored\)", proc.stdout)


def test_perplexity_of_a_flash_store_stays_within_its_budget(flash_path):
    """A chunk's logits (n_ctx x vocab floats: 50 MB here) are never held at once: before Engine.score this run
    peaked at 532 MB against a 150 MB budget. The figure also matches the unbudgeted run (same arithmetic but for
    which rows share a head product)."""
    code = ("import sys, atexit; from flashlm.tools.memory import peak_rss_bytes;"
            "atexit.register(lambda: print('PEAK', peak_rss_bytes(), file=sys.stderr));"
            "from flashlm.cli import main; sys.argv = ['flashlm'] + sys.argv[1:]; main()")
    args = ["perplexity", "-m", flash_path, "-f", GPL3, "-c", "256", "--chunks", "2", "-t", "2"]
    runs = {}
    for budget in (None, 150_000_000):
        extra = ["--memory-budget", f"{budget}B"] if budget else []
        proc = subprocess.run([sys.executable, "-c", code, *args, *extra], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        ppl = float(re.search(r"PPL = (\d+\.\d+)", proc.stdout).group(1))
        peak = int(re.search(r"PEAK (\d+)", proc.stderr).group(1))
        runs[budget] = (ppl, peak)
    print(runs)
    (free_ppl, free_peak), (ppl, peak) = runs[None], runs[150_000_000]
    assert peak <= 150_000_000 < free_peak
    assert abs(ppl / free_ppl - 1) < 0.002
