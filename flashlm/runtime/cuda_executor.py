"""The CUDA backend for flash stores: flash -> pinned host buffers -> GPU, under a GPU and a host memory budget.

Three tiers per layer, in stored (hot-first) neuron order:
  [0, gpu_hot)          records resident in GPU memory (read once at load);
  [gpu_hot, host_hot)   records resident in pinned host memory, copied to the GPU each token (asynchronously);
  [host_hot, n_ff)      records read from flash each token (O_DIRECT, the I/O engine's threads) into pinned
                        buffers, layer i+1's read issued while layer i computes, then copied to the GPU.
Attention weights, norms, the KV cache (float16, as the CPU flash path) and the output matrix live on the GPU in
their GGUF bytes; embedding rows are looked up on the host. Kernels: quant/cuda_kernels.py. CuPy is imported only
here, when `device="cuda"` is asked for: the CPU path never imports it.

A decode step launches ~11 kernels per layer (norms with the residual add fused in, one token's RoPE + cache append
and its attention fused, the quantized products); with everything on the GPU the whole step is one CUDA graph
(CudaExecutor), since a small model's step is otherwise bound by the host's launches, not the GPU.

`naive=True` is the paper's baseline in the same code: nothing of the FFN resident anywhere, every layer's records
read from flash and copied to the GPU for every token, and the attention weights copied from host memory each
token too.
"""

from __future__ import annotations

import contextlib
import gc
import time
import weakref
from dataclasses import dataclass

import numpy as np

from flashlm.errors import InvalidOptionError
from flashlm.flash_store.planner import GpuPlan
from flashlm.flash_store.io_engine import ALIGN, FlashReader, aligned_buffer
from flashlm.quant.cuda_kernels import MAX_S, CudaKernels, GpuRecords
from flashlm.runtime.kernel_executor import ArrayOps, KernelExecutor, attend
from flashlm.runtime.kv_cache import KVCache
from flashlm.runtime.streaming import FFNStats



def import_cupy():
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # ImportError, or CUDA present but no driver/device
        raise InvalidOptionError(f"--device cuda needs CuPy and an NVIDIA GPU (pip install \"flashlm[cuda]\"): "
                                 f"{type(e).__name__}: {e}") from None
    if n < 1:
        raise InvalidOptionError("--device cuda: no CUDA device is visible")
    return cupy


class GpuMatrix:
    """A quantized (or float32) matrix on the GPU in its GGUF rows."""

    def __init__(self, cp, kernels: CudaKernels, rows: np.ndarray, qtype, bias, k: int, keep_on_gpu: bool = True):
        self.cp, self.kernels, self.qtype, self.k = cp, kernels, qtype, k
        self.host = rows if not keep_on_gpu else None  # naive: copied to the GPU at each use
        self.rows = self._upload(rows) if keep_on_gpu else None
        self.n = rows.shape[0]
        self.bias = None if bias is None else cp.asarray(bias)
        self.nbytes = rows.nbytes

    def _upload(self, rows: np.ndarray):
        if rows.dtype == np.float32:
            return self.cp.asarray(rows)
        return self.kernels.upload_rows(rows, self.qtype, self.k)  # planar (quant/cuda_kernels.py)

    def __call__(self, x, xq=None):
        rows = self.rows if self.rows is not None else self._upload(self.host)
        if rows.dtype == np.float32:
            out = x @ rows.T
        else:
            out = self.cp.empty((x.shape[0], self.n), self.cp.float32)
            self.kernels.matvec(rows.data.ptr, rows.shape[1], self.n, self.k, self.qtype, x, out, xq)
        return out + self.bias if self.bias is not None else out


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

    def run_resident(self, i: int, x, y) -> None:
        """y (1, d) += FFN_i(x) when every record is GPU-resident: kernel launches only (no copies, reads, events or
        host clocks), so a decode step can be captured in a CUDA graph."""
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


class GpuHead:
    """The output matrix on the GPU (resident); logits copied back to the host. `output_norm`: the final norm's
    weight, applied by the executor."""

    def __init__(self, cp, matrix: GpuMatrix, output_norm: np.ndarray):
        self.cp, self.matrix, self.output_norm = cp, matrix, cp.asarray(output_norm, dtype=cp.float32)
        self.io_wait_s = 0.0
        self.resident = True

    def run(self, normed, rows: np.ndarray, out: np.ndarray) -> None:
        x = normed[self.cp.asarray(rows)]
        out[:] = self.cp.asnumpy(self.matrix(self.cp.ascontiguousarray(x, dtype=self.cp.float32)))


class GpuLayer:
    """A layer's weights on the GPU: qkv and o matrices, norm weights under the family's names."""

    def __init__(self, cp, qkv: list[GpuMatrix], o: GpuMatrix, norms: dict):
        self.qkv, self.o = qkv, o
        for name, weight in norms.items():
            setattr(self, name, cp.asarray(weight, dtype=cp.float32))


class CudaOps(ArrayOps):
    """Ops on CuPy arrays: matrix products by the CUDA kernels on GGUF blocks; norms, and one token's RoPE, cache
    append and attention, in fused kernels (a batch's attention in CuPy).

    `graphed`: the ops of a decode step that CudaExecutor captures in a CUDA graph: kernel launches only, on
    device buffers (the position is read from device memory), the logits left on the GPU."""

    graphed = False

    def norm(self, x, weight, eps: float):
        return self.ex.kernels.rms_norm(x, weight, eps)

    def head_norm(self, t, weight, eps: float):
        return self.ex.kernels.rms_norm(t, weight, eps)

    def add_norm(self, x, residual, weight, eps: float):
        return self.ex.kernels.rms_norm(x, weight, eps, residual=residual)

    def qkv(self, i: int, w: GpuLayer, x):
        cp = self.ex.cp
        x = cp.ascontiguousarray(x)
        xq = self.ex.kernels.quantize(x) if x.shape[0] <= MAX_S and len(w.qkv) > 1 else None
        outs = [m(x, xq) for m in w.qkv]
        return self.split_heads(outs[0] if len(outs) == 1 else cp.concatenate(outs, axis=1))

    def attend(self, i: int, q, k, v):
        keys, values, cos, sin, window = self.cache_of(i)
        cp = self.ex.cp
        if q.shape[0] == 1:
            return self.ex.kernels.attend_decode(q, k, v, keys, values, self.ex.position, cos, sin,
                                                 self.args.rope.interleaved, window)
        return cp.ascontiguousarray(attend(self.args, q, k, v, keys, values, self.start, cos, sin, window, cp))

    def linear(self, x, matrix: GpuMatrix):
        return matrix(x)

    def ffn(self, i: int, w, x, residual=None):
        if not self.graphed:
            return super().ffn(i, w, x, residual)
        y = residual if residual is not None else self.ex.cp.zeros((1, self.args.d_model), np.float32)
        self.ex.ffn.run_resident(i, x, y)
        return y

    def output(self, x, w):
        if not self.graphed:
            return super().output(x, w)
        return w.matrix(self.ex.cp.ascontiguousarray(x[-1:]))  # one token: its logits, on the GPU

    def softcap(self, logits, cap: float):
        if isinstance(logits, np.ndarray):
            return super().softcap(logits, cap)
        return self.ex.cp.tanh(logits / cap) * cap


@dataclass
class DecodeGraph:
    """One KV cache's decode step captured as a CUDA graph: valid while the cache keeps its buffers (generation).
    `kept`: every GPU allocation made during the capture, held for as long as the graph may replay (the pool
    would otherwise give them to later arrays while the graph still writes them)."""

    generation: int
    graph: object
    logits: object
    kept: list


class CudaExecutor(KernelExecutor):
    """The family's layer and head over CudaOps; activations and the KV cache stay on the GPU, on one stream.

    A decode step (one token) with the whole model on the GPU (every FFN record and matrix resident) is one CUDA
    graph launch: the embedding row and the position are copied into fixed device buffers, the graph (captured
    once per KV cache and its buffers, by running the family's layer and head over CudaOps) replays the ~11
    kernels of each layer, and the logits come back in one copy. Otherwise (tiers streamed from host memory or
    flash, the naive baseline, prompt batches) the ops are launched one by one."""

    ops_class = CudaOps

    def __init__(self, cp, family, args, layers: list[GpuLayer], ffn: GpuFFN, head: GpuHead, embed, kv: KVCache,
                 rope: dict[str, np.ndarray], plan: GpuPlan):
        import cupyx

        super().__init__(family, args, layers, ffn.kernels, ffn, head, embed, kv,
                         {name: cp.asarray(t, dtype=cp.float32) for name, t in rope.items()},
                         compute=contextlib.nullcontext())
        self.cp, self.xp, self.kernels, self.gpu_plan = cp, cp, ffn.kernels, plan
        # every pass runs on this stream (a graph is captured on a stream other than the legacy default one; a
        # blocking stream still orders itself after the uploads made at load on the default stream)
        self.stream = cp.cuda.Stream(non_blocking=False)
        self.position = cp.zeros(1, cp.int32)  # the decode step's position, read by attend_decode
        self._position_host = cupyx.empty_pinned((1,), np.int32)
        self._x = cp.zeros((1, args.d_model), cp.float32)  # the decode step's embedding row
        self._x_host = cupyx.empty_pinned((1, args.d_model), np.float32)
        self._logits_host = cupyx.empty_pinned((1, args.vocab_size), np.float32)
        self.graphable = ffn.gpu_hot == ffn.n_ff and head.resident and all(
            m.rows is not None for w in layers for m in (*w.qkv, w.o))
        self.use_graphs = True  # labs/gpu_bench.py turns it off to time the launches one by one
        self._graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KVCache -> DecodeGraph
        self._events = (cp.cuda.Event(), cp.cuda.Event())
        # decode steps through graphs (captures included), replays, and the replays' GPU time (CUDA events)
        self.graph_steps = self.graph_replays = 0
        self.graph_gpu_s = 0.0

    def report(self) -> str:
        """Host->GPU copy and FFN kernel time per forward pass so far (CUDA events), and the GPU plan."""
        ffn = self.ffn
        n = max(1, ffn.stats.calls // max(1, ffn.n_layers) - self.graph_steps)
        graphs = (f"{self.graph_replays} decode steps replayed as CUDA graphs, "
                  f"{self.graph_gpu_s * 1e3 / self.graph_replays:.3f} ms of GPU time each; "
                  if self.graph_replays else "")
        return (f"{ffn.transfer_s * 1e3 / n:10.2f} ms host->GPU copies, {ffn.gpu_ffn_s * 1e3 / n:.2f} ms FFN kernels "
                f"per forward pass ({n} passes launched op by op); " + graphs + self.gpu_plan.describe())

    def forward(self, ids: np.ndarray, all_logits: bool = False) -> np.ndarray:
        with self.stream:
            if len(ids) == 1 and self.graphable and self.use_graphs:
                return self._graph_step(ids)
            out = super().forward(ids, all_logits)
        self.ffn.collect()
        return out

    def hidden(self, ids: np.ndarray) -> np.ndarray:
        with self.stream:
            if len(ids) == 1:
                self._set_position(self.kv.n_past)
            return super().hidden(ids)

    def logits(self, h, rows: np.ndarray) -> np.ndarray:
        with self.stream:
            return super().logits(h, rows)

    def _set_position(self, pos: int) -> None:
        """The decode step's position into device memory (the pinned source is free again: every pass ends with
        its logits copied to the host, which waits for the stream)."""
        self._position_host[0] = pos
        self.position.data.copy_from_host_async(self._position_host.ctypes.data, 4, self.stream)

    def _decode_pass(self):
        """The family's layers and head on the step's input buffers, over graph-safe ops; the logits stay on the
        GPU."""
        ops = self.ops_class(self, self.kv.n_past)
        ops.graphed = True
        h = self._x
        for i, w in enumerate(self.layers):
            h = self.family.layer(ops, self.args, w, i, h)
        ops.rows = np.array([0])
        return self.family.head(ops, self.args, self.head_stream, h)

    def _kept_allocations(self, kept: list):
        """An allocator that holds every block it gives out in kept (CuPy's pool otherwise reuses them)."""
        pool = self.cp.get_default_memory_pool()

        def malloc(size: int):
            mem = pool.malloc(size)
            kept.append(mem)
            return mem

        return self.cp.cuda.using_allocator(malloc)

    def _capture(self, kv: KVCache) -> None:
        """Run this step's pass once, its logits to the host buffer, then capture the same pass as a graph. The
        run's blocks, held to its end and then freed, leave the pool the blocks the capture asks for again, so
        nothing is allocated from the driver while capturing; the garbage collector is held off meanwhile."""
        warm: list = []
        with self._kept_allocations(warm):
            logits = self._decode_pass()
            logits.data.copy_to_host_async(self._logits_host.ctypes.data, self._logits_host.nbytes, self.stream)
            self.stream.synchronize()
            del logits
        warm.clear()
        kept: list = []
        collecting = gc.isenabled()
        gc.disable()
        try:
            with self._kept_allocations(kept):
                self.stream.begin_capture()
                try:
                    captured = self._decode_pass()
                finally:
                    graph = self.stream.end_capture()
        finally:
            if collecting:
                gc.enable()
        self._graphs[kv] = DecodeGraph(kv.generation, graph, captured, kept)

    def _graph_step(self, ids: np.ndarray) -> np.ndarray:
        kv, stream = self.kv, self.stream
        start = kv.n_past
        kv.reserve(start + 1)
        self._set_position(start)
        self._x_host[:] = self.embed.lookup(ids)
        self._x.data.copy_from_host_async(self._x_host.ctypes.data, self._x_host.nbytes, stream)
        entry = self._graphs.get(kv)
        if entry is None or entry.generation != kv.generation:
            self._graphs.pop(kv, None)  # its buffers are gone: the stream is idle (the last step waited for it)
            self._capture(kv)
        else:
            start_event, stop_event = self._events
            start_event.record(stream)
            entry.graph.launch(stream)
            stop_event.record(stream)
            entry.logits.data.copy_to_host_async(self._logits_host.ctypes.data, self._logits_host.nbytes, stream)
            stream.synchronize()
            self.graph_replays += 1
            self.graph_gpu_s += self.cp.cuda.get_elapsed_time(start_event, stop_event) / 1e3
        self.graph_steps += 1
        self.ffn.count_step()
        kv.n_past = start + 1
        return self._logits_host.copy()
