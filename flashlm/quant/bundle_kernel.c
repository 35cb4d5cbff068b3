/* The bundle FFN kernel: a gated FFN computed straight from row-column bundled records.
 *
 * A record holds one neuron: gate row and up row (GGML Q4_0 / Q4_1 / Q8_0 blocks along d_model) and the down
 * column (Q8_0 blocks along d_model). For tokens x (S, d):
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

enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q8_0 = 8 };  /* GGML type ids */
enum { ACT_SILU = 0, ACT_GELU_TANH = 1 };

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

/* One quantized row (d values, 32-wide blocks) -> float. Plain loops: -O3 -march=native vectorizes them. */
static void dequant_row(const uint8_t *restrict row, int type, float *restrict out, int d) {
    int nb = d / 32;
    for (int b = 0; b < nb; b++) {
        float *o = out + 32 * b;
        if (type == T_Q8_0) {
            const uint8_t *blk = row + 34 * b;
            const int8_t *q = (const int8_t *)(blk + 2);
            float dd = f16_to_f32(blk);
            for (int j = 0; j < 32; j++) o[j] = dd * (float)q[j];
        } else {
            int q41 = type == T_Q4_1;
            const uint8_t *blk = row + (q41 ? 20 : 18) * b;
            const uint8_t *qs = blk + (q41 ? 4 : 2);
            float dd = f16_to_f32(blk), m = q41 ? f16_to_f32(blk + 2) : -8.0f * dd;
            for (int j = 0; j < 16; j++) o[j] = dd * (float)(qs[j] & 15) + m;  /* two loops: each vectorizes */
            for (int j = 0; j < 16; j++) o[j + 16] = dd * (float)(qs[j] >> 4) + m;
        }
    }
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

static float row_dot_avx2(const uint8_t *row, int type, const float *x, const float *xsum, int d) {
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
    if (act == ACT_GELU_TANH) return 0.5f * g * (1.0f + tanhf(0.7978845608f * (g + 0.044715f * g * g * g)));
    return g / (1.0f + expf(-g));
}

/* rows: n pointers to records, in the order their contributions are summed (callers pass neuron-id order, so the
 * result does not depend on where each record sits); gate at offset 0, up at up_offset, down at down_offset.
 * x: (S, d), y: (S, d) accumulated into (not cleared), act_out: (S, n) or NULL. Deterministic for a given n_threads:
 * static partition of the rows, per-thread partial sums added in thread order. */
int bundle_ffn(const uint8_t *const *rows, int64_t n, int d, int gate_type, int up_type, int64_t up_offset,
               int64_t down_offset, int act, const float *x, int S, float *y, float *act_out, int n_threads) {
    if (d % 32 || (gate_type != T_Q4_0 && gate_type != T_Q4_1 && gate_type != T_Q8_0) ||
        (up_type != T_Q4_0 && up_type != T_Q4_1 && up_type != T_Q8_0))
        return -1;
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
        int tid = 0, nt = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        int64_t lo = n * tid / nt, hi = n * (tid + 1) / nt;
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
    for (int t = 0; t < n_threads; t++)
        for (size_t k = 0; k < sd; k++) y[k] += partial[(size_t)t * sd + k];
    free(partial); free(scratch); free(xsum);
    return 0;
}

/* out[s * out_stride + r] = row_r . x_s for n contiguous rows of row_bytes (GGML Q4_0 / Q4_1 / Q8_0 blocks):
 * a streamed output matrix, computed slice by slice as its rows arrive from flash. */
int rows_matvec(const uint8_t *rows, int64_t n, int64_t row_bytes, int type, int d, const float *x, int S,
                float *out, int64_t out_stride, int n_threads) {
    if (d % 32 || (type != T_Q4_0 && type != T_Q4_1 && type != T_Q8_0)) return -1;
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

/* Dequantize records (gate, up, down of each) into float32 (n, d) matrices: the prompt path, where a BLAS
 * matrix product over many tokens beats per-token dot products. */
int dequant_records(const uint8_t *const *rows, int64_t n, int d, int gate_type, int up_type, int64_t up_offset,
                    int64_t down_offset, float *gate, float *up, float *down, int n_threads) {
    if (d % 32) return -1;
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
    if (d % 32 || (type != T_Q4_0 && type != T_Q4_1 && type != T_Q8_0)) return -1;
    if (n_threads < 1) n_threads = 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(static)
#endif
    for (int64_t r = 0; r < n; r++) dequant_row(rows + r * row_bytes, type, out + (size_t)r * d, d);
    return 0;
}

#ifdef HAVE_FUSED
/* One decode step of grouped-query attention over a float16 KV cache, in place:
 * q (n_heads*hd) and k, v (n_kv*hd) get RoPE (q, k) at position `pos`; k and v are written to the caches
 * (n_kv, capacity, hd) at `pos`; out (n_heads*hd) = softmax(q K^T * scale) V over positions 0..pos.
 * cos/sin: (hd/2) for this position; interleaved rotates pairs (2i, 2i+1), else halves. scores: pos+1 floats. */
static void rope(float *v, const float *cos, const float *sin, int hd, int interleaved) {
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
        float x0 = v[a], x1 = v[b];
        v[a] = x0 * cos[i] - x1 * sin[i];
        v[b] = x0 * sin[i] + x1 * cos[i];
    }
}

int attention_decode(float *q, float *k, const float *v, uint16_t *kcache, uint16_t *vcache, int64_t capacity,
                     int pos, const float *cos, const float *sin, int interleaved, int n_heads, int n_kv, int hd,
                     float scale, float *out, float *scores) {
    if (hd % 8) return -1;
    for (int h = 0; h < n_heads; h++) rope(q + (size_t)h * hd, cos, sin, hd, interleaved);
    for (int g = 0; g < n_kv; g++) {
        rope(k + (size_t)g * hd, cos, sin, hd, interleaved);
        uint16_t *kd = kcache + ((size_t)g * capacity + pos) * hd, *vd = vcache + ((size_t)g * capacity + pos) * hd;
        for (int j = 0; j < hd; j += 8) {
            _mm_storeu_si128((__m128i *)(kd + j), _mm256_cvtps_ph(_mm256_loadu_ps(k + (size_t)g * hd + j), 0));
            _mm_storeu_si128((__m128i *)(vd + j), _mm256_cvtps_ph(_mm256_loadu_ps(v + (size_t)g * hd + j), 0));
        }
    }
    int group = n_heads / n_kv, T = pos + 1;
    for (int h = 0; h < n_heads; h++) {
        const float *qh = q + (size_t)h * hd;
        const uint16_t *K = kcache + (size_t)(h / group) * capacity * hd;
        const uint16_t *V = vcache + (size_t)(h / group) * capacity * hd;
        float mx = -INFINITY;
        for (int t = 0; t < T; t++) {
            __m256 acc = _mm256_setzero_ps();
            for (int j = 0; j < hd; j += 8)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + j),
                                      _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(K + (size_t)t * hd + j))), acc);
            scores[t] = hsum(acc) * scale;
            if (scores[t] > mx) mx = scores[t];
        }
        float sum = 0.0f;
        for (int t = 0; t < T; t++) {
            scores[t] = expf(scores[t] - mx);
            sum += scores[t];
        }
        float *oh = out + (size_t)h * hd;
        for (int j = 0; j < hd; j += 8) {
            __m256 acc = _mm256_setzero_ps();
            for (int t = 0; t < T; t++)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(scores[t]),
                                      _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(V + (size_t)t * hd + j))), acc);
            _mm256_storeu_ps(oh + j, _mm256_mul_ps(acc, _mm256_set1_ps(1.0f / sum)));
        }
    }
    return 0;
}
#endif
