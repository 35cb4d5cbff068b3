"""The sketch output head (flash_store/head_sketch.py) and Gemma 3 under a half-model budget, exact and sketched."""

from __future__ import annotations

import numpy as np
import pytest

from .test_flash_store import _run
from .test_gemma3 import gemma_path  # noqa: F401  (fixture)

PROMPTS = ["The GNU General Public License is", "Once upon a time, in a small village,"]


def test_sketch_kernel_matches_numpy():
    from flashlm.flash_store.head_sketch import _SketchKernel

    rng = np.random.default_rng(0)
    n, d, k = 1000, 608, 32
    w = rng.standard_normal((n, d + k)).astype(np.float32)

    class H:  # the arrays a SketchHead holds
        bits = np.packbits(w[:, :d] > 0, axis=1, bitorder="little")
        scale = np.abs(w[:, :d]).mean(1).astype(np.float32)
        s8 = (np.abs(w[:, d:]).max(1) / 127).astype(np.float32)
        q8 = np.round(w[:, d:] / s8[:, None]).astype(np.int8)

    x = rng.standard_normal(d + k).astype(np.float32)
    expected = (np.where(w[:, :d] > 0, 1, -1) * H.scale[:, None]) @ x[:d] + (H.q8 * H.s8[:, None]) @ x[d:]
    kernel = _SketchKernel()
    assert kernel.fn is not None  # the C kernel built here
    out = np.empty(n, np.float32)
    kernel.scores(H, x, out, 2)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-3)
    kernel.fn = None  # the numpy fallback computes the same
    kernel.scores(H, x, out, 2)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def gemma_flash(tmp_path_factory, gemma_path):  # noqa: F811
    from flashlm.tools.convert import convert_gguf as convert

    path = str(tmp_path_factory.mktemp("gemma") / "gemma3.flash")
    convert(gemma_path, path)
    return path


def test_sketch_head_candidates_are_exact_and_cache_evicts(gemma_flash):
    """With a cache smaller than a few tokens' candidates, rows are evicted and re-read; candidate logits equal the
    exact head's (same kernel, same row bytes), and the argmax is always a candidate."""
    import flashlm

    exact = flashlm.load(gemma_flash, threads=2, ctx_size=256)
    sketch = flashlm.load(gemma_flash, threads=2, ctx_size=256, output_head="sketch")
    head = sketch.engine.executor.head_stream
    head.set_cache_rows(700)
    head.read_rank = head.candidates  # every uncached candidate read, so 7 tokens turn the cache over
    head.record = []
    io = sketch.engine.executor.ffn.stats.io  # the live counters the CLI and the benchmarks report
    before = io.snapshot()
    ids = exact.tokenize(PROMPTS[1])
    out_sketch = [sketch.engine.prefill(ids)]
    out_exact = [exact.engine.prefill(ids)]
    for _ in range(6):
        tok = int(out_exact[-1].argmax())
        out_exact.append(exact.engine.step(tok))
        out_sketch.append(sketch.engine.step(tok))
    assert head.rows_read > 700  # the cache turned over
    assert io.since(before).bytes_read == head.rows_read * head.row_bytes  # every row read is in the stats
    for a, b, cand in zip(out_exact, out_sketch, head.record):
        np.testing.assert_allclose(b[0, cand], a[0, cand], rtol=1e-5, atol=1e-5)
        assert b[0].argmax() in cand and b[0].argmax() == a[0].argmax()
    assert (head.cache.slot_of >= 0).sum() == 700 and np.all(head.cache.slot_of[head.cache.id_at] == np.arange(700))
    exact.close()
    sketch.close()


def test_gemma_half_model_budget_exact_and_sketch_equal_resident_greedy(gemma_flash):
    full = _run(gemma_flash, "none", 24, PROMPTS)
    for mode in ("half", "half+sketch"):
        half = _run(gemma_flash, mode, 24, PROMPTS)
        print(f"gemma3 {mode}: budget {half['budget'] / 1e6:.0f} MB, peak {half['peak_bytes'] / 1e6:.0f} MB, "
              f"{half['hot']}/{half['n_ff']} hot neurons, {half['head_resident_rows']}/{half['head_rows']} output rows")
        assert half["peak_bytes"] <= half["budget"]
        assert half["tokens"] == full["tokens"]
    assert all(len(t) == 24 for t in full["tokens"])


def test_sketch_head_needs_its_memory(gemma_flash):
    import flashlm
    from flashlm.errors import BudgetError

    with pytest.raises(BudgetError, match="smallest workable budget"):
        flashlm.load(gemma_flash, threads=2, ctx_size=256, memory_budget="140MB", output_head="sketch")


def test_auto_head_names_the_smaller_smallest_budget_and_it_loads_there(gemma_flash):
    """--output-head auto under a budget neither head fits: the error names the smaller of the two heads' smallest
    workable budgets (the sketch's alone was 163 MB where the streamed exact head works from 134), and a plan at
    that budget exists."""
    from flashlm.errors import BudgetError
    from flashlm.flash_store.planner import plan_for
    from flashlm.flash_store.reader import FlashStore
    from flashlm.models import read_model
    from flashlm.options import LoadOptions

    f, family, args = read_model(gemma_flash)
    store = FlashStore(f, args.n_layers, args.n_ff, args.d_model, verify=False)

    def plan(budget, head):
        opts = LoadOptions(ctx_size=512, memory_budget=budget, output_head=head).validate()
        return plan_for(f, family, args, store, opts, 512, baseline=90_000_000)

    smallest = {}
    for head in ("exact", "sketch", "auto"):
        with pytest.raises(BudgetError) as e:
            plan(100_000_000, head)
        smallest[head] = e.value.smallest_bytes
    assert smallest["auto"] == min(smallest["exact"], smallest["sketch"]) < max(smallest["exact"], smallest["sketch"])
    p = plan(smallest["auto"], "auto")
    assert p.total_bytes <= smallest["auto"] and p.attention_streamed > 0
    f.close()
