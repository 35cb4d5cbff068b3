"""The CUDA backend's FFN: flash -> pinned host buffers -> GPU, in three tiers per layer, in stored (hot-first)
neuron order:
  [0, gpu_hot)          records resident in GPU memory (read once at load);
  [gpu_hot, host_hot)   records resident in pinned host memory, copied to the GPU each token (asynchronously);
  [host_hot, n_ff)      records read from flash each token (O_DIRECT, the I/O engine's threads) into pinned
                        buffers, layer i+1's read issued while layer i computes, then copied to the GPU.
The planner (flash_store/planner.py: gpu_plan_for) sets the tier bounds; cuda_executor.py runs the rest of the model.
`naive=True` (the paper's baseline) keeps nothing of the FFN resident: every record is read and copied each token.
"""

from __future__ import annotations

import time
import weakref

import numpy as np

from flashlm.flash_store.io_engine import ALIGN, FlashReader, aligned_buffer
from flashlm.flash_store.planner import GpuPlan
from flashlm.quant.cuda_kernels import MAX_S, CudaKernels, GpuRecords
from flashlm.runtime.streaming import FFNStats


def _recorded(cp):
    """A CUDA event recorded now on the current stream."""
    event = cp.cuda.Event()
    event.record()
    return event


class GpuFFN:
    """The tiered FFN (module docstring). Same stats interface as runtime/streaming.StreamedFFN."""

    def __init__(self, cp, kernels: CudaKernels, store, reader: FlashReader, plan: GpuPlan, activation: str):
        self.cp, self.kernels, self.store, self.reader, self.plan = cp, kernels, store, reader, plan
        self.layout, self.activation = store.layout, activation
        n_ff, rb = plan.n_ff, plan.record_bytes
        self.n_ff, self.rb, self.n_layers = n_ff, rb, len(store.layers)
        self.gpu_hot, self.host_hot = plan.gpu_hot, plan.host_hot
        self.hot = self.host_hot  # resident somewhere (GPU or pinned host), as the stats report "hot neurons"
        self.stats = FFNStats()
        self.gpu_records, self.host_records = [], []
        scratch = aligned_buffer(n_ff * rb + 2 * ALIGN)
        before = reader.stats.snapshot()
        for i, layer in enumerate(store.layers):
            records = reader.read(layer.offset, n_ff * rb, scratch).result()
            store.check_layer(i, records)
            self.gpu_records.append(kernels.upload_records(records[:self.gpu_hot * rb], self.layout)
                                    if self.gpu_hot else None)
            warm = (self.host_hot - self.gpu_hot) * rb
            if warm:
                buf = self._pinned(warm)[:warm]
                buf[:] = records[self.gpu_hot * rb:self.host_hot * rb]
                self.host_records.append(buf)
            else:
                self.host_records.append(None)
        reader.stats.restore(before)
        del scratch
        self.stats.io = reader.stats
        rest = n_ff - self.gpu_hot
        cold = n_ff - self.host_hot
        # non-resident records land as stored (two buffers: layer i + 1's copies run while layer i computes),
        # then go planar for the kernels; copies on their own stream (non-blocking: it does not wait for the
        # compute stream's work, nor that for it, except through the events below)
        self.landing = [cp.empty(rest * rb, cp.uint8) if rest else None for _ in range(2)]
        self.stage = cp.empty(rest * GpuRecords.of(self.layout).record_bytes, cp.uint8) if rest else None
        self.copy_stream = cp.cuda.Stream(non_blocking=True)
        self.landed = [None, None]  # events: landing buffer k converted (free for the copies of layer k + 2)
        self.read_bufs = [self._pinned(cold * rb + 2 * ALIGN) for _ in range(2)] if cold else []
        self.copied = [None, None]  # events: the copy out of read buffer k has finished
        self._pending: dict[int, object] = {}
        # activations of up to MAX_S tokens, one per neuron (bundle calls go by MAX_S)
        self.h = cp.empty(MAX_S * n_ff * plan.group, cp.float32)
        self.warm_bytes = (self.host_hot - self.gpu_hot) * rb
        # GPU-side split, from CUDA events per layer: host->GPU copies and the FFN kernels (collect() sums them)
        self.transfer_s = self.gpu_ffn_s = 0.0
        self._events: list[tuple] = []

    def _pinned(self, nbytes: int) -> np.ndarray:
        """Page-aligned host memory registered with CUDA (fast, asynchronous copies; valid O_DIRECT target),
        unregistered before the mapping goes (a later mapping at the same address could not be registered)."""
        buf = aligned_buffer(nbytes)
        runtime = self.cp.cuda.runtime
        runtime.hostRegister(buf.ctypes.data, buf.nbytes, 0)
        weakref.finalize(buf, runtime.hostUnregister, buf.ctypes.data)
        return buf

    def _issue(self, i: int) -> None:
        if self.host_hot < self.n_ff and i < self.n_layers and i not in self._pending:
            k = i % 2
            if self.copied[k] is not None:
                self.copied[k].synchronize()  # the GPU is done reading this buffer
            start = self.store.layers[i].offset + self.host_hot * self.rb
            self._pending[i] = self.reader.read(start, (self.n_ff - self.host_hot) * self.rb, self.read_bufs[k])

    def begin(self, n_tokens: int = 1) -> None:
        """A pass starts: reads left in flight by an interrupted pass are waited for and dropped first (the next
        reads reuse their buffers)."""
        self._drain()
        self._events.clear()
        self._issue(0)

    def _drain(self) -> None:
        self._pending.clear()
        self.reader.drain()

    def run(self, i: int, x, y) -> None:
        """y (S, d) += FFN_i(x (S, d)), CuPy float32. The non-resident records are copied on their own stream
        into landing buffer i % 2 while the compute stream works on layer i's GPU-resident records (and, the host
        running ahead, on the layers before); the compute stream waits for the copies only before converting them
        (records_to_planar) and computing with them."""
        cp, st = self.cp, self.stats
        t0 = time.perf_counter()
        k = i % 2
        landing, stage, warm = self.landing[k], self.stage, self.warm_bytes
        copies = self.copy_stream
        if self.landed[k] is not None:
            copies.wait_event(self.landed[k])  # layer i - 2 has been converted out of this landing buffer
        marks = []  # pairs of events around each copy, on the copy stream
        t_io = 0.0
        with copies:
            if warm:
                marks.append(_recorded(cp))
                landing.data.copy_from_host_async(self.host_records[i].ctypes.data, warm)
                marks.append(_recorded(cp))
            if i in self._pending:
                data = self._pending.pop(i).result()
                t_io = time.perf_counter() - t0
                marks.append(_recorded(cp))
                landing[warm:].data.copy_from_host_async(data.ctypes.data, data.nbytes)
                self.copied[k] = _recorded(cp)  # the read buffer k may be reused after this
                marks.append(self.copied[k])
        self._issue(i + 1)
        e_kernels = _recorded(cp)
        t2 = time.perf_counter()
        waits = None
        xq = self.kernels.quantize(x) if x.shape[0] <= MAX_S else None  # shared by both tiers
        if self.gpu_hot:
            self.kernels.bundle(self.gpu_records[i].data.ptr, self.gpu_hot, self.layout, self.activation, x, y,
                                self.h, xq)
        if stage is not None:
            rest = self.n_ff - self.gpu_hot
            if marks:  # the compute stream waits for the copies (the wait is timed apart from the kernels)
                wait_start = _recorded(cp)
                cp.cuda.get_current_stream().wait_event(marks[-1])
                waits = (wait_start, _recorded(cp))
            self.kernels.records_to_planar(landing, stage, rest, self.layout)
            self.landed[k] = _recorded(cp)
            self.kernels.bundle(stage.data.ptr, rest, self.layout, self.activation, x, y, self.h, xq)
        self._events.append((marks, e_kernels, _recorded(cp), waits))
        st.calls += 1
        st.io_wait_s += t_io
        st.manage_s += t2 - t0 - t_io
        st.compute_s += time.perf_counter() - t2  # launch time; the GPU's own time shows in the token's total
        st.neurons_used += self.n_ff
        st.neurons_from_cache += self.host_hot

    def run_resident(self, i: int, x, y, xq=None) -> None:
        """y (1, d) += FFN_i(x) when every record is GPU-resident: kernel launches only (no copies, reads, events or
        host clocks), so a decode step can be captured in a CUDA graph. xq: quantize(x), where made already."""
        if xq is None:
            xq = self.kernels.quantize(x)
        self.kernels.bundle(self.gpu_records[i].data.ptr, self.gpu_hot, self.layout, self.activation, x, y, self.h,
                            xq)

    def count_step(self) -> None:
        """The stats of one replayed decode step (its launches ran in the graph, not through run)."""
        st = self.stats
        st.calls += self.n_layers
        st.neurons_used += self.n_ff * self.n_layers
        st.neurons_from_cache += self.host_hot * self.n_layers

    def collect(self) -> None:
        """Add this pass's event timings to transfer_s (host->GPU copies, on the copy stream: they overlap the
        compute stream's work) and gpu_ffn_s (FFN kernels, waits for copies excluded). The pass is finished:
        logits are on the host."""
        get = self.cp.cuda.get_elapsed_time
        for marks, kernels, done, waits in self._events:
            self.transfer_s += sum(get(marks[k], marks[k + 1]) for k in range(0, len(marks), 2)) / 1e3
            self.gpu_ffn_s += (get(kernels, done) - (get(*waits) if waits else 0.0)) / 1e3
        self._events.clear()

    def close(self) -> None:
        self._drain()
        self.reader.close()
