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
Longer batches (prompts) go MAX_S tokens at a time through the same kernels, as the CPU path takes int8
products for any number of tokens: CPU and GPU results then differ only by the order of float sums.

The down projection of a bundle (y[j] += sum_i h[i] * down_i[j], down columns stored per neuron) runs one thread
per output position j over a chunk of neurons and adds its partial sum atomically: the summation order differs
from the CPU kernel's, so GPU and CPU logits agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import numpy as np

from ..loaders.gguf_reader import GGMLQuantizationType as QT

MAX_S = 8  # decode products (int8 x) take up to this many tokens; longer batches dequantize + cuBLAS
FORMATS = {QT.Q4_0: 0, QT.Q4_1: 1, QT.Q8_0: 2}
BLOCK_BYTES = {QT.Q4_0: 18, QT.Q4_1: 20, QT.Q8_0: 34}
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
DOWN_CHUNK = 64  # neurons per thread block in the down projection
THREADS = 128  # threads per thread block of the row-pair kernels (4 warps)
BLOCKS_PER_SM = 8  # persistent grid: 32 warps per multiprocessor (H200 lab: 4 / 8 / 16 blocks 8.3 / 8.0 / 8.4 us)
DEQUANT_MAX_BYTES = 8 << 20  # float32 rows dequantized at a time for a prompt batch through cuBLAS

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

// Two rows (a matrix's rows 2p and 2p + 1, or a record's gate and up rows), formats F0 and F1, dotted with x by one
// warp: lane takes blocks lane, lane + 32, ... of a chunk of 32 * NF blocks. A Tile holds one chunk of both rows in
// registers, so a warp loads its next chunk (of this pair or its next pair) before it computes this one.
template <int F0, int F1> struct Tile {
    static constexpr int NF = (Blk<F0>::WORDS + Blk<F1>::WORDS) <= 8 ? 4 : 2;  // blocks per lane in flight
    int w0[NF][Blk<F0>::WORDS], w1[NF][Blk<F1>::WORDS];
    float d0[NF], m0[NF], d1[NF], m1[NF];

    __device__ __forceinline__ void load(const u8* row0, const u8* row1, int b0, int nb) {
        int lane = threadIdx.x & 31;
        #pragma unroll
        for (int i = 0; i < NF; i++) {
            int b = b0 + lane + 32 * i;
            if (b < nb) {
                Blk<F0>::load(row0 + (long long)b * Blk<F0>::BYTES, w0[i], d0[i], m0[i]);
                Blk<F1>::load(row1 + (long long)b * Blk<F1>::BYTES, w1[i], d1[i], m1[i]);
            }
        }
    }

    // acc[r][s] += this chunk of row r . x[s]; x (int8, L1-resident) read once per block for both rows
    __device__ __forceinline__ void dot(int b0, int nb, int K, const signed char* xq, const float* xd, const int* xs,
                                        int S, float (&acc)[2][MAX_S]) const {
        int lane = threadIdx.x & 31;
        #pragma unroll
        for (int i = 0; i < NF; i++) {
            int b = b0 + lane + 32 * i;
            if (b >= nb) break;
            #pragma unroll
            for (int s = 0; s < MAX_S; s++) {
                if (s >= S) break;
                const int4* xb = (const int4*)(xq + (long long)s * K + 32 * b);
                int4 x0 = __ldg(xb), x1 = __ldg(xb + 1);
                float dx = __ldg(xd + s * nb + b);
                int sx = __ldg(xs + s * nb + b);
                acc[0][s] += Blk<F0>::dot(w0[i], d0[i], m0[i], x0, x1, dx, sx);
                acc[1][s] += Blk<F1>::dot(w1[i], d1[i], m1[i], x0, x1, dx, sx);
            }
        }
    }
};

// Rows of pair p: row0 = base + p * pair_stride, row1 = row0 + row_gap (or row0 again where p's second row is
// past the end: n_last_single). Warps walk pairs p = warp, warp + n_warps, ... (a persistent grid of a few thread
// blocks per multiprocessor), each pair's chunks in order, always one chunk ahead in registers.
// finish(p, acc) gets the pair's warp-summed dot products (lane 0 writes).
// H200, 4096 x 11008 Q4_0 (repacked lab copy): one pair per warp, no prefetch 9.6 us; persistent + prefetch 8.0 us.
template <int F0, int F1, class Finish>
__device__ __forceinline__ void walk_pairs(const u8* base, long long pair_stride, long long row_gap, int n_pairs,
                                           bool last_single, int K, const signed char* xq, const float* xd,
                                           const int* xs, int S, Finish finish) {
    typedef Tile<F0, F1> T;
    int nb = K >> 5, step = 32 * T::NF;
    int n_warps = (gridDim.x * blockDim.x) >> 5;
    int p = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (p >= n_pairs) return;
    auto row0 = [&](int q) { return base + (long long)q * pair_stride; };
    auto row1 = [&](int q) { return row0(q) + (last_single && q == n_pairs - 1 ? 0 : row_gap); };
    T cur, nxt;
    int b0 = 0;
    cur.load(row0(p), row1(p), 0, nb);
    float acc[2][MAX_S] = {};
    while (true) {
        int np = p, nb0 = b0 + step;
        if (nb0 >= nb) { np = p + n_warps; nb0 = 0; }
        if (np < n_pairs) nxt.load(row0(np), row1(np), nb0, nb);
        cur.dot(b0, nb, K, xq, xd, xs, S, acc);
        if (np != p) {
            #pragma unroll
            for (int s = 0; s < MAX_S; s++) {
                if (s >= S) break;
                acc[0][s] = warp_sum(acc[0][s]);
                acc[1][s] = warp_sum(acc[1][s]);
            }
            finish(p, acc);
            #pragma unroll
            for (int s = 0; s < MAX_S; s++) acc[0][s] = acc[1][s] = 0.f;
            if (np >= n_pairs) return;
        }
        p = np; b0 = nb0;
        cur = nxt;
    }
}

// y[s * y_stride + row] = W[row] . x[s] for S <= MAX_S tokens (x quantized by quantize_x)
template <int F>
__device__ __forceinline__ void matvec_t(const u8* W, long long row_stride, int n_rows, int K, const signed char* xq,
                                         const float* xd, const int* xs, int S, float* y, int y_stride) {
    int lane = threadIdx.x & 31;
    walk_pairs<F, F>(W, 2 * row_stride, row_stride, (n_rows + 1) / 2, n_rows & 1, K, xq, xd, xs, S,
                     [&](int p, const float (&acc)[2][MAX_S]) {
        if (lane != 0) return;
        #pragma unroll
        for (int s = 0; s < MAX_S; s++) {  // unrolled with a guard: acc stays in registers
            if (s >= S) break;
            y[(long long)s * y_stride + 2 * p] = acc[0][s];
            if (2 * p + 1 < n_rows) y[(long long)s * y_stride + 2 * p + 1] = acc[1][s];
        }
    });
}

__device__ __forceinline__ float activate(float g, int act) {
    if (act == 0) return g / (1.f + __expf(-g));
    return 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
}

// h[s * n + i] = act(gate_i . x_s) * (up_i . x_s) for records i < n at R + i * rb: the pairs are the records' gate
// and up rows
template <int GF, int UF>
__device__ __forceinline__ void gate_up_t(const u8* Rb, long long rb, int n, int K, long long up_off, int act,
                                          const signed char* xq, const float* xd, const int* xs, int S, float* h) {
    int lane = threadIdx.x & 31;
    walk_pairs<GF, UF>(Rb, rb, up_off, n, false, K, xq, xd, xs, S, [&](int i, const float (&acc)[2][MAX_S]) {
        if (lane != 0) return;
        #pragma unroll
        for (int s = 0; s < MAX_S; s++) {
            if (s >= S) break;
            h[(long long)s * n + i] = activate(acc[0][s], act) * acc[1][s];
        }
    });
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

// out[r * K + k] = W[r][k] as float32 (rows r < n_rows at W + r * row_stride: a matrix's rows, or the gate / up /
// down rows of records), for prompt batches through cuBLAS
extern "C" __global__ void dequantize_rows(const u8* W, long long row_stride, int n_rows, int K, int fmt,
                                           int block_bytes, float* out) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)n_rows * K) return;
    int r = t / K, k = t % K;
    out[t] = block_value(W + (long long)r * row_stride + (long long)(k >> 5) * block_bytes, fmt, k & 31);
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
        sms = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["multiProcessorCount"]
        self.max_blocks = sms * BLOCKS_PER_SM

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

    def _grid(self, n_pairs: int) -> tuple[int]:
        """Thread blocks of a row-pair walk: one pair per warp, at most BLOCKS_PER_SM blocks per multiprocessor."""
        return (max(1, min(self.max_blocks, (n_pairs * 32 + THREADS - 1) // THREADS)),)

    def matvec(self, ptr: int, row_stride: int, n_rows: int, k: int, qtype, x, y, xq=None) -> None:
        """y (S, >=n_rows; row stride y.shape[1]) = rows @ x.T for x (S, k) float32; rows at device pointer ptr.
        Decode (S <= MAX_S): int8 x; xq: quantize(x) already made, to share one quantization between products
        of the same input. Prompt batches: float32 x, rows dequantized a slice at a time, cuBLAS."""
        fmt, bb = self.fmt(qtype)
        S = x.shape[0]
        if S > MAX_S:
            chunk = max(1, min(n_rows, DEQUANT_MAX_BYTES // (4 * k)))
            w = self.cp.empty((chunk, k), self.cp.float32)
            for r0 in range(0, n_rows, chunk):
                r = min(chunk, n_rows - r0)
                self._dequantize(ptr + r0 * row_stride, row_stride, r, k, fmt, bb, w)
                y[:, r0:r0 + r] = x @ w[:r].T
            return
        q = xq if xq is not None else self.quantize(x)
        self._matvec[fmt](self._grid((n_rows + 1) // 2), (THREADS,), (
            np.uint64(ptr), np.int64(row_stride), np.int32(n_rows), np.int32(k), *q, np.int32(S), y,
            np.int32(y.shape[1])))

    def _dequantize(self, ptr: int, row_stride: int, n_rows: int, k: int, fmt: int, bb: int, out) -> None:
        n = n_rows * k
        self._dequant(((n + 255) // 256,), (256,), (np.uint64(ptr), np.int64(row_stride), np.int32(n_rows),
                                                      np.int32(k), np.int32(fmt), np.int32(bb), out))

    def bundle(self, ptr: int, n: int, layout, activation: str, x, y, h, xq=None) -> None:
        """y (S, d) += FFN over n records at device pointer ptr. Decode (S <= MAX_S): int8 x, h scratch
        (>= MAX_S*n float32), xq: quantize(x) if made already. Prompt batches: float32 x, the records' gate, up
        and down rows dequantized a slice of neurons at a time, cuBLAS."""
        if n == 0:
            return
        d, rb = layout.d_model, layout.record_bytes
        gf, gb = self.fmt(layout.gate_type)
        uf, ub = self.fmt(layout.up_type)
        df, db = self.fmt(layout.down_type)
        S = x.shape[0]
        if S > MAX_S:
            self._bundle_float(ptr, n, layout, activation, x, y, ((gf, gb), (uf, ub), (df, db)))
            return
        q = xq if xq is not None else self.quantize(x)
        self._gate_up[(gf, uf)](self._grid(n), (THREADS,), (
            np.uint64(ptr), np.int64(rb), np.int32(n), np.int32(d), np.int64(layout.gate_bytes),
            np.int32(ACTIVATIONS[activation]), *q, np.int32(S), h))
        self._down(((d + 255) // 256, (n + DOWN_CHUNK - 1) // DOWN_CHUNK), (256,), (
            np.uint64(ptr), np.int64(rb), np.int32(n), np.int32(d), np.int32(df), np.int32(db),
            np.int64(layout.gate_bytes + layout.up_bytes), h, np.int32(S), y, np.int32(DOWN_CHUNK)))

    def _bundle_float(self, ptr: int, n: int, layout, activation: str, x, y, fmts) -> None:
        cp, d, rb = self.cp, layout.d_model, layout.record_bytes
        chunk = max(1, min(n, DEQUANT_MAX_BYTES // (3 * 4 * d)))
        w = cp.empty((3, chunk, d), cp.float32)
        offsets = (0, layout.gate_bytes, layout.gate_bytes + layout.up_bytes)
        for n0 in range(0, n, chunk):
            c = min(chunk, n - n0)
            for part, ((f, bb), off) in enumerate(zip(fmts, offsets)):
                self._dequantize(ptr + n0 * rb + off, rb, c, d, f, bb, w[part])
            g, u = x @ w[0, :c].T, x @ w[1, :c].T
            if activation == "silu":
                g = g / (1 + cp.exp(-g))
            else:
                g = 0.5 * g * (1 + cp.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
            y += (g * u) @ w[2, :c]
