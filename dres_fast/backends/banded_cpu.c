/* The banded spline maps on the CPU: out = base + scale W x and out = base + scale W^T g (base may be
 * NULL; dres_fast/banded.py has the math). base = y, scale = -1 gives the loss's residual y - D y_coded.
 *
 * W (p x n) = P + V M^{-1} s Q^T with M = U^T U pentadiagonal. Columns are independent, so each
 * OpenMP task owns a chunk of CHUNK columns and runs the recurrences down the rows for all of them at
 * once. A chunk row is NV vectors of LANES float64 (GCC/clang vector extensions sized to the build's
 * registers: AVX-512, AVX or SSE/NEON); the recurrences carry their previous rows in registers, and the
 * stencil runs fused with the first sweep (forward map), the second sweep with the stencil's transpose
 * and the output (transposed map). The chunk's float64 scratch (m x CHUNK, for z and gamma) and a packed
 * copy of its data rows stay in cache, so the data is read once and the output written once. Everything
 * is float64 arithmetic whatever the data type (float32 recurrences miss the accuracy contract at
 * thousands of knots). Plain C, no torch headers: loaded with ctypes, built with -march=native where the
 * compiler takes it (dres_fast/backends/banded_cpu.py).
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
/* float64 lanes of one native vector register: wider vectors than the target has are split by the
 * compiler at a large cost (5-6x slower on an AVX2 build with 8-lane vectors). */
#if defined(__AVX512F__)
#define LANES 8
#elif defined(__AVX__)
#define LANES 4
#else
#define LANES 2
#endif
#define NV (CHUNK / LANES)
/* Rows ahead to prefetch: a chunk's rows are d elements apart, each in its own page, where the hardware
 * prefetcher does not follow; without it the stencil pass waits on memory latency row by row. */
#define AHEAD 16
#define PREFETCH_ROW(p) do { __builtin_prefetch(p); __builtin_prefetch((const char *)(p) + 64); } while (0)
#define INLINE static inline __attribute__((always_inline))
#ifdef _OPENMP
#include <omp.h>
#define THREAD_NUM() omp_get_thread_num()
#else
#define THREAD_NUM() 0
#endif

/* The build keeps -ffp-contract=off (the trace at the end must round as its Python twin does); the maps
 * let GCC fuse their multiply-adds where the CPU has FMA: the recurrences' chains are then one fused
 * operation per row, and a step has about half the instructions. clang builds do not fuse (still exact
 * to the contract: every map is checked against float64 with a tolerance). */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#endif

typedef double vec __attribute__((vector_size(LANES * 8)));                           /* scratch rows */
typedef double vec_u __attribute__((vector_size(LANES * 8), aligned(8), may_alias));   /* float64 data */
typedef float vecf __attribute__((vector_size(LANES * 4)));
typedef float vecf_u __attribute__((vector_size(LANES * 4), aligned(4), may_alias));   /* float32 data */
typedef struct { vec v[NV]; } row_t;                                                   /* a chunk row */
#define EACH(v) for (int v = 0; v < NV; ++v)

/* One chunk row of data (w columns) as float64; columns past w are zero. */
INLINE row_t load_f64(const double *src, int64_t w) {
    row_t r;
    if (w == CHUNK) { EACH(v) r.v[v] = *(const vec_u *)(src + v * LANES); return r; }
    double t[CHUNK] = {0};
    for (int64_t c = 0; c < w; ++c) t[c] = src[c];
    memcpy(&r, t, sizeof r);
    return r;
}
INLINE row_t load_f32(const float *src, int64_t w) {
    row_t r;
    if (w == CHUNK) { EACH(v) r.v[v] = __builtin_convertvector(*(const vecf_u *)(src + v * LANES), vec); return r; }
    double t[CHUNK] = {0};
    for (int64_t c = 0; c < w; ++c) t[c] = (double)src[c];
    memcpy(&r, t, sizeof r);
    return r;
}

/* Outputs of at least this many bytes (past a core's L2) are written with non-temporal stores where the
 * build has AVX: a pass's output is not read back while the pass runs, and streaming it skips the
 * read-for-ownership of every line (a third of a pass's memory traffic): 1.2-1.3x per fwd+bwd step at
 * K = N = 1024, d = 4096 and 4096, 1024 on the development VM (interleaved A/B against plain stores, same
 * build flags). Smaller outputs stay in cache. */
#define STREAM_MIN_BYTES ((int64_t)4 << 20)
#if defined(__AVX512F__)
#define STREAM_ALIGN 64
#define STREAM_F32(dst, f) _mm256_stream_ps((dst), (__m256)(f))
#define STREAM_F64(dst, x) _mm512_stream_pd((dst), (__m512d)(x))
#elif defined(__AVX__)
#define STREAM_ALIGN 32
#define STREAM_F32(dst, f) _mm_stream_ps((dst), (__m128)(f))
#define STREAM_F64(dst, x) _mm256_stream_pd((dst), (__m256d)(x))
#else
#define STREAM_ALIGN 0
#endif
#if STREAM_ALIGN
#define STREAM_FENCE() _mm_sfence()
#else
#define STREAM_FENCE() ((void)0)
#endif
/* Whether rows of `out` (contiguous, d per row) are streamed: every full chunk of a row is then aligned. */
#define STREAMS(out, rows, d, T) (STREAM_ALIGN && (rows) * (d) * (int64_t)sizeof(T) >= STREAM_MIN_BYTES     \
                                  && ((uintptr_t)(out) % (STREAM_ALIGN ? STREAM_ALIGN : 1)) == 0               \
                                  && ((d) * (int64_t)sizeof(T)) % (STREAM_ALIGN ? STREAM_ALIGN : 1) == 0)

/* One chunk row to w columns of dst, streamed when `stream` and the chunk is full. */
INLINE void store_f64(double *dst, row_t r, int64_t w, int stream) {
    if (w == CHUNK) {
#if STREAM_ALIGN
        if (stream) { EACH(v) STREAM_F64(dst + v * LANES, r.v[v]); return; }
#endif
        EACH(v) *(vec_u *)(dst + v * LANES) = r.v[v];
        return;
    }
    (void)stream;
    double t[CHUNK];
    memcpy(t, &r, sizeof t);
    for (int64_t c = 0; c < w; ++c) dst[c] = t[c];
}
INLINE void store_f32(float *dst, row_t r, int64_t w, int stream) {
    if (w == CHUNK) {
#if STREAM_ALIGN
        if (stream) { EACH(v) STREAM_F32(dst + v * LANES, __builtin_convertvector(r.v[v], vecf)); return; }
#endif
        EACH(v) *(vecf_u *)(dst + v * LANES) = __builtin_convertvector(r.v[v], vecf);
        return;
    }
    (void)stream;
    double t[CHUNK];
    memcpy(t, &r, sizeof t);
    for (int64_t c = 0; c < w; ++c) dst[c] = (float)t[c];
}

/* M^{-1} in place on z (m chunk rows): U^T z' = z (sweep_down), then U z'' = z' (sweep_up). factor's unused
 * corners (U_{-1,0}, U_{-2,0}, U_{-1,1}) are zero. Each row is scaled by 1/U_ii first and the off-diagonal
 * weights with it, so the chain from one row to the next is a single fused multiply-add. */
static void sweep_down(const double *factor, int64_t m, row_t *z) {  /* U^T z' = z */
    const double *inv = factor, *sup1 = factor + m, *sup2 = factor + 2 * m;
    vec r1[NV], r2[NV];  /* the previous two rows, in registers (arrays of vectors, not row_t copies) */
    EACH(v) r1[v] = r2[v] = (vec){0};
    for (int64_t i = 0; i < m; ++i) {
        const double f = inv[i], a = sup1[i] * f, b = sup2[i] * f;
        EACH(v) { const vec row = z[i].v[v] * f - b * r2[v] - a * r1[v]; z[i].v[v] = row; r2[v] = r1[v]; r1[v] = row; }
    }
}
static void sweep_up(const double *factor, int64_t m, row_t *z) {  /* U z'' = z' */
    const double *inv = factor, *sup1 = factor + m, *sup2 = factor + 2 * m;
    vec r1[NV], r2[NV];
    EACH(v) r1[v] = r2[v] = (vec){0};
    for (int64_t i = m - 1; i >= 0; --i) {
        const double f = inv[i], a = (i + 1 < m ? sup1[i + 1] : 0.0) * f, b = (i + 2 < m ? sup2[i + 2] : 0.0) * f;
        EACH(v) { const vec row = z[i].v[v] * f - b * r2[v] - a * r1[v]; z[i].v[v] = row; r2[v] = r1[v]; r1[v] = row; }
    }
}
static void solve_chunk(const double *factor, int64_t m, row_t *z) { sweep_down(factor, m, z); sweep_up(factor, m, z); }

/* One step of iterative refinement of gamma (m rows, one zero row either side), the solution of M gamma = b,
 * with the residual in factored form (dres_fast/_banded.py): gamma += M^{-1} (base + s (Q^T fit - R gamma)),
 * fit = F - lam Q gamma. Forward: b = s Q^T x, so F = x (passed through `fit` already holding x's rows as
 * float64) and base = NULL; transpose: b = v, F = 0 and base = v. q_bands (3 x m) are Q's unscaled columns,
 * r_bands (2 x m) R's diagonal and off-diagonal (last entry 0). `fit` has n rows, `res` m rows. */
static void refine_chunk(const double *factor, const double *q_bands, const double *r_bands, double lam,
                         int64_t m, row_t *gamma, row_t *fit, const row_t *base, row_t *res) {
    const double *qa = q_bands, *qb = q_bands + m, *qc = q_bands + 2 * m;
    const double *rd = r_bands, *ro = r_bands + m, s = 1.0 / (1.0 + lam);
    for (int64_t j = 0; j < m; ++j) {  /* fit -= lam Q gamma: gamma_j goes to rows j, j+1, j+2 */
        const double a = lam * qa[j], b = lam * qb[j], c = lam * qc[j];
        EACH(v) {
            const vec g = gamma[j].v[v];
            fit[j].v[v] -= a * g; fit[j + 1].v[v] -= b * g; fit[j + 2].v[v] -= c * g;
        }
    }
    for (int64_t j = 0; j < m; ++j) {
        const double a = qa[j], b = qb[j], c = qc[j], r0 = rd[j], r1 = ro[j], rm = j >= 1 ? ro[j - 1] : 0.0;
        EACH(v) {
            const vec value = s * (a * fit[j].v[v] + b * fit[j + 1].v[v] + c * fit[j + 2].v[v] - r0 * gamma[j].v[v]
                                   - r1 * gamma[j + 1].v[v] - rm * gamma[j - 1].v[v]);
            res[j].v[v] = base ? base[j].v[v] + value : value;
        }
    }
    solve_chunk(factor, m, res);
    for (int64_t j = 0; j < m; ++j) EACH(v) gamma[j].v[v] += res[j].v[v];
}

/* A chunk row of data (w of CHUNK columns, `size` bytes each) to dst, zero past w. */
INLINE void pack_row(void *dst, const void *src, int64_t w, size_t size) {
    memcpy(dst, src, (size_t)w * size);
    if (w < CHUNK) memset((char *)dst + (size_t)w * size, 0, (size_t)(CHUNK - w) * size);
}

/* What a call may add to out = base + scale W x (each NULL when not asked for). Transposed map: row_scale
 * (one per row of x) scales x's rows, rounded to the data type, before the map, and scaled_copy (rows of x,
 * contiguous) receives those rows: the loss's backward gets grad_y = c g r and -D^T grad_y from one read
 * of r. Forward map: row_sumsq (one per row of out, zeroed by the caller) receives each output row's sum
 * of squares of its rounded values, in float64: the loss's forward gets its value from the pass that
 * writes the residual. */
typedef struct { const double *row_scale; void *scaled_copy; double *row_sumsq; } extras_t;

INLINE vec round_f64(vec x) { return x; }
INLINE vec round_f32(vec x) { return __builtin_convertvector(__builtin_convertvector(x, vecf), vec); }

/* The arguments every chunk body takes: the exported function's (less threads), the extras (sumsq: this
 * thread's row sums), the scratch, the chunk. */
#define CHUNK_PARAMS(T) const double *factor, const double *stencil, const int64_t *index, const double *chord, \
    const double *curvature, const int64_t *gather, const double *q_bands, const double *r_bands, double lam,  \
    int refine, int64_t n, int64_t p, int64_t d, const T *x, int64_t ld, T *out, const T *base, double scale,  \
    int stream, const double *row_scale, T *scaled_copy, int stream_copy, double *sumsq, row_t *z, int64_t c0,  \
    int64_t w
#define CHUNK_ARGS factor, stencil, index, chord, curvature, gather, q_bands, r_bands, lam, refine, n, p, d, x, \
    ld, out, base, scale, stream, row_scale, scaled_copy, stream_copy, sumsq, z, c0

/* Scratch rows per thread: z (m, one zero row either side), then (transpose) acc (n), then with
 * refinement res (m), fit (n) and (transpose) v (m); then (forward) the chunk's n data rows, packed. */
#define SCRATCH_ROWS(m, n, transpose, refine) ((size_t)((m) + 2 + ((transpose) ? (n) : 0)                     \
                                                        + ((refine) ? (m) + (n) + ((transpose) ? (m) : 0) : 0)))

#define DEFINE_BANDED(T, NAME, LOAD, STORE, ROUND)                                                          \
/* out[:, c0:c0+w] = base + scale W x[:, c0:c0+w] */                                                         \
INLINE void NAME##_forward_chunk(CHUNK_PARAMS(T)) {                                                          \
    (void)row_scale; (void)scaled_copy; (void)stream_copy; /* the transposed map's extras */                 \
    const int64_t m = n - 2;                                                                                 \
    const double *st0 = stencil, *st1 = stencil + m, *st2 = stencil + 2 * m;                                 \
    /* The stencil, the last two rows carried in registers. Each data row is also copied to `packed`, where \
     * the evaluation reads it back from cache: rows d elements apart (a power of two, often) share a few   \
     * cache sets and are evicted before the evaluation gets to them (the residual pass 1.1x faster at      \
     * K = N = 1024, d = 4096 on the development VM; no change measured at 4096, 1024). */                   \
    T *packed = (T *)(z + SCRATCH_ROWS(m, n, 0, refine) - 1);                                                \
    const double *inv = factor, *sup1 = factor + m, *sup2 = factor + 2 * m;                                  \
    vec x0[NV], x1[NV], r1[NV], r2[NV]; /* with the first sweep of the solve (U^T z' = rhs) fused in */     \
    { const row_t a = LOAD(x + c0, w), b = LOAD(x + ld + c0, w); EACH(v) { x0[v] = a.v[v]; x1[v] = b.v[v]; } } \
    EACH(v) r1[v] = r2[v] = (vec){0};                                                                        \
    pack_row(packed, x + c0, w, sizeof(T)); pack_row(packed + CHUNK, x + ld + c0, w, sizeof(T));              \
    for (int64_t j = 0; j < m; ++j) {                                                                        \
        const T *next = x + (j + 2) * ld + c0;                                                               \
        if (j + 2 + AHEAD < n) PREFETCH_ROW(next + AHEAD * ld);                                              \
        const row_t x2 = LOAD(next, w);                                                                      \
        pack_row(packed + (j + 2) * CHUNK, next, w, sizeof(T));                                              \
        const double f = inv[j], s0 = st0[j] * f, s1 = st1[j] * f, s2 = st2[j] * f;                          \
        const double a = sup1[j] * f, b = sup2[j] * f;                                                       \
        EACH(v) {                                                                                            \
            const vec row = s0 * x0[v] + s1 * x1[v] + s2 * x2.v[v] - b * r2[v] - a * r1[v];                  \
            z[j].v[v] = row; r2[v] = r1[v]; r1[v] = row; x0[v] = x1[v]; x1[v] = x2.v[v];                     \
        }                                                                                                    \
    }                                                                                                        \
    sweep_up(factor, m, z);                                                                                  \
    if (refine) {                                                                                            \
        row_t *res = z + m + 1, *fit = res + m;                                                              \
        for (int64_t i = 0; i < n; ++i) fit[i] = LOAD(packed + i * CHUNK, CHUNK);                            \
        refine_chunk(factor, q_bands, r_bands, lam, m, z, fit, NULL, res);                                   \
    }                                                                                                        \
    for (int64_t r = 0; r < p; ++r) {  /* the evaluation: 2 data rows and 4 of gamma per output row */      \
        const T *xa = packed + index[r] * CHUNK;                                                             \
        if (r + AHEAD < p) {                                                                                 \
            if (base) PREFETCH_ROW(base + (r + AHEAD) * d + c0);                                             \
            if (!stream) __builtin_prefetch(out + (r + AHEAD) * d + c0, 1);                                  \
        }                                                                                                    \
        const row_t a = LOAD(xa, CHUNK), b = LOAD(xa + CHUNK, CHUNK);                                        \
        const row_t *g0 = z + gather[4 * r], *g1 = z + gather[4 * r + 1];                                    \
        const row_t *g2 = z + gather[4 * r + 2], *g3 = z + gather[4 * r + 3];                                \
        const double p0 = scale * chord[2 * r], p1 = scale * chord[2 * r + 1];                               \
        const double v0 = scale * curvature[4 * r], v1 = scale * curvature[4 * r + 1];                       \
        const double v2 = scale * curvature[4 * r + 2], v3 = scale * curvature[4 * r + 3];                   \
        row_t o;                                                                                             \
        EACH(v) o.v[v] = p0 * a.v[v] + p1 * b.v[v] + v0 * g0->v[v] + v1 * g1->v[v] + v2 * g2->v[v]          \
                         + v3 * g3->v[v];                                                                    \
        if (base) { const row_t y = LOAD(base + r * d + c0, w); EACH(v) o.v[v] += y.v[v]; }                  \
        if (sumsq) { /* columns past w are zero in o */                                                      \
            vec squares = (vec){0};                                                                          \
            EACH(v) { const vec q = ROUND(o.v[v]); squares += q * q; }                                       \
            double total = 0.0;                                                                              \
            for (int l = 0; l < LANES; ++l) total += squares[l];                                             \
            sumsq[r] += total;                                                                               \
        }                                                                                                    \
        STORE(out + r * d + c0, o, w, stream);                                                               \
    }                                                                                                        \
}                                                                                                            \
                                                                                                             \
/* Row i of the transposed map, complete in acc: out row i = base + scale acc_i; acc_i zeroed again for the \
 * next chunk while its line is in cache. `step`: the direction rows are written in (for the prefetch). */   \
INLINE void NAME##_emit(row_t *acc, int64_t i, int64_t n, int64_t d, T *out, const T *base, double scale,    \
                        int stream, int64_t c0, int64_t w, int64_t step) {                                   \
    const int64_t ahead = i + step * AHEAD;                                                                  \
    if (ahead >= 0 && ahead < n) {                                                                           \
        if (base) PREFETCH_ROW(base + ahead * d + c0);                                                       \
        if (!stream) __builtin_prefetch(out + ahead * d + c0, 1);                                            \
    }                                                                                                        \
    row_t o;                                                                                                 \
    if (base) { const row_t y = LOAD(base + i * d + c0, w); EACH(v) o.v[v] = y.v[v] + scale * acc[i].v[v]; } \
    else EACH(v) o.v[v] = scale * acc[i].v[v];                                                               \
    EACH(v) acc[i].v[v] = (vec){0};                                                                          \
    STORE(out + i * d + c0, o, w, stream);                                                                   \
}                                                                                                            \
                                                                                                             \
/* out[:, c0:c0+w] = base + scale W^T x[:, c0:c0+w]: the scatter to z and acc, the solve, then the          \
 * stencil's transpose into acc, each acc row written out as soon as it is complete */                       \
INLINE void NAME##_transpose_chunk(CHUNK_PARAMS(T)) {                                                        \
    (void)sumsq; /* the forward map's extra */                                                               \
    const int64_t m = n - 2;                                                                                 \
    const double *st0 = stencil, *st1 = stencil + m, *st2 = stencil + 2 * m;                                 \
    row_t *acc = z + m + 1, *res = acc + n, *fit = res + m, *v0rows = fit + n;                               \
    /* z and acc are zero here: zeroed with the buffer, and each chunk leaves them so (below) */           \
    for (int64_t r = 0; r < p; ++r) {                                                                        \
        const T *gr = x + r * ld + c0;                                                                       \
        if (r + AHEAD < p) PREFETCH_ROW(gr + AHEAD * ld);                                                    \
        row_t g = LOAD(gr, w);                                                                               \
        if (row_scale) {                                                                                     \
            const double by = row_scale[r];                                                                  \
            EACH(v) g.v[v] = ROUND(g.v[v] * by);                                                             \
            if (scaled_copy) STORE(scaled_copy + r * d + c0, g, w, stream_copy);                             \
        }                                                                                                    \
        row_t *g0 = z + gather[4 * r], *g1 = z + gather[4 * r + 1];                                          \
        row_t *g2 = z + gather[4 * r + 2], *g3 = z + gather[4 * r + 3];                                      \
        row_t *oa = acc + index[r], *ob = oa + 1;                                                            \
        const double p0 = chord[2 * r], p1 = chord[2 * r + 1];                                               \
        const double v0 = curvature[4 * r], v1 = curvature[4 * r + 1];                                       \
        const double v2 = curvature[4 * r + 2], v3 = curvature[4 * r + 3];                                   \
        /* statement by statement: rows clipped at the ends may repeat (with weight zero) */                 \
        EACH(v) g0->v[v] += v0 * g.v[v];                                                                     \
        EACH(v) g1->v[v] += v1 * g.v[v];                                                                     \
        EACH(v) g2->v[v] += v2 * g.v[v];                                                                     \
        EACH(v) g3->v[v] += v3 * g.v[v];                                                                     \
        EACH(v) { oa->v[v] += p0 * g.v[v]; ob->v[v] += p1 * g.v[v]; }                                        \
    }                                                                                                        \
    if (!refine) {  /* the second sweep with the stencil's transpose and the output fused in (rows down) */ \
        const double *inv = factor, *sup1 = factor + m, *sup2 = factor + 2 * m;                              \
        sweep_down(factor, m, z);                                                                            \
        vec r1[NV], r2[NV];                                                                                  \
        EACH(v) r1[v] = r2[v] = (vec){0};                                                                    \
        for (int64_t i = m - 1; i >= 0; --i) {                                                               \
            const double f = inv[i], a = (i + 1 < m ? sup1[i + 1] : 0.0) * f;                                \
            const double b = (i + 2 < m ? sup2[i + 2] : 0.0) * f, s0 = st0[i], s1 = st1[i], s2 = st2[i];     \
            EACH(v) {                                                                                        \
                const vec u = z[i].v[v] * f - b * r2[v] - a * r1[v];                                         \
                r2[v] = r1[v]; r1[v] = u; z[i].v[v] = (vec){0};                                              \
                acc[i].v[v] += s0 * u; acc[i + 1].v[v] += s1 * u; acc[i + 2].v[v] += s2 * u;                 \
            }                                                                                                \
            NAME##_emit(acc, i + 2, n, d, out, base, scale, stream, c0, w, -1);                              \
        }                                                                                                    \
        NAME##_emit(acc, 1, n, d, out, base, scale, stream, c0, w, -1);                                      \
        NAME##_emit(acc, 0, n, d, out, base, scale, stream, c0, w, -1);                                      \
        return;                                                                                              \
    }                                                                                                        \
    memcpy(v0rows, z, sizeof(row_t) * (size_t)m);                                                            \
    solve_chunk(factor, m, z);                                                                               \
    memset(fit, 0, sizeof(row_t) * (size_t)n);                                                               \
    refine_chunk(factor, q_bands, r_bands, lam, m, z, fit, v0rows, res);                                     \
    for (int64_t i = 0; i < n; ++i) {                                                                        \
        if (i < m) {  /* acc rows i, i+1, i+2 get u_i; row i is then complete */                              \
            const double s0 = st0[i], s1 = st1[i], s2 = st2[i];                                              \
            EACH(v) {                                                                                        \
                const vec u = z[i].v[v];                                                                     \
                acc[i].v[v] += s0 * u; acc[i + 1].v[v] += s1 * u; acc[i + 2].v[v] += s2 * u;                 \
                z[i].v[v] = (vec){0};                                                                        \
            }                                                                                                \
        }                                                                                                    \
        NAME##_emit(acc, i, n, d, out, base, scale, stream, c0, w, 1);                                       \
    }                                                                                                        \
}                                                                                                            \
                                                                                                             \
int NAME(const double *factor, const double *stencil, const int64_t *index, const double *chord,             \
         const double *curvature, const int64_t *gather, const double *q_bands, const double *r_bands,       \
         double lam, int refine, int64_t n, int64_t p, int64_t d, const T *x, int64_t ld, T *out,             \
         const T *base, double scale, int transpose, const extras_t *extras, int threads) {                   \
    const int64_t chunks = (d + CHUNK - 1) / CHUNK;                                                          \
    const int stream = STREAMS(out, transpose ? n : p, d, T);                                                \
    const double *row_scale = extras ? extras->row_scale : NULL;                                             \
    T *scaled_copy = extras && row_scale ? (T *)extras->scaled_copy : NULL;                                  \
    double *row_sumsq = extras && !transpose ? extras->row_sumsq : NULL;                                     \
    const int stream_copy = scaled_copy && STREAMS(scaled_copy, p, d, T);                                    \
    threads = threads < 1 ? 1 : threads;                                                                     \
    double *partials = row_sumsq ? (double *)calloc((size_t)threads * (size_t)p, sizeof(double)) : NULL;     \
    if (row_sumsq && !partials) return 1;                                                                    \
    const size_t packed = transpose ? 0 : ((size_t)n * CHUNK * sizeof(T) + sizeof(row_t) - 1) / sizeof(row_t); \
    const size_t bytes = (SCRATCH_ROWS(n - 2, n, transpose, refine) + packed) * sizeof(row_t);               \
    int failed = 0;                                                                                          \
    _Pragma("omp parallel num_threads(threads) reduction(|:failed)")                                         \
    {                                                                                                        \
        row_t *buffer = (row_t *)aligned_alloc(sizeof(vec), bytes);                                          \
        row_t *z = buffer ? buffer + 1 : NULL; /* z[-1] and z[m] stay zero (refinement reads them) */        \
        double *sumsq = partials ? partials + (size_t)THREAD_NUM() * (size_t)p : NULL;                       \
        if (buffer) memset(buffer, 0, bytes); else failed = 1;                                               \
        _Pragma("omp for schedule(static)")                                                                  \
        for (int64_t k = 0; k < chunks; ++k) {                                                               \
            if (!z) continue;                                                                                \
            const int64_t c0 = k * CHUNK, w = d - c0 < CHUNK ? d - c0 : CHUNK;                               \
            if (!transpose && w == CHUNK) NAME##_forward_chunk(CHUNK_ARGS, CHUNK);                           \
            else if (!transpose) NAME##_forward_chunk(CHUNK_ARGS, w);                                        \
            else if (w == CHUNK) NAME##_transpose_chunk(CHUNK_ARGS, CHUNK);                                  \
            else NAME##_transpose_chunk(CHUNK_ARGS, w);                                                      \
        }                                                                                                    \
        if (stream || stream_copy) STREAM_FENCE(); /* streamed stores visible before the caller reads */    \
        free(buffer);                                                                                        \
    }                                                                                                        \
    if (partials) { /* the threads' row sums, added in thread order: the same result on every run */        \
        for (int t = 0; t < threads; ++t)                                                                    \
            for (int64_t r = 0; r < p; ++r) row_sumsq[r] += partials[(size_t)t * (size_t)p + (size_t)r];      \
        free(partials);                                                                                      \
    }                                                                                                        \
    return failed;                                                                                           \
}

DEFINE_BANDED(double, dres_banded_apply_f64, load_f64, store_f64, round_f64)
DEFINE_BANDED(float, dres_banded_apply_f32, load_f32, store_f32, round_f32)

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

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
