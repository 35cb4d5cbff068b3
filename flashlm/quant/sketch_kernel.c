/* Sketch scores for the output matrix (flash_store/head_sketch.py).
 *
 * The input's few outlier dimensions (n_out of them, moved to the end of x by the caller) are kept as int8 with a
 * scale per row (q8, s8); the other d dimensions as sign bits (bit j set: w_ij > 0, little-endian bit order within
 * each byte, as numpy.packbits(..., bitorder="little")) with one scale s_i = mean_j |w_ij|. For x (d + n_out):
 *   score_i = s_i * (2 * sum_{j < d: bit set} x_j - sum_{j < d} x_j) + s8_i * sum_k q8_ik x_{d+k}
 * With AVX-512, 16 bits of the row select 16 lanes of x in one masked add; otherwise a per-byte table of partial
 * sums (256 entries per byte position) is built once per call and each row is d/8 table lookups. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float int8_part(const int8_t *q, const float *x, int n_out) {
    float s = 0.0f;
    for (int k = 0; k < n_out; k++) s += (float)q[k] * x[k];
    return s;
}

int sign_scores(const uint8_t *bits, const float *scale, const int8_t *q8, const float *s8, int n_out, int64_t n,
                int d, const float *x, float *out, int n_threads) {
    if (d % 16) return -1;
    const float *xo = x + d;
    int nb = d / 8;
    float total = 0.0f;
    for (int j = 0; j < d; j++) total += x[j];
#ifdef __AVX512F__
    /* Rows in groups of ROWS: each row's masked adds are one chain in k order (as one row alone would run them),
     * the group's chains side by side, so the adds' latency is hidden (one chain per row was latency-bound). */
#define ROWS 4
    const int nm = d / 16;
    const int64_t groups = n / ROWS;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t g = 0; g <= groups; g++) {
        const int64_t i0 = g * ROWS, rows = g < groups ? ROWS : n - i0;
        const uint16_t *m[ROWS];
        __m512 acc[ROWS];
        for (int r = 0; r < ROWS; r++) {
            m[r] = (const uint16_t *)(bits + (size_t)(i0 + (r < rows ? r : 0)) * nb);
            acc[r] = _mm512_setzero_ps();
        }
        for (int k = 0; k < nm; k++) {
            const __m512 xk = _mm512_loadu_ps(x + 16 * k);
            for (int r = 0; r < ROWS; r++) acc[r] = _mm512_mask_add_ps(acc[r], (__mmask16)m[r][k], acc[r], xk);
        }
        for (int r = 0; r < rows; r++) {
            const int64_t i = i0 + r;
            out[i] = scale[i] * (2.0f * _mm512_reduce_add_ps(acc[r]) - total) +
                     (n_out ? s8[i] * int8_part(q8 + (size_t)i * n_out, xo, n_out) : 0.0f);
        }
    }
#undef ROWS
#else
    float *table = malloc(sizeof(float) * 256 * nb);
    if (!table) return -2;
    for (int b = 0; b < nb; b++)
        for (int v = 0; v < 256; v++) {
            float s = 0.0f;
            for (int t = 0; t < 8; t++) if (v >> t & 1) s += x[8 * b + t];
            table[256 * b + v] = s;
        }
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *r = bits + (size_t)i * nb;
        float s = 0.0f;
        for (int b = 0; b < nb; b++) s += table[256 * b + r[b]];
        out[i] = scale[i] * (2.0f * s - total) +
                 (n_out ? s8[i] * int8_part(q8 + (size_t)i * n_out, xo, n_out) : 0.0f);
    }
    free(table);
#endif
    return 0;
}
