"""GPU kernels on GGUF blocks as stored (CuPy RawModule, compiled by NVRTC on first use).

The same bytes the CPU bundle kernel reads: matrix rows of Q4_0 / Q4_1 / Q8_0 blocks, and flash-store records
[gate row | up row | down column]. Nothing is dequantized ahead: a decode product reads each block once, one warp
thread block per output row, the row staged in shared memory with 16-byte loads, then four lanes per 32-weight
block (16-bit reads: blocks are 2-byte aligned), x read as float4. Measured on the H200 (4096 x 11008 Q4_0, CUDA
graph, 25.4 MB): a warp per row reading blocks directly 42 us; a row per block, staged, 24.4 us (64 threads);
8 rows staged per block, a warp each, 28.5 us; int8 x + dp4a 21.7 us; nibbles to float by bit tricks instead of
int-to-float conversions 23.9 us; a persistent grid (16 blocks per SM walking the rows, the next row prefetched
into registers while this one computes) 29.9 us; a plain 16-byte streaming read of the same
bytes 7.8 us (3.25 TB/s). So the products are far from the memory's speed: the 50% bar is not met. Longer prompts (S > MAX_S) dequantize one matrix at a time into a scratch buffer of at
most DEQUANT_MAX_BYTES and use cuBLAS (larger matrices go MAX_S tokens at a time through the fused kernel).

The down projection of a bundle (y[j] += sum_i h[i] * down_i[j], down columns stored per neuron) runs one thread
per output position j over a chunk of neurons and adds its partial sum atomically: the summation order differs
from the CPU kernel's, so GPU and CPU logits agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import os

import numpy as np

from ..loaders.gguf_reader import GGMLQuantizationType as QT

MAX_S = 8  # activations per fused decode product; longer batches dequantize + cuBLAS
FORMATS = {QT.Q4_0: 0, QT.Q4_1: 1, QT.Q8_0: 2}
BLOCK_BYTES = {QT.Q4_0: 18, QT.Q4_1: 20, QT.Q8_0: 34}
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
DOWN_CHUNK = 64
# int8 x measured slower here (H200, 4096 x 11008 Q4_0: 40 vs 27 us with float x): off unless FLASHLM_GPU_INT8=1
INT8_ACTIVATIONS = os.environ.get("FLASHLM_GPU_INT8", "0") == "1"
ROW_THREADS = 64  # threads per output row (a compile-time constant of the module); fastest of 32-256 on the H200
DEQUANT_MAX_BYTES = 32 << 20  # largest float32 transient of one matrix for a prompt batch through cuBLAS  # neurons per thread block in the down projection

SOURCE = r"""
#include <cuda_fp16.h>
typedef unsigned char u8;
typedef unsigned short u16;
#define MAX_S 8

__device__ __forceinline__ float ld_half(const u8* p) {
    return __half2float(__ushort_as_half(*(const u16*)p));
}

// 0..255 -> float without an int-to-float conversion (a quarter-rate instruction): the bits of 2^23 + n, minus 2^23
__device__ __forceinline__ float u8_to_float(unsigned int n) {
    return __int_as_float(0x4B000000u | n) - 8388608.f;
}

// Lane t (0..3) of a 4-lane group: its quarter of one 32-weight block dotted with x (S activations, stride K),
// accumulated into acc[s]. Q4: bytes 4t..4t+3 hold elements 4t..4t+3 (low nibbles) and 4t+16..4t+19 (high);
// Q8_0: bytes 8t..8t+7 are elements 8t..8t+7. x is read as float4 (a warp's 8 groups read 8 consecutive blocks).
__device__ __forceinline__ void quarter_dot(int fmt, const u8* b, int t, const float* x, int K, int S, float* acc) {
    float w[8];
    if (fmt == 2) {
        float d = ld_half(b);
        const u16* q = (const u16*)(b + 2 + 8 * t);
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            u16 v = q[j];
            w[2 * j] = d * (u8_to_float((v & 0xFF) ^ 0x80) - 128.f);
            w[2 * j + 1] = d * (u8_to_float((v >> 8) ^ 0x80) - 128.f);
        }
        #pragma unroll
        for (int s = 0; s < MAX_S; s++) {
            if (s >= S) break;
            const float4* xs = (const float4*)(x + (long long)s * K + 8 * t);
            float4 a = __ldg(xs), c = __ldg(xs + 1);
            acc[s] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * c.x + w[5] * c.y + w[6] * c.z
                    + w[7] * c.w;
        }
        return;
    }
    float d = ld_half(b), m = fmt == 1 ? ld_half(b + 2) : -8.f * d;
    const u16* q = (const u16*)(b + (fmt == 1 ? 4 : 2) + 4 * t);
    unsigned int v = (unsigned int)q[0] | ((unsigned int)q[1] << 16);
    unsigned int lo = v & 0x0F0F0F0Fu, hi = (v >> 4) & 0x0F0F0F0Fu;  // elements 4t..4t+3, 4t+16..4t+19
    #pragma unroll
    for (int j = 0; j < 4; j++) {
        w[j] = d * u8_to_float((lo >> (8 * j)) & 0xFF) + m;
        w[4 + j] = d * u8_to_float((hi >> (8 * j)) & 0xFF) + m;
    }
    #pragma unroll
    for (int s = 0; s < MAX_S; s++) {
        if (s >= S) break;
        const float* xs = x + (long long)s * K + 4 * t;
        float4 a = __ldg((const float4*)xs), c = __ldg((const float4*)(xs + 16));
        acc[s] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * c.x + w[5] * c.y + w[6] * c.z
                + w[7] * c.w;
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// Sum over the ROW_THREADS threads of a row's block: warp shuffles, then the warps' partials through shared memory.
#ifndef ROW_THREADS
#define ROW_THREADS 128
#endif
__device__ __forceinline__ float row_sum(float v, float* red) {
    v = warp_sum(v);
    int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) red[warp] = v;
    __syncthreads();
    float total = 0.f;
    if (threadIdx.x == 0) for (int w = 0; w < ROW_THREADS / 32; w++) total += red[w];
    __syncthreads();
    return total;
}

// Copy [src, src + nbytes) into shared memory with 16-byte loads, all issued at once (a row's bytes in flight
// together: one load-use chain per 2-byte access left the H200 at 19% of its bandwidth); returns src's image.
// Reads up to 15 bytes around the range, inside the same 512-byte-rounded allocation.
__device__ __forceinline__ const u8* stage(const u8* src, int nbytes, u8* smem) {
    unsigned long long a = (unsigned long long)src & ~15ULL;
    int lead = (int)((unsigned long long)src - a);
    int n16 = (lead + nbytes + 15) >> 4;
    const uint4* s4 = (const uint4*)a;
    uint4* d4 = (uint4*)smem;
    for (int i = threadIdx.x; i < n16; i += blockDim.x) d4[i] = __ldg(s4 + i);
    __syncthreads();
    return smem + lead;
}

// ---- int8 activations (decode, S <= MAX_S): x quantized per 32-block once per product, dp4a dot products ----
// xq[s*K + k] int8, xd[s*nb + b] its scale, xs[s*nb + b] the exact float sum of the block (Q4_1's offset term)
extern "C" __global__ void quantize_x(const float* x, int K, int S, signed char* xq, float* xd, float* xs) {
    int blk = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    int nb = K >> 5;
    if (blk >= nb * S) return;
    float v = x[(long long)blk * 32 + lane];
    float amax = fabsf(v), sum = v;
    for (int o = 16; o > 0; o >>= 1) {
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, o));
        sum += __shfl_xor_sync(0xffffffff, sum, o);
    }
    float d = amax / 127.f;
    xq[(long long)blk * 32 + lane] = (signed char)(d > 0.f ? __float2int_rn(v / d) : 0);
    if (lane == 0) { xd[blk] = d; xs[blk] = sum; }
}

__device__ __forceinline__ int ld_int_b2(const u8* p) {  // 4 bytes from a 2-byte aligned address
    const u16* q = (const u16*)p;
    return (int)q[0] | ((int)q[1] << 16);
}

// Lane t's quarter of block b (as quarter_dot), int8 x: acc[s] += w . x
__device__ __forceinline__ void quarter_dot_q8(int fmt, const u8* b, int t, int blk, const signed char* xq,
                                               const float* xd, const float* xs, int K, int nb, int S,
                                               float* acc) {
    float d = ld_half(b);
    if (fmt == 2) {
        int w0 = ld_int_b2(b + 2 + 8 * t), w1 = ld_int_b2(b + 6 + 8 * t);
        #pragma unroll
        for (int s = 0; s < MAX_S; s++) {
            if (s >= S) break;
            const int* xi = (const int*)(xq + (long long)s * K + blk * 32 + 8 * t);
            int sumi = __dp4a(w0, xi[0], __dp4a(w1, xi[1], 0));
            acc[s] += d * xd[s * nb + blk] * (float)sumi;
        }
        return;
    }
    int v = ld_int_b2(b + (fmt == 1 ? 4 : 2) + 4 * t);
    int lo = v & 0x0F0F0F0F, hi = (v >> 4) & 0x0F0F0F0F;
    float m = fmt == 1 ? ld_half(b + 2) : 0.f;
    #pragma unroll
    for (int s = 0; s < MAX_S; s++) {
        if (s >= S) break;
        const signed char* xb = xq + (long long)s * K + blk * 32;
        int x0 = *(const int*)(xb + 4 * t), x1 = *(const int*)(xb + 16 + 4 * t);
        int sumi = __dp4a(lo, x0, __dp4a(hi, x1, 0));
        float dx = xd[s * nb + blk];
        if (fmt == 0) {
            int sumq = __dp4a(0x01010101, x0, __dp4a(0x01010101, x1, 0));
            acc[s] += d * dx * (float)(sumi - 8 * sumq);
        } else {
            acc[s] += d * dx * (float)sumi + (t == 0 ? m * xs[s * nb + blk] : 0.f);
        }
    }
}

// One quarter-block dot, float x or (xq != 0) the int8 x that quantize_x made: a branch uniform over the grid.
__device__ __forceinline__ void dot_any(int fmt, const u8* blk, int t, int b, const float* x, const signed char* xq,
                                        const float* xd, const float* xs, int K, int nb, int S, float* acc) {
    if (xq) quarter_dot_q8(fmt, blk, t, b, xq, xd, xs, K, nb, S, acc);
    else quarter_dot(fmt, blk, t, x + b * 32, K, S, acc);
}

// y[s * y_stride + r] = W[r] . x[s]; one row per thread block of ROW_THREADS, staged in shared memory, then
// 4 lanes per 32-weight block.
extern "C" __global__ void matvec(const u8* W, long long row_stride, int n_rows, int K, int fmt, int block_bytes,
                                  const float* x, const signed char* xq, const float* xd, const float* xs, int S,
                                  float* y, int y_stride) {
    extern __shared__ __align__(16) u8 smem[];
    __shared__ float red[ROW_THREADS / 32];
    int row = blockIdx.x;
    int nb = K >> 5, t = threadIdx.x & 3;
    const u8* w = stage(W + (long long)row * row_stride, nb * block_bytes, smem);
    float acc[MAX_S] = {0.f};
    for (int b = threadIdx.x >> 2; b < nb; b += ROW_THREADS / 4)
        dot_any(fmt, w + b * block_bytes, t, b, x, xq, xd, xs, K, nb, S, acc);
    #pragma unroll
    for (int s = 0; s < MAX_S; s++) {
        if (s >= S) break;
        float v = row_sum(acc[s], red);
        if (threadIdx.x == 0) y[(long long)s * y_stride + row] = v;
    }
}

__device__ __forceinline__ float activate(float g, int act) {
    if (act == 0) return g / (1.f + __expf(-g));
    return 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
}

// h[s * n + i] = act(gate_i . x_s) * (up_i . x_s) for records i < n at R + i * rb; one record per thread block
extern "C" __global__ void bundle_gate_up(const u8* R, long long rb, int n, int K, int gfmt, int gbytes, int ufmt,
                                          int ubytes, long long up_off, int act, const float* x,
                                          const signed char* xq, const float* xd, const float* xs, int S, float* h) {
    extern __shared__ __align__(16) u8 smem[];
    __shared__ float red[ROW_THREADS / 32];
    int i = blockIdx.x;
    int nb = K >> 5, t = threadIdx.x & 3;
    const u8* rec = stage(R + (long long)i * rb, (int)up_off + nb * ubytes, smem);
    float g[MAX_S] = {0.f}, u[MAX_S] = {0.f};
    for (int b = threadIdx.x >> 2; b < nb; b += ROW_THREADS / 4) {
        dot_any(gfmt, rec + (long long)b * gbytes, t, b, x, xq, xd, xs, K, nb, S, g);
        dot_any(ufmt, rec + up_off + (long long)b * ubytes, t, b, x, xq, xd, xs, K, nb, S, u);
    }
    #pragma unroll
    for (int s = 0; s < MAX_S; s++) {
        if (s >= S) break;
        float gs = row_sum(g[s], red), us = row_sum(u[s], red);
        if (threadIdx.x == 0) h[(long long)s * n + i] = activate(gs, act) * us;
    }
}

// Value e (0..31) of the block at b: fmt 0 Q4_0, 1 Q4_1, 2 Q8_0
__device__ __forceinline__ float block_value(const u8* b, int fmt, int e) {
    float w;
    if (fmt == 2) {
        w = ld_half(b) * (float)(signed char)b[2 + e];
    } else {
        const u8* q = b + (fmt == 1 ? 4 : 2);
        int v = e < 16 ? (q[e] & 15) : (q[e - 16] >> 4);
        w = fmt == 1 ? ld_half(b) * v + ld_half(b + 2) : ld_half(b) * (v - 8);
    }
    return w;
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

// out[r * K + k] = W[r][k] as float32 (one matrix at a time, for prompt batches through cuBLAS)
extern "C" __global__ void dequantize_rows(const u8* W, long long row_stride, int n_rows, int K, int fmt,
                                           int block_bytes, float* out) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)n_rows * K) return;
    int r = t / K, k = t % K, e = k & 31;
    out[t] = block_value(W + (long long)r * row_stride + (long long)(k >> 5) * block_bytes, fmt, e);
}
"""


STAGE_SLACK = 64  # bytes the staging loads may read past a row: every buffer the kernels read has them spare


def upload(cp, host: np.ndarray):
    """host bytes -> a GPU array of the same shape in an allocation STAGE_SLACK bytes longer."""
    flat = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
    buf = cp.empty(flat.nbytes + STAGE_SLACK, cp.uint8)
    buf[:flat.nbytes].set(flat)
    return buf[:flat.nbytes].view(host.dtype).reshape(host.shape)


class CudaKernels:
    """The compiled module and launch helpers. Arrays are CuPy arrays on the current device. int8_activations:
    decode products (S <= MAX_S) quantize x per 32-block and use dp4a, as the CPU kernel's decode path and
    llama.cpp do (off by default: see INT8_ACTIVATIONS)."""

    def __init__(self, row_threads: int = ROW_THREADS, int8_activations: bool = INT8_ACTIVATIONS):
        import cupy

        self.cp, self.row_threads, self.int8 = cupy, row_threads, int8_activations
        module = cupy.RawModule(code=SOURCE, options=("--use_fast_math", "-std=c++17",
                                                      f"-DROW_THREADS={row_threads}"))
        self._matvec = module.get_function("matvec")
        self._gate_up = module.get_function("bundle_gate_up")
        self._down = module.get_function("bundle_down")
        self._dequant = module.get_function("dequantize_rows")
        self._quantize_x = module.get_function("quantize_x")

    @staticmethod
    def fmt(qtype) -> tuple[int, int]:
        if QT(qtype) not in FORMATS:
            from ..errors import UnsupportedModelError

            raise UnsupportedModelError(f"{QT(qtype).name} has no GPU kernel yet (Q4_0, Q4_1, Q8_0 do)")
        return FORMATS[QT(qtype)], BLOCK_BYTES[QT(qtype)]

    def quantize(self, x):
        """x (S, K) float32 -> (int8 (S, K), scales (S, K/32), block sums (S, K/32))."""
        cp = self.cp
        S, k = x.shape
        nb = k // 32
        xq, xd, xs = cp.empty((S, k), cp.int8), cp.empty((S, nb), cp.float32), cp.empty((S, nb), cp.float32)
        self._quantize_x(((S * nb * 32 + 255) // 256,), (256,), (x, np.int32(k), np.int32(S), xq, xd, xs))
        return xq, xd, xs

    def _x_int8(self, x, xq) -> tuple:
        """The kernels' (xq, xd, xs) arguments: x quantized (or the given quantization) with int8 activations,
        null pointers (float x) without."""
        if not self.int8:
            return (np.uint64(0),) * 3
        return xq if xq is not None else self.quantize(x)

    def matvec(self, ptr: int, row_stride: int, n_rows: int, k: int, qtype, x, y, xq=None) -> None:
        """y (S, >=n_rows; row stride y.shape[1]) = rows @ x.T for x (S, k) float32; rows at device pointer ptr.
        xq: x already quantized (quantize(x)), to share one quantization between products of the same input."""
        cp = self.cp
        fmt, bb = self.fmt(qtype)
        s_total = x.shape[0]
        if s_total > MAX_S and n_rows * k * 4 > DEQUANT_MAX_BYTES:  # too big a transient: fused, MAX_S at a time
            for s0 in range(0, s_total, MAX_S):
                self.matvec(ptr, row_stride, n_rows, k, qtype, x[s0:s0 + MAX_S], y[s0:s0 + MAX_S])
            return
        if s_total > MAX_S:
            w = cp.empty((n_rows, k), cp.float32)
            n = n_rows * k
            self._dequant(((n + 255) // 256,), (256,), (np.uint64(ptr), np.int64(row_stride), np.int32(n_rows),
                                                          np.int32(k), np.int32(fmt), np.int32(bb), w))
            y[:, :n_rows] = x @ w.T
            return
        self._matvec((n_rows,), (self.row_threads,), (
            np.uint64(ptr), np.int64(row_stride), np.int32(n_rows), np.int32(k), np.int32(fmt), np.int32(bb), x,
            *self._x_int8(x, xq), np.int32(s_total), y, np.int32(y.shape[1])), shared_mem=k // 32 * bb + 32)

    def bundle(self, ptr: int, n: int, layout, activation: str, x, y, h, xq=None) -> None:
        """y (S, d) += FFN over n records at device pointer ptr; h: scratch (>= S*n float32). xq: quantize(x)
        when x has at most MAX_S rows and was quantized already."""
        if n == 0:
            return
        d, rb = layout.d_model, layout.record_bytes
        gf, gb = self.fmt(layout.gate_type)
        uf, ub = self.fmt(layout.up_type)
        df, db = self.fmt(layout.down_type)
        for s0 in range(0, x.shape[0], MAX_S):
            xs, ys = x[s0:s0 + MAX_S], y[s0:s0 + MAX_S]
            S = xs.shape[0]
            q = self._x_int8(xs, xq if x.shape[0] <= MAX_S else None)
            self._gate_up((n,), (self.row_threads,), (
                np.uint64(ptr), np.int64(rb), np.int32(n), np.int32(d), np.int32(gf), np.int32(gb), np.int32(uf),
                np.int32(ub), np.int64(layout.gate_bytes), np.int32(ACTIVATIONS[activation]), xs, *q, np.int32(S),
                h), shared_mem=layout.gate_bytes + layout.up_bytes + 32)
            self._down(((d + 255) // 256, (n + DOWN_CHUNK - 1) // DOWN_CHUNK), (256,), (
                np.uint64(ptr), np.int64(rb), np.int32(n), np.int32(d), np.int32(df), np.int32(db),
                np.int64(layout.gate_bytes + layout.up_bytes), h, np.int32(S), ys, np.int32(DOWN_CHUNK)))
