"""runtime/heap.py: arrays reused across decode steps, never while anyone still holds them."""

from __future__ import annotations

import numpy as np
import pytest

from flashlm.runtime.heap import ReusedArrays


def test_a_held_array_is_never_handed_out():
    pool = ReusedArrays((2, 3), keep=2)
    a = pool.get()
    b = pool.get()
    assert a is not b
    view = a[0]
    del a
    c = pool.get()  # the first is still held through a view; both kept ones are held: a new one, not kept
    assert c is not b and c.base is None and view.base is not c and len(pool._arrays) == 2
    del view, c
    d = pool.get()
    assert d is pool._arrays[0] and d.shape == (2, 3) and d.dtype == np.float32


@pytest.mark.parametrize("which", ["gguf", "flash"])
def test_held_logits_survive_the_next_steps(which, model, resident):
    """On SmolLM2 (the GGUF's and the flash store's CPU executors): logits the caller keeps are not overwritten
    by later steps, and once dropped, their array serves a later step (no fresh mapping)."""
    m = model if which == "gguf" else resident
    engine = m._loaded.engine
    with engine.lock:
        engine.reset()
    first = engine.prefill([1, 504, 3, 907])
    kept = [(first, first.copy())]
    for token in (42, 7, 1000, 13):
        logits = engine.step(token)
        kept.append((logits, logits.copy()))
    assert len({id(a) for a, _ in kept}) == len(kept)  # each held array is a different one
    for a, before in kept:
        assert np.array_equal(a, before)
    pooled = {id(a) for a in engine.executor.step_logits._arrays}
    assert pooled and pooled <= {id(a) for a, _ in kept}
    del kept, first, logits, a
    assert id(engine.step(5)) in pooled
