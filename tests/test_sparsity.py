"""FFN sparsity on a flash store (SmolLM2, real weights): selection, page-coalesced reads, budget runs."""

from __future__ import annotations

import os

import numpy as np
import pytest

import flashlm
from flashlm.errors import InvalidOptionError
from flashlm.flash_store.predictor import page_runs, parse_sparsity, select, topk_mask

from .test_bad_input import assert_one_line_error, run_cli
from .test_flash_store import _pin_baseline

PROMPT = "The capital of France is"


@pytest.mark.parametrize("unit, gap", [(512, 0), (512, 4096), (4096, 8192)])
def test_page_runs_cover_every_record_aligned_and_merged(unit, gap):
    rb = 1344
    rng = np.random.default_rng(0)
    starts = np.sort(rng.choice(2000, 300, replace=False)) * rb + 512
    runs = page_runs(starts, rb, unit, gap)
    assert all(a % unit == 0 and b % unit == 0 and a < b for a, b in runs)
    assert all(runs[k + 1][0] - runs[k][1] > gap for k in range(len(runs) - 1))  # disjoint, ascending, gaps kept
    for s in starts:  # every record's bytes are inside one run
        assert any(a <= s and s + rb <= b for a, b in runs)
    needed = {u for s in starts for u in range(s // unit, (s + rb - 1) // unit + 1)}
    read = {u for a, b in runs for u in range(a // unit, b // unit)}
    assert needed <= read and (gap > 0 or read == needed)  # without a gap, exactly the units holding records
    assert len(runs) < len(starts)  # neighbours coalesced
    assert page_runs(np.array([], np.int64), rb, unit, gap) == []


def test_select_and_mask_agree():
    scores = np.random.default_rng(1).random((3, 100)).astype(np.float32)
    mask = topk_mask(scores, 60)
    assert (mask.sum(1) == 60).all()
    for s in range(3):
        assert np.array_equal(np.flatnonzero(mask[s]), select(scores[s], 60))


def test_parse_sparsity():
    assert parse_sparsity("off") == 0.0 and parse_sparsity("0.4") == 0.4 and parse_sparsity("auto") == "auto"
    for bad in ("1.5", "-0.1", "lots"):
        with pytest.raises(InvalidOptionError):
            parse_sparsity(bad)


@pytest.fixture(scope="module")
def sparse(flash_path):
    m = flashlm.load(flash_path, threads=2, ctx_size=512, sparsity=0.3, sparsity_score="exact")
    yield m
    m.close()


def _greedy(model, n=32):
    responses = list(model.stream(PROMPT, max_tokens=n, temperature=0.0))
    return [r.token for r in responses if r.token is not None], responses[-1].timings.flash


def test_sparse_logits_close_to_dense(resident, sparse, gpl_text):
    """Teacher-forced over 256 GPL tokens: dropping 30% of neurons by the exact score keeps the top-1 token."""
    ids = resident.tokenize(gpl_text)[:256]
    dense, sp = resident.logits(ids), sparse.logits(ids)
    agree = float((dense.argmax(-1) == sp.argmax(-1)).mean())
    print(f"top-1 agreement sparse(0.3, exact) vs dense: {agree:.3f}")
    assert agree >= 0.85
    assert not np.array_equal(dense, sp)  # the sparse path really skipped neurons


@pytest.mark.parametrize("read_selected", [False, True])
def test_sparse_decode_under_budget_equals_resident_sparse(resident, sparse, flash_path, monkeypatch, read_selected):
    """Under half the file, the cold range streams whole (SmolLM2's small records: the cost model's choice) or, forced,
    only the sectors holding each token's selected cold records; the result must not depend on what was resident."""
    from flashlm.flash_store import predictor

    monkeypatch.setattr(predictor, "SPARSE_READ_MAX_COVERAGE", 1.0 if read_selected else 0.75)
    tokens, flash = _greedy(sparse)
    # half the file plus the scorer's resident gate and up rows, over a baseline the planner then takes as given
    p = resident._loaded.plan
    budget = _pin_baseline(monkeypatch) + p.kv_bytes + p.scratch_bytes + os.path.getsize(flash_path) // 2 + \
        sparse.engine.executor.ffn.scorer.nbytes
    m = flashlm.load(flash_path, threads=2, ctx_size=512, memory_budget=budget, sparsity=0.3)
    assert m.engine.executor.ffn.read_selected == read_selected
    reader = m.engine.executor.ffn.reader
    issued = []
    original, original_runs, original_ahead = reader.read, reader.read_runs, reader.read_ahead
    reader.read = lambda offset, nbytes, out=None: (issued.append(nbytes), original(offset, nbytes, out))[1]
    reader.read_ahead = lambda offset, nbytes, out: (issued.append(nbytes), original_ahead(offset, nbytes, out))[1]
    reader.read_runs = lambda base, runs, out: (issued.extend(b - a for a, b in runs), original_runs(base, runs, out))[1]
    streamed, stats = _greedy(m)
    m.close()
    assert m._loaded.plan.hot_neurons < m._loaded.plan.n_ff
    assert streamed == tokens
    assert stats.bytes_read == sum(issued) > 0
    assert stats.used_fraction == pytest.approx(0.7, abs=0.01)  # 30% of the neurons skipped per token


def test_sparsity_on_gguf_and_bad_values_fail_clearly(smollm_path, flash_path):
    r = run_cli("generate", "-m", smollm_path, "-p", "hi", "-n", "2", "--sparsity", "0.3")
    assert_one_line_error(r, "needs a .flash store")
    r = run_cli("generate", "-m", flash_path, "-p", "hi", "-n", "2", "--sparsity", "2")
    assert_one_line_error(r, "sparsity must be")


def test_window_table_counts_new_and_cached_neurons():
    from labs.window_table import window_table

    masks = np.zeros((1, 4, 4), bool)  # one layer, 4 tokens, 4 neurons: token t uses neurons {t % 2, 2}
    for t in range(4):
        masks[0, t, [t % 2, 2]] = True
    rows = dict((k, (read, cache)) for k, read, cache in window_table(masks, windows=(1, 2, 3)))
    assert rows[1] == (0.5, 0.5)  # k=1: nothing remembered, both neurons read
    assert rows[2] == (0.25, 0.75)  # k=2: neuron 2 stays; the alternating one is read; cache holds 3 of 4
    assert rows[3] == (0.0, 0.75)
