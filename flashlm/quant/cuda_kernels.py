"""GPU kernels on GGUF blocks (CuPy RawModule, compiled by NVRTC on first use).

The same blocks the CPU bundle kernel reads (Q4_0 / Q4_1 / Q8_0 / Q5_0 / Q4_K / Q6_K: matrix rows, and flash-store records
[gate row | up row | down column]), never dequantized copies, but rearranged on the GPU after each upload into planar rows
(cuda_kernels.cu: quant bytes of every block 16-byte aligned, then the scales; GpuRecords for records). Decode products
(S <= MAX_S tokens) quantize x to int8 per 32-block once (quantize_x: the CPU decode path's quantization, bit for
bit) and take dp4a integer dot products, as llama.cpp's CUDA mmvq does; a persistent grid of warps walks row pairs
(two rows of a matrix, or a record's gate and up rows), a lane per block, the next chunk's loads issued before
this one is computed. Prompt batches dequantize a slice of rows at a time and use cuBLAS in float32.

Measured on the H200, 4096 x 11008 Q4_0 (25.4 MB, 8 copies rotated, CUDA graph; variants in benchmarks/gpu_matvec_lab*.py,
one run each; a plain 16-byte read of the same bytes 6.6-7.3 us):
    a row per thread block staged in shared memory, float x (the previous kernel)   26.9 us   0.94 TB/s
    float x, a lane per block (repacked; 1 / 2 rows per warp)                       47.3 / 29.7 us
    int8 x, a warp per row, a lane per block, 2-byte loads of GGUF blocks            10.3 us   2.46 TB/s
      ... 2 rows per warp                                                            11.3 us
      ... persistent walk with prefetch                                              14.9 us (2-byte loads in flight
                                                                                     hold many registers)
    int8 x, quants and scales apart, 16-byte loads, 2 rows per warp (lab)             9.6 us
      ... persistent walk with prefetch (lab, S = 1 only)                             8.0 us   3.16 TB/s
    this module: planar 16-byte loads, persistent walk, S = 1 kernel                  9.3 us   2.72 TB/s
      (planes of 4-byte words instead: 11.0 us; one kernel for all S <= 8: 13.8 us, its code outgrew the
      instruction cache)
    x quantized inside the product (each thread block) instead of quantize_x          10.6 us (lab)
    quantize_x alone 1.2 us; an empty kernel 0.5 us

The down projection of a bundle (y[j] += sum_i h[i] * down_i[j], down columns stored per neuron) runs one thread
per output position j over a chunk of neurons and adds its partial sum atomically: the summation order differs
from the CPU kernel's, so GPU and CPU logits agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from flashlm.loaders.gguf_reader import GGMLQuantizationType as QT
from flashlm.quant.bundle_kernel import ACTIVATIONS  # the act codes, one table for the C and CUDA kernels

MAX_S = 8  # decode products (int8 x) take up to this many tokens; longer batches dequantize + cuBLAS
FORMATS = {QT.Q4_0: 0, QT.Q4_1: 1, QT.Q8_0: 2, QT.Q5_0: 3, QT.Q4_K: 4, QT.Q6_K: 5}  # Blk<F> in cuda_kernels.cu
UNIT_BYTES = {0: 18, 1: 20, 2: 34, 3: 22, 4: 24, 5: 40}  # planar bytes per 32 values on the GPU
DOWN_FORMATS = {0, 1, 2}  # down columns (kept as GGUF stores them)
# gate / up formats with a kernel: every pair of the first three, and each newer format with itself
GATE_UP_PAIRS = [(g, u) for g in range(3) for u in range(3)] + [(3, 3), (4, 4), (5, 5)]
DOWN_CHUNK = 64  # neurons per thread block in the down projection
THREADS = 128  # threads per thread block of the row-pair kernels (4 warps)
BLOCKS_PER_SM = 8  # persistent grid: 32 warps per multiprocessor (H200 lab: 4 / 8 / 16 blocks 8.3 / 8.0 / 8.4 us)
ATT_WARPS = 4  # warps per thread block of attend_decode (its #define in cuda_kernels.cu)
DEQUANT_MAX_BYTES = 8 << 20  # float32 rows dequantized at a time for a prompt batch through cuBLAS

SOURCE_PATH = os.path.join(os.path.dirname(__file__), "cuda_kernels.cu")
with open(SOURCE_PATH, encoding="utf-8") as _f:
    SOURCE = _f.read()


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


def gpu_row_bytes(k: int, qtype) -> int:
    """Bytes of one planar row of k weights on the GPU (UNIT_BYTES per 32, padded to 16)."""
    return _round16(k // 32 * UNIT_BYTES[CudaKernels.fmt(qtype)])


def gpu_matrix_bytes(qtype, n_rows: int, k: int) -> int:
    """GPU memory of a matrix as GpuMatrix holds it: planar rows of a quantized type, float32 otherwise."""
    if QT(qtype) in (QT.F32, QT.F16, QT.BF16):
        return n_rows * k * 4
    return n_rows * gpu_row_bytes(k, qtype)


@dataclass(frozen=True)
class GpuRecords:
    """Flash-store records as the GPU keeps them (records_to_planar converts), each part 16-byte aligned.
    Neuron layout: n records of [gate row planar | up row planar | down column as stored] (record_bytes each).
    Block layout (group G): n * G sub-records [gate row planar | up row planar] (sub_bytes each), then the n
    records' down parts as stored (d blocks each): record_bytes = G * sub_bytes + down part per record."""

    record_bytes: int
    up_off: int
    down_off: int  # neuron layout: in the record; block layout: unused (the down parts follow the sub-records)
    group: int = 1
    sub_bytes: int = 0

    @staticmethod
    @functools.lru_cache(maxsize=None)  # asked per layer and token; a RecordLayout is frozen (hashable)
    def of(layout) -> "GpuRecords":
        up = gpu_row_bytes(layout.d_model, layout.gate_type)
        down = up + gpu_row_bytes(layout.d_model, layout.up_type)
        if layout.group > 1:
            return GpuRecords(layout.group * down + layout.down_bytes, up, -1, layout.group, down)
        return GpuRecords(down + _round16(layout.down_bytes), up, down)


class CudaKernels:
    """The compiled module and launch helpers. Arrays are CuPy arrays on the current device. Quantized rows on
    the GPU are planar (cuda_kernels.cu): upload_rows / upload_records / records_to_planar make them from GGUF bytes."""

    def __init__(self):
        import cupy

        self.cp = cupy
        # no fast math: quantize_x must round as the CPU does (and keep denormals); activate uses __expf itself
        module = cupy.RawModule(code=SOURCE, options=("-std=c++17",))
        fn = module.get_function
        self._matvec, self._matvec1, self._dequant, self._planarize = (
            {f: fn(f"{name}_{f}") for f in FORMATS.values()}
            for name in ("matvec", "matvec1", "dequantize", "planarize"))
        self._down = {f: fn(f"down_{f}") for f in DOWN_FORMATS}
        self._down_block = {f: fn(f"down_block_{f}") for f in DOWN_FORMATS}
        self._gate_up, self._gate_up1 = ({(g, u): fn(f"{name}_{g}{u}") for g, u in GATE_UP_PAIRS}
                                         for name in ("gate_up", "gate_up1"))
        self._quantize_x = fn("quantize_x")
        self._rms_norm, self._rope_append, self._attend_decode = (fn(n) for n in ("rms_norm", "rope_append",
                                                                                   "attend_decode"))
        sms = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["multiProcessorCount"]
        self.max_blocks = sms * BLOCKS_PER_SM

    @staticmethod
    def fmt(qtype, allowed=None) -> int:
        """The kernels' format number of a GGUF type; UnsupportedModelError where there is no kernel."""
        f = FORMATS.get(QT(qtype))
        if f is None or (allowed is not None and f not in allowed):
            from flashlm.errors import UnsupportedModelError

            have = ", ".join(t.name for t, g in FORMATS.items() if allowed is None or g in allowed)
            raise UnsupportedModelError(f"{QT(qtype).name} has no GPU kernel yet ({have} do)")
        return f

    # ---- GGUF bytes -> planar rows on the GPU
    def _to_planar(self, src_ptr: int, src_stride: int, dst_ptr: int, dst_stride: int, n_rows: int, k: int,
                   qtype, group: int = 1, group_gap: int = 0) -> None:
        """Source row r at src_ptr + r * src_stride + (r // group) * group_gap."""
        fmt = self.fmt(qtype)
        if dst_ptr % 16 or dst_stride % 16 or src_ptr % 2 or src_stride % 2 or group_gap % 2:
            raise ValueError("planar rows need 16-byte aligned destinations")
        n = n_rows * (k // 32)
        self._planarize[fmt](((n + 255) // 256,), (256,), (np.uint64(src_ptr), np.int64(src_stride),
                                                           np.uint64(dst_ptr), np.int64(dst_stride),
                                                           np.int32(n_rows), np.int32(k // 32), np.int32(group),
                                                           np.int64(group_gap)))

    def upload_rows(self, rows: np.ndarray, qtype, k: int):
        """A matrix's GGUF rows (n, row_bytes) -> planar rows on the GPU, (n, gpu_row_bytes) (a transient GGUF
        copy on the way)."""
        src = self.cp.asarray(np.ascontiguousarray(rows))
        dst = self.cp.empty((rows.shape[0], gpu_row_bytes(k, qtype)), self.cp.uint8)
        self._to_planar(src.data.ptr, rows.shape[1], dst.data.ptr, dst.shape[1], rows.shape[0], k, qtype)
        return dst

    def records_to_planar(self, src, dst, n: int, layout) -> None:
        """n flash-store records (GPU, GGUF bytes, layout.record_bytes each) -> dst in the GPU record layout
        (GpuRecords): gate and up rows planar, down columns as stored."""
        if n == 0:
            return
        g = GpuRecords.of(layout)
        rb = layout.record_bytes
        if g.group > 1:
            self._blocks_to_planar(src, dst, n, layout, g)
            return
        down = layout.gate_bytes + layout.up_bytes
        dst.reshape(-1, g.record_bytes)[:n, g.down_off:g.down_off + layout.down_bytes] = \
            src[:n * rb].reshape(n, rb)[:, down:down + layout.down_bytes]
        for off, goff, qtype in ((0, 0, layout.gate_type), (layout.gate_bytes, g.up_off, layout.up_type)):
            self._to_planar(src.data.ptr + off, rb, dst.data.ptr + goff, g.record_bytes, n, layout.d_model, qtype)

    def _blocks_to_planar(self, src, dst, n: int, layout, g: "GpuRecords") -> None:
        G, rb = g.group, layout.record_bytes
        gate, up, down = layout.slices()
        dst.reshape(-1)[n * G * g.sub_bytes:n * g.record_bytes].reshape(n, -1)[:] = \
            src[:n * rb].reshape(n, rb)[:, down]
        for part, goff, qtype, row_bytes in ((gate, 0, layout.gate_type, layout.gate_bytes),
                                             (up, g.up_off, layout.up_type, layout.up_bytes)):
            self._to_planar(src.data.ptr + part.start, row_bytes, dst.data.ptr + goff, g.sub_bytes, n * G,
                            layout.d_model, qtype, G, rb - G * row_bytes)

    def upload_records(self, records: np.ndarray, layout):
        """Flash-store records (host bytes) -> GPU records (GpuRecords layout, flat uint8)."""
        src = self.cp.asarray(np.ascontiguousarray(records).reshape(-1).view(np.uint8))
        n = src.nbytes // layout.record_bytes
        dst = self.cp.empty(n * GpuRecords.of(layout).record_bytes, self.cp.uint8)
        self.records_to_planar(src, dst, n, layout)
        return dst

    def _quantized_buffers(self, S: int, k: int) -> tuple:
        """What quantize() returns, unfilled: int8 (S, k), scales (S, k/32), int32 block sums (S, k/32)."""
        cp = self.cp
        return cp.empty((S, k), cp.int8), cp.empty((S, k // 32), cp.float32), cp.empty((S, k // 32), cp.int32)

    def quantize(self, x) -> tuple:
        """x (S, K) float32, S <= MAX_S -> (int8 (S, K), scales (S, K/32), int32 block sums (S, K/32))."""
        S, k = x.shape
        q = self._quantized_buffers(S, k)
        x = self.cp.ascontiguousarray(x, dtype=self.cp.float32)
        self._quantize_x(((S * (k // 32) * 32 + 255) // 256,), (256,), (x, np.int32(k), np.int32(S), *q))
        return q

    def rms_norm(self, x, weight, eps: float, residual=None, quantized: list | None = None):
        """RMSNorm over the last axis (weight's length) of x, float32; with residual: (norm(x + residual),
        x + residual), the add fused in. One kernel. quantized: a list that gets the result's quantize() in the
        same kernel (rows of a multiple of 32, at most MAX_S of them; otherwise left empty)."""
        cp = self.cp
        x = cp.ascontiguousarray(x, dtype=cp.float32)
        n = weight.shape[0]
        y = cp.empty(x.shape, cp.float32)
        total = cp.empty(x.shape, cp.float32) if residual is not None else None
        res = cp.ascontiguousarray(residual, dtype=cp.float32) if residual is not None else None
        null = np.uint64(0)
        rows = x.size // n
        q = (null, null, null)
        if quantized is not None and n % 32 == 0 and rows <= MAX_S:
            q = self._quantized_buffers(rows, n)
            quantized.append(q)
        self._rms_norm((rows,), (min(1024, (n + 31) // 32 * 32),), (
            x, null if res is None else res, weight, y, null if total is None else total, np.int32(n),
            np.float32(eps), *q))
        return y if residual is None else (y, total)

    def attend_decode(self, q, k, v, keys, values, pos, cos, sin, interleaved: bool, window: int,
                      quantized: list | None = None):
        """One token's attention (q (1, heads, hd), k and v (1, kv_heads, hd)): RoPE at position pos[0] (a device
        int32, so a captured graph replays every step), k and v appended to the float16 caches (kv_heads,
        capacity, hd) at that position, softmax attention over the cache (within the window, if any). Two
        kernels; returns (1, heads * hd) float32. quantized: a list that gets the result's quantize() (hd a
        multiple of 32; otherwise left empty)."""
        cp = self.cp
        _, n_heads, hd = q.shape
        n_kv, capacity = k.shape[1], keys.shape[1]
        if hd % 2 or hd > 256 or n_heads % n_kv:
            raise ValueError(f"attend_decode: head size {hd} (even, <= 256), {n_heads} heads over {n_kv}")
        q, k, v = (cp.ascontiguousarray(t, dtype=cp.float32) for t in (q, k, v))
        qr = cp.empty((1, n_heads * hd), cp.float32)
        out = cp.empty((1, n_heads * hd), cp.float32)
        scores = cp.empty((n_heads, capacity), cp.float32)
        n = (n_heads + n_kv) * hd // 2 + n_kv * hd
        self._rope_append(((n + 255) // 256,), (256,), (
            q, k, v, pos, cos, sin, np.int32(interleaved), np.int32(n_heads), np.int32(n_kv), np.int32(hd),
            np.int64(capacity), qr, keys, values))
        xq = (np.uint64(0),) * 3
        if quantized is not None and hd % 32 == 0:
            xq = self._quantized_buffers(1, n_heads * hd)
            quantized.append(xq)
        self._attend_decode((n_heads,), (32 * ATT_WARPS,), (
            qr, keys, values, pos, np.int32(window), np.int32(n_heads), np.int32(n_kv), np.int32(hd),
            np.int64(capacity), np.float32(hd ** -0.5), scores, out, *xq))
        return out

    def _grid(self, n_pairs: int) -> tuple[int]:
        """Thread blocks of a row-pair walk: one pair per warp, at most BLOCKS_PER_SM blocks per multiprocessor."""
        return (max(1, min(self.max_blocks, (n_pairs * 32 + THREADS - 1) // THREADS)),)

    def _dequantize(self, ptr: int, row_stride: int, n_rows: int, k: int, fmt: int, planar: bool, out) -> None:
        n = n_rows * k
        self._dequant[fmt](((n + 255) // 256,), (256,), (np.uint64(ptr), np.int64(row_stride), np.int32(n_rows),
                                                          np.int32(k), np.int32(planar), out))

    def matvec(self, ptr: int, row_stride: int, n_rows: int, k: int, qtype, x, y, xq=None) -> None:
        """y (S, >=n_rows; row stride y.shape[1]) = rows @ x.T for x (S, k) float32; planar rows at device pointer
        ptr. Decode (S <= MAX_S): int8 x; xq: quantize(x) already made, to share one quantization between products
        of the same input. Prompt batches: float32 x, rows dequantized a slice at a time, cuBLAS."""
        fmt = self.fmt(qtype)
        S = x.shape[0]
        if S > MAX_S:
            chunk = max(1, min(n_rows, DEQUANT_MAX_BYTES // (4 * k)))
            w = self.cp.empty((chunk, k), self.cp.float32)
            for r0 in range(0, n_rows, chunk):
                r = min(chunk, n_rows - r0)
                self._dequantize(ptr + r0 * row_stride, row_stride, r, k, fmt, True, w)
                y[:, r0:r0 + r] = x @ w[:r].T
            return
        q = xq if xq is not None else self.quantize(x)
        (self._matvec1 if S == 1 else self._matvec)[fmt](self._grid((n_rows + 1) // 2), (THREADS,), (
            np.uint64(ptr), np.int64(row_stride), np.int32(n_rows), np.int32(k), *q, np.int32(S), y,
            np.int32(y.shape[1])))

    def bundle(self, ptr: int, n: int, layout, activation: str, x, y, h, xq=None) -> None:
        """y (S, d) += FFN over n records (records_to_planar's form) at device pointer ptr. Decode (S <= MAX_S):
        int8 x, h scratch (>= MAX_S*n float32), xq: quantize(x) if made already. Prompt batches: float32 x, the
        records' gate, up and down rows dequantized a slice of neurons at a time, cuBLAS."""
        if n == 0:
            return
        d, g = layout.d_model, GpuRecords.of(layout)
        rb = g.record_bytes
        gf, uf = self.fmt(layout.gate_type), self.fmt(layout.up_type)
        df = self.fmt(layout.down_type, DOWN_FORMATS)
        if (gf, uf) not in GATE_UP_PAIRS:
            from flashlm.errors import UnsupportedModelError

            raise UnsupportedModelError(f"gate rows {QT(layout.gate_type).name} with up rows "
                                        f"{QT(layout.up_type).name}: no GPU kernel for this pair")
        S, G = x.shape[0], g.group
        if S > MAX_S:
            (self._bundle_float_blocks if G > 1 else self._bundle_float)(ptr, n, g, d, activation, x, y, (gf, uf, df))
            return
        q = xq if xq is not None else self.quantize(x)
        # gate and up rows: a record's (neuron layout), or the n * G sub-records' (block layout)
        (self._gate_up1 if S == 1 else self._gate_up)[(gf, uf)](self._grid(n * G), (THREADS,), (
            np.uint64(ptr), np.int64(g.sub_bytes if G > 1 else rb), np.int32(n * G), np.int32(d),
            np.int64(g.up_off), np.int32(ACTIVATIONS[activation]), *q, np.int32(S), h))
        if G > 1:  # ffn_down's blocks after the sub-records (down_block_t)
            chunk = max(1, DOWN_CHUNK // G)
            self._down_block[df](((d + 255) // 256, (n + chunk - 1) // chunk), (256,), (
                np.uint64(ptr + n * G * g.sub_bytes), np.int64(rb - G * g.sub_bytes), np.int32(n), np.int32(d), h,
                np.int32(S), y, np.int32(chunk)))
        else:
            self._down[df](((d + 255) // 256, (n + DOWN_CHUNK - 1) // DOWN_CHUNK), (256,), (
                np.uint64(ptr), np.int64(rb), np.int32(n), np.int32(d), np.int64(g.down_off), h, np.int32(S), y,
                np.int32(DOWN_CHUNK)))

    def _bundle_float_blocks(self, ptr: int, n: int, g: "GpuRecords", d: int, activation: str, x, y, fmts) -> None:
        """Prompt batches over block records: dequantized slices of records (their ffn_down blocks transposed to
        one row per neuron) and cuBLAS, as _bundle_float for neuron records."""
        cp, (gf, uf, df), G = self.cp, fmts, g.group
        down_ptr, dstride = ptr + n * G * g.sub_bytes, g.record_bytes - G * g.sub_bytes
        chunk = max(1, min(n, DEQUANT_MAX_BYTES // (3 * 4 * d * G)))
        w = cp.empty((3, chunk * G, d), cp.float32)
        wd = cp.empty((chunk * d, G), cp.float32)
        for i0 in range(0, n, chunk):
            c = min(chunk, n - i0)
            sub = ptr + i0 * G * g.sub_bytes
            self._dequantize(sub, g.sub_bytes, c * G, d, gf, True, w[0])
            self._dequantize(sub + g.up_off, g.sub_bytes, c * G, d, uf, True, w[1])
            self._dequantize(down_ptr + i0 * dstride, dstride // d, c * d, G, df, False, wd)
            w[2, :c * G] = wd[:c * d].reshape(c, d, G).transpose(0, 2, 1).reshape(c * G, d)
            y += (_activate(cp, x @ w[0, :c * G].T, activation) * (x @ w[1, :c * G].T)) @ w[2, :c * G]

    def _bundle_float(self, ptr: int, n: int, g: "GpuRecords", d: int, activation: str, x, y, fmts) -> None:
        cp, rb = self.cp, g.record_bytes
        chunk = max(1, min(n, DEQUANT_MAX_BYTES // (3 * 4 * d)))
        w = cp.empty((3, chunk, d), cp.float32)
        parts = ((0, True), (g.up_off, True), (g.down_off, False))
        for n0 in range(0, n, chunk):
            c = min(chunk, n - n0)
            for i, (f, (off, planar)) in enumerate(zip(fmts, parts)):
                self._dequantize(ptr + n0 * rb + off, rb, c, d, f, planar, w[i])
            y += (_activate(cp, x @ w[0, :c].T, activation) * (x @ w[1, :c].T)) @ w[2, :c]


def _activate(cp, g, activation: str):
    if activation == "silu":
        return g / (1 + cp.exp(-g))
    if activation == "relu":
        return cp.maximum(g, 0)
    return 0.5 * g * (1 + cp.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
