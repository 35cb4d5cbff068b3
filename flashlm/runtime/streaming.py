"""The streamed FFN stage: per layer, hot neurons from the neuron cache, the rest read from flash each call.

Until a sparsity source exists every neuron is needed for every token, so each layer's cache holds its planned
hot prefix (pinned) and the cold suffix, one contiguous range of records, is read in large parallel chunks into
one of two aligned buffers; layer i+1's range is read while layer i computes. The bundle kernel is given record
addresses in stored-neuron order, so the sum it computes does not depend on which records were cached: a budget
run gives exactly the fully resident output.

A failed read (StorageError from the I/O engine) propagates out of the forward pass before any product uses the
buffer it was filling; reads still in flight are waited for first, and a pass that was interrupted (an error, a
KeyboardInterrupt) leaves no read running into a buffer the next pass uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace

import numpy as np

from flashlm.flash_store.io_engine import ALIGN, FlashReader, IOStats, aligned_buffer
from flashlm.flash_store.planner import FlashPlan, attention_names, attention_span
from flashlm.flash_store.predictor import (NeuronScorer, keep_count, page_coverage, page_runs, reads_selected, select,
                                           topk_mask)
from flashlm.flash_store.reader import FlashStore
from flashlm.flash_store.residency import NeuronWindowCache
from flashlm.quant.bundle_kernel import BLAS_MIN_TOKENS, BundleKernel, dense_ffn, rows_matvec
from flashlm.runtime.kernel_executor import AttentionWeights, RowMatrix


@dataclass
class FFNStats:
    calls: int = 0
    io_wait_s: float = 0.0  # time compute waited for reads
    compute_s: float = 0.0  # bundle kernel time
    manage_s: float = 0.0  # cache bookkeeping and read issue
    neurons_used: int = 0
    neurons_from_cache: int = 0  # hot (pinned) or held by the sliding window
    window_lookups: int = 0  # selected cold neurons looked up in the sliding window
    window_hits: int = 0  # ... and found there
    rows_moved: int = 0  # window deletions that moved the last row into a hole
    io: IOStats = field(default_factory=IOStats)

    def copy(self) -> "FFNStats":
        return replace(self, io=self.io.snapshot())

    def since(self, before: "FFNStats") -> "FFNStats":
        counters = {f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self) if f.name != "io"}
        return FFNStats(**counters, io=self.io.since(before.io))



class StreamedFFN:
    """sparsity: fraction of neurons skipped per token (0: dense); score: how they are ranked (predictor.py).
    With sparsity, a decoded token reads only the pages holding its selected cold records (no prefetch: the
    selection needs this layer's input); prompt batches read densely and mask each token's skipped neurons, so
    both compute the same sum."""

    def __init__(self, store: FlashStore, reader: FlashReader, plan: FlashPlan, kernel: BundleKernel,
                 sparsity: float = 0.0, score: str = "exact", thresholds: np.ndarray | None = None,
                 window: int = 0):
        self.store, self.reader, self.plan, self.kernel = store, reader, plan, kernel
        self.window = window  # tokens whose selected neurons stay cached (plan.window_rows records per layer)
        n_ff, rb, hot = plan.n_ff, store.record_bytes, plan.hot_neurons
        self.hot, self.n_ff, self.record_bytes = hot, n_ff, rb
        self.sparsity, self.keep = sparsity, keep_count(n_ff, sparsity)
        # per layer: keep the neurons scoring at least this (predictor.resolve_sparsity: "auto" on a ReLU FFN)
        # instead of a fixed top-k; `sparsity` is then the expected share skipped
        self.thresholds = thresholds
        self.stats = FFNStats()
        # callables observe(i, x) told each layer's FFN input before it is computed (calibration, lab tables)
        self.observers: list = []
        self.caches: list[NeuronWindowCache] = []
        # A layer wholly in memory as block records, dense: kept as its three matrices instead (format.py:
        # RecordLayout.matrices), whose row products are faster than the records' (bundle_kernel_i8.c)
        self.dense: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = \
            [] if hot == n_ff and sparsity == 0 and store.layout.group > 1 else None
        gate_rows, up_rows = self._load_hot_sets(score if sparsity > 0 and score != "predictor" else None)
        predictor = [store.predictor(i) for i in range(len(store.layers))] \
            if sparsity > 0 and score == "predictor" else None
        self.page_coverage = page_coverage(sparsity, rb, reader.read_unit)
        self.read_selected = reads_selected(sparsity, rb, reader.read_unit)
        self.scorer = NeuronScorer(score, gate_rows, up_rows, store.layout.gate_type, store.layout.up_type,
                                   kernel.activation, predictor) if sparsity > 0 else None
        self.stats.io = reader.stats  # the reader's live counters (per-token traffic from here on)
        cold = n_ff - hot
        self.buffers = [aligned_buffer(cold * rb + 2 * ALIGN) for _ in range(2)] if cold else []
        # Record addresses per layer and buffer parity, in stored order: hot from the cache, cold from the buffer.
        self.addresses: list[list[np.ndarray]] = []
        lead = [self._lead(i) for i in range(len(store.layers))]
        for i, cache in enumerate(self.caches):
            hot_addr = cache.base_address + np.arange(hot, dtype=np.uint64) * np.uint64(rb)
            per_parity = []
            for buf in self.buffers or [None]:
                if buf is None:
                    per_parity.append(hot_addr)
                else:
                    cold_addr = buf.ctypes.data + lead[i] + np.arange(cold, dtype=np.uint64) * np.uint64(rb)
                    per_parity.append(np.concatenate([hot_addr, cold_addr.astype(np.uint64)]))
            self.addresses.append(per_parity)
        self._pending: dict[int, object] = {}
        self._token_wise = False
        self._steps = np.zeros(len(store.layers), np.int64)  # tokens each layer has seen (the window's clock)
        self.n_layers = len(store.layers)

    def _lead(self, i: int) -> int:
        start = self.store.layers[i].offset + self.hot * self.record_bytes
        return start - start // ALIGN * ALIGN

    def _load_hot_sets(self, score: str | None) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Read each layer's bundle once (checking its CRC) and keep the hot prefix in the layer's cache.
        Returns the rows a sparsity `score` keeps resident (stored order): gate rows, and up rows for "exact"."""
        rb, n_ff, hot = self.record_bytes, self.plan.n_ff, self.hot
        g, u, _ = self.store.layout.slices()
        gate_rows: list[np.ndarray] = []
        up_rows = [] if score == "exact" else None
        scratch = aligned_buffer(n_ff * rb + 2 * ALIGN)
        for i, layer in enumerate(self.store.layers):
            records = self.reader.read(layer.offset, n_ff * rb, scratch).result()
            self.store.check_layer(i, records)
            if score is not None:
                gate_rows.append(np.ascontiguousarray(records.reshape(n_ff, rb)[:, g]))
            if up_rows is not None:
                up_rows.append(np.ascontiguousarray(records.reshape(n_ff, rb)[:, u]))
            if self.dense is not None:
                self.dense.append(self.store.layout.matrices(records.reshape(n_ff, rb)))
                continue
            # the pinned hot prefix, and room for the sliding window's records
            cache = NeuronWindowCache(hot + self.plan.window_rows, rb, n_ff, self.window)
            if hot:
                cache.insert(np.arange(hot), records[: hot * rb].reshape(hot, rb), step=0, pin=True)
            self.caches.append(cache)
        self.reader.stats.restore()  # load-time reads are not per-token traffic
        del scratch
        return gate_rows, up_rows

    def _issue(self, i: int) -> None:
        if self.hot < self.n_ff and i < self.n_layers and i not in self._pending:
            start = self.store.layers[i].offset + self.hot * self.record_bytes
            self._pending[i] = self.reader.read_ahead(start, (self.n_ff - self.hot) * self.record_bytes,
                                                self.buffers[i % 2])

    def _drain(self) -> None:
        """Wait for every read in flight (an interrupted pass leaves the next layer's read, or head slices, going
        into buffers the next pass fills again); a failed one has made the reader refuse further reads."""
        self._pending.clear()
        self.reader.drain()

    def begin(self, n_tokens: int = 1) -> None:
        """A forward pass starts: get layer 0's cold range coming, unless this pass goes token by token sparsely
        (decode, short prompts): a sparse step reads after selecting."""
        self._drain()
        self._token_wise = self.read_selected and n_tokens < BLAS_MIN_TOKENS
        if not self._token_wise:
            self._issue(0)

    def run(self, i: int, x: np.ndarray, y: np.ndarray) -> None:
        """y (S, d) += FFN_i(x (S, d)); both float32 C-contiguous."""
        for observe in self.observers:
            observe(i, x)
        if self._token_wise:
            for s in range(x.shape[0]):
                self._run_sparse(i, x[s:s + 1], y[s:s + 1])
            return
        t0 = time.perf_counter()
        if i in self._pending:
            try:
                self._pending.pop(i).result()
            except BaseException:
                self._drain()
                raise
        t1 = time.perf_counter()
        if self.dense is not None:
            L = self.store.layout
            gate, up, down = self.dense[i]
            dense_ffn(self.kernel, gate, L.gate_type, up, L.up_type, down, L.down_type, x, y)
            self._count(t1 - t0, 0.0, time.perf_counter() - t1, self.n_ff, self.n_ff)
            return
        # One layer ahead: reading further ahead measured no faster under a budget, and each layer's buffer costs
        # resident neurons (docs/RESULTS.md).
        self._issue(i + 1)
        addresses = self.addresses[i][i % 2 if self.buffers else 0]
        if self.sparsity == 0:
            t2 = time.perf_counter()
            self.kernel.run(addresses, x, y)
            self._count(t1 - t0, t2 - t1, time.perf_counter() - t2, self.n_ff, self.hot)
            return
        scores = self.scorer.scores(self.kernel, i, x)
        if x.shape[0] >= BLAS_MIN_TOKENS:  # one masked product over the batch
            mask = self._mask(i, scores)
            t2 = time.perf_counter()
            self.kernel.run(addresses, x, y, mask=mask)
            self._count(t1 - t0, t2 - t1, time.perf_counter() - t2, self.n_ff, self.hot)
            return
        picks = [self._pick(i, row) for row in scores]  # token by token over each one's selection
        t2 = time.perf_counter()
        for s, pick in enumerate(picks):
            if len(pick):
                self.kernel.run(addresses[pick], x[s:s + 1], y[s:s + 1])
        self._count(t1 - t0, t2 - t1, time.perf_counter() - t2, sum(map(len, picks)) // len(picks),
                    sum(int(np.searchsorted(p, self.hot)) for p in picks) // len(picks))

    def _pick(self, i: int, scores: np.ndarray) -> np.ndarray:
        """One token's selected neurons of layer i, ascending."""
        if self.thresholds is None:
            return select(scores, self.keep)
        return np.flatnonzero(scores >= self.thresholds[i])

    def _mask(self, i: int, scores: np.ndarray) -> np.ndarray:
        """(S, n) bool: each token's selected neurons of layer i."""
        if self.thresholds is None:
            return topk_mask(scores, self.keep)
        return scores >= self.thresholds[i]

    def _count(self, io_wait_s: float, manage_s: float, compute_s: float, used: int, cached: int) -> None:
        st = self.stats
        st.calls += 1
        st.io_wait_s += io_wait_s
        st.manage_s += manage_s
        st.compute_s += compute_s
        st.neurons_used += used
        st.neurons_from_cache += cached

    def _run_sparse(self, i: int, x: np.ndarray, y: np.ndarray) -> None:
        """One token: score, select, read the pages holding the selected cold records that are not cached,
        compute the selected ones only."""
        t0 = time.perf_counter()
        idx = self._pick(i, self.scorer.scores(self.kernel, i, x)[0])
        n_hot = int(np.searchsorted(idx, self.hot))
        addresses = self.addresses[i][0][idx]  # buffer-0 addresses: hot from the cache, cold where a read lands
        read = idx[n_hot:]
        if self.window:
            read = self._from_window(i, read, addresses[n_hot:])
        t1 = time.perf_counter()
        self._read_cold(i, read)
        if self.window:
            self._keep_in_window(i, read)
        t2 = time.perf_counter()
        if len(idx):
            self.kernel.run(addresses, x, y)
        self._count(t2 - t1, t1 - t0, time.perf_counter() - t2, len(idx), len(idx) - len(read))

    def _read_cold(self, i: int, ids: np.ndarray) -> None:
        """Read the sectors (pages without O_DIRECT) holding records `ids` (cold, ascending) where a full cold-range
        read into buffer 0 would put them."""
        if not len(ids):
            return
        hot, rb, lead = self.hot, self.record_bytes, self._lead(i)
        rel = lead + (ids - hot) * rb
        base = self.store.layers[i].offset + hot * rb - lead  # aligned file offset of buffer byte 0
        self.reader.read_runs(base, page_runs(rel, rb, self.reader.read_unit), self.buffers[0])

    def _from_window(self, i: int, cold: np.ndarray, addresses: np.ndarray) -> np.ndarray:
        """A token of layer i: drop what the last `window` tokens did not use, point the selected cold records the
        window holds at their cache rows (addresses, in place), and return the ones that must be read."""
        cache, moved = self.caches[i], self.caches[i].rows_moved
        self._steps[i] += 1
        cache.evict(int(self._steps[i]))  # before the lookup: deleting moves rows
        slots = cache.lookup(cold, int(self._steps[i]))
        held = slots >= 0
        st = self.stats
        st.window_lookups, st.window_hits = st.window_lookups + len(cold), st.window_hits + int(held.sum())
        st.rows_moved += cache.rows_moved - moved
        addresses[held] = cache.base_address + slots[held].astype(np.uint64) * np.uint64(self.record_bytes)
        return cold[~held]

    def _keep_in_window(self, i: int, read: np.ndarray) -> None:
        """Copy the records just read (computed from the read buffer this time) into the window, as many as it has
        room for; appended rows, so the slots found by the lookup stay valid."""
        cache, step = self.caches[i], int(self._steps[i])
        n = min(len(read), cache.room())
        if n:
            rb, lead = self.record_bytes, self._lead(i)
            cache.insert(read[:n], self.buffers[0][lead:lead + (self.n_ff - self.hot) * rb].reshape(-1, rb)[
                read[:n] - self.hot], step)

    def close(self) -> None:
        self._drain()
        self.reader.close()


class StreamedHead:
    """The output matrix of a flash store, computed by the bundle kernel from its quantized rows (the final norm's
    weight is kept here as `output_norm`; the executor applies it). Its first `resident_rows` rows are read once at load; the rest are read each call
    in slices, `depth` of them in flight, each multiplied as it arrives while the next ones are read (the resident
    rows are computed while the first slices are on their way). Either way the arithmetic is the same, so
    streaming the head does not change the logits."""

    def __init__(self, reader: FlashReader, kernel: BundleKernel, offset: int, n_rows: int, row_bytes: int, qtype,
                 output_norm: np.ndarray, resident_rows: int | bool, slice_rows: int = 4096,
                 depth: int = 2):
        self.reader, self.kernel, self.offset = reader, kernel, offset
        self.n_rows, self.row_bytes, self.qtype = n_rows, row_bytes, qtype
        self.output_norm = output_norm.astype(np.float32)
        r = n_rows if resident_rows is True else min(n_rows, int(resident_rows))
        self.resident_rows = r
        self.bounds = list(range(r, n_rows, slice_rows)) + [n_rows]
        self.io_wait_s = 0.0
        self.resident = r >= n_rows
        self.rows = None
        if r:
            before = reader.stats.snapshot()
            self.rows = reader.read(offset, r * row_bytes).result().reshape(r, row_bytes)
            reader.stats.restore(before)  # load-time reads are not per-token traffic
        n_slices = len(self.bounds) - 1
        self.buffers = [aligned_buffer(slice_rows * row_bytes + 2 * ALIGN) for _ in range(min(depth, n_slices))]

    def _issue(self, k: int):
        lo, hi = self.bounds[k], self.bounds[k + 1]
        buf = self.buffers[k % len(self.buffers)]
        return self.reader.read(self.offset + lo * self.row_bytes, (hi - lo) * self.row_bytes, buf)

    def run(self, normed: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        """normed (S, d) hidden states after the final norm, rows (R,) positions to produce, out (R, n_rows)."""
        x = np.ascontiguousarray(normed[rows], dtype=np.float32)
        n_slices = len(self.bounds) - 1
        pending = []
        try:
            for k in range(min(len(self.buffers), n_slices)):
                pending.append(self._issue(k))
            if self.rows is not None:
                rows_matvec(self.kernel, self.rows, self.qtype, x, out[:, :self.resident_rows])
            for k in range(n_slices):
                lo, hi = self.bounds[k], self.bounds[k + 1]
                t = time.perf_counter()
                data = pending[k].result().reshape(hi - lo, self.row_bytes)
                self.io_wait_s += time.perf_counter() - t
                rows_matvec(self.kernel, data, self.qtype, x, out[:, lo:hi])
                if k + len(self.buffers) < n_slices:  # its buffer is free again
                    pending.append(self._issue(k + len(self.buffers)))
        except BaseException:
            self.reader.drain()  # no slice still being read into a buffer the next call reuses
            raise


class StreamedAttention:
    """The attention matrices of the layers a budget cannot keep (plan.attention_streamed, the last ones): each
    forward pass reads a layer's q, k, v and o (one span of the file, planner.attention_span) into one of two
    buffers; handing out layer i's weights issues the next streamed layer's read into the other buffer, so it
    arrives while layer i and its FFN compute. The rows are used as stored, as resident ones are: the same
    products, whatever streams."""

    def __init__(self, reader: FlashReader, f, family, layers: list[int], norms: dict[int, dict],
                 biases: dict[int, dict]):
        self.reader, self.order = reader, layers
        self.io_wait_s = 0.0
        self.spans, self.parts = {}, {}
        for i in layers:
            start, end = self.spans[i] = attention_span(f, family, i)
            self.parts[i] = [(f.tensors[n].offset - start, f.tensors[n].nbytes, f.tensors[n].shape[0],
                              f.tensors[n].ggml_type, biases[i].get(key)) for n, key in
                             zip(attention_names(family, i), ("q", "k", "v", "o"))]
        self.norms = norms
        size = max((end - start for start, end in self.spans.values()), default=0)
        self.buffers = [aligned_buffer(size + 2 * ALIGN) for _ in range(2 if layers else 0)]
        self._pending: dict[int, object] = {}

    def _issue(self, k: int) -> None:
        if k < len(self.order):
            i = self.order[k]
            start, end = self.spans[i]
            self._pending[i] = self.reader.read(start, end - start, self.buffers[k % 2])

    def begin(self) -> None:
        """A forward pass starts: the first streamed layer's read is issued."""
        if self._pending:  # an interrupted pass: no read may still be filling a buffer
            self.reader.drain()
            self._pending.clear()
        self._issue(0)

    def weights(self, i: int):
        """Layer i's AttentionWeights, views into the buffer its read filled (valid until the read two streamed
        layers on reuses it)."""
        t = time.perf_counter()
        try:
            data = self._pending.pop(i).result()
        except BaseException:
            self.reader.drain()
            self._pending.clear()
            raise
        self.io_wait_s += time.perf_counter() - t
        self._issue(self.order.index(i) + 1)
        q, k, v, o = (RowMatrix(data[a:a + n].reshape(rows, -1), qtype, bias)
                      for a, n, rows, qtype, bias in self.parts[i])
        return AttentionWeights([q, k, v], o, self.norms[i])


@dataclass
class FlashTimings:
    """Streaming figures for one generation (the paper's Table 3 split), attached to its last response."""

    tokens: int  # forward passes counted (prompt batches count once, as their reads are shared)
    bytes_read: int
    reads: int
    io_s: float  # summed wall time of the read requests (issue to last byte)
    io_wait_ms: float
    manage_ms: float
    compute_ms: float  # FFN (bundle kernel)
    other_ms: float  # everything else in the forward passes (attention, head, Python)
    hit_rate: float
    hot_neurons: int  # neurons (not records) per layer
    used_fraction: float = 1.0  # FFN neurons computed per token / n_ff (below 1 with --sparsity)
    window_hit_rate: float | None = None  # --window: selected cold neurons found in the sliding window
    rows_moved: int = 0  # --window: rows moved by the window's deletions


def flash_timings(ffn: StreamedFFN, head: StreamedHead | None, before: FFNStats, head_wait_before: float,
                  forward_ms: float) -> FlashTimings:
    d = ffn.stats.since(before)
    head_wait = (head.io_wait_s - head_wait_before) if head is not None else 0.0
    tokens = d.calls // max(1, ffn.n_layers)
    io_wait_ms = (d.io_wait_s + head_wait) * 1e3
    accounted = io_wait_ms + d.manage_s * 1e3 + d.compute_s * 1e3
    return FlashTimings(tokens, d.io.bytes_read, d.io.reads, d.io.request_s, io_wait_ms, d.manage_s * 1e3,
                        d.compute_s * 1e3, max(0.0, forward_ms - accounted),
                        d.neurons_from_cache / d.neurons_used if d.neurons_used else 0.0, ffn.hot * ffn.plan.group,
                        d.neurons_used / (d.calls * ffn.n_ff) if d.calls else 1.0,
                        d.window_hits / d.window_lookups if d.window_lookups else None, d.rows_moved)
