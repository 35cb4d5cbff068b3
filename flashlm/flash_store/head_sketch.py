"""An output head that does not read the whole vocabulary matrix per token: a resident sign sketch picks candidates,
their exact rows (cached, else read from flash) give their exact logits.

Why: Gemma 3's tied output matrix is 262,144 x 640 (178 MB as Q8_0, 70% of the file) and every token needs all of
it. Under a budget that cannot hold it, streaming it costs 178 MB of reads per token, more than llama.cpp's mmap
pays. The sketch (1 bit per weight plus a scale per row, and the input's 64 outlier dimensions as int8 columns:
39 MB) ranks all rows; the top `candidates` are computed
exactly from their quantized rows, which live in an LRU cache of `cache_rows` rows (the rows a text needs recur:
a hot set of 16k rows covers ~89% of the candidates of 256-candidate selections, measured on the GPL text).

Measured offline on Gemma 3 270M, 1,500 GPL tokens (hidden states recovered from the model's logits): the true
top-1 token is among the sketch's top 128 / 256 / 512 rows at 99.2% / 99.7% / 100% of positions (sign bits alone:
93.6% / 96.5% / 98.7%). Alternatives measured: a 2-bit copy (52 MB) 99.5% at 256; k-means clusters of rows (1024 or 4096 centroids,
contiguous reads) only 87-94% at 1.5-6 MB of reads; a rank-128 projection 62% at 256. Logits outside the candidates
are the sketch's estimates (mapped by a line fitted per token on the candidates' exact logits, kept below the best
candidate), so perplexity and log-probabilities see an approximation there (greedy decoding and top-k sampling
with k <= candidates only see candidates); the fidelity cost is printed by
`python -m labs.head_fidelity` (README, "Output head").

Not bit-exact: greedy output equals the exact head's when the exact top-1 is a candidate (the rates above).
"""

from __future__ import annotations

import ctypes
import os
import time

import numpy as np

from flashlm.quant.bundle_kernel import address, rows_matvec
from flashlm.quant.formats import dequantize
from flashlm.flash_store.io_engine import ALIGN, FlashReader, aligned_buffer
from flashlm.flash_store.residency import LRURowCache

DEFAULT_CANDIDATES = 512
DEFAULT_CACHE_ROWS = 16384
# Where the FFN streams, the planner gives the sketch this smaller row cache and the difference to FFN records
# (flash_loader.plan_for). SmolLM2 block store, 3 interleaved runs, 16,384 -> 4,096 rows: 120 MB 13.7-17.0 ->
# 14.4-19.5 tok/s (reads 47.8 -> 39.5 MB, 202 -> 251 per token), 135 MB 21.2-23.6 -> 22.7-25.8 (31.2 -> 22.9 MB).
STREAMING_CACHE_ROWS = 4096
SKETCH_SOURCE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "quant", "sketch_kernel.c")


BUILD_SLICE_ROWS = 1024
# Input dimensions kept as int8 in the sketch (d_model - OUTLIER_DIMS must be a multiple of 16). Measured on Gemma 3,
# 4 prompts x 48 greedy tokens (outliers found on each short prompt): the greedy token missed the 512 candidates
# 1/192 times with 32 dimensions, 0/192 with 64 (1,024 candidates did not help 32).
OUTLIER_DIMS = 64
READ_RANK = 128  # uncached candidates below this rank by score keep their estimate (SketchHead._worth_reading)
SAMPLE_STRIDE = 8  # the candidates' score threshold is placed on every SAMPLE_STRIDE-th score (_top)
GATHER_ROWS = 2  # candidates' rows gathered per token, in units of `candidates` (_top's count varies around it)


def sketch_bytes(n_rows: int, d_model: int, row_bytes: int, cache_rows: int = DEFAULT_CACHE_ROWS) -> int:
    """Memory of a SketchHead: sign bits, int8 outlier columns and scales, the exact-row cache, its maps."""
    cache_rows = min(cache_rows, n_rows)
    return (n_rows * ((d_model - OUTLIER_DIMS) // 8 + OUTLIER_DIMS + 4 + 4 + 4) + cache_rows * (row_bytes + 16)
            + GATHER_ROWS * DEFAULT_CANDIDATES * row_bytes)


class _SketchKernel:
    def __init__(self):
        from flashlm.quant.bundle_kernel import build_library

        path = build_library(SKETCH_SOURCE)
        self.fn = None
        if path is not None:
            lib = ctypes.CDLL(path)
            lib.sign_scores.restype = ctypes.c_int
            lib.sign_scores.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_int]
            self.fn = lib.sign_scores

    def scores(self, h: "SketchHead", x: np.ndarray, out: np.ndarray, threads: int) -> None:
        """x: the input with the outlier dimensions moved to its end (SketchHead._split)."""
        n_out = h.q8.shape[1]
        d = x.shape[0] - n_out
        if self.fn is not None and self.fn(address(h.bits), address(h.scale), address(h.q8),
                                           address(h.s8), n_out, len(h.scale), d, address(x),
                                           address(out), threads) == 0:
            return
        signs = np.unpackbits(h.bits, axis=1, bitorder="little").astype(np.float32) * 2 - 1  # numpy fallback
        np.multiply(signs @ x[:d], h.scale, out=out)
        out += (h.q8.astype(np.float32) @ x[d:]) * h.s8


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope and intercept of y on x (np.polyfit(x, y, 1) took 0.22 ms a token, this ~0.02)."""
    xm, ym = x.mean(), y.mean()
    dx = x - xm
    var = float(dx @ dx)
    a = float(dx @ (y - ym)) / var if var > 0 else 0.0
    return a, float(ym - a * xm)


class SketchHead:
    """An OutputHead (runtime/kernel_executor.py) as StreamedHead is: run(normed, rows, out), io_wait_s."""

    def __init__(self, reader: FlashReader, kernel, offset: int, n_rows: int, row_bytes: int, qtype,
                 output_norm: np.ndarray, d_model: int, candidates: int = DEFAULT_CANDIDATES,
                 cache_rows: int = DEFAULT_CACHE_ROWS, slice_rows: int = 4096):
        self.reader, self.kernel, self.offset = reader, kernel, offset
        self.n_rows, self.row_bytes, self.qtype = n_rows, row_bytes, qtype
        self.output_norm = output_norm.astype(np.float32)  # applied by the executor before run()
        self.candidates = min(candidates, n_rows)
        self.read_rank = min(READ_RANK, self.candidates)
        self.d_model, self.slice_rows = d_model, slice_rows
        self.io_wait_s = 0.0
        self.outliers: np.ndarray | None = None  # chosen on the first call (see _build)
        self.set_cache_rows(cache_rows)
        self._scores = np.empty(n_rows, np.float32)
        # _top's threshold sample and mask, kept: fresh arrays of these sizes are new mappings each token
        # (Gemma 3's 262,144 rows: 98 page faults a token)
        self._sample = np.empty(len(range(0, n_rows, SAMPLE_STRIDE)), np.float32)
        self._above = np.empty(n_rows, bool)
        self._gather = np.empty((GATHER_ROWS * self.candidates, row_bytes), np.uint8)
        self._sketch = _SketchKernel()
        self.record: list | None = None  # set to a list to collect each position's candidate ids (fidelity tool)

    def set_cache_rows(self, cache_rows: int) -> None:
        """(Re)allocate an empty exact-row cache of this many rows (at least the candidates of one token)."""
        self.cache_rows = max(self.candidates, min(cache_rows, self.n_rows))
        self.cache = LRURowCache(self.cache_rows, self.row_bytes, self.n_rows)
        self.clock = 0

    def _build(self, x: np.ndarray) -> None:
        """One pass over the matrix, on the first call. The input's outlier dimensions (a few carry most of its
        energy: on Gemma 3, 6 of 640 dimensions have 10-20x the median RMS) decide what the sketch gets wrong, so
        they are found on this first input (all its positions: the prompt) and kept as int8 columns; the rest
        become sign bits. Measured offline (1,500 GPL tokens): the true top-1 among 512 / 256 / 128 candidates
        98.7% / 96.5% / 93.6% of the time with sign bits only, 100% / 99.7% / 99.2% with 32 int8 dimensions,
        100% / 99.9% with 64. The same pass fills the exact-row cache with the first rows: BPE and SentencePiece
        vocabularies number frequent tokens first, and SmolLM2's 16,384 first rows cut the rows read per token
        from 89 (an empty cache) to 28 over 64 greedy tokens after a GPL-3 prompt, 55 after a chat prompt."""
        d, n = self.d_model, self.n_rows
        k = min(OUTLIER_DIMS, d - 16) // 16 * 16 if d % 16 == 0 else 0
        # the median over positions: a prompt's first position (BOS, an attention sink) has its own huge dimensions
        self.outliers = np.sort(np.argsort(-np.median(x * x, axis=0))[:k])
        self.rest = np.setdiff1d(np.arange(d), self.outliers)
        self.bits = np.empty((n, len(self.rest) // 8), np.uint8)
        self.scale = np.empty(n, np.float32)
        self.q8 = np.empty((n, k), np.int8)
        self.s8 = np.empty(n, np.float32)
        step = BUILD_SLICE_ROWS  # small slices: the float32 copies of a slice are this pass's transient memory
        buf = aligned_buffer(step * self.row_bytes + 2 * ALIGN)
        before = self.reader.stats.snapshot()
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            data = self.reader.read(self.offset + lo * self.row_bytes, (hi - lo) * self.row_bytes, buf).result()
            w = dequantize(data.reshape(hi - lo, self.row_bytes), self.qtype).reshape(hi - lo, d)
            rest, out = w[:, self.rest], w[:, self.outliers]
            self.bits[lo:hi] = np.packbits(rest > 0, axis=1, bitorder="little")
            self.scale[lo:hi] = np.abs(rest).mean(1)
            s8 = np.maximum(np.abs(out).max(1), 1e-30) / 127
            self.q8[lo:hi] = np.round(out / s8[:, None])
            self.s8[lo:hi] = s8
            if lo < self.cache.capacity:  # the cache starts with the vocabulary's first rows (see above), aged by
                keep = min(hi, self.cache.capacity) - lo  # id: the rarer of two unused rows leaves first
                ids = np.arange(lo, lo + keep)
                self.cache.insert(ids, data.reshape(hi - lo, self.row_bytes)[:keep], step=-ids)
        self.reader.stats.restore(before)  # a one-time pass, not per-token traffic

    def _split(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.concatenate([x[self.rest], x[self.outliers]]), dtype=np.float32)

    def _rows_for(self, cand: np.ndarray) -> np.ndarray:
        """Cache slots holding the candidates' rows, reading the missing ones (least recently used slots go)."""
        self.clock += 1
        t, before = time.perf_counter(), self.cache.rows_read
        slots = self.cache.slots_for(cand, self.clock, self._read_rows)
        if self.cache.rows_read > before:
            self.io_wait_s += time.perf_counter() - t
        return slots

    def _read_rows(self, ids: np.ndarray, into: list[np.ndarray]) -> None:
        self.reader.read_rows(self.offset + ids.astype(np.int64) * self.row_bytes, self.row_bytes, into)

    @property
    def rows_read(self) -> int:
        return self.cache.rows_read

    def run(self, normed: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        """normed (S, d) hidden states after the final norm, rows (R,) positions to produce, out (R, n_rows)."""
        x = np.ascontiguousarray(normed[rows], dtype=np.float32)
        if self.outliers is None:
            self._build(normed.astype(np.float32))
        for r in range(x.shape[0]):
            self._sketch.scores(self, self._split(x[r]), self._scores, self.kernel.threads)
            cand = self._top(self._scores)
            cand = cand[self._worth_reading(cand)]  # the cached candidates, and the uncached ones near the top
            if self.record is not None:
                self.record.append(cand.copy())
            exact = self._exact(self._rows_for(cand), x[r:r + 1])
            # The other rows get the sketch's estimate mapped onto the logit scale by a line fitted on this
            # token's candidates (whose exact logits are known), capped below the best candidate so the argmax is
            # always an exact logit. Measured offline (513 GPL tokens), perplexity over the exact head's: 1.22
            # with this line, 1.43 capped at the lowest candidate, 1.16-1.30 fitted on random probe rows.
            a, b = _line(self._scores[cand].astype(np.float64), exact.astype(np.float64))
            np.multiply(self._scores, np.float32(a), out=out[r])
            out[r] += np.float32(b)
            np.minimum(out[r], np.nextafter(exact.max(), -np.inf), out=out[r])
            out[r, cand] = exact

    def _worth_reading(self, cand: np.ndarray) -> np.ndarray:
        """Which candidates get exact logits: the cached ones, and the uncached among the top `read_rank` by
        score. Each uncached row is a random read of ~27 us on this disk (they queue: 10 rows 0.30 ms, 30 rows
        0.83 ms), and the sketch's top ranks are where the argmax is. SmolLM2, `python -m labs.head_fidelity`
        (513 GPL tokens, 16,384 cached rows), reading the top 128 / 256 / all 512: top-1 agreement with the exact
        head 0.9961 / 0.9980 / 0.9980, perplexity ratio 1.128 / 1.109 / 1.107, greedy 64/64 on three prompts
        each; rows read in a 63-token run at 170 MB 493 / 1,012 / 1,940."""
        cached = self.cache.slot_of[cand] >= 0
        if len(cand) <= self.read_rank:
            return np.ones(len(cand), bool)
        s = self._scores[cand]
        return cached | (s >= np.partition(s, len(s) - self.read_rank)[len(s) - self.read_rank])

    def _top(self, scores: np.ndarray) -> np.ndarray:
        """About `candidates` rows with the highest scores: those at or above a threshold taken from every
        SAMPLE_STRIDE-th score (np.argpartition over all rows took 0.6 ms a token on SmolLM2's 49,152)."""
        k, n = self.candidates, self.n_rows
        if k < 16 * SAMPLE_STRIDE or 4 * k > n:  # too few sampled scores above the threshold to place it
            return np.argpartition(scores, n - k)[n - k:]
        sample = self._sample
        np.copyto(sample, scores[::SAMPLE_STRIDE])
        j = len(sample) - max(1, k // SAMPLE_STRIDE)
        sample.partition(j)
        cand = np.flatnonzero(np.greater_equal(scores, sample[j], out=self._above))
        return cand if len(cand) <= self.cache_rows else np.argpartition(scores, n - k)[n - k:]

    def _exact(self, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Exact logits of the cached rows in `slots`, gathered into a buffer kept for it (a fresh array of this
        size is a new mapping under a budget: 64 page faults a token on SmolLM2)."""
        out = np.empty((1, len(slots)), np.float32)
        if len(slots):
            gather = self._gather[:len(slots)]  # (mode "clip": np.take writes into `out` without a buffered copy)
            rows = (np.take(self.cache.records, slots, axis=0, out=gather, mode="clip")
                    if len(slots) <= len(self._gather) else self.cache.records[slots])
            rows_matvec(self.kernel, rows, self.qtype, x, out)
        return out[0]
