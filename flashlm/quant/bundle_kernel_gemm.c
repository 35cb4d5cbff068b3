/* Int8 GEMM for prompt batches, compiled as part of bundle_kernel.c (included after bundle_kernel_i8.c, whose
 * quantized x, unpacking and row_dots_i8 it builds on).
 *
 * rows_gemm_i8 computes what rows_matvec_i8 computes, for any number of tokens, bit for bit the same per token:
 * each (row, token) result goes through the same integer lanes, the same float products f * dx, the same two FMA
 * chains (even and odd sub-blocks) and the same final sums as row_dots_i8. So a prompt gives each token what a
 * decode step gives it, and a prompt in chunks what it gives in one pass. What differs is the shape of the work:
 *   - AVX-512: one 512-bit dpbusd covers two sub-blocks (row_dots_i8's acc0 | acc1 chains side by side), with
 *     the scale vector [f_even * dx_even x8 | f_odd * dx_odd x8];
 *   - tiles of GEMM_ROWS rows x GEMM_TOKENS tokens: each row is unpacked once per call (not once per 8 tokens),
 *     each token's x is loaded once per row tile;
 *   - one OpenMP region per call (rows_matvec_i8 in groups of 8 tokens took 16 for a 128-token prompt: on a busy
 *     machine every region's barrier waits for a descheduled thread), its row tiles handed out dynamically.
 * Builds without AVX-512 VNNI take rows_matvec_i8 over groups of I8_MAX_TOKENS tokens (the same results). */

#if defined(HAVE_FUSED) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__AVX512VNNI__)
#define HAVE_GEMM_I8 1
#define GEMM_ROWS 4
#define GEMM_TOKENS 4
/* row tiles handed out GEMM_CHUNK at a time, to whichever thread is free: on a shared machine a thread that loses
 * its core no longer holds the others at the region's end with a fixed half of the rows (each (row, token) result
 * is computed alone, so the split does not change any bits) */
#define GEMM_CHUNK 8

/* GEMM_ROWS rows unpacked for the whole call: per pair p of sub-blocks, per row, 64 bytes u, the scales
 * [f_2p x8 | f_2p+1 x8], Q6_K's per-16 integer scales and its sign mask; per sub-block its min m. */
typedef struct {
    __m512i *u, *sc16;
    __m512 *f;
    __mmask64 *neg;
    float *m;  /* (GEMM_ROWS, nb) */
    int np;
} gemm_rows_t;

/* The rows a GEMM reads: base + r * stride (ptrs NULL), or ptrs[r] + offset (records). */
typedef struct {
    const uint8_t *base;
    const uint8_t *const *ptrs;
    int64_t stride, offset;
} row_src_t;

static inline const uint8_t *row_at(const row_src_t *src, int64_t r) {
    return src->ptrs ? src->ptrs[r] + src->offset : src->base + r * src->stride;
}

/* Sub-block sb of a row: u (32 bytes, |w| for Q6_K), f, m, its Q6_K scales and sign bits, as sub_dots_i8 sees them. */
static inline __attribute__((always_inline)) __m256i gemm_unpack_sb(const uint8_t *row, int type, int sb,
                                                                     float *f, float *m, __m256i *sc16,
                                                                     __mmask32 *neg) {
    float fm[2] = {0.0f, 0.0f};
    int K;
    if (type == T_Q4_K || type == T_Q5_K || type == T_Q6_K) {  /* as row_dots_i8 decodes them per super-block */
        const uint8_t *blk = row + (size_t)block_bytes(type) * (sb / 8);
        if (type == T_Q6_K) {
            fm[0] = f16_to_f32(blk + 208);
        } else {
            float dd = f16_to_f32(blk), dmin = f16_to_f32(blk + 2), sc, mn;
            k_scale_min(blk + 4, sb % 8, &sc, &mn);
            fm[0] = dd * sc;
            fm[1] = -dmin * mn;
        }
    }
    __m256i u = unpack_avx2(row, type, sb, f, m, &K, sc16, fm);
    *neg = 0;
    if (type == T_Q6_K) {
        *neg = _mm256_movepi8_mask(u);
        u = _mm256_abs_epi8(u);
    }
    return u;
}

static void gemm_unpack_rows(const row_src_t *src, int64_t r0, int nr, int type, int nb, gemm_rows_t *R) {
    for (int r = 0; r < GEMM_ROWS; r++) {
        float *mr = R->m + (size_t)r * nb;
        if (r >= nr) {  /* past the last row: zeros, computed and not stored */
            for (int p = 0; p < R->np; p++) {
                R->u[(size_t)p * GEMM_ROWS + r] = _mm512_setzero_si512();
                R->f[(size_t)p * GEMM_ROWS + r] = _mm512_setzero_ps();
                R->sc16[(size_t)p * GEMM_ROWS + r] = _mm512_setzero_si512();
                R->neg[(size_t)p * GEMM_ROWS + r] = 0;
            }
            for (int sb = 0; sb < nb; sb++) mr[sb] = 0.0f;
            continue;
        }
        const uint8_t *row = row_at(src, r0 + r);
        for (int p = 0; p < R->np; p++) {
            float f0, f1 = 0.0f, m0, m1 = 0.0f;
            __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256(), u1 = _mm256_setzero_si256();
            __mmask32 n0, n1 = 0;
            __m256i u0 = gemm_unpack_sb(row, type, 2 * p, &f0, &m0, &s0, &n0);
            if (2 * p + 1 < nb) u1 = gemm_unpack_sb(row, type, 2 * p + 1, &f1, &m1, &s1, &n1);
            const size_t k = (size_t)p * GEMM_ROWS + r;
            R->u[k] = _mm512_inserti64x4(_mm512_castsi256_si512(u0), u1, 1);
            R->sc16[k] = _mm512_inserti64x4(_mm512_castsi256_si512(s0), s1, 1);
            R->f[k] = _mm512_insertf32x8(_mm512_set1_ps(f0), _mm256_set1_ps(f1), 1);
            R->neg[k] = (__mmask64)n0 | ((__mmask64)n1 << 32);
            mr[2 * p] = m0;
            if (2 * p + 1 < nb) mr[2 * p + 1] = m1;
        }
    }
}

/* The quantized tokens as the tiles read them, per token and pair: x (64 bytes; the second half zero past an odd
 * last sub-block), [dx_2p x8 | dx_2p+1 x8], and -K * (sum of q) in lanes 0 and 8 (dpbusd's initial value). */
typedef struct {
    const int8_t *q;
    const __m512 *dxv;
    const __m512i *kv;
    const float *fs;
    int d, nb, np;
} gemm_x_t;

static int gemm_x_init(const xq_t *X, int S, int K, __m512 **dxv, __m512i **kv) {
    const int nb = X->nb, np = (nb + 1) / 2;
    *dxv = aligned_alloc(64, sizeof(__m512) * (size_t)S * np);
    *kv = aligned_alloc(64, sizeof(__m512i) * (size_t)S * np);
    if (!*dxv || !*kv) { free(*dxv); free(*kv); return -2; }
    for (int t = 0; t < S; t++)
        for (int p = 0; p < np; p++) {
            const size_t i = (size_t)t * nb + 2 * p, j = (size_t)t * np + p;
            const int odd = 2 * p + 1 < nb;
            (*dxv)[j] = _mm512_insertf32x8(_mm512_set1_ps(X->dx[i]), _mm256_set1_ps(odd ? X->dx[i + 1] : 0.0f), 1);
            int32_t k0 = K ? X->kinit[i] : 0, k1 = K && odd ? X->kinit[i + 1] : 0;
            (*kv)[j] = _mm512_mask_set1_epi32(_mm512_maskz_set1_epi32(1, k0), 1 << 8, k1);
        }
    return 0;
}

/* One tile: GEMM_ROWS rows (unpacked in R) x T tokens (t0..), results into out[t * ts + r * rs]. */
static inline __attribute__((always_inline)) void gemm_tile(const gemm_rows_t *R, const gemm_x_t *X, int type,
                                                            const int T, int t0, int nr, float *out, int64_t ts,
                                                            int64_t rs) {
    const int has_min = type == T_Q4_1 || type == T_Q5_1 || type == T_Q4_K || type == T_Q5_K;
    const int has_k = i8_offset(type) != 0;
    __m512 acc[GEMM_ROWS][GEMM_TOKENS];
    for (int r = 0; r < GEMM_ROWS; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    const __mmask64 tail = X->nb % 2 ? 0xFFFFFFFFull : ~0ull;
    for (int p = 0; p < X->np; p++) {
        __m512i xv[GEMM_TOKENS];
        for (int t = 0; t < T; t++) {
            const int8_t *xq = X->q + (size_t)(t0 + t) * X->d + 64 * p;
            xv[t] = p + 1 < X->np ? _mm512_loadu_si512(xq) : _mm512_maskz_loadu_epi8(tail, xq);
        }
        for (int r = 0; r < GEMM_ROWS; r++) {
            const size_t k = (size_t)p * GEMM_ROWS + r;
            const __m512i u = R->u[k];
            const __m512 f = R->f[k];
            for (int t = 0; t < T; t++) {
                const size_t j = (size_t)(t0 + t) * X->np + p;
                __m512i dp;
                if (type == T_Q6_K) {
                    __m512i xs = _mm512_mask_sub_epi8(xv[t], R->neg[k], _mm512_setzero_si512(), xv[t]);
                    dp = _mm512_madd_epi16(_mm512_maddubs_epi16(u, xs), R->sc16[k]);
                } else {
                    dp = _mm512_dpbusd_epi32(has_k ? X->kv[j] : _mm512_setzero_si512(), u, xv[t]);
                }
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), _mm512_mul_ps(f, X->dxv[j]), acc[r][t]);
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < T; t++) {
            __m256 lo = _mm512_castps512_ps256(acc[r][t]), hi = _mm512_extractf32x8_ps(acc[r][t], 1);
            out[(t0 + t) * ts + r * rs] = hsum(_mm256_add_ps(lo, hi)) +
                (has_min ? min_dot(R->m + (size_t)r * X->nb, X->fs + (size_t)(t0 + t) * X->nb, X->nb) : 0.0f);
        }
}

#define GEMM_TILE_T(T_, type)                                                                                     \
    static void gemm_tiles_##type##_##T_(const gemm_rows_t *R, const gemm_x_t *X, int t0, int nr, float *out,  \
                                         int64_t ts, int64_t rs) {                                              \
        gemm_tile(R, X, type, T_, t0, nr, out, ts, rs);                                                          \
    }
#define GEMM_TILES(T) GEMM_TILE_T(1, T) GEMM_TILE_T(2, T) GEMM_TILE_T(3, T) GEMM_TILE_T(4, T)
I8_TYPES(GEMM_TILES)
typedef void (*gemm_tile_fn)(const gemm_rows_t *, const gemm_x_t *, int, int, float *, int64_t, int64_t);
#define GEMM_CASE(T) \
    case T: { static const gemm_tile_fn f[4] = {gemm_tiles_##T##_1, gemm_tiles_##T##_2, gemm_tiles_##T##_3, \
                                                gemm_tiles_##T##_4}; return f[n - 1]; }
static gemm_tile_fn gemm_tile_for(int type, int n) {
    switch (type) { I8_TYPES(GEMM_CASE) }
    return NULL;
}

static void gemm_rows_free(gemm_rows_t *R) { free(R->u); free(R->sc16); free(R->f); free(R->neg); free(R->m); }

static int gemm_rows_alloc(gemm_rows_t *R, int nb) {
    const int np = (nb + 1) / 2;
    R->np = np;
    R->u = aligned_alloc(64, sizeof(__m512i) * (size_t)np * GEMM_ROWS);
    R->sc16 = aligned_alloc(64, sizeof(__m512i) * (size_t)np * GEMM_ROWS);
    R->f = aligned_alloc(64, sizeof(__m512) * (size_t)np * GEMM_ROWS);
    R->neg = malloc(sizeof(__mmask64) * (size_t)np * GEMM_ROWS);
    R->m = malloc(sizeof(float) * (size_t)nb * GEMM_ROWS);
    if (R->u && R->sc16 && R->f && R->neg && R->m) return 0;
    gemm_rows_free(R);
    return -2;
}

/* out[t * ts + r * rs] = row r . x_t for n rows and S tokens of quantized x (XQ: its offsets for this type), in
 * one parallel region: x's vectors are laid out first (serially, O(S * d)), then row tiles are handed out to the
 * threads as they come free, with no barrier but the region's end. Returns -2 on no memory. */
static int gemm_rows(const row_src_t *src, int64_t n, int type, const xq_t *XQ, int S, float *out, int64_t ts,
                     int64_t rs, int n_threads) {
    const int nb = XQ->nb, np = (nb + 1) / 2;
    __m512 *dxv = NULL;
    __m512i *kv = NULL;
    if (gemm_x_init(XQ, S, i8_offset(type), &dxv, &kv)) return -2;
    const gemm_x_t X = {XQ->q, dxv, kv, XQ->fs, XQ->d, nb, np};
    const int64_t tiles = (n + GEMM_ROWS - 1) / GEMM_ROWS;
    const gemm_tile_fn full = gemm_tile_for(type, GEMM_TOKENS), rest = S % GEMM_TOKENS ?
                              gemm_tile_for(type, S % GEMM_TOKENS) : NULL;
    int status = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads)
#endif
    {
        gemm_rows_t R;
        const int mine = gemm_rows_alloc(&R, nb);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, GEMM_CHUNK) nowait
#endif
        for (int64_t tile = 0; tile < tiles; tile++) {
            if (mine) continue;
            const int64_t r0 = tile * GEMM_ROWS;
            const int nr = (int)(n - r0 < GEMM_ROWS ? n - r0 : GEMM_ROWS);
            gemm_unpack_rows(src, r0, nr, type, nb, &R);
            float *o = out + r0 * rs;
            int t0 = 0;
            for (; t0 + GEMM_TOKENS <= S; t0 += GEMM_TOKENS) full(&R, &X, t0, nr, o, ts, rs);
            if (rest) rest(&R, &X, t0, nr, o, ts, rs);
        }
        if (mine) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            status = mine;
        } else {
            gemm_rows_free(&R);
        }
    }
    free(dxv); free(kv);
    return status;
}

#define PROMPT_DOWN_TOKENS 16
/* down_axpy_tokens (bundle_kernel_i8.c) in 16-float vectors, for up to PROMPT_DOWN_TOKENS tokens: per element the
 * same products a * scale and the same FMA chain over the records in order, so the same sums bit for bit, in half
 * the instructions. */
static void down_axpy_tokens_512(const uint8_t *const *down, float a[][DOWN_GROUP], int g, int m, float *y, int d) {
    for (int b = 0; b < d / 32; b++) {
        float sc[DOWN_GROUP];
        for (int k = 0; k < g; k++) sc[k] = f16_to_f32(down[k] + 34 * b);
        float c[PROMPT_DOWN_TOKENS][DOWN_GROUP];
        for (int s = 0; s < m; s++)
            for (int k = 0; k < g; k++) c[s][k] = a[s][k] * sc[k];
        for (int h = 0; h < 2; h++) {
            __m512 w[DOWN_GROUP];
            for (int k = 0; k < g; k++)
                w[k] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                    _mm_loadu_si128((const __m128i *)(down[k] + 34 * b + 2 + 16 * h))));
            for (int s = 0; s < m; s++) {
                float *yv = y + (size_t)s * d + 32 * b + 16 * h;
                __m512 acc = _mm512_loadu_ps(yv);
                for (int k = 0; k < g; k++) acc = _mm512_fmadd_ps(_mm512_set1_ps(c[s][k]), w[k], acc);
                _mm512_storeu_ps(yv, acc);
            }
        }
    }
}

/* bundle_ffn_i8 for a prompt's tokens (not ReLU: bundle_ffn_i8 skips the up products of neurons off for every
 * token): every record's gate and up products for all S tokens first, through the GEMM tiles (g, u: (S, n), each
 * sum as row_dots_i8 gives it), then the down pass over them: per thread the same records in the same order (the
 * same static partition), each token's y the same FMA chain, with the same activation and mask. So each token's
 * y is bit for bit what bundle_ffn_i8 gives it alone; tokens go PROMPT_DOWN_TOKENS at a time, each group of
 * DOWN_GROUP down columns converted to float once for all of them. */
static int bundle_ffn_prompt_i8(const uint8_t *const *rows, int64_t n, int d, int gate_type, int up_type,
                                int64_t up_offset, int64_t down_offset, int act, const float *x, int S, float *y,
                                int n_threads, const uint8_t *mask) {
    const size_t sd = (size_t)S * d, sn = (size_t)S * n;
    ffn_x_t X;
    float *partial = calloc((size_t)n_threads * sd, sizeof(float));
    float *g = malloc(sizeof(float) * sn), *u = malloc(sizeof(float) * sn);
    if (!partial || !g || !u || ffn_x_init(&X, x, S, d, gate_type, up_type)) {
        free(partial); free(g); free(u);
        return -2;
    }
    const row_src_t gate_rows = {NULL, rows, 0, 0}, up_rows = {NULL, rows, 0, up_offset};
    int status = gemm_rows(&gate_rows, n, gate_type, &X.gate, S, g, n, 1, n_threads);
    if (!status) status = gemm_rows(&up_rows, n, up_type, &X.up, S, u, n, 1, n_threads);
    if (!status) {
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads)
#endif
        {
            int64_t lo, hi;
            const int tid = thread_range(n, &lo, &hi);
            float *ylocal = partial + (size_t)tid * sd;
            for (int64_t i = lo; i < hi; i += DOWN_GROUP) {
                const int gn = (int)(hi - i < DOWN_GROUP ? hi - i : DOWN_GROUP);
                for (int s0 = 0; s0 < S; s0 += PROMPT_DOWN_TOKENS) {
                    const int m = S - s0 < PROMPT_DOWN_TOKENS ? S - s0 : PROMPT_DOWN_TOKENS;
                    float a[PROMPT_DOWN_TOKENS][DOWN_GROUP];
                    const uint8_t *down[DOWN_GROUP];
                    for (int k = 0; k < gn; k++) {
                        float gv[PROMPT_DOWN_TOKENS] = {0}, av[PROMPT_DOWN_TOKENS];
                        for (int s = 0; s < m; s++) gv[s] = g[(size_t)(s0 + s) * n + i + k];
                        activate_8(gv, act, av);
                        activate_8(gv + 8, act, av + 8);
                        for (int s = 0; s < m; s++) a[s][k] = av[s] * u[(size_t)(s0 + s) * n + i + k];
                        if (mask)
                            for (int s = 0; s < m; s++)
                                if (!mask[(size_t)(s0 + s) * n + i + k]) a[s][k] = 0.0f;
                        down[k] = rows[i + k] + down_offset;
                    }
                    down_axpy_tokens_512(down, a, gn, m, ylocal + (size_t)s0 * d, d);
                }
            }
        }
        add_partials(y, partial, n_threads, sd);
    }
    ffn_x_free(&X);
    free(partial); free(g); free(u);
    return status;
}
#elif defined(HAVE_FUSED)
static int bundle_ffn_prompt_i8(const uint8_t *const *rows, int64_t n, int d, int gate_type, int up_type,
                                int64_t up_offset, int64_t down_offset, int act, const float *x, int S, float *y,
                                int n_threads, const uint8_t *mask) {
    return -3;  /* no GEMM tiles in this build: bundle_ffn_i8 takes its own path */
}
#endif

/* rows_matvec_i8 for any number of tokens: the same arguments and the same results, bit for bit. */
int rows_gemm_i8(const uint8_t *rows, int64_t n, int64_t row_bytes, int type, int d, const float *x, int S,
                 float *out, int64_t out_stride, int n_threads) {
    if (!row_ok(type, d)) return -1;
    if (!i8_type_ok(type) || S < 1) return -3;
    if (n_threads < 1) n_threads = 1;
#ifdef HAVE_GEMM_I8
    const int nb = d / 32;
    int8_t *q = malloc((size_t)S * d + 64);  /* + 64: a tile's last 64-byte load of an odd block count */
    float *dx = malloc(sizeof(float) * 2 * (size_t)S * nb);
    int32_t *sums = malloc(sizeof(int32_t) * 3 * (size_t)S * nb), *kinit = sums + 2 * (size_t)S * nb;
    if (!q || !dx || !sums) { free(q); free(dx); free(sums); return -2; }
    float *fs = dx + (size_t)S * nb;
    quantize_x_i8(x, S, d, q, dx, sums);
    xq_offsets(dx, sums, (size_t)S * nb, i8_offset(type), fs, kinit);
    xq_t X = {q, dx, fs, sums, kinit, d, nb};
    const row_src_t src = {rows, NULL, row_bytes, 0};
    const int status = gemm_rows(&src, n, type, &X, S, out, out_stride, 1, n_threads);
    free(q); free(dx); free(sums);
    return status;
#else
    for (int s0 = 0; s0 < S; s0 += I8_MAX_TOKENS) {
        const int m = S - s0 < I8_MAX_TOKENS ? S - s0 : I8_MAX_TOKENS;
        int status = rows_matvec_i8(rows, n, row_bytes, type, d, x + (size_t)s0 * d, m, out + (size_t)s0 * out_stride,
                                    out_stride, n_threads);
        if (status) return status;
    }
    return 0;
#endif
}
