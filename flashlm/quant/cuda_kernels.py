"""GPU kernels on GGUF blocks as stored (CuPy RawModule, compiled by NVRTC on first use).

The same bytes the CPU bundle kernel reads: matrix rows of Q4_0 / Q4_1 / Q8_0 blocks, and flash-store records
[gate row | up row | down column]. Nothing is dequantized ahead: a decode product reads each block once, one warp
per output row, four lanes per 32-weight block (16-bit loads: blocks are 2-byte aligned), so a warp reads 8
consecutive blocks per step and x as float4. Longer prompts (S > MAX_S) dequantize one matrix at a time into a scratch buffer of at
most DEQUANT_MAX_BYTES and use cuBLAS (larger matrices go MAX_S tokens at a time through the fused kernel).

The down projection of a bundle (y[j] += sum_i h[i] * down_i[j], down columns stored per neuron) runs one thread
per output position j over a chunk of neurons and adds its partial sum atomically: the summation order differs
from the CPU kernel's, so GPU and CPU logits agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as QT

MAX_S = 8  # activations per fused decode product; longer batches dequantize + cuBLAS
FORMATS = {QT.Q4_0: 0, QT.Q4_1: 1, QT.Q8_0: 2}
BLOCK_BYTES = {QT.Q4_0: 18, QT.Q4_1: 20, QT.Q8_0: 34}
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
DOWN_CHUNK = 64
DEQUANT_MAX_BYTES = 32 << 20  # largest float32 transient of one matrix for a prompt batch through cuBLAS  # neurons per thread block in the down projection

SOURCE = r"""
#include <cuda_fp16.h>
typedef unsigned char u8;
typedef unsigned short u16;
#define MAX_S 8

__device__ __forceinline__ float ld_half(const u8* p) {
    return __half2float(__ushort_as_half(*(const u16*)p));
}

// Lane t (0..3) of a 4-lane group: its quarter of one 32-weight block dotted with x (S activations, stride K),
// accumulated into acc[s]. Q4: bytes 4t..4t+3 hold elements 4t..4t+3 (low nibbles) and 4t+16..4t+19 (high);
// Q8_0: bytes 8t..8t+7 are elements 8t..8t+7. x is read as float4 (a warp's 8 groups read 8 consecutive blocks).
__device__ __forceinline__ void quarter_dot(int fmt, const u8* b, int t, const float* x, int K, int S, float* acc) {
    float w[8];
    const float* xo;
    if (fmt == 2) {
        float d = ld_half(b);
        const u16* q = (const u16*)(b + 2 + 8 * t);
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            u16 v = q[j];
            w[2 * j] = d * (float)(signed char)(v & 0xFF);
            w[2 * j + 1] = d * (float)(signed char)(v >> 8);
        }
        for (int s = 0; s < S; s++) {
            const float4* xs = (const float4*)(x + (long long)s * K + 8 * t);
            float4 a = __ldg(xs), c = __ldg(xs + 1);
            acc[s] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * c.x + w[5] * c.y + w[6] * c.z
                    + w[7] * c.w;
        }
        return;
    }
    float d = ld_half(b), m = fmt == 1 ? ld_half(b + 2) : -8.f * d;
    const u16* q = (const u16*)(b + (fmt == 1 ? 4 : 2) + 4 * t);
    u16 v0 = q[0], v1 = q[1];
    w[0] = d * (float)(v0 & 15) + m;        w[1] = d * (float)((v0 >> 8) & 15) + m;
    w[2] = d * (float)(v1 & 15) + m;        w[3] = d * (float)((v1 >> 8) & 15) + m;
    w[4] = d * (float)((v0 >> 4) & 15) + m; w[5] = d * (float)(v0 >> 12) + m;
    w[6] = d * (float)((v1 >> 4) & 15) + m; w[7] = d * (float)(v1 >> 12) + m;
    for (int s = 0; s < S; s++) {
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

// y[s * y_stride + r] = W[r] . x[s]   for r < n_rows; W row r at W + r * row_stride (+ 0)
extern "C" __global__ void matvec(const u8* W, long long row_stride, int n_rows, int K, int fmt, int block_bytes,
                                  const float* x, int S, float* y, int y_stride) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= n_rows) return;
    const u8* w = W + (long long)row * row_stride;
    float acc[MAX_S] = {0.f};
    int nb = K >> 5, t = lane & 3;
    for (int b = lane >> 2; b < nb; b += 8) quarter_dot(fmt, w + (long long)b * block_bytes, t, x + b * 32, K, S, acc);
    for (int s = 0; s < S; s++) {
        float v = warp_sum(acc[s]);
        if (lane == 0) y[(long long)s * y_stride + row] = v;
    }
}

__device__ __forceinline__ float activate(float g, int act) {
    if (act == 0) return g / (1.f + __expf(-g));
    return 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
}

// h[s * n + i] = act(gate_i . x_s) * (up_i . x_s) for records i < n at R + i * rb
extern "C" __global__ void bundle_gate_up(const u8* R, long long rb, int n, int K, int gfmt, int gbytes, int ufmt,
                                          int ubytes, long long up_off, int act, const float* x, int S, float* h) {
    int i = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (i >= n) return;
    const u8* rec = R + (long long)i * rb;
    float g[MAX_S] = {0.f}, u[MAX_S] = {0.f};
    int nb = K >> 5, t = lane & 3;
    for (int b = lane >> 2; b < nb; b += 8) {
        quarter_dot(gfmt, rec + (long long)b * gbytes, t, x + b * 32, K, S, g);
        quarter_dot(ufmt, rec + up_off + (long long)b * ubytes, t, x + b * 32, K, S, u);
    }
    for (int s = 0; s < S; s++) {
        float gs = warp_sum(g[s]), us = warp_sum(u[s]);
        if (lane == 0) h[(long long)s * n + i] = activate(gs, act) * us;
    }
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
        const u8* b = R + (long long)i * rb + down_off + (long long)blk * dbytes;
        float w;
        if (dfmt == 2) {
            w = ld_half(b) * (float)(signed char)b[2 + e];
        } else {
            const u8* q = b + (dfmt == 1 ? 4 : 2);
            int v = e < 16 ? (q[e] & 15) : (q[e - 16] >> 4);
            w = dfmt == 1 ? ld_half(b) * v + ld_half(b + 2) : ld_half(b) * (v - 8);
        }
        for (int s = 0; s < S; s++) acc[s] += h[(long long)s * n + i] * w;
    }
    for (int s = 0; s < S; s++) atomicAdd(y + (long long)s * d + j, acc[s]);
}

// out[r * K + k] = W[r][k] as float32 (one matrix at a time, for prompt batches through cuBLAS)
extern "C" __global__ void dequantize_rows(const u8* W, long long row_stride, int n_rows, int K, int fmt,
                                           int block_bytes, float* out) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)n_rows * K) return;
    int r = t / K, k = t % K, e = k & 31;
    const u8* b = W + (long long)r * row_stride + (long long)(k >> 5) * block_bytes;
    float w;
    if (fmt == 2) {
        w = ld_half(b) * (float)(signed char)b[2 + e];
    } else {
        const u8* q = b + (fmt == 1 ? 4 : 2);
        int v = e < 16 ? (q[e] & 15) : (q[e - 16] >> 4);
        w = fmt == 1 ? ld_half(b) * v + ld_half(b + 2) : ld_half(b) * (v - 8);
    }
    out[t] = w;
}
"""


class CudaKernels:
    """The compiled module and launch helpers. Arrays are CuPy arrays on the current device."""

    def __init__(self):
        import cupy

        self.cp = cupy
        module = cupy.RawModule(code=SOURCE, options=("--use_fast_math", "-std=c++17"))
        self._matvec = module.get_function("matvec")
        self._gate_up = module.get_function("bundle_gate_up")
        self._down = module.get_function("bundle_down")
        self._dequant = module.get_function("dequantize_rows")

    @staticmethod
    def fmt(qtype) -> tuple[int, int]:
        if QT(qtype) not in FORMATS:
            from ..errors import UnsupportedModelError

            raise UnsupportedModelError(f"{QT(qtype).name} has no GPU kernel yet (Q4_0, Q4_1, Q8_0 do)")
        return FORMATS[QT(qtype)], BLOCK_BYTES[QT(qtype)]

    def matvec(self, ptr: int, row_stride: int, n_rows: int, k: int, qtype, x, y) -> None:
        """y (S, >=n_rows; row stride y.shape[1]) = rows @ x.T for x (S, k) float32; rows at device pointer ptr."""
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
        grid = ((n_rows * 32 + 255) // 256,)
        self._matvec(grid, (256,), (np.uint64(ptr), np.int64(row_stride), np.int32(n_rows), np.int32(k),
                                    np.int32(fmt), np.int32(bb), x, np.int32(s_total), y, np.int32(y.shape[1])))

    def bundle(self, ptr: int, n: int, layout, activation: str, x, y, h) -> None:
        """y (S, d) += FFN over n records at device pointer ptr; h: scratch (>= S*n float32)."""
        if n == 0:
            return
        d, rb = layout.d_model, layout.record_bytes
        gf, gb = self.fmt(layout.gate_type)
        uf, ub = self.fmt(layout.up_type)
        df, db = self.fmt(layout.down_type)
        for s0 in range(0, x.shape[0], MAX_S):
            xs, ys = x[s0:s0 + MAX_S], y[s0:s0 + MAX_S]
            S = xs.shape[0]
            self._gate_up(((n * 32 + 255) // 256,), (256,), (
                np.uint64(ptr), np.int64(rb), np.int32(n), np.int32(d), np.int32(gf), np.int32(gb), np.int32(uf),
                np.int32(ub), np.int64(layout.gate_bytes), np.int32(ACTIVATIONS[activation]), xs, np.int32(S), h))
            self._down(((d + 255) // 256, (n + DOWN_CHUNK - 1) // DOWN_CHUNK), (256,), (
                np.uint64(ptr), np.int64(rb), np.int32(n), np.int32(d), np.int32(df), np.int32(db),
                np.int64(layout.gate_bytes + layout.up_bytes), h, np.int32(S), ys, np.int32(DOWN_CHUNK)))
