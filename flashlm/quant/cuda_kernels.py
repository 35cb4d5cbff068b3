"""GPU kernels on GGUF blocks (CuPy RawModule, compiled by NVRTC on first use).

The same blocks the CPU bundle kernel reads (Q4_0 / Q4_1 / Q8_0 / Q5_0 / Q4_K: matrix rows, and flash-store records
[gate row | up row | down column]), never dequantized copies, but rearranged on the GPU after each upload into planar rows
(SOURCE: quant bytes of every block 16-byte aligned, then the scales; GpuRecords for records). Decode products
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

from dataclasses import dataclass

import numpy as np

from ..loaders.gguf_reader import GGMLQuantizationType as QT

MAX_S = 8  # decode products (int8 x) take up to this many tokens; longer batches dequantize + cuBLAS
FORMATS = {QT.Q4_0: 0, QT.Q4_1: 1, QT.Q8_0: 2, QT.Q5_0: 3, QT.Q4_K: 4}  # Blk<F> in SOURCE
UNIT_BYTES = {0: 18, 1: 20, 2: 34, 3: 22, 4: 24}  # planar bytes per 32 values on the GPU
DOWN_FORMATS = {0, 1, 2}  # down columns (kept as GGUF stores them)
# gate / up formats with a kernel: every pair of the first three, and each newer format with itself
GATE_UP_PAIRS = [(g, u) for g in range(3) for u in range(3)] + [(3, 3), (4, 4)]
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

__device__ __forceinline__ float half_at(const u16* p) { return __half2float(__ushort_as_half(__ldg(p))); }

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

// ---- Block formats. In GPU memory a row of nb units of 32 values is stored planar: planarize (below) rearranges the
// GGUF row into the quant bytes of every unit (QW words, 16-byte aligned), then XW extra words per unit (Q5_0's high
// bits), then the scales: HALVES float16 planes (d; Q4_1: then m) or FLOATS float32 planes. Lane b of a warp reads
// unit b's quants with 16-byte loads, 512 contiguous bytes per warp and instruction, where GGUF's 18 / 20 / 34-byte
// blocks need 2-byte loads. Q4_K is re-encoded per 32 values in Q4_1's form with float32 scale d * sc and offset
// -dmin * m (the same values, 24 bytes per 32 instead of 18). H200, 4096 x 11008 Q4_0: 2-byte loads of GGUF blocks
// 14.9 us; planes of 4-byte words 11.0 us; this layout 9.3 us.
// A unit dotted with 32 int8 x values (x0: x[0..15], x1: x[16..31]), scale dx, int sum sx:
//   Q4_0: d dx (u.q - 8 sx)   Q4_1, Q4_K: d dx (u.q) + m dx sx   Q8_0: d dx (w.q)   Q5_0: d dx (u.q - 16 sx)
// as the CPU's int8 decode path (bundle_kernel_i8.c) and llama.cpp's vec_dot_*_q8_1 compute them.
template <int F> struct Blk;
template <> struct Blk<0> {  // Q4_0: half d, 16 bytes: element j low nibble of byte j, element j + 16 high nibble
    static constexpr int BYTES = 18, QOFF = 2, QW = 4, XW = 0, HALVES = 1, FLOATS = 0;
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
    __device__ static float value(int byte, int xw, float d, float m, int e) {
        return d * (float)((e < 16 ? byte & 15 : byte >> 4) - 8);
    }
};
template <> struct Blk<1> {  // Q4_1: half d, half m, nibbles as Q4_0; w = d * u + m
    static constexpr int BYTES = 20, QOFF = 4, QW = 4, XW = 0, HALVES = 2, FLOATS = 0;
    __device__ static float dot(const int* w, float d, float m, int4 x0, int4 x1, float dx, int sx) {
        return d * dx * (float)Blk<0>::udot(w, x0, x1) + m * dx * (float)sx;
    }
    __device__ static float value(int byte, int xw, float d, float m, int e) {
        return d * (float)(e < 16 ? byte & 15 : byte >> 4) + m;
    }
};
template <> struct Blk<2> {  // Q8_0: half d, 32 signed bytes
    static constexpr int BYTES = 34, QOFF = 2, QW = 8, XW = 0, HALVES = 1, FLOATS = 0;
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
    __device__ static float value(int byte, int xw, float d, float m, int e) { return d * (float)(signed char)byte; }
};
// bits 0..3 of b -> bit 4 of bytes 0..3 (Q5_0's fifth bit; llama.cpp's vec_dot_q5_0_q8_1 does the same)
__device__ __forceinline__ int spread4(int b) {
    return ((b << 4) & 0x10) | ((b << 11) & 0x1000) | ((b << 18) & 0x100000) | ((b << 25) & 0x10000000);
}
template <> struct Blk<3> {  // Q5_0: half d, 4 bytes qh (bit i: fifth bit of element i), nibbles as Q4_0
    static constexpr int BYTES = 22, QOFF = 6, QW = 4, XW = 1, HALVES = 1, FLOATS = 0;
    __device__ static float dot(const int* w, float d, float m, int4 x0, int4 x1, float dx, int sx) {
        int qh = w[4];
        int s = __dp4a((w[0] & 0x0F0F0F0F) | spread4(qh), x0.x, 0);
        s = __dp4a((w[1] & 0x0F0F0F0F) | spread4(qh >> 4), x0.y, s);
        s = __dp4a((w[2] & 0x0F0F0F0F) | spread4(qh >> 8), x0.z, s);
        s = __dp4a((w[3] & 0x0F0F0F0F) | spread4(qh >> 12), x0.w, s);
        s = __dp4a(((w[0] >> 4) & 0x0F0F0F0F) | spread4(qh >> 16), x1.x, s);
        s = __dp4a(((w[1] >> 4) & 0x0F0F0F0F) | spread4(qh >> 20), x1.y, s);
        s = __dp4a(((w[2] >> 4) & 0x0F0F0F0F) | spread4(qh >> 24), x1.z, s);
        s = __dp4a(((w[3] >> 4) & 0x0F0F0F0F) | spread4((qh >> 28) & 15), x1.w, s);
        return d * dx * (float)(s - 16 * sx);
    }
    __device__ static float value(int byte, int xw, float d, float m, int e) {
        int v = (e < 16 ? byte & 15 : byte >> 4) | (((xw >> e) & 1) << 4);
        return d * (float)(v - 16);
    }
};
template <> struct Blk<4> : Blk<1> {  // Q4_K re-encoded per 32: Q4_1's nibbles, float32 d and m
    static constexpr int BYTES = 144, QOFF = 0, QW = 4, XW = 0, HALVES = 0, FLOATS = 2;
};

// The planar row's tail for unit b: its extra word (Q5_0's qh; xw untouched without), d and m
template <int F>
__device__ __forceinline__ void planar_tail(const u8* row, int nb, int b, int& xw, float& d, float& m) {
    typedef Blk<F> B;
    const u8* rest = row + 4 * B::QW * nb;
    if (B::XW) xw = __ldg((const int*)rest + b);
    rest += 4 * B::XW * nb;
    if (B::FLOATS) {
        d = __ldg((const float*)rest + b);
        m = __ldg((const float*)rest + nb + b);
    } else {
        d = half_at((const u16*)rest + b);
        m = B::HALVES == 2 ? half_at((const u16*)rest + nb + b) : 0.f;
    }
}

// Unit b of a planar row (16-byte aligned): its words (QW quant words, then XW extra), d and m
template <int F>
__device__ __forceinline__ void load_block(const u8* row, int nb, int b, int* w, float& d, float& m) {
    typedef Blk<F> B;
    const uint4* q = (const uint4*)row + b * (B::QW / 4);
    #pragma unroll
    for (int v = 0; v < B::QW / 4; v++) {
        uint4 t = __ldg(q + v);
        w[4 * v] = (int)t.x; w[4 * v + 1] = (int)t.y; w[4 * v + 2] = (int)t.z; w[4 * v + 3] = (int)t.w;
    }
    int xw = 0;
    planar_tail<F>(row, nb, b, xw, d, m);
    if (B::XW) w[B::QW] = xw;
}

// Q4_K's 6-bit scale and min of sub-block j (ggml's get_scale_min_k4)
__device__ __forceinline__ void scale_min_k4(int j, const u8* q, int& sc, int& mn) {
    if (j < 4) { sc = q[j] & 63; mn = q[j + 4] & 63; }
    else { sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4); mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}

// GGUF rows -> planar rows: n_rows rows of nb units at src + r * src_stride, written at dst + r * dst_stride
// (16-byte aligned). One thread per unit of 32 values.
template <int F>
__device__ __forceinline__ void planarize_t(const u8* src, long long src_stride, u8* dst, long long dst_stride,
                                            int n_rows, int nb) {
    typedef Blk<F> B;
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)n_rows * nb) return;
    long long r = t / nb;
    int b = (int)(t - r * nb);
    u8* row = dst + r * dst_stride;
    u8* qd = row + 16 * (B::QW / 4) * b;
    u8* rest = row + 4 * B::QW * nb;
    if (F == 4) {  // Q4_K: superblock b / 8 (d, dmin, 12 bytes of scales, 128 bytes of nibbles), sub-block b % 8
        const u8* sb = src + r * src_stride + (long long)(b >> 3) * 144;
        int j = b & 7, sc, mn;
        scale_min_k4(j, sb + 4, sc, mn);
        float d = __half2float(__ushort_as_half(*(const u16*)sb)), dmin = __half2float(__ushort_as_half(*(const u16*)(sb + 2)));
        const u8* qs = sb + 16 + 32 * (j >> 1);
        int shift = 4 * (j & 1);
        for (int i = 0; i < 16; i++) qd[i] = ((qs[i] >> shift) & 15) | (((qs[i + 16] >> shift) & 15) << 4);
        ((float*)rest)[b] = d * (float)sc;
        ((float*)rest)[nb + b] = -dmin * (float)mn;
        return;
    }
    const u8* blk = src + r * src_stride + (long long)b * B::BYTES;  // 2-byte aligned
    #pragma unroll
    for (int j = 0; j < 4 * B::QW; j++) qd[j] = blk[B::QOFF + j];
    if (B::XW) ((int*)rest)[b] = (int)((const u16*)blk)[1] | ((int)((const u16*)blk)[2] << 16);  // Q5_0's qh
    rest += 4 * B::XW * nb;
    #pragma unroll
    for (int k = 0; k < B::HALVES; k++) ((u16*)rest)[k * nb + b] = ((const u16*)blk)[k];
}

// Value e (0..31) of unit b of a row: planar (gate and up rows, matrices) or as GGUF stores it (down columns of
// records: Q4_0 / Q4_1 / Q8_0)
template <int F>
__device__ __forceinline__ float block_value(const u8* row, int nb, int b, int e, bool planar) {
    typedef Blk<F> B;
    int j = B::QW == 8 ? e : e & 15, word, xw = 0;  // quant byte j holds the value (4-bit: high nibble for e >= 16)
    float d, m;
    if (planar) {
        word = __ldg((const int*)row + b * B::QW + (j >> 2));
        planar_tail<F>(row, nb, b, xw, d, m);
    } else {
        const u16* blk = (const u16*)(row + (long long)b * B::BYTES);
        const u16* w2 = (const u16*)((const u8*)blk + B::QOFF + 4 * (j >> 2));
        word = (int)__ldg(w2) | ((int)__ldg(w2 + 1) << 16);
        d = half_at(blk);
        m = B::HALVES == 2 ? half_at(blk + 1) : 0.f;
    }
    return B::value((word >> (8 * (j & 3))) & 0xFF, xw, d, m, e);
}

// Two rows (a matrix's rows 2p and 2p + 1, or a record's gate and up rows), formats F0 and F1, dotted with x by one
// warp: lane takes blocks lane, lane + 32, ... of a chunk of 32 * NF blocks. A Tile holds one chunk of both rows in
// registers, so a warp loads its next chunk (of this pair or its next pair) before it computes this one.
template <int F0, int F1> struct Tile {
    static constexpr int W0 = Blk<F0>::QW + Blk<F0>::XW, W1 = Blk<F1>::QW + Blk<F1>::XW;
    static constexpr int NF = W0 + W1 <= 10 ? 4 : 2;  // units per lane in flight
    int w0[NF][W0], w1[NF][W1];
    float d0[NF], m0[NF], d1[NF], m1[NF];

    __device__ __forceinline__ void load(const u8* row0, const u8* row1, int b0, int nb) {
        int lane = threadIdx.x & 31;
        #pragma unroll
        for (int i = 0; i < NF; i++) {
            int b = b0 + lane + 32 * i;
            if (b < nb) {
                load_block<F0>(row0, nb, b, w0[i], d0[i], m0[i]);
                load_block<F1>(row1, nb, b, w1[i], d1[i], m1[i]);
            }
        }
    }

    // acc[r][s] += this chunk of row r . x[s]; x (int8, L1-resident) read once per block for both rows
    template <int SMAX>
    __device__ __forceinline__ void dot(int b0, int nb, int K, const signed char* xq, const float* xd, const int* xs,
                                        int S, float (&acc)[2][SMAX]) const {
        int lane = threadIdx.x & 31;
        #pragma unroll
        for (int i = 0; i < NF; i++) {
            int b = b0 + lane + 32 * i;
            if (b >= nb) break;
            #pragma unroll
            for (int s = 0; s < SMAX; s++) {
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

// Rows of pair p: row0 = base + p * pair_stride, row1 = row0 + row_gap (row0 again for the last pair of an odd
// count: last_single). Warps walk pairs p = warp, warp + n_warps, ... (a persistent grid of a few thread blocks
// per multiprocessor), each pair's chunks in order, always one chunk ahead in registers. finish(p, acc) gets the
// pair's warp-summed dot products (lane 0 writes them). NS: the number of tokens where known at compile time
// (1: decode), else 0 (S <= MAX_S at run time). The S = 1 kernels are 5x smaller: the generic ones unroll every
// token count, and their code outgrows the instruction cache (H200, 4096 x 11008 Q4_0: 13.8 us before).
template <int F0, int F1, int NS, class Finish>
__device__ __forceinline__ void walk_pairs(const u8* base, long long pair_stride, long long row_gap, int n_pairs,
                                           bool last_single, int K, const signed char* xq, const float* xd,
                                           const int* xs, int S, Finish finish) {
    typedef Tile<F0, F1> T;
    constexpr int SMAX = NS ? NS : MAX_S;
    if (NS) S = NS;
    int nb = K >> 5, step = 32 * T::NF;
    int n_warps = (gridDim.x * blockDim.x) >> 5;
    int p = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (p >= n_pairs) return;
    auto row0 = [&](int q) { return base + (long long)q * pair_stride; };
    auto row1 = [&](int q) { return row0(q) + (last_single && q == n_pairs - 1 ? 0 : row_gap); };
    T cur, nxt;
    int b0 = 0;
    cur.load(row0(p), row1(p), 0, nb);
    float acc[2][SMAX] = {};
    while (true) {
        int np = p, nb0 = b0 + step;
        if (nb0 >= nb) { np = p + n_warps; nb0 = 0; }
        if (np < n_pairs) nxt.load(row0(np), row1(np), nb0, nb);
        cur.template dot<SMAX>(b0, nb, K, xq, xd, xs, S, acc);
        if (np != p) {
            #pragma unroll
            for (int s = 0; s < SMAX; s++) {
                if (s >= S) break;
                acc[0][s] = warp_sum(acc[0][s]);
                acc[1][s] = warp_sum(acc[1][s]);
            }
            finish(p, acc, S);
            #pragma unroll
            for (int s = 0; s < SMAX; s++) acc[0][s] = acc[1][s] = 0.f;
            if (np >= n_pairs) return;
        }
        p = np; b0 = nb0;
        cur = nxt;
    }
}

// y[s * y_stride + row] = W[row] . x[s] for S <= MAX_S tokens (x quantized by quantize_x)
template <int F, int NS>
__device__ __forceinline__ void matvec_t(const u8* W, long long row_stride, int n_rows, int K, const signed char* xq,
                                         const float* xd, const int* xs, int S, float* y, int y_stride) {
    int lane = threadIdx.x & 31;
    walk_pairs<F, F, NS>(W, 2 * row_stride, row_stride, (n_rows + 1) / 2, n_rows & 1, K, xq, xd, xs, S,
                         [&](int p, const float (&acc)[2][NS + !NS * MAX_S], int S) {
        if (lane != 0) return;
        #pragma unroll
        for (int s = 0; s < NS + !NS * MAX_S; s++) {  // unrolled with a guard: acc stays in registers
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
template <int GF, int UF, int NS>
__device__ __forceinline__ void gate_up_t(const u8* Rb, long long rb, int n, int K, long long up_off, int act,
                                          const signed char* xq, const float* xd, const int* xs, int S, float* h) {
    int lane = threadIdx.x & 31;
    walk_pairs<GF, UF, NS>(Rb, rb, up_off, n, false, K, xq, xd, xs, S,
                           [&](int i, const float (&acc)[2][NS + !NS * MAX_S], int S) {
        if (lane != 0) return;
        #pragma unroll
        for (int s = 0; s < NS + !NS * MAX_S; s++) {
            if (s >= S) break;
            h[(long long)s * n + i] = activate(acc[0][s], act) * acc[1][s];
        }
    });
}

// y[s * d + j] += sum_{i in chunk} h[s * n + i] * down_i[j]; down column of record i at R + i * rb + down_off, as
// GGUF stores it (a warp reads one block's bytes: 2 sectors, where planar would touch one per word)
template <int F>
__device__ __forceinline__ void down_t(const u8* R, long long rb, int n, int d, long long down_off, const float* h,
                                       int S, float* y, int chunk) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    int i0 = blockIdx.y * chunk, i1 = min(n, i0 + chunk);
    float acc[MAX_S] = {0.f};
    for (int i = i0; i < i1; i++) {
        float w = block_value<F>(R + (long long)i * rb + down_off, d >> 5, j >> 5, j & 31, false);
        #pragma unroll
        for (int s = 0; s < MAX_S; s++) if (s < S) acc[s] += h[(long long)s * n + i] * w;
    }
    #pragma unroll
    for (int s = 0; s < MAX_S; s++) if (s < S) atomicAdd(y + (long long)s * d + j, acc[s]);
}

// out[r * K + k] = W[r][k] as float32 (rows r < n_rows at W + r * row_stride: a matrix's rows, or the gate / up /
// down rows of records; planar or not), for prompt batches through cuBLAS
template <int F>
__device__ __forceinline__ void dequantize_t(const u8* W, long long row_stride, int n_rows, int K, int planar,
                                             float* out) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)n_rows * K) return;
    long long r = t / K;
    int k = (int)(t - r * K);
    out[t] = block_value<F>(W + r * row_stride, K >> 5, k >> 5, k & 31, planar);
}

#define PER_FORMAT(F)                                                                                               \
extern "C" __global__ void matvec_##F(const u8* W, long long row_stride, int n_rows, int K, const signed char* xq, \
                                      const float* xd, const int* xs, int S, float* y, int y_stride) {            \
    matvec_t<F, 0>(W, row_stride, n_rows, K, xq, xd, xs, S, y, y_stride);                                          \
}                                                                                                                   \
extern "C" __global__ void matvec1_##F(const u8* W, long long row_stride, int n_rows, int K, const signed char* xq,\
                                       const float* xd, const int* xs, int S, float* y, int y_stride) {           \
    matvec_t<F, 1>(W, row_stride, n_rows, K, xq, xd, xs, S, y, y_stride);                                          \
}                                                                                                                   \
extern "C" __global__ void dequantize_##F(const u8* W, long long row_stride, int n_rows, int K, int planar,      \
                                          float* out) {                                                            \
    dequantize_t<F>(W, row_stride, n_rows, K, planar, out);                                                        \
}                                                                                                                   \
extern "C" __global__ void planarize_##F(const u8* src, long long src_stride, u8* dst, long long dst_stride,      \
                                          int n_rows, int nb) {                                                    \
    planarize_t<F>(src, src_stride, dst, dst_stride, n_rows, nb);                                                  \
}
PER_FORMAT(0) PER_FORMAT(1) PER_FORMAT(2) PER_FORMAT(3) PER_FORMAT(4)

#define DOWN(F)  /* down columns as GGUF stores them: Q4_0, Q4_1, Q8_0 */                                          \
extern "C" __global__ void down_##F(const u8* R, long long rb, int n, int d, long long down_off, const float* h,   \
                                    int S, float* y, int chunk) {                                                  \
    down_t<F>(R, rb, n, d, down_off, h, S, y, chunk);                                                              \
}
DOWN(0) DOWN(1) DOWN(2)

#define GATE_UP(G, U)                                                                                               \
extern "C" __global__ void gate_up_##G##U(const u8* Rb, long long rb, int n, int K, long long up_off, int act,     \
                                          const signed char* xq, const float* xd, const int* xs, int S, float* h) {\
    gate_up_t<G, U, 0>(Rb, rb, n, K, up_off, act, xq, xd, xs, S, h);                                               \
}                                                                                                                   \
extern "C" __global__ void gate_up1_##G##U(const u8* Rb, long long rb, int n, int K, long long up_off, int act,    \
                                           const signed char* xq, const float* xd, const int* xs, int S, float* h) {\
    gate_up_t<G, U, 1>(Rb, rb, n, K, up_off, act, xq, xd, xs, S, h);                                               \
}
GATE_UP(0, 0) GATE_UP(0, 1) GATE_UP(0, 2) GATE_UP(1, 0) GATE_UP(1, 1) GATE_UP(1, 2) GATE_UP(2, 0) GATE_UP(2, 1)
GATE_UP(2, 2) GATE_UP(3, 3) GATE_UP(4, 4)
"""


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
    """Flash-store records as the GPU keeps them: [gate row planar | up row planar | down column as stored], each
    part 16-byte aligned (records_to_planar converts)."""

    record_bytes: int
    up_off: int
    down_off: int

    @staticmethod
    def of(layout) -> "GpuRecords":
        up = gpu_row_bytes(layout.d_model, layout.gate_type)
        down = up + gpu_row_bytes(layout.d_model, layout.up_type)
        return GpuRecords(down + _round16(layout.down_bytes), up, down)


class CudaKernels:
    """The compiled module and launch helpers. Arrays are CuPy arrays on the current device. Quantized rows on
    the GPU are planar (SOURCE): upload_rows / upload_records / records_to_planar make them from GGUF bytes."""

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
        self._gate_up, self._gate_up1 = ({(g, u): fn(f"{name}_{g}{u}") for g, u in GATE_UP_PAIRS}
                                         for name in ("gate_up", "gate_up1"))
        self._quantize_x = fn("quantize_x")
        sms = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["multiProcessorCount"]
        self.max_blocks = sms * BLOCKS_PER_SM

    @staticmethod
    def fmt(qtype, allowed=None) -> int:
        """The kernels' format number of a GGUF type; UnsupportedModelError where there is no kernel."""
        f = FORMATS.get(QT(qtype))
        if f is None or (allowed is not None and f not in allowed):
            from ..errors import UnsupportedModelError

            have = ", ".join(t.name for t, g in FORMATS.items() if allowed is None or g in allowed)
            raise UnsupportedModelError(f"{QT(qtype).name} has no GPU kernel yet ({have} do)")
        return f

    # ---- GGUF bytes -> planar rows on the GPU
    def _to_planar(self, src_ptr: int, src_stride: int, dst_ptr: int, dst_stride: int, n_rows: int, k: int,
                   qtype) -> None:
        fmt = self.fmt(qtype)
        if dst_ptr % 16 or dst_stride % 16 or src_ptr % 2 or src_stride % 2:
            raise ValueError("planar rows need 16-byte aligned destinations")
        n = n_rows * (k // 32)
        self._planarize[fmt](((n + 255) // 256,), (256,), (np.uint64(src_ptr), np.int64(src_stride),
                                                           np.uint64(dst_ptr), np.int64(dst_stride),
                                                           np.int32(n_rows), np.int32(k // 32)))

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
        down = layout.gate_bytes + layout.up_bytes
        dst.reshape(-1, g.record_bytes)[:n, g.down_off:g.down_off + layout.down_bytes] = \
            src[:n * rb].reshape(n, rb)[:, down:down + layout.down_bytes]
        for off, goff, qtype in ((0, 0, layout.gate_type), (layout.gate_bytes, g.up_off, layout.up_type)):
            self._to_planar(src.data.ptr + off, rb, dst.data.ptr + goff, g.record_bytes, n, layout.d_model, qtype)

    def upload_records(self, records: np.ndarray, layout):
        """Flash-store records (host bytes) -> GPU records (GpuRecords layout, flat uint8)."""
        src = self.cp.asarray(np.ascontiguousarray(records).reshape(-1).view(np.uint8))
        n = src.nbytes // layout.record_bytes
        dst = self.cp.empty(n * GpuRecords.of(layout).record_bytes, self.cp.uint8)
        self.records_to_planar(src, dst, n, layout)
        return dst

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
            from ..errors import UnsupportedModelError

            raise UnsupportedModelError(f"gate rows {QT(layout.gate_type).name} with up rows "
                                        f"{QT(layout.up_type).name}: no GPU kernel for this pair")
        S = x.shape[0]
        if S > MAX_S:
            self._bundle_float(ptr, n, g, d, activation, x, y, (gf, uf, df))
            return
        q = xq if xq is not None else self.quantize(x)
        (self._gate_up1 if S == 1 else self._gate_up)[(gf, uf)](self._grid(n), (THREADS,), (
            np.uint64(ptr), np.int64(rb), np.int32(n), np.int32(d), np.int64(g.up_off),
            np.int32(ACTIVATIONS[activation]), *q, np.int32(S), h))
        self._down[df](((d + 255) // 256, (n + DOWN_CHUNK - 1) // DOWN_CHUNK), (256,), (
            np.uint64(ptr), np.int64(rb), np.int32(n), np.int32(d), np.int64(g.down_off), h, np.int32(S), y,
            np.int32(DOWN_CHUNK)))

    def _bundle_float(self, ptr: int, n: int, g: "GpuRecords", d: int, activation: str, x, y, fmts) -> None:
        cp, rb = self.cp, g.record_bytes
        chunk = max(1, min(n, DEQUANT_MAX_BYTES // (3 * 4 * d)))
        w = cp.empty((3, chunk, d), cp.float32)
        parts = ((0, True), (g.up_off, True), (g.down_off, False))
        for n0 in range(0, n, chunk):
            c = min(chunk, n - n0)
            for i, (f, (off, planar)) in enumerate(zip(fmts, parts)):
                self._dequantize(ptr + n0 * rb + off, rb, c, d, f, planar, w[i])
            g, u = x @ w[0, :c].T, x @ w[1, :c].T
            if activation == "silu":
                g = g / (1 + cp.exp(-g))
            else:
                g = 0.5 * g * (1 + cp.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
            y += (g * u) @ w[2, :c]
