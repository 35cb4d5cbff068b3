"""Unit checks of the flash pieces: the neuron window cache, the I/O engine, the budget parser and planner."""

from __future__ import annotations


import numpy as np
import pytest

from flashlm.errors import BudgetError
from flashlm.flash_store.io_engine import FlashReader
from flashlm.flash_store.planner import parse_size, plan_flash
from flashlm.flash_store.residency import NeuronWindowCache


def _records(ids, width=16):
    return np.stack([np.full(width, i % 251, np.uint8) for i in ids])


def test_window_cache_reads_only_missing_and_deletes_by_moving_last_rows():
    c = NeuronWindowCache(capacity=8, record_bytes=16, n_neurons=100, window=2)
    assert list(c.missing(np.array([3, 5, 7]), step=0)) == [3, 5, 7]
    c.insert(np.array([3, 5, 7]), _records([3, 5, 7]), step=0)
    c.insert(np.array([50]), _records([50]), step=0, pin=True)
    assert list(c.missing(np.array([5, 9]), step=1)) == [9]  # 5 is cached: only 9 must be read
    c.insert(np.array([9]), _records([9]), step=1)
    assert c.evict(step=2) == 0  # before token 2, a window of 2 keeps what tokens 0 and 1 used
    assert c.evict(step=3) == 2  # before token 3: 3 and 7 unused since token 0; 50 is pinned
    assert c.num_used == 3
    live = {int(c.id_at[s]) for s in range(c.num_used)}
    assert live == {5, 9, 50}
    for s in range(c.num_used):  # every live row still holds its own neuron's record, and the map agrees
        assert c.records[s, 0] == c.id_at[s] % 251 and c.slot_of[c.id_at[s]] == s
    assert c.slot_of[3] == c.slot_of[7] == -1
    with pytest.raises(MemoryError):
        c.insert(np.arange(60, 66), _records(range(60, 66)), step=3)


def test_io_engine_reads_exact_unaligned_ranges(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 3_000_000, dtype=np.uint8)
    path = tmp_path / "blob"
    data.tofile(path)
    reader = FlashReader(str(path), threads=3, chunk_bytes=256 << 10)
    for offset, n in [(0, 4096), (123, 1_000_000), (2_999_000, 1000), (4095, 2)]:
        got = reader.read(offset, n).result()
        assert np.array_equal(got, data[offset:offset + n])
    assert reader.stats.bytes_read == 4096 + 1_000_000 + 1000 + 2
    assert reader.stats.bytes_transferred >= reader.stats.bytes_read
    with pytest.raises(Exception, match="past the end"):
        reader.read(2_999_999, 10)
    reader.close()


def test_parse_size():
    assert parse_size("150MB") == 150_000_000
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("800MiB") == 800 * 2 ** 20
    assert parse_size("123456B") == 123456
    assert parse_size("150") == 150_000_000  # no unit: MB
    for bad in ("lots", "-5MB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_planner_streams_ffn_first_then_the_head_and_refuses_the_impossible():
    common = dict(baseline=80_000_000, attention_bytes=16_000_000, head_bytes=30_000_000, n_layers=30, n_ff=1536,
                  record_bytes=1344, kv_bytes_per_token=46_080, n_ctx=512, batch_size=512, n_heads=9,
                  head_stream_bytes=11_000_000, head_rows=50_000)
    full = plan_flash(budget=None, **common)
    assert full.hot_neurons == 1536 and full.head_resident
    roomy = plan_flash(budget=full.total_bytes, **common)
    assert roomy.hot_neurons == 1536
    mid = plan_flash(budget=full.total_bytes - 30_000_000, **common)
    assert 0 < mid.hot_neurons < 1536 and mid.head_resident and mid.total_bytes <= full.total_bytes - 30_000_000
    streamed_floor = (full.baseline_bytes + 16_000_000 + full.kv_bytes + mid.scratch_bytes
                      + 2 * (1536 * 1344 + 8192) + 11_000_000)
    tight = plan_flash(budget=streamed_floor + 1_000_000, **common)
    assert not tight.head_resident and tight.total_bytes <= tight.budget_bytes
    with pytest.raises(BudgetError, match="smallest workable budget"):
        plan_flash(budget=90_000_000, **common)
    # a head too big to stay whole next to a resident FFN: the FFN stays whole, part of the head stays too
    big = dict(common, head_bytes=120_000_000, head_rows=200_000)
    whole = plan_flash(budget=None, **big)
    part = plan_flash(budget=whole.total_bytes - 80_000_000, **big)
    assert part.hot_neurons == 1536 and 0 < part.head_resident_rows < 200_000 and not part.head_resident
    assert part.head_resident_rows % 4096 == 0 and part.total_bytes <= part.budget_bytes
    assert f"{part.head_resident_rows}/200000 output rows" in part.describe()


def test_planner_streams_attention_layers_last_and_as_few_as_fit():
    common = dict(baseline=60_000_000, attention_bytes=16_800_000, head_bytes=30_000_000, n_layers=30, n_ff=48,
                  record_bytes=34_560, kv_bytes_per_token=23_040, n_ctx=256, batch_size=32, n_heads=9,
                  head_stream_bytes=10_000_000, head_rows=49_152)
    span = 560_000  # a layer's q, k, v and o in the file
    floor = plan_flash(budget=None, **common)
    no_stream = floor.baseline_bytes + 16_800_000 + floor.kv_bytes + floor.scratch_bytes + 2 * (48 * 34_560 + 8192) \
        + 10_000_000  # the smallest plan with every attention matrix resident (head streamed, no hot records)
    with pytest.raises(BudgetError, match="smallest workable budget"):
        plan_flash(budget=no_stream - 3_000_000, **common)  # attention cannot stream: refused
    p = plan_flash(budget=no_stream - 3_000_000, attention_layer_bytes=span, **common)
    assert p.attention_streamed == 8 and p.total_bytes <= p.budget_bytes  # 3 MB + two buffers of a span: 7.4 layers
    assert p.attention_streamed_bytes == 8 * span and "attention of 8/30 layers" in p.describe()
    assert plan_flash(budget=no_stream + 1_000_000, attention_layer_bytes=span, **common).attention_streamed == 0
    with pytest.raises(BudgetError, match="smallest workable budget is (\\d+) MB") as e:
        plan_flash(budget=60_000_000, attention_layer_bytes=span, **common)
    smallest = int(e.value.args[0].split("smallest workable budget is ")[1].split()[0]) * 1_000_000
    assert plan_flash(budget=smallest, attention_layer_bytes=span, **common).attention_streamed == 30
    assert -(-e.value.smallest_bytes // 1_000_000) * 1_000_000 == smallest  # the figure the message names


def test_loading_the_kernels_keeps_subnormals():
    """-ffast-math on the link line would load crtfastmath.o, setting flush-to-zero for the whole process."""
    import ctypes

    from flashlm.flash_store.head_sketch import SKETCH_SOURCE
    from flashlm.quant.bundle_kernel import build_library

    for source in (None, SKETCH_SOURCE):
        path = build_library() if source is None else build_library(source)
        if path is None:
            pytest.skip("no C compiler")
        ctypes.CDLL(path)
    assert np.float32(1e-39) * np.float32(1.0) != 0
