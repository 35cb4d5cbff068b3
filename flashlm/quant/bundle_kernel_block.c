/* The FFN over block-layout records (flash_store/format.py, group G > 1), compiled as part of bundle_kernel.c
 * after bundle_kernel_i8.c (whose row dot products, x quantization and activations it uses).
 *
 * A record holds G consecutive neurons: their G gate rows, their G up rows, then ffn_down's d rows restricted to
 * these neurons: one block of G values per row, the source GGUF's bytes (no requantization). For tokens x (S, d):
 *     a[s, k] = act(gate_k . x_s) * (up_k . x_s)          k < G
 *     y[s, r] += down_block_r . a[s, :]                     r < d
 * The second line is llama.cpp's ffn_down product restricted to one block column: a is quantized to int8 per 32
 * (quantize_x_i8, as llama.cpp quantizes ffn_down's input) and each block goes through row_dots_i8 as a one-block
 * row. Records are the outer loop, split statically between threads with per-thread partial sums added in thread
 * order (deterministic for a given n_threads, as bundle_ffn_i8). */

#define BLOCK_MAX_G 256

/* dequant_block_records: records -> float32 gate (n*G, d), up (n*G, d) and down (n*G, d) (neuron k of record i is
 * row i*G + k; down row = that neuron's column of ffn_down): the prompt path without the fused kernel, and the
 * tests' reference. */
int dequant_block_records(const uint8_t *const *rows, int64_t n, int d, int gate_type, int up_type, int down_type,
                          int G, int64_t up_offset, int64_t down_offset, float *gate, float *up, float *down,
                          int n_threads) {
    if (!row_ok(gate_type, d) || !row_ok(up_type, d) || !row_ok(down_type, G) || G > BLOCK_MAX_G) return -1;
    if (n_threads < 1) n_threads = 1;
    const int64_t gb = (int64_t)d / block_values(gate_type) * block_bytes(gate_type);
    const int64_t ub = (int64_t)d / block_values(up_type) * block_bytes(up_type);
    const int64_t bb = (int64_t)G / block_values(down_type) * block_bytes(down_type);
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(static)
#endif
    for (int64_t i = 0; i < n; i++) {
        float col[BLOCK_MAX_G];
        for (int k = 0; k < G; k++) {
            dequant_row(rows[i] + k * gb, gate_type, gate + ((size_t)i * G + k) * d, d);
            dequant_row(rows[i] + up_offset + k * ub, up_type, up + ((size_t)i * G + k) * d, d);
        }
        for (int r = 0; r < d; r++) {
            dequant_row(rows[i] + down_offset + r * bb, down_type, col, G);
            for (int k = 0; k < G; k++) down[((size_t)i * G + k) * d + r] = col[k];
        }
    }
    return 0;
}

#ifdef HAVE_FUSED
/* y (S_, d) += for each r: down_block_r . a, the blocks contiguous (bb bytes each); type and S_ fixed per copy. */
typedef void (*down_fn)(const uint8_t *blocks, int64_t bb, int d, const xq_t *A, float *y);
#define DOWN_FN(T, S_)                                                                                             \
    static void down_##T##_##S_(const uint8_t *blocks, int64_t bb, int d, const xq_t *A, float *y) {              \
        for (int r = 0; r < d; r++) {                                                                              \
            float res[S_];                                                                                         \
            row_dots_i8(blocks + (size_t)r * bb, T, S_, A, res);                                                   \
            for (int s = 0; s < S_; s++) y[(size_t)s * d + r] += res[s];                                           \
        }                                                                                                          \
    }
#define DOWN_FNS(T) I8_COUNTS(DOWN_FN, T)
I8_TYPES(DOWN_FNS)
#define DOWN_CASE(T) I8_TABLE_CASE(down, T)

static down_fn down_for(int type, int S) {
    switch (type) { I8_TYPES(DOWN_CASE) }
    return NULL;
}

/* One token, 32-value blocks (G = 32: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): y[r] += down_block_r . a for 8 rows at a time.
 * down_for's path spends a whole row_dots_i8 (accumulator set-up, horizontal sum, the min terms) on each row's one
 * block; here 8 rows' integer dot products are summed together (hadd tree) and scaled in one vector: 3.5x fewer
 * instructions a row. The integer sums are exact; only where the float scaling rounds may differ from down_for's. */
static inline __attribute__((always_inline)) void down_g32_s1(const uint8_t *blocks, int64_t bb, int d, int type,
                                                              const xq_t *A, float *y) {
    const __m256i xv = _mm256_loadu_si256((const __m256i *)A->q);
    const __m256i init = _mm256_zextsi128_si256(_mm_cvtsi32_si128(A->kinit[0]));
    const float dx = A->dx[0], fs = A->fs[0];
    const int has_min = type == T_Q4_1 || type == T_Q5_1;
    int r = 0;
    for (; r + 8 <= d; r += 8) {
        __m256i dp[8];
        float f[8], m[8];
        for (int k = 0; k < 8; k++) {
            int K;
            __m256i sc16;
            const uint8_t *blk = blocks + (size_t)(r + k) * bb;
            __m256i u = unpack_avx2(blk, type, 0, &f[k], &m[k], &K, &sc16, NULL), x = xv;
#ifndef HAVE_VNNI
            if (type == T_Q8_0) {  /* signed weights: |w| and x * sign(w), as sub_dots_i8 */
                x = _mm256_sign_epi8(xv, u);
                u = _mm256_abs_epi8(u);
            }
#endif
            dp[k] = DPBUSD(K ? init : _mm256_setzero_si256(), u, x);
        }
        const __m256i t0 = _mm256_hadd_epi32(_mm256_hadd_epi32(dp[0], dp[1]), _mm256_hadd_epi32(dp[2], dp[3]));
        const __m256i t1 = _mm256_hadd_epi32(_mm256_hadd_epi32(dp[4], dp[5]), _mm256_hadd_epi32(dp[6], dp[7]));
        const __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(t0, t1, 0x20),
                                              _mm256_permute2x128_si256(t0, t1, 0x31));  /* rows r .. r+7 */
        const __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(f), _mm256_set1_ps(dx));
        const __m256 base = has_min ? _mm256_mul_ps(_mm256_loadu_ps(m), _mm256_set1_ps(fs)) : _mm256_setzero_ps();
        const __m256 res = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, base);
        _mm256_storeu_ps(y + r, _mm256_add_ps(_mm256_loadu_ps(y + r), res));
    }
    for (; r < d; r++) {  /* d not a multiple of 8: the rest as down_for computes them */
        float res[1];
        row_dots_i8(blocks + (size_t)r * bb, type, 1, A, res);
        y[r] += res[0];
    }
}

/* down_g32_s1 specialised per type (the type a constant in each copy); down_one_token_g32: NULL for other types. */
#define DOWN_G32_FN(T) \
    static void down_g32_##T(const uint8_t *b, int64_t bb, int d, const xq_t *A, float *y) { down_g32_s1(b, bb, d, T, A, y); }
DOWN_G32_FN(T_Q4_0) DOWN_G32_FN(T_Q4_1) DOWN_G32_FN(T_Q5_0) DOWN_G32_FN(T_Q5_1) DOWN_G32_FN(T_Q8_0)

static down_fn down_one_token_g32(int type) {
    switch (type) {
    case T_Q4_0: return down_g32_T_Q4_0;
    case T_Q4_1: return down_g32_T_Q4_1;
    case T_Q5_0: return down_g32_T_Q5_0;
    case T_Q5_1: return down_g32_T_Q5_1;
    case T_Q8_0: return down_g32_T_Q8_0;
    default: return NULL;
    }
}

int bundle_ffn_block_i8(const uint8_t *const *rows, int64_t n, int d, int gate_type, int up_type, int down_type,
                        int G, int64_t up_offset, int64_t down_offset, int act, const float *x, int S, float *y,
                        int n_threads) {
    if (!row_ok(gate_type, d) || !row_ok(up_type, d) || !row_ok(down_type, G) || G % 32 || G > BLOCK_MAX_G)
        return -1;
    if (!i8_type_ok(gate_type) || !i8_type_ok(up_type) || !i8_type_ok(down_type) || S < 1) return -3;
    if (n_threads < 1) n_threads = 1;
#ifndef _OPENMP
    n_threads = 1;
#endif
    const size_t sd = (size_t)S * d;
    const int64_t gb = (int64_t)d / block_values(gate_type) * block_bytes(gate_type);
    const int64_t ub = (int64_t)d / block_values(up_type) * block_bytes(up_type);
    const int64_t bb = (int64_t)G / block_values(down_type) * block_bytes(down_type);
    const int Kd = i8_offset(down_type);
    const down_fn down_one = G == 32 ? down_one_token_g32(down_type) : NULL;  /* one token's down pass, if any */
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
        const int anb = G / 32;
        float a[I8_MAX_TOKENS * BLOCK_MAX_G], adx[2 * I8_MAX_TOKENS * BLOCK_MAX_G / 32];
        int8_t aq[I8_MAX_TOKENS * BLOCK_MAX_G];
        int32_t asums[3 * I8_MAX_TOKENS * BLOCK_MAX_G / 16];
        for (int64_t i = lo; i < hi; i++) {
            for (int s0 = 0; s0 < S; s0 += I8_MAX_TOKENS) {
                const int m = S - s0 < I8_MAX_TOKENS ? S - s0 : I8_MAX_TOKENS;
                const dots_fn fg = dots_for(gate_type, m), fu = dots_for(up_type, m);
                const xq_t xg = xq_from(&XG, s0), xu = xq_from(&XU, s0);
                for (int k = 0; k < G; k++) {
                    float gv[I8_MAX_TOKENS] = {0}, uv[I8_MAX_TOKENS], av[I8_MAX_TOKENS];
                    fg(rows[i] + k * gb, &xg, gv);
                    fu(rows[i] + up_offset + k * ub, &xu, uv);
                    activate_8(gv, act, av);
                    for (int s = 0; s < m; s++) a[s * G + k] = av[s] * uv[s];
                }
                /* a (m, G) -> int8 per 32, with the sums and offsets row_dots_i8 expects for the down type */
                const size_t mnb = (size_t)m * anb;
                int32_t *akinit = asums + 2 * mnb;
                float *afs = adx + mnb;
                quantize_x_i8(a, m, G, aq, adx, asums);
                xq_offsets(adx, asums, mnb, Kd, afs, akinit);
                const xq_t A = {aq, adx, afs, asums, akinit, G, anb};
                (m == 1 && down_one ? down_one : down_for(down_type, m))(rows[i] + down_offset, bb, d, &A,
                                                                           ylocal + (size_t)s0 * d);
            }
        }
    }
    add_partials(y, partial, n_threads, sd);
    ffn_x_free(&X);
    free(partial);
    return 0;
}
#endif
