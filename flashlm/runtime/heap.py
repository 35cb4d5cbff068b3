"""The process heap's policy (glibc): large blocks straight from mmap while a model runs token by token, the heap
for a prompt's passes, and the freed heap handed back to the system after each.

Why both: glibc raises its mmap threshold after the first large free, and activation buffers then stay in the heap
as a high-water mark (measured: +9 MB peak RSS on SmolLM2 with a 128-token prompt), so the loader fixes the
threshold at 128 KiB. But then every array of a prompt's pass of 128 KiB or more is a fresh mapping, and each of
its pages faults in zeroed: Gemma 3's 128-token prompt took 291 ms with the threshold fixed, 149 ms with its
buffers reused from the heap (min of 10, idle AMD EPYC, 2 threads). So a pass of several tokens serves large
blocks from the heap, keeps the heap's top until it ends (M_TRIM_THRESHOLD, else each free at the top is given
back and faulted in again), and trims the heap when done (`batch_heap`). Under a memory budget too: a prompt's peak
RSS with heap blocks was the same or lower than with mapped ones (SmolLM2 .flash at 120 / 150 / 165 MB, Gemma 3 at
260 / 300 MB; 128 and 400 tokens), and its pass as fast or up to 20% faster. A decode step's arrays are under the
threshold, but for its logits (0.2-1 MB), which the executors take from `ReusedArrays`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from contextlib import contextmanager

import numpy as np

MMAP_THRESHOLD = 128 * 1024  # glibc's default before it adapts
BATCH_MMAP_THRESHOLD = 32 << 20  # during a batch: blocks up to this size come from the heap and are reused
TRIM_THRESHOLD = 128 * 1024  # glibc's default: free memory at the heap's top beyond this goes back at once
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt parameters (malloc.h)


def _load_libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_libc = _load_libc()
_lock = threading.Lock()
_batches = 0  # passes inside batch_heap now (the policy is process-wide; threads may run several models)


def release() -> None:
    """Hand the heap's free pages back to the system (malloc_trim)."""
    if _libc is not None:
        _libc.malloc_trim(0)


def fixed_mmap_threshold() -> None:
    """Serve allocations of MMAP_THRESHOLD and up with mmap, always (see the module docstring). Also M_ARENA_MAX 2:
    onnxruntime's worker threads would each keep a heap arena."""
    if _libc is not None:
        _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _libc.mallopt(M_ARENA_MAX, 2)


@contextmanager
def batch_heap(active: bool = True):
    """with batch_heap(n > 1): the pass inside reuses heap blocks for its large arrays; the heap is trimmed after."""
    global _batches
    if not active or _libc is None:
        yield
        return
    with _lock:
        _batches += 1
        if _batches == 1:  # and the top is kept until the pass ends (else every free at the top gives it back)
            _libc.mallopt(M_MMAP_THRESHOLD, BATCH_MMAP_THRESHOLD)
            _libc.mallopt(M_TRIM_THRESHOLD, 2 * BATCH_MMAP_THRESHOLD)
    try:
        yield
    finally:
        with _lock:
            _batches -= 1
            if _batches == 0:
                _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                _libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                _libc.malloc_trim(0)


def _unshared_count() -> int:
    """sys.getrefcount of an array that a list alone holds, read as ReusedArrays.get reads it: the count includes
    the interpreter's own temporary references (2 on CPython 3.11), which can differ between versions."""
    held = [np.empty(0)]
    return sys.getrefcount(held[0])


_UNSHARED = _unshared_count()


class ReusedArrays:
    """Arrays of one shape handed out again once every other holder has dropped them: a decode step's logits
    (196 KB for SmolLM2, 1 MB for Gemma 3) are over the mmap threshold, so a fresh array each token is a fresh
    mapping whose pages all fault in zeroed. Gemma 3's CPU decode (.flash, 2 threads, AMD EPYC): 123 -> 137 tok/s
    with its logits reused. An array still held (the caller kept the previous step's logits, or a view of them)
    is never handed out; when all `keep` are held, get() makes one that is not kept."""

    def __init__(self, shape: tuple[int, ...], dtype=np.float32, keep: int = 3):
        self.shape, self.dtype, self.keep = shape, dtype, keep
        self._arrays: list = []

    def get(self):
        for i in range(len(self._arrays)):
            if sys.getrefcount(self._arrays[i]) == _UNSHARED:
                return self._arrays[i]
        out = np.empty(self.shape, self.dtype)
        if len(self._arrays) < self.keep:
            self._arrays.append(out)
        return out
