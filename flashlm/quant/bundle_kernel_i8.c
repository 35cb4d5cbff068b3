/* Int8-activation kernels of the bundle kernel, compiled as part of bundle_kernel.c (included there: they use its
 * static helpers, block layouts and the fused-path primitives; one translation unit keeps them inlinable). */

/* ---- Decode products with int8 activations (as llama.cpp's ggml_vec_dot_*_q8_0 / _q8_K compute them) ----------
 * rows_matvec_i8 computes what rows_matvec does, for a few tokens (S <= I8_MAX_TOKENS), with each x row quantized
 * once per call to int8 per 32-wide block: dx = max|x| / 127, q = round-to-nearest-even(x / dx) (quantize_x_i8 below,
 * exported for the tests). Each weight sub-block of 32 is unpacked to unsigned bytes u with w = f * (u - K) + m, and
 *     w . x  ~=  f * dx * (u . q - K * sum q)  +  m * dx * sum q
 * with u . q an integer dot product (VNNI dpbusd where the CPU has it, else AVX2 maddubs; a scalar loop elsewhere).
 * Q8_0 on VNNI: u = w ^ 0x80 (w + 128), K = 128; without VNNI maddubs would saturate there, so abs/sign as llama.cpp.
 * Q6_K: signed q - 32 (abs/sign as Q8_0 without VNNI), scales per 16 applied to the integer lanes.
 * The result depends on x only through its quantization, row by row: how the rows are sliced or threaded does
 * not change it (resident and streamed output matrices agree bit for bit).
 *
 * Measured on this machine (Xeon, AVX-512 VNNI, 2 cores; streaming-read ceiling ~11 GB/s on 1 thread, ~20 GB/s on 2;
 * best of 9-30 calls on an idle machine; before = rows_matvec's float-x path), ms per call and GB/s of weights:
 *   Gemma 3 output matrix 262144x640 Q8_0 (178 MB), S=1:  1 thread 26.7 ms 6.7 GB/s -> 17.2 ms 10.4 GB/s;
 *                                                         2 threads 17.9 ms 9.9 GB/s -> 10.2 ms 17.5 GB/s
 *   4096x11008 Q8_0 (47.9 MB), S=1: 1 thread 6.9 -> 4.5 ms (7.0 -> 10.6 GB/s); 2 threads 4.5 -> 2.7 ms (17.6 GB/s)
 *   4096x11008 Q4_0 (25.4 MB), S=1: 1 thread 5.7 -> 2.8 ms (4.5 -> 9.0 GB/s); 2 threads 4.4 -> 2.3 ms (11.2 GB/s)
 *   S = 2 / 4 / 7 (float x dequantizes each row, then S dot products), Gemma output, 1 thread:
 *     81 -> 19 ms, 136 -> 25 ms, 200 -> 40 ms; 4096x11008 Q8_0: 32 -> 5.1, 53 -> 6.7, 79 -> 13 ms.
 * Accuracy, max |error| / max |reference| against float64 x @ dequantize(rows).T, x ~ N(0, 1): float x 1e-7..1.5e-6;
 * int8 x 0.15%..0.85% over Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K (Gemma's real rows and synthetic ones).
 */
#define I8_MAX_TOKENS 8

/* x (S, d) -> q (S, d) int8, dx (S, d/32) float scales, sums (S, d/16) int32: sums of q over each 16 values.
 * Compiled without -ffast-math: with it GCC computed x * (1/dx) with an approximate reciprocal (a -36.500004 came out
 * -36.5 and rounded to -36): the tests check this function bit for bit against numpy float32 arithmetic. */
#pragma GCC push_options
#pragma GCC optimize("no-fast-math")
#ifdef __AVX2__
/* One 32-block in AVX2, the same IEEE operations as the scalar version below (max of |x|, one product, round to
 * nearest even, clamp): the same bits. The scalar one calls libm's fmaxf per value (no -ffast-math here), which
 * was ~7% of a Gemma 3 prompt's CPU time (perf), all on one thread before each product's parallel region. */
static inline void quantize_block(const float *xb, int8_t *qb, float *dx, int32_t *sums) {
    const __m256 sign = _mm256_set1_ps(-0.0f), lim = _mm256_set1_ps(127.0f), nlim = _mm256_set1_ps(-127.0f);
    __m256 v[4], mx = _mm256_setzero_ps();
    for (int k = 0; k < 4; k++) {
        v[k] = _mm256_loadu_ps(xb + 8 * k);
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[k]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float amax = _mm_cvtss_f32(m4), dd = amax * (1.0f / 127.0f), id = dd != 0.0f ? 1.0f / dd : 0.0f;
    const __m256 idv = _mm256_set1_ps(id);
    __m256i i[4];
    for (int k = 0; k < 4; k++) {
        __m256 r = _mm256_round_ps(_mm256_mul_ps(v[k], idv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        i[k] = _mm256_cvtps_epi32(_mm256_max_ps(nlim, _mm256_min_ps(lim, r)));
    }
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256((__m256i *)qb, _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    const __m256i s0 = _mm256_add_epi32(i[0], i[1]), s1 = _mm256_add_epi32(i[2], i[3]);
    __m128i h0 = _mm_add_epi32(_mm256_castsi256_si128(s0), _mm256_extracti128_si256(s0, 1));
    __m128i h1 = _mm_add_epi32(_mm256_castsi256_si128(s1), _mm256_extracti128_si256(s1, 1));
    h0 = _mm_hadd_epi32(h0, h1);  /* [s0 a, s0 b, s1 a, s1 b] */
    h0 = _mm_hadd_epi32(h0, h0);
    *dx = dd;
    sums[0] = _mm_cvtsi128_si32(h0);
    sums[1] = _mm_extract_epi32(h0, 1);
}
#else
static inline void quantize_block(const float *xb, int8_t *qb, float *dx, int32_t *sums) {
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
    float dd = amax * (1.0f / 127.0f), id = dd != 0.0f ? 1.0f / dd : 0.0f;
    int32_t s0 = 0, s1 = 0;
    for (int j = 0; j < 32; j++) {
        float v = nearbyintf(xb[j] * id);
        v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
        qb[j] = (int8_t)v;
    }
    for (int j = 0; j < 16; j++) { s0 += qb[j]; s1 += qb[j + 16]; }
    *dx = dd;
    sums[0] = s0;
    sums[1] = s1;
}
#endif

int quantize_x_i8(const float *x, int S, int d, int8_t *q, float *dx, int32_t *sums) {
    if (d <= 0 || d % 32) return -1;
    int nb = d / 32;
    for (int s = 0; s < S; s++)
        for (int b = 0; b < nb; b++)
            quantize_block(x + (size_t)s * d + 32 * b, q + (size_t)s * d + 32 * b, dx + (size_t)s * nb + b,
                           sums + (size_t)s * 2 * nb + 2 * b);
    return 0;
}
#pragma GCC pop_options

/* M(T) for every type the int8 kernels cover (specialised copies, dispatch switches) */
#define I8_TYPES(M) M(T_Q8_0) M(T_Q4_0) M(T_Q4_1) M(T_Q5_0) M(T_Q5_1) M(T_Q4_K) M(T_Q5_K) M(T_Q6_K)
/* M(T, S) for the token counts 1..I8_MAX_TOKENS */
#define I8_COUNTS(M, T) M(T, 1) M(T, 2) M(T, 3) M(T, 4) M(T, 5) M(T, 6) M(T, 7) M(T, 8)

static int i8_type_ok(int type) {
    switch (type) {
    case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1: case T_Q8_0: case T_Q4_K: case T_Q5_K: case T_Q6_K: return 1;
    default: return 0;
    }
}

/* K of each type: its unpacked bytes u stand for u - K (Q8_0: w ^ 0x80 = w + 128 on VNNI builds). */
static int i8_offset(int type) {
    switch (type) {
#if defined(__AVX2__) && defined(__FMA__) && (defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__))
    case T_Q8_0: return 128;
#endif
    case T_Q4_0: return 8;
    case T_Q5_0: return 16;
    default: return 0;  /* Q6_K: signed q - 32 in the SIMD paths (the scalar one takes K from unpack_scalar) */
    }
}

/* Per 32-block of quantized x: fs = dx * (sum of q) and kinit = -K * (sum of q), what row_dots_i8 needs besides q
 * and dx for a weight type of offset K (i8_offset). */
static void xq_offsets(const float *dx, const int32_t *sums, size_t n_blocks, int K, float *fs, int32_t *kinit) {
    for (size_t i = 0; i < n_blocks; i++) {
        int32_t t = sums[2 * i] + sums[2 * i + 1];
        fs[i] = dx[i] * (float)t;
        kinit[i] = -K * t;
    }
}

/* Sub-block sb (32 values) of a row: its bytes u (0..255 unsigned, or signed w for Q8_0 off VNNI) with
 * w = f * (u - K) + m, in scalar form. Q6_K: per-16 integer scales sc[0], sc[1] (1 for the other types). */
static inline __attribute__((always_inline)) void unpack_scalar(const uint8_t *row, int type, int sb, int *u,
                                                                float *f, float *m, int *K, int *sc) {
    sc[0] = sc[1] = 1;
    *m = 0.0f;
    switch (type) {
    case T_Q8_0: {
        const uint8_t *blk = row + 34 * sb;
        *f = f16_to_f32(blk); *K = 0;
        for (int j = 0; j < 32; j++) u[j] = (int8_t)blk[2 + j];
        break;
    }
    case T_Q4_0: case T_Q4_1: {
        int q41 = type == T_Q4_1;
        const uint8_t *blk = row + (q41 ? 20 : 18) * sb, *qs = blk + (q41 ? 4 : 2);
        *f = f16_to_f32(blk); *K = q41 ? 0 : 8;
        if (q41) *m = f16_to_f32(blk + 2);
        for (int j = 0; j < 16; j++) { u[j] = qs[j] & 15; u[j + 16] = qs[j] >> 4; }
        break;
    }
    case T_Q5_0: case T_Q5_1: {
        int q51 = type == T_Q5_1;
        const uint8_t *blk = row + (q51 ? 24 : 22) * sb, *qs = blk + (q51 ? 8 : 6);
        uint32_t qh;
        memcpy(&qh, blk + (q51 ? 4 : 2), 4);
        *f = f16_to_f32(blk); *K = q51 ? 0 : 16;
        if (q51) *m = f16_to_f32(blk + 2);
        for (int j = 0; j < 16; j++) {
            u[j] = (qs[j] & 15) | (((qh >> j) & 1) << 4);
            u[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
        }
        break;
    }
    case T_Q4_K: case T_Q5_K: {
        int q5 = type == T_Q5_K, j = sb % 8;
        const uint8_t *blk = row + (q5 ? 176 : 144) * (sb / 8), *qh = blk + 16, *q = blk + (q5 ? 48 : 16) + 32 * (j / 2);
        float s, mn;
        k_scale_min(blk + 4, j, &s, &mn);
        *f = f16_to_f32(blk) * s; *m = -f16_to_f32(blk + 2) * mn; *K = 0;
        for (int l = 0; l < 32; l++)
            u[l] = ((j & 1) ? q[l] >> 4 : q[l] & 15) | (q5 ? ((qh[l] >> j) & 1) << 4 : 0);
        break;
    }
    case T_Q6_K: {
        int j = sb % 8, h = j / 4, g = j % 4;
        const uint8_t *blk = row + 210 * (sb / 8), *lq = blk + 64 * h + 32 * (g & 1), *qh = blk + 128 + 32 * h;
        const int8_t *scs = (const int8_t *)(blk + 192);
        *f = f16_to_f32(blk + 208); *K = 32;
        sc[0] = scs[2 * j]; sc[1] = scs[2 * j + 1];
        for (int l = 0; l < 32; l++) u[l] = ((lq[l] >> (4 * (g >> 1))) & 15) | (((qh[l] >> (2 * g)) & 3) << 4);
        break;
    }
    }
}

#if defined(__AVX2__) && defined(__FMA__)
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define HAVE_VNNI 1
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)
#define HAVE_VNNI 1
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#else  /* exact while u * s pairs fit int16: u <= 128 (every type here; Q8_0 goes through abs/sign) */
#define DPBUSD(acc, u, s) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
#endif

/* v as a value the compiler cannot look through: with -ffast-math it may regroup (dd * sc) * dx differently in each
 * inlined copy, so a K-quant scale is fixed here before it meets x's (decode dots and prompt GEMM alike). */
static inline __attribute__((always_inline)) float opaque_f32(float v) {
    __asm__("" : "+x"(v));
    return v;
}

/* Sub-block sb as 32 unsigned bytes (signed w for Q8_0 without VNNI), w = f * (u - K) + m; Q6_K: *sc16 = its
 * two per-16 integer scales as 16 int16 lanes (8 each, matching maddubs's pairs). */
static inline __attribute__((always_inline)) __m256i unpack_avx2(const uint8_t *row, int type, int sb, float *f,
                                                                 float *m, int *K, __m256i *sc16, const float *fm) {
    const __m128i m4 = _mm_set1_epi8(15);
    *m = 0.0f;
    switch (type) {
    case T_Q8_0: {
        const uint8_t *blk = row + 34 * sb;
        *f = f16_to_f32(blk);
        __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 2));
#ifdef HAVE_VNNI
        *K = 128;
        return _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80));
#else
        *K = 0;
        return w;
#endif
    }
    case T_Q4_0: case T_Q4_1: {
        int q41 = type == T_Q4_1;
        const uint8_t *blk = row + (q41 ? 20 : 18) * sb;
        __m128i q = _mm_loadu_si128((const __m128i *)(blk + (q41 ? 4 : 2)));
        *f = f16_to_f32(blk); *K = q41 ? 0 : 8;
        if (q41) *m = f16_to_f32(blk + 2);
        return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m4), _mm_and_si128(q, m4));
    }
    case T_Q5_0: case T_Q5_1: {
        int q51 = type == T_Q5_1;
        const uint8_t *blk = row + (q51 ? 24 : 22) * sb;
        __m128i qs = _mm_loadu_si128((const __m128i *)(blk + (q51 ? 8 : 6)));
        __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), m4), _mm_and_si128(qs, m4));
        *f = f16_to_f32(blk); *K = q51 ? 0 : 16;
        if (q51) *m = f16_to_f32(blk + 2);
        return _mm256_or_si256(q, _mm256_and_si256(bytes_from_bits_32(blk + (q51 ? 4 : 2)), _mm256_set1_epi8(0x10)));
    }
    case T_Q4_K: case T_Q5_K: {
        int q5 = type == T_Q5_K, j = sb % 8;
        const uint8_t *blk = row + (q5 ? 176 : 144) * (sb / 8);
        *f = opaque_f32(fm[0]); *m = fm[1]; *K = 0;  /* decoded once per super-block: k_quant_scales */
        __m256i q = _mm256_loadu_si256((const __m256i *)(blk + (q5 ? 48 : 16) + 32 * (j / 2)));
        if (j & 1) q = _mm256_srli_epi16(q, 4);
        q = _mm256_and_si256(q, _mm256_set1_epi8(15));
        if (q5) {
            __m256i bit = _mm256_set1_epi8((char)(1 << j)), qh = _mm256_loadu_si256((const __m256i *)(blk + 16));
            q = _mm256_or_si256(q, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit),
                                                    _mm256_set1_epi8(0x10)));
        }
        return q;
    }
    default: {  /* T_Q6_K */
        int j = sb % 8, h = j / 4, g = j % 4;
        const uint8_t *blk = row + 210 * (sb / 8);
        const int8_t *scs = (const int8_t *)(blk + 192);
        *f = fm[0]; *K = 0;  /* returned as signed q - 32 (abs/sign below: no cancellation) */
        *sc16 = _mm256_set_m128i(_mm_set1_epi16(scs[2 * j + 1]), _mm_set1_epi16(scs[2 * j]));
        __m256i ql = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32 * (g & 1)));
        __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
        if (g >> 1) ql = _mm256_srli_epi16(ql, 4);
        qh = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * g));
        return _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(ql, _mm256_set1_epi8(15)),
                                               _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(3)), 4)),
                               _mm256_set1_epi8(32));
    }
    }
}
#endif

/* Q4_K / Q5_K: a super-block's 8 scales and 8 mins decoded together (ggml's 32-bit mask trick on the 12 packed
 * bytes), as fm[j][0] = d * sc_j and fm[j][1] = -dmin * mn_j: the same products as k_scale_min's scalar loop, which
 * took most of a Q4_K row's time (perf: scalar converts and spills around it). */
static inline __attribute__((always_inline)) void k_scales_avx2(const uint8_t *blk, float fm[8][2]) {
    uint32_t u[4];
    memcpy(u, blk + 4, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);  /* mins 4..7 */
    const uint32_t mins_lo = u[1] & 0x3f3f3f3f;                               /* mins 0..3 */
    u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);          /* scales 4..7 */
    u[2] = mins_lo;
    u[0] &= 0x3f3f3f3f;                                                         /* scales 0..3 */
    const __m128i b = _mm_loadu_si128((const __m128i *)u);
    const __m256 sc = _mm256_mul_ps(_mm256_set1_ps(f16_to_f32(blk)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)));
    const __m256 mn = _mm256_mul_ps(_mm256_set1_ps(-f16_to_f32(blk + 2)),
                                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))));
    const __m256 lo = _mm256_unpacklo_ps(sc, mn), hi = _mm256_unpackhi_ps(sc, mn);  /* pairs (sc_j, mn_j) */
    _mm256_storeu_ps(&fm[0][0], _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(&fm[4][0], _mm256_permute2f128_ps(lo, hi, 0x31));
}

/* Quantized x: q (S, d) int8, dx (S, nb), sums (S, 2 nb) per 16, fs (S, nb) = dx * (sum of q over the block). */
typedef struct {
    const int8_t *q;
    const float *dx, *fs;
    const int32_t *sums, *kinit;  /* kinit = -K * (sum of q over the block), K the row type's offset */
    int d, nb;
} xq_t;

#if defined(__AVX2__) && defined(__FMA__)
/* The min terms of one (row, token): sum over sub-blocks of m[sb] * fs[sb], in one fixed order. Not inlined: one
 * compiled copy for every caller, so the decode dots and the prompt GEMM (bundle_kernel_gemm.c) sum them alike
 * (inlined with -ffast-math, GCC paired them differently per token count). */
static __attribute__((noinline)) float min_dot(const float *m, const float *fs, int nb) {
    __m256 a = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= nb; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(m + i), _mm256_loadu_ps(fs + i), a);
    if (i < nb) {
        const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(nb - i), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        a = _mm256_fmadd_ps(_mm256_maskload_ps(m + i, lanes), _mm256_maskload_ps(fs + i, lanes), a);
    }
    return hsum(a);
}

/* Sub-block sb of a row against every x_s: acc[s] += f * dx * (u . q - K * sum q) (8 int32 lanes); its min m goes
 * to mins[sb] (min_dot adds them up). */
static inline __attribute__((always_inline)) void sub_dots_i8(const uint8_t *row, const int type, const int S,
                                                              const xq_t *X, int sb, __m256 *acc, float *mins,
                                                              const float *fm) {
    const int nsb = X->nb, has_min = type == T_Q4_1 || type == T_Q5_1 || type == T_Q4_K || type == T_Q5_K;
    float f, m;
    int K;
    __m256i sc16 = _mm256_setzero_si256();
    /* software prefetch ~2 KiB ahead: 16 -> 18 ms a call for Gemma's output matrix on one thread */
    _mm_prefetch((const char *)row + (size_t)sb * block_bytes(type) * 32 / block_values(type) + 2048, _MM_HINT_T0);
    __m256i u = unpack_avx2(row, type, sb, &f, &m, &K, &sc16, fm);
    /* signed weights (Q6_K; Q8_0 without VNNI) go in as |w| and x * sign(w). Q6_K's -32 as -32 * (sum of x)
     * folded into one lane cancelled in float between lanes: up to 5e-4 relative off the exact product. */
#ifdef HAVE_VNNI
    const int is_signed = type == T_Q6_K;
#else
    const int is_signed = type == T_Q6_K || type == T_Q8_0;
#endif
    __m256i w = u;
    if (is_signed) u = _mm256_abs_epi8(w);
    for (int s = 0; s < S; s++) {
        const size_t xi = (size_t)s * nsb + sb;
        __m256i xv = _mm256_loadu_si256((const __m256i *)(X->q + (size_t)s * X->d + 32 * sb));
        if (is_signed) xv = _mm256_sign_epi8(xv, w);
        __m256i init = K ? _mm256_zextsi128_si256(_mm_cvtsi32_si128(X->kinit[xi])) : _mm256_setzero_si256();
        __m256i dp;
        if (type == T_Q6_K)  /* pairs |w| * x (<= 32 * 127 * 2) in int16, times the per-16 scale, summed in int32 */
            dp = _mm256_madd_epi16(_mm256_maddubs_epi16(u, xv), sc16);
        else
            dp = DPBUSD(init, u, xv);
        acc[s] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), _mm256_set1_ps(f * X->dx[xi]), acc[s]);
    }
    if (has_min) mins[sb] = m;
}
#endif

/* res[s] = row . x_s for s < S; type and S are constants after inlining (one specialised loop per case). */
static inline __attribute__((always_inline)) void row_dots_i8(const uint8_t *row, const int type, const int S,
                                                              const xq_t *X, float *res) {
#if defined(__AVX2__) && defined(__FMA__)
    const int nsb = X->nb, has_min = type == T_Q4_1 || type == T_Q5_1 || type == T_Q4_K || type == T_Q5_K;
    float mins[nsb];
    __m256 acc0[I8_MAX_TOKENS], acc1[I8_MAX_TOKENS];  /* even and odd sub-blocks: two FMA dependency chains */
    for (int s = 0; s < S; s++) acc0[s] = acc1[s] = _mm256_setzero_ps();
    if (type == T_Q4_K || type == T_Q5_K || type == T_Q6_K) {  /* per super-block: its scales decoded once */
        const int bb = block_bytes(type);
        for (int B = 0; B < nsb / 8; B++) {
            const uint8_t *blk = row + (size_t)bb * B;
            float fm[8][2];
            if (type == T_Q6_K) {
                for (int j = 0; j < 8; j++) fm[j][0] = f16_to_f32(blk + 208);
            } else {
                k_scales_avx2(blk, fm);
            }
#pragma GCC unroll 4
            for (int j = 0; j < 8; j += 2) {
                sub_dots_i8(row, type, S, X, 8 * B + j, acc0, mins, fm[j]);
                sub_dots_i8(row, type, S, X, 8 * B + j + 1, acc1, mins, fm[j + 1]);
            }
        }
    } else {
        int sb = 0;
        for (; sb + 1 < nsb; sb += 2) {
            sub_dots_i8(row, type, S, X, sb, acc0, mins, NULL);
            sub_dots_i8(row, type, S, X, sb + 1, acc1, mins, NULL);
        }
        if (sb < nsb) sub_dots_i8(row, type, S, X, sb, acc0, mins, NULL);
    }
    for (int s = 0; s < S; s++)
        res[s] = hsum(_mm256_add_ps(acc0[s], acc1[s])) + (has_min ? min_dot(mins, X->fs + (size_t)s * nsb, nsb) : 0.0f);
#else
    float off[I8_MAX_TOKENS];
    for (int s = 0; s < S; s++) off[s] = 0.0f;
    const int nsb = X->nb, has_min = type == T_Q4_1 || type == T_Q5_1 || type == T_Q4_K || type == T_Q5_K;
    float acc[I8_MAX_TOKENS];
    for (int s = 0; s < S; s++) acc[s] = 0.0f;
    for (int sb = 0; sb < nsb; sb++) {
        int u[32], K, sc[2];
        float f, m;
        unpack_scalar(row, type, sb, u, &f, &m, &K, sc);
        for (int s = 0; s < S; s++) {
            const size_t xi = (size_t)s * nsb + sb;
            const int8_t *xq = X->q + (size_t)s * X->d + 32 * sb;
            int32_t d0 = -K * X->sums[2 * xi], d1 = -K * X->sums[2 * xi + 1];
            for (int j = 0; j < 16; j++) { d0 += u[j] * xq[j]; d1 += u[j + 16] * xq[j + 16]; }
            acc[s] += f * X->dx[xi] * (float)(sc[0] * d0 + sc[1] * d1);
            if (has_min) off[s] += m * X->fs[xi];
        }
    }
    for (int s = 0; s < S; s++) res[s] = acc[s] + off[s];
#endif
}

#define I8_CASE_S(T, S_)                                                                                          \
    case S_:                                                                                                      \
        _Pragma("omp parallel for num_threads(n_threads) schedule(static)")                                      \
        for (int64_t r = 0; r < n; r++) {                                                                         \
            float res[S_];                                                                                        \
            row_dots_i8(rows + r * row_bytes, T, S_, &X, res);                                                    \
            for (int s = 0; s < S_; s++) out[(size_t)s * out_stride + r] = res[s];                                \
        }                                                                                                         \
        break;
#define I8_CASE_T(T)                                                                                              \
    case T:                                                                                                       \
        switch (S) { I8_CASE_S(T, 1) I8_CASE_S(T, 2) I8_CASE_S(T, 3) I8_CASE_S(T, 4) I8_CASE_S(T, 5)             \
                     I8_CASE_S(T, 6) I8_CASE_S(T, 7) I8_CASE_S(T, 8) }                                            \
        break;

/* rows_matvec with int8 activations: same arguments; -3 when S or the type is outside what it covers. */
int rows_matvec_i8(const uint8_t *rows, int64_t n, int64_t row_bytes, int type, int d, const float *x, int S,
                   float *out, int64_t out_stride, int n_threads) {
    if (!row_ok(type, d)) return -1;
    if (!i8_type_ok(type) || S < 1 || S > I8_MAX_TOKENS) return -3;
    if (n_threads < 1) n_threads = 1;
    int nb = d / 32;
    int8_t *q = malloc((size_t)S * d);
    float *dx = malloc(sizeof(float) * 2 * (size_t)S * nb);
    int32_t *sums = malloc(sizeof(int32_t) * 3 * (size_t)S * nb), *kinit = sums + 2 * (size_t)S * nb;
    if (!q || !dx || !sums) { free(q); free(dx); free(sums); return -2; }
    float *fs = dx + (size_t)S * nb;
    quantize_x_i8(x, S, d, q, dx, sums);
    xq_offsets(dx, sums, (size_t)S * nb, i8_offset(type), fs, kinit);
    xq_t X = {q, dx, fs, sums, kinit, d, nb};
    switch (type) { I8_TYPES(I8_CASE_T) }
    free(q); free(dx); free(sums);
    return 0;
}

#ifdef HAVE_FUSED
/* ---- The bundle FFN with int8 activations, for any number of tokens -------------------------------------------
 * gate . x_s and up . x_s as rows_matvec_i8 computes them (x quantized per 32-block, integer dot products), then
 * a = act(gate . x) * (up . x) and y_s += a * down in float, DOWN_GROUP neurons at a time (down_axpy_group).
 * Records are the outer loop (each group's bytes are read from memory once, then stay in L1 while every token
 * uses them); tokens go in groups of up to I8_MAX_TOKENS through row dot products specialised per (type, count).
 * Deterministic for a given n_threads, as bundle_ffn. Replaces the prompt path's dequantize + BLAS products and
 * the float-x decode path (measurements in bundle_kernel.py). */
typedef void (*dots_fn)(const uint8_t *row, const xq_t *X, float *res);
#define DOTS_FN(T, S_) \
    static void dots_##T##_##S_(const uint8_t *row, const xq_t *X, float *res) { row_dots_i8(row, T, S_, X, res); }
#define DOTS_FNS(T) I8_COUNTS(DOTS_FN, T)
I8_TYPES(DOTS_FNS)
/* case T: the table of name_T_1 .. name_T_8 (one specialised copy per token count), entry S - 1 */
#define I8_TABLE_CASE(name, T) \
    case T: { static const name##_fn f[8] = {name##_##T##_1, name##_##T##_2, name##_##T##_3, name##_##T##_4, \
                                             name##_##T##_5, name##_##T##_6, name##_##T##_7, name##_##T##_8}; \
              return f[S - 1]; }
#define DOTS_CASE(T) I8_TABLE_CASE(dots, T)

static dots_fn dots_for(int type, int S) {
    switch (type) { I8_TYPES(DOTS_CASE) }
    return NULL;
}

/* x (S, d) quantized once for a fused FFN call, with the offsets of the gate and the up rows' types */
typedef struct {
    int8_t *q;
    float *dx;
    int32_t *sums;
    xq_t gate, up;
} ffn_x_t;

static void ffn_x_free(ffn_x_t *X) { free(X->q); free(X->dx); free(X->sums); }

static int ffn_x_init(ffn_x_t *X, const float *x, int S, int d, int gate_type, int up_type) {
    const int nb = d / 32;
    const size_t snb = (size_t)S * nb;
    X->q = malloc((size_t)S * d);
    X->dx = malloc(sizeof(float) * 2 * snb);
    X->sums = malloc(sizeof(int32_t) * 4 * snb);
    if (!X->q || !X->dx || !X->sums) { ffn_x_free(X); return -2; }
    float *fs = X->dx + snb;
    int32_t *kg = X->sums + 2 * snb, *ku = kg + snb;
    quantize_x_i8(x, S, d, X->q, X->dx, X->sums);
    xq_offsets(X->dx, X->sums, snb, i8_offset(gate_type), fs, kg);
    xq_offsets(X->dx, X->sums, snb, i8_offset(up_type), fs, ku);
    X->gate = (xq_t){X->q, X->dx, fs, X->sums, kg, d, nb};
    X->up = (xq_t){X->q, X->dx, fs, X->sums, ku, d, nb};
    return 0;
}

/* exp for 8 floats: Cephes' expf (as in avx_mathfun's exp256_ps), relative error ~1e-7; inputs clamped to
 * +-88.38 (exp(-88.38) comes out 0). */
static inline __m256 v_expf(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 z = _mm256_mul_ps(x, x), y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(0x7f)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* act(g[s]) for 8 values at once (SiLU g / (1 + e^-g); ReLU; GELU-tanh with tanh(y) = 1 - 2 / (1 + e^2y)): a scalar
 * expf or tanhf per neuron and token took 40% of Gemma 3's decode FFN time and a fifth of its prompt batches'. */
static inline void activate_8(const float *g, int act, float *out) {
    const __m256 x = _mm256_loadu_ps(g), one = _mm256_set1_ps(1.0f);
    __m256 r;
    if (act == ACT_RELU) {
        r = _mm256_max_ps(x, _mm256_setzero_ps());
    } else if (act == ACT_GELU_TANH) {
        __m256 y = _mm256_mul_ps(_mm256_set1_ps(0.7978845608f),
                                 _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), x), _mm256_mul_ps(x, x), x));
        __m256 t = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f),
                                                    _mm256_add_ps(one, v_expf(_mm256_add_ps(y, y)))));
        r = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(one, t));
    } else {
        r = _mm256_div_ps(x, _mm256_add_ps(one, v_expf(_mm256_sub_ps(_mm256_setzero_ps(), x))));
    }
    _mm256_storeu_ps(out, r);
}

/* The quantized x of tokens s0.. (a view into X). */
static xq_t xq_from(const xq_t *X, int s0) {
    xq_t v = *X;
    v.q += (size_t)s0 * X->d;
    v.dx += (size_t)s0 * X->nb;
    v.fs += (size_t)s0 * X->nb;
    v.sums += (size_t)s0 * 2 * X->nb;
    v.kinit += (size_t)s0 * X->nb;
    return v;
}

/* y_s += sum_k a[s][k] * down_k for m tokens: each 8-value slice of the g down columns is converted to float once
 * and used by every token (down_axpy_group per token converted it m times). Kept apart from down_axpy_group: one
 * function for both (same sums, bit for bit) made the float decode path 11-16% slower and, with its broadcasts
 * hoisted, this one 15-30% slower (measured on SmolLM2 and Gemma 3 layer 0). */
static void down_axpy_tokens(const uint8_t *const *down, float a[][DOWN_GROUP], int g, int m, float *y, int d) {
    for (int b = 0; b < d / 32; b++) {
        float sc[DOWN_GROUP];
        for (int k = 0; k < g; k++) sc[k] = f16_to_f32(down[k] + 34 * b);
        float c[I8_MAX_TOKENS][DOWN_GROUP];
        for (int s = 0; s < m; s++)
            for (int k = 0; k < g; k++) c[s][k] = a[s][k] * sc[k];
        for (int v = 0; v < 4; v++) {
            __m256 w[DOWN_GROUP];
            for (int k = 0; k < g; k++)
                w[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                    _mm_loadl_epi64((const __m128i *)(down[k] + 34 * b + 2 + 8 * v))));
            for (int s = 0; s < m; s++) {
                float *yv = y + (size_t)s * d + 32 * b + 8 * v;
                __m256 acc = _mm256_loadu_ps(yv);
                for (int k = 0; k < g; k++) acc = _mm256_fmadd_ps(_mm256_set1_ps(c[s][k]), w[k], acc);
                _mm256_storeu_ps(yv, acc);
            }
        }
    }
}

static int bundle_ffn_prompt_i8(const uint8_t *const *rows, int64_t n, int d, int gate_type, int up_type,
                                int64_t up_offset, int64_t down_offset, int act, const float *x, int S, float *y,
                                int n_threads, const uint8_t *mask);  /* bundle_kernel_gemm.c; -3: not built */

/* mask: NULL, or (S, n) bytes: token s counts neuron i where mask[s * n + i] (sparsity over a prompt batch) */
int bundle_ffn_i8(const uint8_t *const *rows, int64_t n, int d, int gate_type, int up_type, int64_t up_offset,
                  int64_t down_offset, int act, const float *x, int S, float *y, int n_threads,
                  const uint8_t *mask) {
    if (!row_ok(gate_type, d) || !row_ok(up_type, d) || !row_ok(T_Q8_0, d)) return -1;
    if (!i8_type_ok(gate_type) || !i8_type_ok(up_type) || S < 1) return -3;
    if (n_threads < 1) n_threads = 1;
#ifndef _OPENMP
    n_threads = 1;
#endif
    /* a prompt's gate and up products through the GEMM tiles; a ReLU model's skip most up products here */
    if (S > I8_MAX_TOKENS && act != ACT_RELU) {
        const int status = bundle_ffn_prompt_i8(rows, n, d, gate_type, up_type, up_offset, down_offset, act, x, S, y,
                                                n_threads, mask);
        if (status != -3) return status;
    }
    const size_t sd = (size_t)S * d;
    ffn_x_t X;
    float *partial = calloc((size_t)n_threads * sd, sizeof(float));
    if (!partial || ffn_x_init(&X, x, S, d, gate_type, up_type)) { free(partial); return -2; }
    const xq_t XG = X.gate, XU = X.up;
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads)
#endif
    {
        int64_t lo, hi;
        const int tid = thread_range(n, &lo, &hi);
        float *ylocal = partial + (size_t)tid * sd;
        for (int64_t i = lo; i < hi; i += DOWN_GROUP) {
            const int g = (int)(hi - i < DOWN_GROUP ? hi - i : DOWN_GROUP);
            for (int s0 = 0; s0 < S; s0 += I8_MAX_TOKENS) {
                const int m = S - s0 < I8_MAX_TOKENS ? S - s0 : I8_MAX_TOKENS;
                const dots_fn fg = dots_for(gate_type, m), fu = dots_for(up_type, m);
                const xq_t xg = xq_from(&XG, s0), xu = xq_from(&XU, s0);
                float a[I8_MAX_TOKENS][DOWN_GROUP];
                const uint8_t *down[DOWN_GROUP];
                int kept = 0;  /* neurons with a nonzero activation for some token: only they reach down */
                for (int k = 0; k < g; k++) {
                    float gv[I8_MAX_TOKENS] = {0}, uv[I8_MAX_TOKENS], av[I8_MAX_TOKENS];
                    fg(rows[i + k], &xg, gv);
                    if (act == ACT_RELU) {  /* relu(gate) == 0 for every token: no up product, no down column */
                        int any = 0;
                        for (int s = 0; s < m; s++) any |= gv[s] > 0.0f;
                        if (!any) continue;
                    }
                    fu(rows[i + k] + up_offset, &xu, uv);
                    activate_8(gv, act, av);
                    for (int s = 0; s < m; s++) a[s][kept] = av[s] * uv[s];
                    if (mask)
                        for (int s = 0; s < m; s++)
                            if (!mask[(size_t)(s0 + s) * n + i + k]) a[s][kept] = 0.0f;
                    down[kept++] = rows[i + k] + down_offset;
                }
                if (kept) down_axpy_tokens(down, a, kept, m, ylocal + (size_t)s0 * d, d);
            }
        }
    }
    add_partials(y, partial, n_threads, sd);
    ffn_x_free(&X);
    free(partial);
    return 0;
}
#endif

#ifdef HAVE_FUSED
int rows_gemm_i8(const uint8_t *rows, int64_t n, int64_t row_bytes, int type, int d, const float *x, int S,
                 float *out, int64_t out_stride, int n_threads);  /* bundle_kernel_gemm.c */

/* ---- A resident FFN as three row products (llama.cpp's layout: ffn_gate, ffn_up (n_ff, d), ffn_down (d, n_ff)) --
 * g = gate . x, u = up . x with x quantized per 32-block, a = act(g) * u in float, then y += down . a with a
 * quantized the same way (as llama.cpp quantizes ffn_down's input). A decode step's few tokens go through
 * rows_matvec_i8, a prompt's through rows_gemm_i8 (the same sums per token). Used where a layer's whole FFN is in
 * memory (a GGUF, or a .flash with no budget): each product streams its matrix row by row, where the record
 * kernels' one-block down products cost ~45% more per token (SmolLM2 layer 0, AMD EPYC 2 threads: 113 -> 76 us at
 * one token, 77 -> 58 us per token at 128). */
int dense_ffn_i8(const uint8_t *gate, int64_t gate_row_bytes, int gate_type, const uint8_t *up,
                 int64_t up_row_bytes, int up_type, const uint8_t *down, int64_t down_row_bytes, int down_type,
                 int d, int n_ff, int act, const float *x, int S, float *y, int n_threads) {
    if (!row_ok(gate_type, d) || !row_ok(up_type, d) || !row_ok(down_type, n_ff) || n_ff % 8) return -1;
    if (!i8_type_ok(gate_type) || !i8_type_ok(up_type) || !i8_type_ok(down_type) || S < 1) return -3;
    int (*const product)(const uint8_t *, int64_t, int64_t, int, int, const float *, int, float *, int64_t, int) =
        S <= I8_MAX_TOKENS ? rows_matvec_i8 : rows_gemm_i8;
    float *g = malloc(sizeof(float) * (size_t)S * n_ff), *u = malloc(sizeof(float) * (size_t)S * n_ff);
    float *dy = malloc(sizeof(float) * (size_t)S * d);
    int status = (g && u && dy) ? 0 : -2;
    if (!status) status = product(gate, n_ff, gate_row_bytes, gate_type, d, x, S, g, n_ff, n_threads);
    if (!status) status = product(up, n_ff, up_row_bytes, up_type, d, x, S, u, n_ff, n_threads);
    /* elementwise, so split across threads for a prompt (Gemma 3: 262k GELUs per layer at 128 tokens) */
    const int64_t n_act = status ? 0 : (int64_t)S * n_ff;
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(static) if (S > I8_MAX_TOKENS)
#endif
    for (int64_t k = 0; k < n_act; k += 8) {
        activate_8(g + k, act, g + k);
        _mm256_storeu_ps(g + k, _mm256_mul_ps(_mm256_loadu_ps(g + k), _mm256_loadu_ps(u + k)));
    }
    if (!status) status = product(down, d, down_row_bytes, down_type, n_ff, g, S, dy, d, n_threads);
    for (size_t k = 0; k < (size_t)S * d && !status; k++) y[k] += dy[k];
    free(g); free(u); free(dy);
    return status;
}
#endif
