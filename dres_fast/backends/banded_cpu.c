/* The banded spline maps on the CPU: out = base + scale W x and out = base + scale W^T g (base may be
 * NULL; dres_fast/banded.py has the math). base = y, scale = -1 gives the loss's residual y - D y_coded.
 *
 * W (p x n) = P + V M^{-1} s Q^T with M = U^T U pentadiagonal. Columns are independent, so each
 * OpenMP task owns a chunk of CHUNK columns and runs the recurrences down the rows for all of them at
 * once (the inner loops run along the row: contiguous, vectorised). The chunk's float64 scratch
 * (m x CHUNK, for z and gamma) stays in cache, so the data is read about twice and written once.
 * Everything is float64 arithmetic whatever the data type (float32 recurrences miss the accuracy
 * contract at thousands of knots). Plain C, no torch headers: loaded with ctypes, built with
 * -march=native where the compiler takes it (dres_fast/backends/banded_cpu.py).
 *
 * Arrays (float64 unless said): factor[3][m] = 1/U_ii, U_{i-1,i}, U_{i-2,i}; stencil[3][m]: rhs_j =
 * st0_j x_j + st1_j x_{j+1} + st2_j x_{j+2}; index[p] (int64), chord[p][2], curvature[p][4],
 * gather[p][4] (int64). Data rows are `ld` elements apart; out is contiguous (rows x d).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#define CHUNK 32
/* Rows ahead to prefetch: a chunk's rows are d elements apart, each in its own page, where the hardware
 * prefetcher does not follow; without it the stencil pass waits on memory latency row by row. */
#define AHEAD 16
#define PREFETCH_ROW(p) do { __builtin_prefetch(p); __builtin_prefetch((const char *)(p) + 64); } while (0)

/* Outputs of at least this many bytes (past a core's L2) are written with non-temporal stores where the
 * build has AVX: a pass's output is not read back while the pass runs, and streaming it skips the
 * read-for-ownership of every line (a third of a pass's memory traffic): 1.2-1.3x per fwd+bwd step at
 * K = N = 1024, d = 4096 and 4096, 1024 on the development VM (interleaved A/B against plain stores, same
 * build flags). Smaller outputs stay in cache. */
#define STREAM_MIN_BYTES ((int64_t)4 << 20)
#if defined(__AVX512F__)
#define STREAM_ALIGN 64
static inline void stream_row_f32(float *o, const double *row) {
    for (int c = 0; c < CHUNK; c += 16) {
        const __m256 lo = _mm512_cvtpd_ps(_mm512_loadu_pd(row + c)), hi = _mm512_cvtpd_ps(_mm512_loadu_pd(row + c + 8));
        _mm512_stream_ps(o + c, _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1));
    }
}
static inline void stream_row_f64(double *o, const double *row) {
    for (int c = 0; c < CHUNK; c += 8) _mm512_stream_pd(o + c, _mm512_loadu_pd(row + c));
}
#define STREAM_FENCE() _mm_sfence()
#elif defined(__AVX__)
#define STREAM_ALIGN 32
static inline void stream_row_f32(float *o, const double *row) {
    for (int c = 0; c < CHUNK; c += 8) {
        const __m128 lo = _mm256_cvtpd_ps(_mm256_loadu_pd(row + c)), hi = _mm256_cvtpd_ps(_mm256_loadu_pd(row + c + 4));
        _mm256_stream_ps(o + c, _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1));
    }
}
static inline void stream_row_f64(double *o, const double *row) {
    for (int c = 0; c < CHUNK; c += 4) _mm256_stream_pd(o + c, _mm256_loadu_pd(row + c));
}
#define STREAM_FENCE() _mm_sfence()
#else
#define STREAM_ALIGN 0
static inline void stream_row_f32(float *o, const double *row) { (void)o; (void)row; }
static inline void stream_row_f64(double *o, const double *row) { (void)o; (void)row; }
#define STREAM_FENCE() ((void)0)
#endif
/* Whether rows of `out` (contiguous, d per row) are streamed: a full chunk of each row is then aligned. */
#define STREAMS(out, rows, d, T) (STREAM_ALIGN && (rows) * (d) * (int64_t)sizeof(T) >= STREAM_MIN_BYTES     \
                                  && ((uintptr_t)(out) % (STREAM_ALIGN ? STREAM_ALIGN : 1)) == 0               \
                                  && ((d) * (int64_t)sizeof(T)) % (STREAM_ALIGN ? STREAM_ALIGN : 1) == 0)
/* One chunk row (w float64 values in `row`) to `o` as T: streamed when `stream` and the chunk is full. */
#define STORE_ROW(T, o, row, w, stream) do {                                                                  \
    if ((stream) && (w) == CHUNK && sizeof(T) == 4) stream_row_f32((float *)(void *)(o), (row));             \
    else if ((stream) && (w) == CHUNK) stream_row_f64((double *)(void *)(o), (row));                          \
    else for (int64_t c_ = 0; c_ < (w); ++c_) (o)[c_] = (T)(row)[c_];                                        \
} while (0)

/* M^{-1} in place on z (m x w, row stride CHUNK, with two zero rows above and below): U^T z' = z,
 * then U z'' = z'. factor's unused corners (U_{-1,0}, U_{-2,0}, U_{-1,1}) are zero. */
static void solve_chunk(const double *factor, int64_t m, double *z, int64_t w) {
    const double *inv = factor, *sup1 = factor + m, *sup2 = factor + 2 * m;
    for (int64_t i = 0; i < m; ++i) {
        double *row = z + i * CHUNK;
        const double *r1 = row - CHUNK, *r2 = row - 2 * CHUNK;
        const double a = sup1[i], b = sup2[i], f = inv[i];
        for (int64_t c = 0; c < w; ++c) row[c] = (row[c] - a * r1[c] - b * r2[c]) * f;
    }
    for (int64_t i = m - 1; i >= 0; --i) {
        double *row = z + i * CHUNK;
        const double *r1 = row + CHUNK, *r2 = row + 2 * CHUNK;
        const double a = i + 1 < m ? sup1[i + 1] : 0.0, b = i + 2 < m ? sup2[i + 2] : 0.0, f = inv[i];
        for (int64_t c = 0; c < w; ++c) row[c] = (row[c] - a * r1[c] - b * r2[c]) * f;
    }
}

/* One step of iterative refinement of gamma (m x w), the solution of M gamma = b, with the residual in
 * factored form (dres_fast/_banded.py): gamma += M^{-1} (base + s (Q^T fit - R gamma)), fit = F - lam Q gamma.
 * Forward: b = s Q^T x, so F = x (passed through `fit` already holding x's rows as float64) and base = 0;
 * transpose: b = v, F = 0 and base = v. q_bands (3 x m) are Q's unscaled columns, r_bands (2 x m) R's
 * diagonal and off-diagonal (last entry 0). `fit` has n rows; `res` m rows with two zero rows either side. */
static void refine_chunk(const double *factor, const double *q_bands, const double *r_bands, double lam,
                         int64_t m, double *gamma, double *fit, const double *base, double *res, int64_t w) {
    const double *qa = q_bands, *qb = q_bands + m, *qc = q_bands + 2 * m;
    const double *rd = r_bands, *ro = r_bands + m, s = 1.0 / (1.0 + lam);
    for (int64_t j = 0; j < m; ++j) {  /* fit -= lam Q gamma: gamma_j goes to rows j, j+1, j+2 */
        const double *g = gamma + j * CHUNK;
        double *f0 = fit + j * CHUNK, *f1 = f0 + CHUNK, *f2 = f1 + CHUNK;
        const double a = lam * qa[j], b = lam * qb[j], c = lam * qc[j];
        for (int64_t k = 0; k < w; ++k) { f0[k] -= a * g[k]; f1[k] -= b * g[k]; f2[k] -= c * g[k]; }
    }
    for (int64_t j = 0; j < m; ++j) {
        const double *f0 = fit + j * CHUNK, *f1 = f0 + CHUNK, *f2 = f1 + CHUNK;
        const double *g = gamma + j * CHUNK, *gu = g - CHUNK, *gd = g + CHUNK; /* zero rows pad gamma */
        const double *bj = base ? base + j * CHUNK : NULL;
        const double a = qa[j], b = qb[j], c = qc[j], r0 = rd[j], r1 = ro[j], rm = j >= 1 ? ro[j - 1] : 0.0;
        double *out = res + j * CHUNK;
        for (int64_t k = 0; k < w; ++k) {
            const double value = s * (a * f0[k] + b * f1[k] + c * f2[k] - r0 * g[k] - r1 * gd[k] - rm * gu[k]);
            out[k] = bj ? bj[k] + value : value;
        }
    }
    solve_chunk(factor, m, res, w);
    for (int64_t j = 0; j < m; ++j) {
        double *g = gamma + j * CHUNK;
        const double *r = res + j * CHUNK;
        for (int64_t k = 0; k < w; ++k) g[k] += r[k];
    }
}

#define DEFINE_BANDED(T, NAME)                                                                              \
int NAME(const double *factor, const double *stencil, const int64_t *index, const double *chord,             \
         const double *curvature, const int64_t *gather, const double *q_bands, const double *r_bands,       \
         double lam, int refine, int64_t n, int64_t p, int64_t d, const T *x, int64_t ld, T *out,             \
         const T *base, double scale, int transpose, int threads) {                                           \
    const int64_t m = n - 2, chunks = (d + CHUNK - 1) / CHUNK;                                               \
    const double *st0 = stencil, *st1 = stencil + m, *st2 = stencil + 2 * m;                                 \
    const int stream = STREAMS(out, transpose ? n : p, d, T);                                                \
    int failed = 0;                                                                                          \
    _Pragma("omp parallel num_threads(threads) reduction(|:failed)")                                         \
    {                                                                                                        \
        /* z: two zero rows, m rows, two zero rows, then (transpose) n rows of out; with refinement also   \
         * res (the same padding), fit (n rows) and (transpose) a copy of v (m rows) */                      \
        const size_t rows = (size_t)(m + 4 + (transpose ? n : 0) + (refine ? m + 4 + n + (transpose ? m : 0) : 0)); \
        double *buffer = (double *)calloc(rows * CHUNK, sizeof(double));                                    \
        double *z = buffer ? buffer + 2 * CHUNK : NULL;                                                      \
        if (!buffer) failed = 1;                                                                             \
        _Pragma("omp for schedule(static)")                                                                  \
        for (int64_t k = 0; k < chunks; ++k) {                                                               \
            if (!z) continue;                                                                                \
            const int64_t c0 = k * CHUNK, w = d - c0 < CHUNK ? d - c0 : CHUNK;                               \
            if (!transpose) {                                                                                \
                for (int64_t j = 0; j < m; ++j) {                                                            \
                    const T *x0 = x + j * ld + c0, *x1 = x0 + ld, *x2 = x1 + ld;                             \
                    if (j + 2 + AHEAD < n) PREFETCH_ROW(x2 + AHEAD * ld);                                    \
                    double *row = z + j * CHUNK;                                                             \
                    for (int64_t c = 0; c < w; ++c)                                                          \
                        row[c] = st0[j] * (double)x0[c] + st1[j] * (double)x1[c] + st2[j] * (double)x2[c];  \
                }                                                                                            \
                solve_chunk(factor, m, z, w);                                                                \
                if (refine) {                                                                                \
                    double *res = z + (m + 4) * CHUNK, *fit = res + (m + 2) * CHUNK;                         \
                    for (int64_t i = 0; i < n; ++i) {                                                        \
                        if (i + AHEAD < n) PREFETCH_ROW(x + (i + AHEAD) * ld + c0);                          \
                        for (int64_t c = 0; c < w; ++c) fit[i * CHUNK + c] = (double)x[i * ld + c0 + c];     \
                    }                                                                                        \
                    refine_chunk(factor, q_bands, r_bands, lam, m, z, fit, NULL, res, w);                    \
                }                                                                                            \
                for (int64_t r = 0; r < p; ++r) {                                                            \
                    const T *xa = x + index[r] * ld + c0, *xb = xa + ld;                                     \
                    if (r + AHEAD < p) {                                                                     \
                        PREFETCH_ROW(x + (index[r + AHEAD] + 1) * ld + c0);                                  \
                        if (!stream) __builtin_prefetch(out + (r + AHEAD) * d + c0, 1);                      \
                    }                                                                                        \
                    const double *g0 = z + gather[4 * r] * CHUNK, *g1 = z + gather[4 * r + 1] * CHUNK;       \
                    const double *g2 = z + gather[4 * r + 2] * CHUNK, *g3 = z + gather[4 * r + 3] * CHUNK;   \
                    const double p0 = chord[2 * r], p1 = chord[2 * r + 1];                                   \
                    const double v0 = curvature[4 * r], v1 = curvature[4 * r + 1];                           \
                    const double v2 = curvature[4 * r + 2], v3 = curvature[4 * r + 3];                       \
                    T *o = out + r * d + c0;                                                                 \
                    const T *b = base ? base + r * d + c0 : NULL;                                            \
                    double row[CHUNK];                                                                       \
                    for (int64_t c = 0; c < w; ++c) {                                                        \
                        const double value = scale * (p0 * (double)xa[c] + p1 * (double)xb[c] + v0 * g0[c]  \
                                                      + v1 * g1[c] + v2 * g2[c] + v3 * g3[c]);              \
                        row[c] = b ? (double)b[c] + value : value;                                           \
                    }                                                                                        \
                    STORE_ROW(T, o, row, w, stream);                                                         \
                }                                                                                            \
            } else {                                                                                         \
                double *acc = z + (m + 2) * CHUNK; /* out rows, n x CHUNK */                                 \
                double *res = acc + n * CHUNK + 2 * CHUNK, *fit = res + (m + 2) * CHUNK, *v = fit + n * CHUNK;  \
                memset(z, 0, sizeof(double) * (size_t)m * CHUNK);                                            \
                memset(acc, 0, sizeof(double) * (size_t)n * CHUNK);                                          \
                for (int64_t r = 0; r < p; ++r) {                                                            \
                    const T *gr = x + r * ld + c0;                                                           \
                    if (r + AHEAD < p) PREFETCH_ROW(gr + AHEAD * ld);                                        \
                    double *g0 = z + gather[4 * r] * CHUNK, *g1 = z + gather[4 * r + 1] * CHUNK;             \
                    double *g2 = z + gather[4 * r + 2] * CHUNK, *g3 = z + gather[4 * r + 3] * CHUNK;         \
                    double *oa = acc + index[r] * CHUNK, *ob = oa + CHUNK;                                   \
                    const double p0 = chord[2 * r], p1 = chord[2 * r + 1];                                   \
                    const double v0 = curvature[4 * r], v1 = curvature[4 * r + 1];                           \
                    const double v2 = curvature[4 * r + 2], v3 = curvature[4 * r + 3];                       \
                    for (int64_t c = 0; c < w; ++c) {                                                        \
                        const double g = (double)gr[c];                                                      \
                        g0[c] += v0 * g; g1[c] += v1 * g; g2[c] += v2 * g; g3[c] += v3 * g;                  \
                        oa[c] += p0 * g; ob[c] += p1 * g;                                                    \
                    }                                                                                        \
                }                                                                                            \
                if (refine) memcpy(v, z, sizeof(double) * (size_t)m * CHUNK);                                \
                solve_chunk(factor, m, z, w);                                                                \
                if (refine) {                                                                                \
                    memset(fit, 0, sizeof(double) * (size_t)n * CHUNK);                                      \
                    refine_chunk(factor, q_bands, r_bands, lam, m, z, fit, v, res, w);                       \
                }                                                                                            \
                for (int64_t j = 0; j < m; ++j) {                                                            \
                    const double *u = z + j * CHUNK;                                                         \
                    double *o0 = acc + j * CHUNK, *o1 = o0 + CHUNK, *o2 = o1 + CHUNK;                        \
                    for (int64_t c = 0; c < w; ++c) {                                                        \
                        o0[c] += st0[j] * u[c]; o1[c] += st1[j] * u[c]; o2[c] += st2[j] * u[c];              \
                    }                                                                                        \
                }                                                                                            \
                for (int64_t i = 0; i < n; ++i) {                                                            \
                    const double *a = acc + i * CHUNK;                                                       \
                    if (i + AHEAD < n && !stream) __builtin_prefetch(out + (i + AHEAD) * d + c0, 1);         \
                    T *o = out + i * d + c0;                                                                 \
                    const T *b = base ? base + i * d + c0 : NULL;                                            \
                    double row[CHUNK];                                                                       \
                    for (int64_t c = 0; c < w; ++c) row[c] = b ? (double)b[c] + scale * a[c] : scale * a[c]; \
                    STORE_ROW(T, o, row, w, stream);                                                         \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
        if (stream) STREAM_FENCE(); /* the streamed stores are visible before the caller reads out */        \
        free(buffer);                                                                                        \
    }                                                                                                        \
    return failed;                                                                                           \
}

DEFINE_BANDED(double, dres_banded_apply_f64)
DEFINE_BANDED(float, dres_banded_apply_f32)

/* tr(Sigma R) for Sigma = (U^T U)^{-1} from the band of Sigma, bottom up (Hutchinson & de Hoog): the loop
 * of dres_fast/_banded.py PenalizedSystem.smoother_trace, same order of operations. diag, sup1, sup2: U_ii,
 * U_{i,i+1}, U_{i,i+2} (zero past the end); r_diag, r_off: R's diagonal and U-aligned off-diagonal. */
double dres_trace_sigma_r(const double *diag, const double *sup1, const double *sup2, const double *r_diag,
                          const double *r_off, int64_t m) {
    double s11 = 0.0, s12 = 0.0, s22 = 0.0, total = 0.0;
    for (int64_t i = m - 1; i >= 0; --i) {
        const double d = diag[i], p = sup1[i], q = sup2[i];
        const double s02 = -(p * s12 + q * s22) / d;
        const double s01 = -(p * s11 + q * s12) / d;
        const double s00 = (1.0 / d - p * s01 - q * s02) / d;
        total += r_diag[i] * s00 + 2.0 * r_off[i] * s01;
        s22 = s11; s12 = s01; s11 = s00;
    }
    return total;
}
