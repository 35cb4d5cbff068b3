/* The bundle FFN kernel: a gated FFN computed straight from row-column bundled records.
 *
 * A record holds one neuron: gate row and up row (GGML Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 blocks of 32 or Q4_K / Q5_K /
 * Q6_K super-blocks of 256 along d_model) and the down column (Q8_0 blocks along d_model). For tokens x (S, d):
 *     a[s, i] = act(gate_i . x_s) * (up_i . x_s)        y[s, :] += a[s, i] * down_i
 * Each record is read once per call, whatever S is; activations stay float32 (no int8 rounding), so the result
 * depends only on which records are passed, not on where they came from (RAM cache or flash). onnxruntime has no
 * fast kernel for quantized weights that change between calls (MatMulNBits with non-constant weights: 4 ms for a
 * 576x3072 product here, against 0.2 ms for int8 MatMulInteger), hence this file. Built at first use by
 * bundle_kernel.py with the system C compiler; a numpy reference implementation stands in when none is found.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* GGML type ids */
enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };
enum { ACT_SILU = 0, ACT_GELU_TANH = 1, ACT_RELU = 2 };

#if defined(__F16C__)
#include <immintrin.h>
static inline float f16_to_f32(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}
#else
static inline float f16_to_f32(const uint8_t *p) {
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
#endif

/* Values and bytes per block of each supported row type (0: unsupported); K-quant super-blocks hold 256 values. */
static int block_values(int type) {
    switch (type) {
    case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1: case T_Q8_0: return 32;
    case T_Q4_K: case T_Q5_K: case T_Q6_K: return 256;
    default: return 0;
    }
}

static int block_bytes(int type) {
    switch (type) {
    case T_Q4_0: return 18;
    case T_Q4_1: return 20;
    case T_Q5_0: return 22;
    case T_Q5_1: return 24;
    case T_Q8_0: return 34;
    case T_Q4_K: return 144;
    case T_Q5_K: return 176;
    case T_Q6_K: return 210;
    default: return 0;
    }
}

/* A row of d values of this type is supported: a whole number of blocks (and of the 32-wide x sums). */
static int row_ok(int type, int d) { return block_values(type) && d > 0 && d % block_values(type) == 0; }

/* Q4_K / Q5_K: 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes (ggml's get_scale_min_k4). */
static inline void k_scale_min(const uint8_t *s, int j, float *sc, float *mn) {
    if (j < 4) {
        *sc = (float)(s[j] & 63);
        *mn = (float)(s[j + 4] & 63);
    } else {
        *sc = (float)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        *mn = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

/* One block -> float, as gguf-py's reference computes it. Plain loops: -O3 -march=native vectorizes them. */
static void dequant_block(const uint8_t *restrict blk, int type, float *restrict o) {
    switch (type) {
    case T_Q8_0: {
        const int8_t *q = (const int8_t *)(blk + 2);
        float dd = f16_to_f32(blk);
        for (int j = 0; j < 32; j++) o[j] = dd * (float)q[j];
        break;
    }
    case T_Q4_0: case T_Q4_1: {
        int q41 = type == T_Q4_1;
        const uint8_t *qs = blk + (q41 ? 4 : 2);
        float dd = f16_to_f32(blk), m = q41 ? f16_to_f32(blk + 2) : -8.0f * dd;
        for (int j = 0; j < 16; j++) o[j] = dd * (float)(qs[j] & 15) + m;  /* two loops: each vectorizes */
        for (int j = 0; j < 16; j++) o[j + 16] = dd * (float)(qs[j] >> 4) + m;
        break;
    }
    case T_Q5_0: case T_Q5_1: {  /* 5th bits: bit j of the little-endian uint32 qh is element j's */
        int q51 = type == T_Q5_1;
        uint32_t qh;
        memcpy(&qh, blk + (q51 ? 4 : 2), 4);
        const uint8_t *qs = blk + (q51 ? 8 : 6);
        float dd = f16_to_f32(blk), m = q51 ? f16_to_f32(blk + 2) : 0.0f;
        int zero = q51 ? 0 : 16;
        for (int j = 0; j < 16; j++) o[j] = dd * (float)((int)((qs[j] & 15) | (((qh >> j) & 1) << 4)) - zero) + m;
        for (int j = 0; j < 16; j++)
            o[j + 16] = dd * (float)((int)((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - zero) + m;
        break;
    }
    case T_Q4_K: case T_Q5_K: {  /* w = d*sc * q - dmin*mn per sub-block of 32; byte l of pair j: sub-blocks 2j, 2j+1 */
        int q5 = type == T_Q5_K;
        float dd = f16_to_f32(blk), dmin = f16_to_f32(blk + 2);
        const uint8_t *qh = blk + 16, *qs = blk + (q5 ? 48 : 16);
        for (int j = 0; j < 4; j++) {
            float sc0, mn0, sc1, mn1;
            k_scale_min(blk + 4, 2 * j, &sc0, &mn0);
            k_scale_min(blk + 4, 2 * j + 1, &sc1, &mn1);
            float ds0 = dd * sc0, dm0 = dmin * mn0, ds1 = dd * sc1, dm1 = dmin * mn1;
            const uint8_t *q = qs + 32 * j;
            float *oj = o + 64 * j;
            for (int l = 0; l < 32; l++)
                oj[l] = ds0 * (float)((q[l] & 15) | (q5 ? ((qh[l] >> (2 * j)) & 1) << 4 : 0)) - dm0;
            for (int l = 0; l < 32; l++)
                oj[l + 32] = ds1 * (float)((q[l] >> 4) | (q5 ? ((qh[l] >> (2 * j + 1)) & 1) << 4 : 0)) - dm1;
        }
        break;
    }
    case T_Q6_K: {  /* per half of 128: ql nibbles and 2-bit qh fields of 4 groups of 32; int8 scales per 16 */
        const int8_t *sc = (const int8_t *)(blk + 192);
        float dd = f16_to_f32(blk + 208);
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
            for (int g = 0; g < 4; g++) {
                const uint8_t *lq = ql + 32 * (g & 1);
                int nib = 4 * (g >> 1), hb = 2 * g;
                float *og = o + 128 * h + 32 * g;
                for (int l = 0; l < 32; l++) {
                    int q = ((lq[l] >> nib) & 15) | (((qh[l] >> hb) & 3) << 4);
                    og[l] = dd * (float)sc[8 * h + 2 * g + l / 16] * (float)(q - 32);
                }
            }
        }
        break;
    }
    }
}

/* One quantized row (d values) -> float. */
static void dequant_row(const uint8_t *restrict row, int type, float *restrict out, int d) {
    int bv = block_values(type), bb = block_bytes(type);
    for (int b = 0; b < d / bv; b++) dequant_block(row + (size_t)bb * b, type, out + (size_t)bv * b);
}

static inline float dot(const float *a, const float *b, int d) {
    float s = 0.0f;
    for (int j = 0; j < d; j++) s += a[j] * b[j];
    return s;
}

#if defined(__AVX2__) && defined(__FMA__)
/* Fused single-token path: dot products and the down update straight from the quantized blocks. */
static inline __m256 cvt8(__m128i bytes_u8) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes_u8)); }
static inline __m256 cvt8s(__m128i bytes_i8) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes_i8)); }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sum_j q[j] * x[j] over 16 or 32 int8 values */
static inline __m256 dot16s(__m128i q, const float *x) {
    __m256 a = _mm256_mul_ps(cvt8s(q), _mm256_loadu_ps(x));
    return _mm256_fmadd_ps(cvt8s(_mm_srli_si128(q, 8)), _mm256_loadu_ps(x + 8), a);
}

static inline __m256 dot32s(__m256i q, const float *x) {
    return _mm256_add_ps(dot16s(_mm256_castsi256_si128(q), x), dot16s(_mm256_extracti128_si256(q, 1), x + 16));
}

/* 32 bytes, byte j = 0xFF where bit j of the little-endian uint32 at p is set (llama.cpp's bytes_from_bits_32) */
static inline __m256i bytes_from_bits_32(const uint8_t *p) {
    uint32_t bits;
    memcpy(&bits, p, 4);
    const __m256i shuffle = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuffle);
    bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}

static float dot_q4_q8(const uint8_t *row, int type, const float *x, const float *xsum, int d) {
    __m256 acc = _mm256_setzero_ps();
    float offset = 0.0f;
    const __m128i mask = _mm_set1_epi8(15);
    for (int b = 0; b < d / 32; b++) {
        const float *xb = x + 32 * b;
        __m256 blk_acc;
        float dd;
        if (type == T_Q8_0) {
            const uint8_t *blk = row + 34 * b;
            __m128i q0 = _mm_loadu_si128((const __m128i *)(blk + 2)), q1 = _mm_loadu_si128((const __m128i *)(blk + 18));
            dd = f16_to_f32(blk);
            blk_acc = _mm256_mul_ps(cvt8s(q0), _mm256_loadu_ps(xb));
            blk_acc = _mm256_fmadd_ps(cvt8s(_mm_srli_si128(q0, 8)), _mm256_loadu_ps(xb + 8), blk_acc);
            blk_acc = _mm256_fmadd_ps(cvt8s(q1), _mm256_loadu_ps(xb + 16), blk_acc);
            blk_acc = _mm256_fmadd_ps(cvt8s(_mm_srli_si128(q1, 8)), _mm256_loadu_ps(xb + 24), blk_acc);
        } else {
            int q41 = type == T_Q4_1;
            const uint8_t *blk = row + (q41 ? 20 : 18) * b;
            __m128i q = _mm_loadu_si128((const __m128i *)(blk + (q41 ? 4 : 2)));
            __m128i lo = _mm_and_si128(q, mask), hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
            dd = f16_to_f32(blk);
            offset += (q41 ? f16_to_f32(blk + 2) : -8.0f * dd) * xsum[b];
            blk_acc = _mm256_mul_ps(cvt8(lo), _mm256_loadu_ps(xb));
            blk_acc = _mm256_fmadd_ps(cvt8(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xb + 8), blk_acc);
            blk_acc = _mm256_fmadd_ps(cvt8(hi), _mm256_loadu_ps(xb + 16), blk_acc);
            blk_acc = _mm256_fmadd_ps(cvt8(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xb + 24), blk_acc);
        }
        acc = _mm256_fmadd_ps(blk_acc, _mm256_set1_ps(dd), acc);
    }
    return hsum(acc) + offset;
}

/* Q5_0 (q - 16 as int8) and Q5_1 (q 0..31, plus m * sum(x) per block). */
static float dot_q5(const uint8_t *row, int type, const float *x, const float *xsum, int d) {
    int q51 = type == T_Q5_1, bb = q51 ? 24 : 22;
    __m256 acc = _mm256_setzero_ps();
    float offset = 0.0f;
    const __m128i m4 = _mm_set1_epi8(15);
    const __m256i bit4 = _mm256_set1_epi8(0x10), zero = _mm256_set1_epi8(q51 ? 0 : 16);
    for (int b = 0; b < d / 32; b++) {
        const uint8_t *blk = row + bb * b;
        __m128i qs = _mm_loadu_si128((const __m128i *)(blk + (q51 ? 8 : 6)));
        __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), m4), _mm_and_si128(qs, m4));
        q = _mm256_or_si256(q, _mm256_and_si256(bytes_from_bits_32(blk + (q51 ? 4 : 2)), bit4));
        if (q51) offset += f16_to_f32(blk + 2) * xsum[b];
        acc = _mm256_fmadd_ps(dot32s(_mm256_sub_epi8(q, zero), x + 32 * b), _mm256_set1_ps(f16_to_f32(blk)), acc);
    }
    return hsum(acc) + offset;
}

/* Q4_K and Q5_K: per sub-block of 32, d*sc * (q . x) - dmin*mn * sum(x). */
static float dot_q45_k(const uint8_t *row, int type, const float *x, const float *xsum, int d) {
    int q5 = type == T_Q5_K, bb = q5 ? 176 : 144;
    __m256 acc = _mm256_setzero_ps();
    float offset = 0.0f;
    const __m256i m4 = _mm256_set1_epi8(15), bit4 = _mm256_set1_epi8(0x10);
    for (int b = 0; b < d / 256; b++) {
        const uint8_t *blk = row + bb * b;
        const float *xb = x + 256 * b, *xs = xsum + 8 * b;
        float dd = f16_to_f32(blk), dmin = f16_to_f32(blk + 2);
        __m256i qh = q5 ? _mm256_loadu_si256((const __m256i *)(blk + 16)) : _mm256_setzero_si256();
        const uint8_t *qs = blk + (q5 ? 48 : 16);
        for (int j = 0; j < 4; j++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
            __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            if (q5) {  /* bit 2j of qh[l]: high bit of sub-block 2j's element l; bit 2j+1: sub-block 2j+1's */
                __m256i b0 = _mm256_set1_epi8((char)(1 << (2 * j))), b1 = _mm256_set1_epi8((char)(2 << (2 * j)));
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b0), b0), bit4));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b1), b1), bit4));
            }
            float sc0, mn0, sc1, mn1;
            k_scale_min(blk + 4, 2 * j, &sc0, &mn0);
            k_scale_min(blk + 4, 2 * j + 1, &sc1, &mn1);
            acc = _mm256_fmadd_ps(dot32s(lo, xb + 64 * j), _mm256_set1_ps(dd * sc0), acc);
            acc = _mm256_fmadd_ps(dot32s(hi, xb + 64 * j + 32), _mm256_set1_ps(dd * sc1), acc);
            offset += dmin * (mn0 * xs[2 * j] + mn1 * xs[2 * j + 1]);
        }
    }
    return hsum(acc) - offset;
}

/* Q6_K: per half of 128 values, 4 groups of 32 = nibble | 2 bits of qh << 4, minus 32; int8 scale per 16. */
static float dot_q6_k(const uint8_t *row, const float *x, int d) {
    __m256 acc = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(0x30), z = _mm256_set1_epi8(32);
    for (int b = 0; b < d / 256; b++) {
        const uint8_t *blk = row + 210 * b;
        const int8_t *sc = (const int8_t *)(blk + 192);
        float dd = f16_to_f32(blk + 208);
        for (int h = 0; h < 2; h++) {
            __m256i ql0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h));
            __m256i ql1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32));
            __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
            __m256i q[4] = {
                _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2)),
                _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2)),
            };
            const float *xh = x + 256 * b + 128 * h;
            const int8_t *sh = sc + 8 * h;
            for (int g = 0; g < 4; g++) {
                __m256i qg = _mm256_sub_epi8(q[g], z);
                acc = _mm256_fmadd_ps(dot16s(_mm256_castsi256_si128(qg), xh + 32 * g),
                                      _mm256_set1_ps(dd * (float)sh[2 * g]), acc);
                acc = _mm256_fmadd_ps(dot16s(_mm256_extracti128_si256(qg, 1), xh + 32 * g + 16),
                                      _mm256_set1_ps(dd * (float)sh[2 * g + 1]), acc);
            }
        }
    }
    return hsum(acc);
}

/* row . x straight from the quantized blocks; xsum: sums of x over each 32-wide block (offsets, mins). */
static float row_dot_avx2(const uint8_t *row, int type, const float *x, const float *xsum, int d) {
    switch (type) {
    case T_Q5_0: case T_Q5_1: return dot_q5(row, type, x, xsum, d);
    case T_Q4_K: case T_Q5_K: return dot_q45_k(row, type, x, xsum, d);
    case T_Q6_K: return dot_q6_k(row, x, d);
    default: return dot_q4_q8(row, type, x, xsum, d);
    }
}

/* The down update for a group of neurons at once: each 8-float slice of y is loaded and stored once per group
 * instead of once per neuron (the per-neuron version spent half the kernel's time moving y). */
#define DOWN_GROUP 8
static void down_axpy_group(const uint8_t *const *down, const float *a, int g, float *y, int d) {
    for (int b = 0; b < d / 32; b++) {
        __m256 c[DOWN_GROUP];
        for (int k = 0; k < g; k++) c[k] = _mm256_set1_ps(a[k] * f16_to_f32(down[k] + 34 * b));
        for (int v = 0; v < 4; v++) {
            float *yv = y + 32 * b + 8 * v;
            __m256 acc = _mm256_loadu_ps(yv);
            for (int k = 0; k < g; k++) {
                __m128i q = _mm_loadl_epi64((const __m128i *)(down[k] + 34 * b + 2 + 8 * v));
                acc = _mm256_fmadd_ps(c[k], _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), acc);
            }
            _mm256_storeu_ps(yv, acc);
        }
    }
}
#define HAVE_FUSED 1
#endif

static inline float activate(float g, int act) {
    if (act == ACT_RELU) return g > 0.0f ? g : 0.0f;
    if (act == ACT_GELU_TANH) return 0.5f * g * (1.0f + tanhf(0.7978845608f * (g + 0.044715f * g * g * g)));
    return g / (1.0f + expf(-g));
}

/* Inside an OpenMP parallel region: this thread's share [lo, hi) of n items, a static partition (so the per-thread
 * partial sums, added in thread order, do not depend on timing). Returns the thread's index. */
static inline int thread_range(int64_t n, int64_t *lo, int64_t *hi) {
    int tid = 0, nt = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    *lo = n * tid / nt;
    *hi = n * (tid + 1) / nt;
    return tid;
}

/* y[k] += the per-thread partial sums (n_threads arrays of sd floats), in thread order. */
static void add_partials(float *y, const float *partial, int n_threads, size_t sd) {
    for (int t = 0; t < n_threads; t++)
        for (size_t k = 0; k < sd; k++) y[k] += partial[(size_t)t * sd + k];
}

/* rows: n pointers to records, in the order their contributions are summed (callers pass neuron-id order, so the
 * result does not depend on where each record sits); gate at offset 0, up at up_offset, down at down_offset.
 * x: (S, d), y: (S, d) accumulated into (not cleared), act_out: (S, n) or NULL. Deterministic for a given n_threads:
 * static partition of the rows, per-thread partial sums added in thread order. */
int bundle_ffn(const uint8_t *const *rows, int64_t n, int d, int gate_type, int up_type, int64_t up_offset,
               int64_t down_offset, int act, const float *x, int S, float *y, float *act_out, int n_threads) {
    if (!row_ok(gate_type, d) || !row_ok(up_type, d) || !row_ok(T_Q8_0, d)) return -1;
    if (n_threads < 1) n_threads = 1;
#ifndef _OPENMP
    n_threads = 1;
#endif
    size_t sd = (size_t)S * d;
    int nb = d / 32;
    float *xsum = malloc(sizeof(float) * (size_t)S * nb);
    if (!xsum) return -2;
    for (int s = 0; s < S; s++)
        for (int b = 0; b < nb; b++) {
            float t = 0.0f;
            for (int j = 0; j < 32; j++) t += x[(size_t)s * d + 32 * b + j];
            xsum[(size_t)s * nb + b] = t;
        }
    float *partial = calloc((size_t)n_threads * sd, sizeof(float));
    float *scratch = malloc(sizeof(float) * (size_t)n_threads * 3 * d);
    if (!partial || !scratch) {
        free(partial); free(scratch); free(xsum);
        return -2;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads)
#endif
    {
        int64_t lo, hi;
        const int tid = thread_range(n, &lo, &hi);
        float *ylocal = partial + (size_t)tid * sd;
        float *gf = scratch + (size_t)tid * 3 * d, *uf = gf + d, *df = uf + d;
#ifdef HAVE_FUSED
        if (S == 1) {  /* decode: no intermediate buffers */
            for (int64_t i = lo; i < hi; i += DOWN_GROUP) {
                int g = (int)(hi - i < DOWN_GROUP ? hi - i : DOWN_GROUP);
                float a[DOWN_GROUP];
                const uint8_t *down[DOWN_GROUP];
                for (int k = 0; k < g; k++) {
                    const uint8_t *rec = rows[i + k];
                    a[k] = activate(row_dot_avx2(rec, gate_type, x, xsum, d), act) *
                           row_dot_avx2(rec + up_offset, up_type, x, xsum, d);
                    if (act_out) act_out[i + k] = a[k];
                    down[k] = rec + down_offset;
                }
                down_axpy_group(down, a, g, ylocal, d);
            }
            lo = hi;
        }
#endif
        for (int64_t i = lo; i < hi; i++) {
            const uint8_t *rec = rows[i];
            dequant_row(rec, gate_type, gf, d);
            dequant_row(rec + up_offset, up_type, uf, d);
            dequant_row(rec + down_offset, T_Q8_0, df, d);
            for (int s = 0; s < S; s++) {
                const float *xs = x + (size_t)s * d;
                float a = activate(dot(gf, xs, d), act) * dot(uf, xs, d);
                if (act_out) act_out[(size_t)s * n + i] = a;
                float *ys = ylocal + (size_t)s * d;
                for (int j = 0; j < d; j++) ys[j] += a * df[j];
            }
        }
    }
    add_partials(y, partial, n_threads, sd);
    free(partial); free(scratch); free(xsum);
    return 0;
}

/* out[s * out_stride + r] = row_r . x_s for n contiguous rows of row_bytes (any supported row type): attention
 * matrices, and a streamed output matrix computed slice by slice as its rows arrive from flash. */
int rows_matvec(const uint8_t *rows, int64_t n, int64_t row_bytes, int type, int d, const float *x, int S,
                float *out, int64_t out_stride, int n_threads) {
    if (!row_ok(type, d)) return -1;
    if (n_threads < 1) n_threads = 1;
    int nb = d / 32;
    float *xsum = malloc(sizeof(float) * (size_t)S * nb);
    float *buf = malloc(sizeof(float) * (size_t)n_threads * d);
    if (!xsum || !buf) { free(xsum); free(buf); return -2; }
    for (int s = 0; s < S; s++)
        for (int b = 0; b < nb; b++) {
            float t = 0.0f;
            for (int j = 0; j < 32; j++) t += x[(size_t)s * d + 32 * b + j];
            xsum[(size_t)s * nb + b] = t;
        }
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(static)
#endif
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *row = rows + r * row_bytes;
#ifdef HAVE_FUSED
        if (S == 1) {
            out[r] = row_dot_avx2(row, type, x, xsum, d);
            continue;
        }
#endif
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *w = buf + (size_t)tid * d;
        dequant_row(row, type, w, d);
        for (int s = 0; s < S; s++) out[(size_t)s * out_stride + r] = dot(w, x + (size_t)s * d, d);
    }
    free(xsum); free(buf);
    return 0;
}

#include "bundle_kernel_i8.c"  /* rows_matvec_i8, bundle_ffn_i8: int8 activations */
#include "bundle_kernel_block.c"  /* bundle_ffn_block_i8, dequant_block_records: block-layout records */
#include "bundle_kernel_gemm.c"  /* rows_gemm_i8: int8 products for prompt batches */

/* Dequantize records (gate, up, down of each) into float32 (n, d) matrices: the prompt path, where a BLAS
 * matrix product over many tokens beats per-token dot products. */
int dequant_records(const uint8_t *const *rows, int64_t n, int d, int gate_type, int up_type, int64_t up_offset,
                    int64_t down_offset, float *gate, float *up, float *down, int n_threads) {
    if (!row_ok(gate_type, d) || !row_ok(up_type, d) || !row_ok(T_Q8_0, d)) return -1;
    if (n_threads < 1) n_threads = 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(static)
#endif
    for (int64_t i = 0; i < n; i++) {
        dequant_row(rows[i], gate_type, gate + (size_t)i * d, d);
        dequant_row(rows[i] + up_offset, up_type, up + (size_t)i * d, d);
        dequant_row(rows[i] + down_offset, T_Q8_0, down + (size_t)i * d, d);
    }
    return 0;
}

/* n contiguous quantized rows -> float32 (n, d). */
int dequant_rows(const uint8_t *rows, int64_t n, int64_t row_bytes, int type, int d, float *out, int n_threads) {
    if (!row_ok(type, d)) return -1;
    if (n_threads < 1) n_threads = 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(static)
#endif
    for (int64_t r = 0; r < n; r++) dequant_row(rows + r * row_bytes, type, out + (size_t)r * d, d);
    return 0;
}

#ifdef HAVE_FUSED
/* Grouped-query attention over a float16 KV cache (n_kv, capacity, hd): RoPE on q and k (cos/sin: hd/2 per
 * position; interleaved rotates pairs (2i, 2i+1), else halves), k and v written to the caches, then per head
 * out = softmax(q K^T * scale) V over the positions it sees. attention_decode does one token, attention_batch a
 * prompt's tokens; both give each (token, head) the same arithmetic (attend_head), so a prompt's attention is what
 * decoding its tokens one by one gives, bit for bit, in one pass or in chunks. */
static void rope(float *v, const float *cos, const float *sin, int hd, int interleaved) {
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
        float x0 = v[a], x1 = v[b];
        v[a] = x0 * cos[i] - x1 * sin[i];
        v[b] = x0 * sin[i] + x1 * cos[i];
    }
}

/* RoPE on one token's q heads and k heads; k and v into the caches at `pos`. */
static void rope_and_store(float *q, float *k, const float *v, uint16_t *kcache, uint16_t *vcache, int64_t capacity,
                           int64_t pos, const float *cos, const float *sin, int interleaved, int n_heads, int n_kv,
                           int hd) {
    for (int h = 0; h < n_heads; h++) rope(q + (size_t)h * hd, cos, sin, hd, interleaved);
    for (int g = 0; g < n_kv; g++) {
        rope(k + (size_t)g * hd, cos, sin, hd, interleaved);
        uint16_t *kd = kcache + ((size_t)g * capacity + pos) * hd, *vd = vcache + ((size_t)g * capacity + pos) * hd;
        for (int j = 0; j < hd; j += 8) {
            _mm_storeu_si128((__m128i *)(kd + j), _mm256_cvtps_ph(_mm256_loadu_ps(k + (size_t)g * hd + j), 0));
            _mm_storeu_si128((__m128i *)(vd + j), _mm256_cvtps_ph(_mm256_loadu_ps(v + (size_t)g * hd + j), 0));
        }
    }
}

/* One head of one token: oh (hd) = softmax(qh K^T * scale) V over the T cached rows of K and V (row stride hd);
 * sc: T floats of scratch. Not inlined: one compiled copy for both callers (with -ffast-math an inlined copy may
 * be reassociated differently at each call site). Each score is one FMA chain over j in order and each output
 * element one FMA chain over t in order; four positions' chains (QK) and eight output vectors (PV) run side by side
 * in registers, which hides the FMA latency and keeps oh out of memory without changing any sum (Gemma 3, 128-token
 * prompt: 18 -> 7 ms of attention, idle AMD EPYC). */
static __attribute__((noinline)) void attend_head(const float *qh, const uint16_t *K, const uint16_t *V, int T, int hd,
                                                  float scale, float *sc, float *oh) {
#define KROW(r, j) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(K + (size_t)(r) * hd + (j))))
#define VROW(r, j) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(V + (size_t)(r) * hd + (j))))
    int t = 0;
    for (; t + 4 <= T; t += 4) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int j = 0; j < hd; j += 8) {
            const __m256 qv = _mm256_loadu_ps(qh + j);
            a0 = _mm256_fmadd_ps(qv, KROW(t, j), a0);
            a1 = _mm256_fmadd_ps(qv, KROW(t + 1, j), a1);
            a2 = _mm256_fmadd_ps(qv, KROW(t + 2, j), a2);
            a3 = _mm256_fmadd_ps(qv, KROW(t + 3, j), a3);
        }
        sc[t] = hsum(a0) * scale;
        sc[t + 1] = hsum(a1) * scale;
        sc[t + 2] = hsum(a2) * scale;
        sc[t + 3] = hsum(a3) * scale;
    }
    for (; t < T; t++) {
        __m256 acc = _mm256_setzero_ps();
        for (int j = 0; j < hd; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + j), KROW(t, j), acc);
        sc[t] = hsum(acc) * scale;
    }
    float mx = -INFINITY;
    for (t = 0; t < T; t++)
        if (sc[t] > mx) mx = sc[t];
    /* exp 8 at a time (v_expf, ~1e-7 relative: a scalar expf per position was a third of the kernel) */
    t = 0;
    for (; t + 8 <= T; t += 8)
        _mm256_storeu_ps(sc + t, v_expf(_mm256_sub_ps(_mm256_loadu_ps(sc + t), _mm256_set1_ps(mx))));
    for (; t < T; t++) sc[t] = expf(sc[t] - mx);
    float sum = 0.0f;
    for (t = 0; t < T; t++) sum += sc[t];
    const __m256 inv = _mm256_set1_ps(1.0f / sum);
    int j0 = 0;
    for (; j0 + 64 <= hd; j0 += 64) {
        __m256 o[8];
        for (int k = 0; k < 8; k++) o[k] = _mm256_setzero_ps();
        for (t = 0; t < T; t++) {
            const __m256 st = _mm256_set1_ps(sc[t]);
            for (int k = 0; k < 8; k++) o[k] = _mm256_fmadd_ps(st, VROW(t, j0 + 8 * k), o[k]);
        }
        for (int k = 0; k < 8; k++) _mm256_storeu_ps(oh + j0 + 8 * k, _mm256_mul_ps(o[k], inv));
    }
    for (; j0 < hd; j0 += 8) {
        __m256 o = _mm256_setzero_ps();
        for (t = 0; t < T; t++) o = _mm256_fmadd_ps(_mm256_set1_ps(sc[t]), VROW(t, j0), o);
        _mm256_storeu_ps(oh + j0, _mm256_mul_ps(o, inv));
    }
#undef KROW
#undef VROW
}

/* One token at `pos` (caches that start at the attention window's first position: the caller offsets them),
 * q (n_heads*hd), k and v (n_kv*hd) in place; scores: n_heads * (pos+1) floats. */
#define ATTN_PARALLEL_MIN_T 64
int attention_decode(float *q, float *k, const float *v, uint16_t *kcache, uint16_t *vcache, int64_t capacity,
                     int pos, const float *cos, const float *sin, int interleaved, int n_heads, int n_kv, int hd,
                     float scale, float *out, float *scores, int n_threads) {
    if (hd % 8) return -1;
    rope_and_store(q, k, v, kcache, vcache, capacity, pos, cos, sin, interleaved, n_heads, n_kv, hd);
    int group = n_heads / n_kv, T = pos + 1;
    /* heads in parallel once the context is long enough to pay for the fork (each head's sums are its own: the
     * result does not depend on the thread count) */
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(static) if (T >= ATTN_PARALLEL_MIN_T)
#endif
    for (int h = 0; h < n_heads; h++)
        attend_head(q + (size_t)h * hd, kcache + (size_t)(h / group) * capacity * hd,
                    vcache + (size_t)(h / group) * capacity * hd, T, hd, scale, scores + (size_t)h * T,
                    out + (size_t)h * hd);
    return 0;
}

/* S tokens at positions pos0..pos0+S-1: q (S, n_heads*hd), k and v (S, n_kv*hd) in place, cos/sin (S, hd/2) the
 * tokens' rows, window 0 (causal) or the sliding window's width; out (S, n_heads*hd). Every token's k and v are
 * stored first, then (token, head) pairs run in parallel, each over the positions that token sees, as
 * attention_decode would at its position. */
int attention_batch(float *q, float *k, const float *v, uint16_t *kcache, uint16_t *vcache, int64_t capacity,
                    int64_t pos0, int S, const float *cos, const float *sin, int interleaved, int n_heads, int n_kv,
                    int hd, float scale, int window, float *out, int n_threads) {
    if (hd % 8 || S < 1 || pos0 + S > capacity) return -1;
    const int half = hd / 2, group = n_heads / n_kv;
    for (int s = 0; s < S; s++)
        rope_and_store(q + (size_t)s * n_heads * hd, k + (size_t)s * n_kv * hd, v + (size_t)s * n_kv * hd, kcache,
                       vcache, capacity, pos0 + s, cos + (size_t)s * half, sin + (size_t)s * half, interleaved,
                       n_heads, n_kv, hd);
    int status = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads)
#endif
    {
        float *sc = malloc(sizeof(float) * (size_t)(pos0 + S));
        if (!sc) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            status = -2;
        }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t i = 0; i < (int64_t)S * n_heads; i++) {
            if (!sc) continue;
            const int s = (int)(i / n_heads), h = (int)(i % n_heads);
            const int64_t pos = pos0 + s, lo = window && pos - window + 1 > 0 ? pos - window + 1 : 0;
            const size_t base = ((size_t)(h / group) * capacity + lo) * hd;
            attend_head(q + ((size_t)s * n_heads + h) * hd, kcache + base, vcache + base, (int)(pos - lo + 1), hd,
                        scale, sc, out + ((size_t)s * n_heads + h) * hd);
        }
        free(sc);
    }
    return status;
}
#endif
