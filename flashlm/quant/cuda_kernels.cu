// CUDA kernels of quant/cuda_kernels.py (compiled by NVRTC through CuPy at first use; the module docstring
// has the design and the measurements).
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
// operations; the module is compiled without fast math, so denormals are kept as on the CPU). One warp per block:
// quantize_block is one 32-block, its lane's value v (rms_norm below quantizes its result with it too).
__device__ __forceinline__ void quantize_block(float v, int lane, long long blk, signed char* xq, float* xd, int* xs) {
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

extern "C" __global__ void quantize_x(const float* x, int K, int S, signed char* xq, float* xd, int* xs) {
    int blk = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (blk >= (K >> 5) * S) return;  // a whole warp: blockDim is a multiple of 32
    quantize_block(x[(long long)blk * 32 + lane], lane, blk, xq, xd, xs);
}

// ---- Block formats. In GPU memory a row of nb units of 32 values is stored planar: planarize (below) rearranges the
// GGUF row into the quant bytes of every unit (QW words, 16-byte aligned), then XW extra words per unit (Q5_0's high
// bits), then the scales: HALVES float16 planes (d; Q4_1: then m) or FLOATS float32 planes. Lane b of a warp reads
// unit b's quants with 16-byte loads, 512 contiguous bytes per warp and instruction, where GGUF's 18 / 20 / 34-byte
// blocks need 2-byte loads. Q4_K is re-encoded per 32 values in Q4_1's form with float32 scale d * sc and offset
// -dmin * m (the same values, 24 bytes per 32 instead of 18); Q6_K per 32 as signed bytes q - 32 with float32
// d * scale for each half of 16 (40 bytes per 32 instead of 26.25). H200, 4096 x 11008 Q4_0: 2-byte loads of GGUF blocks
// 14.9 us; planes of 4-byte words 11.0 us; this layout 9.3 us.
// A unit dotted with 32 int8 x values (x0: x[0..15], x1: x[16..31]), scale dx, int sum sx:
//   Q4_0: d dx (u.q - 8 sx)   Q4_1, Q4_K: d dx (u.q) + m dx sx   Q8_0: d dx (w.q)   Q5_0: d dx (u.q - 16 sx)
// as the CPU's int8 decode path (bundle_kernel_i8.c) and llama.cpp's vec_dot_*_q8_1 compute them.
template <int F> struct Blk;
// acc + the dot product of 4 words of signed bytes with 16 int8 x values
__device__ __forceinline__ int dp4a4(const int* w, int4 x, int acc) {
    return __dp4a(w[3], x.w, __dp4a(w[2], x.z, __dp4a(w[1], x.y, __dp4a(w[0], x.x, acc))));
}
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
        return d * dx * (float)dp4a4(w + 4, x1, dp4a4(w, x0, 0));
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
template <> struct Blk<5> {  // Q6_K re-encoded per 32: signed bytes q - 32, float32 d * scale of each half (d, m)
    static constexpr int BYTES = 210, QOFF = 0, QW = 8, XW = 0, HALVES = 0, FLOATS = 2;
    __device__ static float dot(const int* w, float d, float m, int4 x0, int4 x1, float dx, int sx) {
        return dx * (d * (float)dp4a4(w, x0, 0) + m * (float)dp4a4(w + 4, x1, 0));
    }
    __device__ static float value(int byte, int xw, float d, float m, int e) {
        return (e < 16 ? d : m) * (float)(signed char)byte;
    }
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

// GGUF rows -> planar rows: n_rows rows of nb units at src + r * src_stride + (r / group) * group_gap (groups of
// rows with a gap after each: the gate or up rows of block-layout records), written at dst + r * dst_stride
// (16-byte aligned). One thread per unit of 32 values.
template <int F>
__device__ __forceinline__ void planarize_t(const u8* src, long long src_stride, u8* dst, long long dst_stride,
                                            int n_rows, int nb, int group, long long group_gap) {
    typedef Blk<F> B;
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)n_rows * nb) return;
    long long r = t / nb;
    int b = (int)(t - r * nb);
    src += (r / group) * group_gap;
    u8* row = dst + r * dst_stride;
    u8* qd = row + 16 * (B::QW / 4) * b;
    u8* rest = row + 4 * B::QW * nb;
    if (F == 5) {  // Q6_K: superblock b / 8 (ql[128], qh[64], 16 int8 scales per 16 values, half d), unit j = b % 8:
        // half h = j / 4, quarter t = j % 4; value l: ql[64h + 32(t & 1) + l] (high nibble for t >= 2), qh[32h + l]
        // bits 2t..2t+1, scale sc[8h + 2t + l / 16] (ggml's dequantize_row_q6_K)
        const u8* sb = src + r * src_stride + (long long)(b >> 3) * 210;
        int j = b & 7, h = j >> 2, t = j & 3;
        const u8* ql = sb + 64 * h + 32 * (t & 1);
        const u8* qh = sb + 128 + 32 * h;
        const signed char* sc = (const signed char*)(sb + 192) + 8 * h + 2 * t;
        float d = __half2float(__ushort_as_half(*(const u16*)(sb + 208)));
        for (int l = 0; l < 32; l++) {
            int q = ((t >> 1) ? ql[l] >> 4 : ql[l] & 15) | (((qh[l] >> (2 * t)) & 3) << 4);
            qd[l] = (u8)(signed char)(q - 32);
        }
        ((float*)rest)[b] = d * (float)sc[0];
        ((float*)rest)[nb + b] = d * (float)sc[1];
        return;
    }
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

// All 32 values of one block as GGUF stores it (Q4_0 / Q4_1 / Q8_0: 2-byte aligned), each as block_value gives it:
// its scales and quant words loaded once (block_value per value loaded them 32 times: ffn_down of SmolLM2's block
// records took 14.5 us a layer on the H200, ncu)
template <int F>
__device__ __forceinline__ void block_values(const u8* blk, float* w) {
    typedef Blk<F> B;
    const u16* b16 = (const u16*)blk;
    const float d = half_at(b16), m = B::HALVES == 2 ? half_at(b16 + 1) : 0.f;
    int word[B::QW];
    #pragma unroll
    for (int k = 0; k < B::QW; k++)
        word[k] = (int)__ldg(b16 + B::QOFF / 2 + 2 * k) | ((int)__ldg(b16 + B::QOFF / 2 + 2 * k + 1) << 16);
    #pragma unroll
    for (int e = 0; e < 32; e++) {
        const int j = B::QW == 8 ? e : e & 15;
        w[e] = B::value((word[j >> 2] >> (8 * (j & 3))) & 0xFF, 0, d, m, e);
    }
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
    if (act == 2) return fmaxf(g, 0.f);
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

// Block-layout records (format.py, group 32): y[s * d + j] += sum_{i in chunk} sum_e h[s * 32n + 32i + e] * w_ij[e],
// w_ij (row j of ffn_down over record i's 32 neurons) at D + i * dstride + j * BYTES, as GGUF stores it
template <int F>
__device__ __forceinline__ void down_block_t(const u8* D, long long dstride, int n, int d, const float* h, int S,
                                             float* y, int chunk) {
    typedef Blk<F> B;
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    int i0 = blockIdx.y * chunk, i1 = min(n, i0 + chunk);
    long long n32 = (long long)n * 32;
    float acc[MAX_S] = {0.f};
    for (int i = i0; i < i1; i++) {
        float w[32];
        block_values<F>(D + (long long)i * dstride + (long long)j * B::BYTES, w);
        #pragma unroll
        for (int e = 0; e < 32; e++) {
            #pragma unroll
            for (int s = 0; s < MAX_S; s++) if (s < S) acc[s] += h[s * n32 + 32 * i + e] * w[e];
        }
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
                                          int n_rows, int nb, int group, long long group_gap) {                    \
    planarize_t<F>(src, src_stride, dst, dst_stride, n_rows, nb, group, group_gap);                                \
}
PER_FORMAT(0) PER_FORMAT(1) PER_FORMAT(2) PER_FORMAT(3) PER_FORMAT(4) PER_FORMAT(5)

#define DOWN(F)  /* down columns as GGUF stores them: Q4_0, Q4_1, Q8_0 */                                          \
extern "C" __global__ void down_##F(const u8* R, long long rb, int n, int d, long long down_off, const float* h,   \
                                    int S, float* y, int chunk) {                                                  \
    down_t<F>(R, rb, n, d, down_off, h, S, y, chunk);                                                              \
}                                                                                                                   \
extern "C" __global__ void down_block_##F(const u8* D, long long dstride, int n, int d, const float* h, int S,      \
                                          float* y, int chunk) {                                                   \
    down_block_t<F>(D, dstride, n, d, h, S, y, chunk);                                                             \
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
GATE_UP(2, 2) GATE_UP(3, 3) GATE_UP(4, 4) GATE_UP(5, 5)

// ---- One decode step's small ops, fused (the step is captured in a CUDA graph by runtime/cuda_executor.py, so the
// token's position is read from device memory, pos, never passed by value: one graph replays every step).

// RMSNorm of rows of n: y[r] = v / sqrt(mean(v * v) + eps) * w with v = x[r] (+ res[r], then also written to total[r]:
// the residual add fused in). One thread block per row, blockDim a multiple of 32 (<= 1024). With xq (n a multiple of
// 32): y also quantized as quantize_x does it (the same bits), for the products that read it: one launch, not two.
extern "C" __global__ void rms_norm(const float* x, const float* res, const float* w, float* y, float* total, int n,
                                    float eps, signed char* xq, float* xd, int* xs) {
    long long r = blockIdx.x;
    x += r * n;
    y += r * n;
    if (res) { res += r * n; total += r * n; }
    __shared__ float part[32];
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = x[i];
        if (res) { v += res[i]; total[i] = v; }
        ss += v * v;
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float t = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.f;
        t = warp_sum(t);
        if (threadIdx.x == 0) part[0] = t;
    }
    __syncthreads();
    float s = sqrtf(part[0] / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = (res ? total[i] : x[i]) / s * w[i];
    if (!xq) return;
    __syncthreads();  // y's values, written by other threads
    const int lane = threadIdx.x & 31, nb = n >> 5;
    for (int b = threadIdx.x >> 5; b < nb; b += blockDim.x >> 5)
        quantize_block(y[32 * b + lane], lane, r * nb + b, xq, xd, xs);
}

// RoPE of one token's q (n_heads, hd) and k (n_kv, hd) at position *pos (table rows cos/sin (positions, hd / 2);
// interleaved: pairs (2i, 2i + 1), else (i, i + hd / 2)); rotated q to qr, rotated k and v appended to the float16
// caches kc, vc (n_kv, capacity, hd) at *pos. Products rounded apart, as numpy and the CPU kernel compute them.
extern "C" __global__ void rope_append(const float* q, const float* k, const float* v, const int* pos,
                                       const float* cos, const float* sin, int interleaved, int n_heads, int n_kv,
                                       int hd, long long capacity, float* qr, u16* kc, u16* vc) {
    int t = blockIdx.x * blockDim.x + threadIdx.x, half = hd >> 1, p = *pos;
    int n_rot = (n_heads + n_kv) * half;
    if (t < n_rot) {
        int head = t / half, i = t - head * half;
        const float* x = head < n_heads ? q + (long long)head * hd : k + (long long)(head - n_heads) * hd;
        int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
        float c = cos[(long long)p * half + i], s = sin[(long long)p * half + i], x0 = x[a], x1 = x[b];
        float y0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s)), y1 = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
        if (head < n_heads) {
            qr[(long long)head * hd + a] = y0;
            qr[(long long)head * hd + b] = y1;
        } else {
            u16* dst = kc + ((long long)(head - n_heads) * capacity + p) * hd;
            dst[a] = __half_as_ushort(__float2half_rn(y0));
            dst[b] = __half_as_ushort(__float2half_rn(y1));
        }
    } else if (t < n_rot + n_kv * hd) {
        int j = t - n_rot, g = j / hd;
        vc[((long long)g * capacity + p) * hd + (j - g * hd)] = __half_as_ushort(__float2half_rn(v[j]));
    }
}

// One token's attention, a thread block (ATT_WARPS warps) per query head: softmax(q . K[lo..pos] * scale) . V[lo..pos]
// over its KV head's float16 cache rows, lo = max(0, pos - window + 1) in a sliding window (window 0: none). A warp
// per cached position, lanes over pairs of dimensions (hd even, <= 256); scores (n_heads, capacity) is scratch. With
// xq, the output also quantized (the o projection's int8 input: one launch less).
#define ATT_WARPS 4
extern "C" __global__ void attend_decode(const float* qr, const u16* kc, const u16* vc, const int* pos, int window,
                                         int n_heads, int n_kv, int hd, long long capacity, float scale,
                                         float* scores, float* out, signed char* xq, float* xd, int* xs) {
    int h = blockIdx.x, g = h / (n_heads / n_kv), p = *pos;
    int lo = window > 0 ? max(0, p - window + 1) : 0, T = p + 1 - lo, pairs = hd >> 1;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const __half2* K = (const __half2*)(kc + ((long long)g * capacity + lo) * hd);
    const __half2* V = (const __half2*)(vc + ((long long)g * capacity + lo) * hd);
    float* sc = scores + (long long)h * capacity;
    float2 qv[4];
    #pragma unroll
    for (int j = 0; j < 4; j++) {
        int d2 = lane + 32 * j;
        qv[j] = d2 < pairs ? make_float2(qr[(long long)h * hd + 2 * d2], qr[(long long)h * hd + 2 * d2 + 1])
                           : make_float2(0.f, 0.f);
    }
    float mx = __int_as_float(0xff800000);  // -inf
    for (int t = warp; t < T; t += ATT_WARPS) {
        float s = 0.f;
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            int d2 = lane + 32 * j;
            if (d2 < pairs) {
                float2 kf = __half22float2(K[(long long)t * pairs + d2]);
                s += qv[j].x * kf.x + qv[j].y * kf.y;
            }
        }
        s = warp_sum(s) * scale;
        if (lane == 0) sc[t] = s;
        mx = fmaxf(mx, s);
    }
    __shared__ float red[ATT_WARPS], acc_s[ATT_WARPS][256];
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    mx = red[0];
    #pragma unroll
    for (int w = 1; w < ATT_WARPS; w++) mx = fmaxf(mx, red[w]);
    float sum = 0.f;
    float2 acc[4] = {};
    for (int t = warp; t < T; t += ATT_WARPS) {
        float e = expf(sc[t] - mx);
        sum += e;
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            int d2 = lane + 32 * j;
            if (d2 < pairs) {
                float2 vf = __half22float2(V[(long long)t * pairs + d2]);
                acc[j].x += e * vf.x;
                acc[j].y += e * vf.y;
            }
        }
    }
    __syncthreads();  // every warp has read red[]
    if (lane == 0) red[warp] = sum;
    #pragma unroll
    for (int j = 0; j < 4; j++) {
        int d2 = lane + 32 * j;
        if (d2 < pairs) { acc_s[warp][2 * d2] = acc[j].x; acc_s[warp][2 * d2 + 1] = acc[j].y; }
    }
    __syncthreads();
    float total = 0.f;
    #pragma unroll
    for (int w = 0; w < ATT_WARPS; w++) total += red[w];
    float inv = 1.f / total;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float o = 0.f;
        #pragma unroll
        for (int w = 0; w < ATT_WARPS; w++) o += acc_s[w][i];
        out[(long long)h * hd + i] = o * inv;
    }
    if (!xq) return;  // with xq (hd a multiple of 32): the head's output quantized as quantize_x does it
    __syncthreads();
    for (int b = warp; b < (hd >> 5); b += ATT_WARPS) {
        const long long blk = (long long)h * (hd >> 5) + b;
        quantize_block(out[32 * blk + lane], lane, blk, xq, xd, xs);
    }
}
