"""The CUDA backend for flash stores, under a GPU and a host memory budget.

Attention weights, norms, the KV cache (float16, as the CPU flash path) and the output matrix live on the GPU in
their GGUF bytes; embedding rows are looked up on the host; the FFN is tiered between GPU memory, pinned host memory
and flash (cuda_ffn.py: GpuFFN). Kernels: quant/cuda_kernels.py. CuPy is imported only here, when `device="cuda"`
is asked for: the CPU path never imports it.

A decode step launches 8 kernels per layer of a llama (norms with the residual add fused in and their output
quantized for the next product, one token's RoPE + cache append, its attention (output quantized too), the
quantized products); with everything on the GPU the whole step is one CUDA graph
(CudaExecutor), since a small model's step is otherwise bound by the host's launches, not the GPU.

`naive=True` is the paper's baseline in the same code: nothing of the FFN resident anywhere, every layer's records
read from flash and copied to the GPU for every token, and the attention weights copied from host memory each
token too.
"""
from __future__ import annotations

import contextlib
import gc
import weakref
from dataclasses import dataclass

import numpy as np

from flashlm.errors import InvalidOptionError
from flashlm.flash_store.planner import GpuPlan
from flashlm.quant.cuda_kernels import MAX_S, CudaKernels
from flashlm.runtime.cuda_ffn import GpuFFN
from flashlm.runtime.kernel_executor import ArrayOps, KernelExecutor, attend
from flashlm.runtime.kv_cache import KVCache


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
    # (array, its int8 form): a norm's or one token's attention output quantized in the kernel that made it
    # (decode steps), for the product that reads it next (qkv, the o projection, the FFN, the output matrix); held
    # with the array itself, so no other array can take its address, and handed out once
    _normed: tuple | None = None

    def norm(self, x, weight, eps: float):
        quantized: list = []
        y = self.ex.kernels.rms_norm(x, weight, eps, quantized=quantized)
        self._normed = (y, quantized[0]) if quantized else None
        return y

    def head_norm(self, t, weight, eps: float):
        return self.ex.kernels.rms_norm(t, weight, eps)

    def add_norm(self, x, residual, weight, eps: float):
        quantized: list = []
        y, total = self.ex.kernels.rms_norm(x, weight, eps, residual=residual, quantized=quantized)
        self._normed = (y, quantized[0]) if quantized else None
        return y, total

    def _quantized(self, x):
        """x's int8 form if x is the array last stored in _normed (once), else None."""
        normed, self._normed = self._normed, None
        return normed[1] if normed is not None and normed[0] is x else None

    def qkv(self, i: int, w: GpuLayer, x):
        cp = self.ex.cp
        x = cp.ascontiguousarray(x)
        xq = self._quantized(x)
        if xq is None and x.shape[0] <= MAX_S and len(w.qkv) > 1:
            xq = self.ex.kernels.quantize(x)
        outs = [m(x, xq) for m in w.qkv]
        return self.split_heads(outs[0] if len(outs) == 1 else cp.concatenate(outs, axis=1))

    def attend(self, i: int, q, k, v):
        keys, values, cos, sin, window = self.cache_of(i)
        cp = self.ex.cp
        if q.shape[0] == 1:
            quantized: list = []
            out = self.ex.kernels.attend_decode(q, k, v, keys, values, self.ex.position, cos, sin,
                                                self.args.rope.interleaved, window, quantized)
            self._normed = (out, quantized[0]) if quantized else None
            return out
        return cp.ascontiguousarray(attend(self.args, q, k, v, keys, values, self.start, cos, sin, window, cp))

    def linear(self, x, matrix: GpuMatrix):
        return matrix(x, self._quantized(x))

    def ffn(self, i: int, w, x, residual=None):
        if not self.graphed:
            return super().ffn(i, w, x, residual)
        y = residual if residual is not None else self.ex.cp.zeros((1, self.args.d_model), np.float32)
        self.ex.ffn.run_resident(i, x, y, self._quantized(x))
        return y

    def output(self, x, w):
        if not self.graphed:
            return super().output(x, w)
        xq = self._quantized(x) if x.shape[0] == 1 else None
        return w.matrix(self.ex.cp.ascontiguousarray(x[-1:]), xq)  # one token: its logits, on the GPU

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
    once per KV cache and its buffers, by running the family's layer and head over CudaOps) replays the 8
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
