"""GPU kernels on GGUF blocks as stored (CuPy RawModule, compiled by NVRTC on first use).

The same bytes the CPU bundle kernel reads: matrix rows of Q4_0 / Q4_1 / Q8_0 blocks, and flash-store records
[gate row | up row | down column]. Nothing is dequantized ahead for decode products (S <= MAX_S tokens): x is
quantized to int8 per 32-block once (quantize_x: the CPU decode path's quantization, bit for bit), then a warp
takes two rows (or one record's gate and up rows), each lane whole blocks with IN_FLIGHT of them loaded before the
first is used, and dp4a integer dot products, as llama.cpp's CUDA mmvq computes them.

Measured on the H200 (4096 x 11008 Q4_0, 25.4 MB, 8 copies rotated, CUDA graph; .gpu_work lab, one run):
    the previous kernel (a row per thread block, staged in shared memory, float x)  26.9 us   0.94 TB/s
    a warp per row, lane per block, int8 x, GGUF bytes as stored                    10.3 us   2.46 TB/s
    the same on a repacked copy (quants and scales apart, 16-byte loads)            10.0 us   2.53 TB/s
      ... 2 rows per warp                                                            9.6 us   2.65 TB/s
    float x instead of int8 (lane per block, repacked; 1 / 2 rows per warp)     47.3 / 29.7 us
    x quantized inside the product (each thread block, no separate launch)         10.6 us
    quantize_x alone 1.2 us; an empty kernel 0.5 us; a plain 16-byte read of the same bytes 6.6 us (3.40 TB/s)
The repack gained 3-7%, so the GGUF bytes stay as stored (one layout for the flash store, host and GPU).
Longer prompts (S > MAX_S) dequantize at most DEQUANT_MAX_BYTES of rows at a time and use cuBLAS; bundles go
MAX_S tokens at a time through the same int8 kernels.

The down projection of a bundle (y[j] += sum_i h[i] * down_i[j], down columns stored per neuron) runs one thread
per output position j over a chunk of neurons and adds its partial sum atomically: the summation order differs
from the CPU kernel's, so GPU and CPU logits agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import numpy as np

from ..loaders.gguf_reader import GGMLQuantizationType as QT

MAX_S = 8  # activations per fused decode product; longer batches dequantize + cuBLAS
FORMATS = {QT.Q4_0: 0, QT.Q4_1: 1, QT.Q8_0: 2}
BLOCK_BYTES = {QT.Q4_0: 18, QT.Q4_1: 20, QT.Q8_0: 34}
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
DOWN_CHUNK = 64  # neurons per thread block in the down projection
THREADS = 128  # threads per thread block of the warp-per-row kernels (64-256 within 1% on the H200)
DEQUANT_MAX_BYTES = 32 << 20  # largest float32 transient of dequantized rows for a prompt batch through cuBLAS

SOURCE = r"""
#include <cuda_fp16.h>
typedef unsigned char u8;
typedef unsigned short u16;
#define MAX_S 8
#define IN_FLIGHT 4  // blocks per lane loaded before the first is used

__device__ __forceinline__ float ld_half(const u8* p) {
    return __half2float(__ushort_as_half(__ldg((const u16*)p)));
}

__device__ __forceinline__ int ld_int_b2(const u8* p) {  // 4 bytes from a 2-byte aligned address
    const u16* q = (const u16*)p;
    return (int)__ldg(q) | ((int)__ldg(q + 1) << 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// x (S, K) float -> xq (S, K) int8, xd (S, K/32) scales, xs (S, K/32) sums of the int8 values of each block, as the
// CPU's quantize_x_i8 computes them, bit for bit: dx = max|x| * (1/127), q = rint(x * (1/dx)) (IEEE round-to-nearest
// operations; the module is compiled without fast math, so denormals are kept as on the CPU). One warp per block.
extern "C" __global__ void quantize_x(const float* x, int K, int S, signed char* xq, float* xd, int* xs) {
    int blk = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (blk >= (K >> 5) * S) return;  // a whole warp: blockDim is a multiple of 32
    float v = x[(long long)blk * 32 + lane];
    float amax = fabsf(v);
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, o));
    float d = __fmul_rn(amax, 1.0f / 127.0f);
    float id = d != 0.f ? __frcp_rn(d) : 0.f;
    int q = (int)fminf(fmaxf(rintf(__fmul_rn(v, id)), -127.f), 127.f);
    xq[(long long)blk * 32 + lane] = (signed char)q;
    int s = q;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    if (lane == 0) { xd[blk] = d; xs[blk] = s; }
}

// One GGUF block dotted with 32 int8 x values (x0: x[0..15], x1: x[16..31]), scale dx, int sum sx:
//   Q4_0: d * dx * (u . q - 8 * sx)    Q4_1: d * dx * (u . q) + m * dx * sx    Q8_0: d * dx * (w . q)
// as the CPU's int8 decode path (bundle_kernel_i8.c) and llama.cpp's vec_dot_q4_0_q8_1 compute them. Blocks are
// 2-byte aligned (18 / 20 / 34 bytes): 16-bit loads.
template <int F> struct Blk;
template <> struct Blk<0> {  // Q4_0: half d, 16 bytes: element j low nibble of byte j, element j + 16 high nibble
    static constexpr int BYTES = 18, WORDS = 4;
    __device__ static void load(const u8* b, int* w, float& d, float& m) {
        d = ld_half(b); m = 0.f;
        #pragma unroll
        for (int j = 0; j < 4; j++) w[j] = ld_int_b2(b + 2 + 4 * j);
    }
    __device__ static int udot(const int* w, int4 x0, int4 x1) {
        int s = __dp4a(w[0] & 0x0F0F0F0F, x0.x, 0);
        s = __dp4a(w[1] & 0x0F0F0F0F, x0.y, s);
        s = __dp4a(w[2] & 0x0F0F0F0F, x0.z, s);
        s = __dp4a(w[3] & 0x0F0F0F0F, x0.w, s);
        s = __dp4a((w[0] >> 4) & 0x0F0F0F0F, x1.x, s);
        s = __dp4a((w[1] >> 4) & 0x0F0F0F0F, x1.y, s);
        s = __dp4a((w[2] >> 4) & 0x0F0F0F0F, x1.z, s);
        return __dp4a((w[3] >> 4) & 0x0F0F0F0F, x1.w, s);
    }
    __device__ static float dot(const int* w, float d, float m, int4 x0, int4 x1, float dx, int sx) {
        return d * dx * (float)(udot(w, x0, x1) - 8 * sx);
    }
};
template <> struct Blk<1> {  // Q4_1: half d, half m, nibbles as Q4_0; w = d * u + m
    static constexpr int BYTES = 20, WORDS = 4;
    __device__ static void load(const u8* b, int* w, float& d, float& m) {
        d = ld_half(b); m = ld_half(b + 2);
        #pragma unroll
        for (int j = 0; j < 4; j++) w[j] = ld_int_b2(b + 4 + 4 * j);
    }
    __device__ static float dot(const int* w, float d, float m, int4 x0, int4 x1, float dx, int sx) {
        return d * dx * (float)Blk<0>::udot(w, x0, x1) + m * dx * (float)sx;
    }
};
template <> struct Blk<2> {  // Q8_0: half d, 32 signed bytes
    static constexpr int BYTES = 34, WORDS = 8;
    __device__ static void load(const u8* b, int* w, float& d, float& m) {
        d = ld_half(b); m = 0.f;
        #pragma unroll
        for (int j = 0; j < 8; j++) w[j] = ld_int_b2(b + 2 + 4 * j);
    }
    __device__ static float dot(const int* w, float d, float m, int4 x0, int4 x1, float dx, int sx) {
        int s = __dp4a(w[0], x0.x, 0);
        s = __dp4a(w[1], x0.y, s);
        s = __dp4a(w[2], x0.z, s);
        s = __dp4a(w[3], x0.w, s);
        s = __dp4a(w[4], x1.x, s);
        s = __dp4a(w[5], x1.y, s);
        s = __dp4a(w[6], x1.z, s);
        s = __dp4a(w[7], x1.w, s);
        return d * dx * (float)s;
    }
};

// acc[r][s] += row r . x[s] for the R rows at base + min(r, last) * stride (a warp; lane takes blocks lane,
// lane + 32, ...). IN_FLIGHT blocks of every row are loaded before the first is used, so a warp has
// R * IN_FLIGHT * 32 blocks in flight; x (int8, L1-resident) is read once per block for all R rows.
template <int F, int R>
__device__ __forceinline__ void dot_rows(const u8* base, long long stride, int last, int nb, int K,
                                         const signed char* xq, const float* xd, const int* xs, int S,
                                         float (&acc)[R][MAX_S]) {
    typedef Blk<F> B;
    int lane = threadIdx.x & 31;
    for (int b0 = 0; b0 < nb; b0 += 32 * IN_FLIGHT) {
        int w[R][IN_FLIGHT][B::WORDS];
        float d[R][IN_FLIGHT], m[R][IN_FLIGHT];
        #pragma unroll
        for (int r = 0; r < R; r++) {
            const u8* row = base + (long long)min(r, last) * stride;
            #pragma unroll
            for (int i = 0; i < IN_FLIGHT; i++) {
                int b = b0 + lane + 32 * i;
                if (b < nb) B::load(row + (long long)b * B::BYTES, w[r][i], d[r][i], m[r][i]);
            }
        }
        #pragma unroll
        for (int i = 0; i < IN_FLIGHT; i++) {
            int b = b0 + lane + 32 * i;
            if (b >= nb) break;
            #pragma unroll
            for (int s = 0; s < MAX_S; s++) {
                if (s >= S) break;
                const int4* xb = (const int4*)(xq + (long long)s * K + 32 * b);
                int4 x0 = __ldg(xb), x1 = __ldg(xb + 1);
                float dx = __ldg(xd + s * nb + b);
                int sx = __ldg(xs + s * nb + b);
                #pragma unroll
                for (int r = 0; r < R; r++) acc[r][s] += B::dot(w[r][i], d[r][i], m[r][i], x0, x1, dx, sx);
            }
        }
    }
}

// y[s * y_stride + row] = W[row] . x[s] for S <= MAX_S tokens: a warp per 2 rows (llama.cpp's mmvq shape, x
// quantized once per product by quantize_x). H200, 4096 x 11008 Q4_0: 10.3 us (2.46 TB/s) with 1 row per warp.
template <int F>
__device__ __forceinline__ void matvec_t(const u8* W, long long row_stride, int n_rows, int K, const signed char* xq,
                                         const float* xd, const int* xs, int S, float* y, int y_stride) {
    int row0 = 2 * ((blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (row0 >= n_rows) return;
    float acc[2][MAX_S] = {};
    int last = min(1, n_rows - 1 - row0);
    dot_rows<F, 2>(W + (long long)row0 * row_stride, row_stride, last, K >> 5, K, xq, xd, xs, S, acc);
    #pragma unroll
    for (int r = 0; r < 2; r++) {
        if (r > last) break;
        #pragma unroll
        for (int s = 0; s < MAX_S; s++) {
            if (s >= S) break;
            float v = warp_sum(acc[r][s]);
            if (lane == 0) y[(long long)s * y_stride + row0 + r] = v;
        }
    }
}

__device__ __forceinline__ float activate(float g, int act) {
    if (act == 0) return g / (1.f + __expf(-g));
    return 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
}

// h[s * n + i] = act(gate_i . x_s) * (up_i . x_s) for records i < n at R + i * rb: a warp per record, its gate
// and up rows as the two rows of dot_rows where they share a format
template <int GF, int UF>
__device__ __forceinline__ void gate_up_t(const u8* Rb, long long rb, int n, int K, long long up_off, int act,
                                          const signed char* xq, const float* xd, const int* xs, int S, float* h) {
    int i = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (i >= n) return;
    const u8* rec = Rb + (long long)i * rb;
    int nb = K >> 5;
    float gu[2][MAX_S] = {};
    if (GF == UF) {
        dot_rows<GF, 2>(rec, up_off, 1, nb, K, xq, xd, xs, S, gu);
    } else {
        float g[1][MAX_S] = {}, u[1][MAX_S] = {};
        dot_rows<GF, 1>(rec, 0, 0, nb, K, xq, xd, xs, S, g);
        dot_rows<UF, 1>(rec + up_off, 0, 0, nb, K, xq, xd, xs, S, u);
        #pragma unroll
        for (int s = 0; s < MAX_S; s++) { gu[0][s] = g[0][s]; gu[1][s] = u[0][s]; }
    }
    #pragma unroll
    for (int s = 0; s < MAX_S; s++) {
        if (s >= S) break;
        float gs = warp_sum(gu[0][s]), us = warp_sum(gu[1][s]);
        if (lane == 0) h[(long long)s * n + i] = activate(gs, act) * us;
    }
}

#define MATVEC(F, NAME)                                                                                             \
extern "C" __global__ void NAME(const u8* W, long long row_stride, int n_rows, int K, const signed char* xq,       \
                                const float* xd, const int* xs, int S, float* y, int y_stride) {                  \
    matvec_t<F>(W, row_stride, n_rows, K, xq, xd, xs, S, y, y_stride);                                             \
}
MATVEC(0, matvec_0) MATVEC(1, matvec_1) MATVEC(2, matvec_2)

#define GATE_UP(G, U, NAME)                                                                                         \
extern "C" __global__ void NAME(const u8* Rb, long long rb, int n, int K, long long up_off, int act,               \
                                const signed char* xq, const float* xd, const int* xs, int S, float* h) {         \
    gate_up_t<G, U>(Rb, rb, n, K, up_off, act, xq, xd, xs, S, h);                                                  \
}
GATE_UP(0, 0, gate_up_00) GATE_UP(0, 1, gate_up_01) GATE_UP(0, 2, gate_up_02)
GATE_UP(1, 0, gate_up_10) GATE_UP(1, 1, gate_up_11) GATE_UP(1, 2, gate_up_12)
GATE_UP(2, 0, gate_up_20) GATE_UP(2, 1, gate_up_21) GATE_UP(2, 2, gate_up_22)

// Value e (0..31) of the block at b: fmt 0 Q4_0, 1 Q4_1, 2 Q8_0
__device__ __forceinline__ float block_value(const u8* b, int fmt, int e) {
    if (fmt == 2) return ld_half(b) * (float)(signed char)b[2 + e];
    const u8* q = b + (fmt == 1 ? 4 : 2);
    int v = e < 16 ? (q[e] & 15) : (q[e - 16] >> 4);
    return fmt == 1 ? ld_half(b) * v + ld_half(b + 2) : ld_half(b) * (v - 8);
}

// y[s * d + j] += sum_{i in chunk} h[s * n + i] * down_i[j]; down column of record i at R + i * rb + down_off
extern "C" __global__ void bundle_down(const u8* R, long long rb, int n, int d, int dfmt, int dbytes,
                                       long long down_off, const float* h, int S, float* y, int chunk) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    int i0 = blockIdx.y * chunk, i1 = min(n, i0 + chunk);
    int blk = j >> 5, e = j & 31;
    float acc[MAX_S] = {0.f};
    for (int i = i0; i < i1; i++) {
        float w = block_value(R + (long long)i * rb + down_off + (long long)blk * dbytes, dfmt, e);
        #pragma unroll
        for (int s = 0; s < MAX_S; s++) if (s < S) acc[s] += h[(long long)s * n + i] * w;
    }
    #pragma unroll
    for (int s = 0; s < MAX_S; s++) if (s < S) atomicAdd(y + (long long)s * d + j, acc[s]);
}

// out[r * K + k] = W[r][k] as float32 (rows of one matrix, for prompt batches through cuBLAS)
extern "C" __global__ void dequantize_rows(const u8* W, long long row_stride, int n_rows, int K, int fmt,
                                           int block_bytes, float* out) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)n_rows * K) return;
    int r = t / K, k = t % K, e = k & 31;
    out[t] = block_value(W + (long long)r * row_stride + (long long)(k >> 5) * block_bytes, fmt, e);
}
"""


class CudaKernels:
    """The compiled module and launch helpers. Arrays are CuPy arrays on the current device."""

    def __init__(self):
        import cupy

        self.cp = cupy
        # no fast math: quantize_x must round as the CPU does (and keep denormals); activate uses __expf itself
        module = cupy.RawModule(code=SOURCE, options=("-std=c++17",))
        self._matvec = {f: module.get_function(f"matvec_{f}") for f in FORMATS.values()}
        self._gate_up = {(g, u): module.get_function(f"gate_up_{g}{u}") for g in FORMATS.values()
                         for u in FORMATS.values()}
        self._down = module.get_function("bundle_down")
        self._dequant = module.get_function("dequantize_rows")
        self._quantize_x = module.get_function("quantize_x")

    @staticmethod
    def fmt(qtype) -> tuple[int, int]:
        if QT(qtype) not in FORMATS:
            from ..errors import UnsupportedModelError

            raise UnsupportedModelError(f"{QT(qtype).name} has no GPU kernel yet (Q4_0, Q4_1, Q8_0 do)")
        return FORMATS[QT(qtype)], BLOCK_BYTES[QT(qtype)]

    def quantize(self, x) -> tuple:
        """x (S, K) float32, S <= MAX_S -> (int8 (S, K), scales (S, K/32), int32 block sums (S, K/32))."""
        cp = self.cp
        S, k = x.shape
        nb = k // 32
        xq, xd, xs = cp.empty((S, k), cp.int8), cp.empty((S, nb), cp.float32), cp.empty((S, nb), cp.int32)
        self._quantize_x(((S * nb * 32 + 255) // 256,), (256,), (cp.ascontiguousarray(x, dtype=cp.float32),
                                                                  np.int32(k), np.int32(S), xq, xd, xs))
        return xq, xd, xs

    def matvec(self, ptr: int, row_stride: int, n_rows: int, k: int, qtype, x, y, xq=None) -> None:
        """y (S, >=n_rows; row stride y.shape[1]) = rows @ x.T for x (S, k) float32; rows at device pointer ptr.
        xq: quantize(x) already made, to share one quantization between products of the same input."""
        fmt, bb = self.fmt(qtype)
        S = x.shape[0]
        if S > MAX_S:
            self._dequant_matmul(ptr, row_stride, n_rows, k, fmt, bb, x, y)
            return
        xq, xd, xs = xq if xq is not None else self.quantize(x)
        grid = ((n_rows + 1) // 2 * 32 + THREADS - 1) // THREADS
        self._matvec[fmt]((grid,), (THREADS,), (np.uint64(ptr), np.int64(row_stride), np.int32(n_rows), np.int32(k),
                                                xq, xd, xs, np.int32(S), y, np.int32(y.shape[1])))

    def _dequant_matmul(self, ptr: int, row_stride: int, n_rows: int, k: int, fmt: int, bb: int, x, y) -> None:
        """A prompt batch: rows dequantized DEQUANT_MAX_BYTES at a time into a float32 scratch, then cuBLAS."""
        chunk = max(1, min(n_rows, DEQUANT_MAX_BYTES // (4 * k)))
        w = self.cp.empty((chunk, k), self.cp.float32)
        for r0 in range(0, n_rows, chunk):
            r = min(chunk, n_rows - r0)
            n = r * k
            self._dequant(((n + 255) // 256,), (256,), (np.uint64(ptr + r0 * row_stride), np.int64(row_stride),
                                                          np.int32(r), np.int32(k), np.int32(fmt), np.int32(bb), w))
            y[:, r0:r0 + r] = x @ w[:r].T

    def bundle(self, ptr: int, n: int, layout, activation: str, x, y, h, xq=None) -> None:
        """y (S, d) += FFN over n records at device pointer ptr; h: scratch (>= MAX_S*n float32). xq: quantize(x)
        when x has at most MAX_S rows and was quantized already."""
        if n == 0:
            return
        d, rb = layout.d_model, layout.record_bytes
        gf, _ = self.fmt(layout.gate_type)
        uf, _ = self.fmt(layout.up_type)
        df, db = self.fmt(layout.down_type)
        gate_up = self._gate_up[(gf, uf)]
        for s0 in range(0, x.shape[0], MAX_S):
            xs, ys = x[s0:s0 + MAX_S], y[s0:s0 + MAX_S]
            S = xs.shape[0]
            q = xq if xq is not None and x.shape[0] <= MAX_S else self.quantize(xs)
            gate_up(((n * 32 + THREADS - 1) // THREADS,), (THREADS,), (
                np.uint64(ptr), np.int64(rb), np.int32(n), np.int32(d), np.int64(layout.gate_bytes),
                np.int32(ACTIVATIONS[activation]), *q, np.int32(S), h))
            self._down(((d + 255) // 256, (n + DOWN_CHUNK - 1) // DOWN_CHUNK), (256,), (
                np.uint64(ptr), np.int64(rb), np.int32(n), np.int32(d), np.int32(df), np.int32(db),
                np.int64(layout.gate_bytes + layout.up_bytes), h, np.int32(S), ys, np.int32(DOWN_CHUNK)))
