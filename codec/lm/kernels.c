/* Fused CPU loops for the exact engine's elementwise work (codec/lm/kernels.py builds and loads this).
 *
 * Each function computes exactly what a sequence of torch ops in engine.py's TorchOps computes: the
 * same IEEE 754 float64 operations on the same operands in the same order, one rounding per
 * operation. That is why it must be compiled with -ffp-contract=off and without -ffast-math: a fused
 * multiply-add or a reassociated sum would round differently. Integer sums (of integer-valued
 * doubles below 2^53) are exact in any order. What fusion saves is memory traffic and dispatch: the
 * torch form makes ~10 passes over a (rows, vocab) float64 tensor for the LM head, this makes 2.
 *
 * Row-major, contiguous arrays throughout; the Python side checks dtypes and contiguity.
 */
#define _GNU_SOURCE   /* getpriority's per-thread meaning, pthread_atfork */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
/* -DLLMFS_NO_AVX512: no AVX-512 code at all (no VNNI kernels, no x86-64-v4 clones), what an AVX2-only
 * CPU runs: LLMFS_BACKEND=avx2|blas|intmm load this build so that a VNNI machine runs those paths. */
#if defined(LLMFS_NO_AVX512) && !defined(LLMFS_NO_VNNI)
#define LLMFS_NO_VNNI 1
#endif
#if defined(__x86_64__) && ((defined(__GNUC__) && __GNUC__ >= 9) || defined(__clang__))
/* AVX2 kernels (gemm_packed_avx2): compiled for AVX2 by a target attribute, called only when the CPU
 * reports it (have_avx2), so the library still loads on any x86-64 */
#include <immintrin.h>
#define HAVE_AVX2_KERNELS 1
#define AVX2_TARGET __attribute__((target("avx2")))
static int have_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
}
#endif
#if defined(__x86_64__) && ((defined(__GNUC__) && __GNUC__ >= 9) || defined(__clang__)) && \
    !defined(LLMFS_NO_VNNI)
/* Intrinsics for the VNNI attention kernels, compiled for that ISA by a target attribute only and
 * called only when the CPU reports it (have_vnni): the library still loads on any x86-64. */
#include <immintrin.h>
#define HAVE_VNNI 1
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))
static int have_vnni(void) {
    __builtin_cpu_init();   /* idempotent; needed if this ran before libgcc's constructor */
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vnni");
}
/* The elementwise kernels' AVX-512 forms (head_freqs, swiglu_quant, ...): the same IEEE operations
 * on the same operands in the same order as the portable loops, 8 doubles at a time; only integer
 * sums and maxima (no NaN, no -0) change their order, which cannot change their value. */
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
static int have_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
#endif

#define ACT_MAX (127.0 * 128.0)
#define ACT8_MAX 127.0
#define SIG_RANGE 24.0
#define SIG_STEPS 4096.0 /* 2^SIG_RES_BITS */
/* maxsd semantics (no NaN can occur here); fmax() is a libm call that blocks vectorisation */
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define HEAD_LANES 8

/* The hot loops are compiled twice and picked when the library loads (gcc target_clones, an ifunc):
 * for AVX2 (8 int32 / 4 double lanes, gathers for the table lookups) and for the baseline ISA, since
 * the cached build may move between machines (no -march; -DLLMFS_NO_CLONES builds the baseline
 * only, as tests do). The results are the same bits: only
 * elementwise IEEE operations and integer sums vectorise, AVX2 does not imply FMA, and float sums
 * keep their order. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(LLMFS_NO_CLONES)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
/* AVX-512 (DQ: int64 multiply and int64 <-> double conversion) vectorises the LM head's division */
#ifdef LLMFS_NO_AVX512
#define MULTIVERSION512 MULTIVERSION
#else
#define MULTIVERSION512 __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#endif
#else
#define MULTIVERSION512
#define MULTIVERSION
#endif

/* Decoding attention (attend_step's VNNI and AVX2 forms) asks for the cache PF_DIST keys ahead
 * (VNNI: 32 and 64 measured alike, 128 slower) */
#define PF_DIST 64

/* Round half to even, as torch.round: for |x| < 2^51, x + 1.5*2^52 lies in [2^52, 2^53) where the
 * spacing of doubles is 1, so the addition itself rounds to the nearest integer (ties to even, the
 * default mode); subtracting the constant back is exact. Callers keep |x| < 2^51 (bounds at each
 * call). Portable and vectorisable, unlike nearbyint() on baseline x86-64. */
static inline double round_even(double x) {
    const double magic = 6755399441055744.0; /* 1.5 * 2^52 */
    return (x + magic) - magic;
}

/* max x[k] (abs: max |x[k]|) for n >= 0, -INFINITY (abs: 0) when n = 0, over HEAD_LANES interleaved
 * partial maxima: independent chains instead of one maxsd latency chain per element. The max of a
 * set does not depend on the order as long as no value is NaN and MAX never has to choose between
 * +0 and -0: callers pass no NaN, and only values that are never -0 (abs: fabs is never -0). */
static inline double max_of(const double *restrict x, int64_t n, int absval) {
    double lane[HEAD_LANES];
    for (int64_t u = 0; u < HEAD_LANES; u++) lane[u] = absval ? 0.0 : -INFINITY;
    int64_t k = 0;
    for (; k + HEAD_LANES <= n; k += HEAD_LANES)
        for (int64_t u = 0; u < HEAD_LANES; u++) {
            double v = absval ? fabs(x[k + u]) : x[k + u];
            lane[u] = MAX(lane[u], v);
        }
    double m = absval ? 0.0 : -INFINITY;
    for (; k < n; k++) {
        double v = absval ? fabs(x[k]) : x[k];
        m = MAX(m, v);
    }
    for (int64_t u = 0; u < HEAD_LANES; u++) m = MAX(m, lane[u]);
    return m;
}

/* Per-row int16 quantisation split into int8 halves (engine._quant_rows):
 *   m = max|x|, s = m > 0 ? m / ACT_MAX : 1, xq = round(x / s), hi = round(xq / 128), lo = xq - 128 hi.
 * |x / s| <= ACT_MAX < 2^51. hi is written to rows 0..M-1 of q, lo to rows M..2M-1. */
static void quant_row(const double *x, int64_t K, int8_t *hi, int8_t *lo, double *s_out) {
    double m = max_of(x, K, 1);
    double s = m > 0 ? m / ACT_MAX : 1.0;
    for (int64_t k = 0; k < K; k++) {
        double xq = round_even(x[k] / s);
        double h = round_even(xq / 128.0);
        hi[k] = (int8_t)(int32_t)h;            /* via int32: vectorises */
        lo[k] = (int8_t)(int32_t)(xq - h * 128.0);
    }
    *s_out = s;
}

/* Per-row int8 quantisation, one pass (engine.TorchOps.quant_rows with int8):
 *   m = max|x|, s = m > 0 ? m / ACT8_MAX : 1, q = round(x / s). |x / s| <= 127. */
static void quant_row8(const double *x, int64_t K, int8_t *q, double *s_out) {
    double m = max_of(x, K, 1);
    double s = m > 0 ? m / ACT8_MAX : 1.0;
    for (int64_t k = 0; k < K; k++) q[k] = (int8_t)(int32_t)round_even(x[k] / s);
    *s_out = s;
}

/* int8: q is (M, K), one row per row of x; else (2M, K), hi then lo */
MULTIVERSION
void quant_rows_portable(const double *x, int64_t M, int64_t K, int8_t *q, double *s,
                         int int8) {
    for (int64_t i = 0; i < M; i++)
        if (int8)
            quant_row8(x + i * K, K, q + i * K, s + i);
        else
            quant_row(x + i * K, K, q + i * K, q + (M + i) * K, s + i);
}

/* sqrt(d) for d > 0 from +, * and / only (engine.det_sqrt): IEEE rounds each of those correctly on
 * every CPU and GPU, while library square roots need not (torch's CPU sqrt goes through MKL, which
 * is 1-ulp accurate, not correctly rounded). Start at the power of two 2^ceil(e/2) >= sqrt(d)
 * (d = m 2^e, m in [0.5, 1): within a factor 2) and take 7 Newton steps (relative error
 * 1 -> 0.25 -> 0.025 -> 3e-4 -> 5e-8 -> 1e-15 -> rounding). */
static double det_sqrt(double d) {
    int e;
    frexp(d, &e);
    int k = (e + 1) / 2;
    if ((e + 1) % 2 < 0) k -= 1; /* floor division */
    double y = ldexp(1.0, k);
    for (int i = 0; i < 7; i++) y = (y + d / y) * 0.5;
    return y;
}

/* RMSNorm then quantisation (engine.TorchOps.rmsnorm_quant). 1/rms is a per-row factor, so it is
 * applied to the row's scale, not to every element:
 *   sr = max|x| / 2^20 (or 1), xi = round(x / sr), D = ((sum xi^2) / K) * sr * sr + eps,
 *   q, sh = quant(x * w), s = sh / det_sqrt(D).
 * |x / sr| <= 2^20; sum xi^2 < K 2^40 < 2^51 is exact. */
MULTIVERSION
void rmsnorm_quant_portable(const double *x, int64_t M, int64_t K, const double *w, double eps,
                           int8_t *q, double *s, int int8) {
    double *h = malloc(sizeof(double) * K);
    for (int64_t i = 0; i < M; i++) {
        const double *xr = x + i * K;
        double m = max_of(xr, K, 1);
        double sr = m > 0 ? m / 1048576.0 : 1.0;
        double ss = 0;
        for (int64_t k = 0; k < K; k++) {
            double xi = round_even(xr[k] / sr);
            ss += xi * xi;
            h[k] = xr[k] * w[k];
        }
        double d = ss / (double)K;
        d = d * sr;
        d = d * sr;
        d = d + eps;
        double sh;
        if (int8)
            quant_row8(h, K, q + i * K, &sh);
        else
            quant_row(h, K, q + i * K, q + (M + i) * K, &sh);
        s[i] = sh / det_sqrt(d);
    }
    free(h);
}

/* The exact integer value of x @ w.T from the stacked hi/lo accumulators: 128 hi + lo. In double
 * (|128 hi| < 2^38, every step exact) because int32 -> double converts 4 at a time with AVX2. */
static inline double acc_value(const int32_t *hi, const int32_t *lo, int64_t n) {
    return (double)hi[n] * 128.0 + (double)lo[n];
}

/* Linear-layer output (engine._combine): y = value * ws[n] * s[m]; with add, y += that
 * (the residual connection x + linear(x)). stacked: acc is (2M, N) hi/lo accumulators of an int16
 * input; else (M, N), the value itself (an int8 input). */
MULTIVERSION512
void combine(const int32_t *acc, int64_t M, int64_t N, const double *ws, const double *s,
             double *y, int add, int stacked) {
    for (int64_t i = 0; i < M; i++) {
        const int32_t *hi = acc + i * N, *lo = acc + (M + i) * N;
        double *yr = y + i * N, si = s[i];
        if (!stacked) {
            if (add)
                for (int64_t n = 0; n < N; n++) yr[n] = yr[n] + (double)hi[n] * ws[n] * si;
            else
                for (int64_t n = 0; n < N; n++) yr[n] = (double)hi[n] * ws[n] * si;
        } else if (add)
            for (int64_t n = 0; n < N; n++) yr[n] = yr[n] + acc_value(hi, lo, n) * ws[n] * si;
        else
            for (int64_t n = 0; n < N; n++) yr[n] = acc_value(hi, lo, n) * ws[n] * si;
    }
}

/* MLP activation then quantisation for the down projection (engine._swiglu + _quant_rows), from
 * stacked (2M, 2F) or single (M, 2F) accumulators (see combine):
 * gate, up = the two halves of the gate_up output; a = gate * sigmoid_table[i] * up with
 * i = round((clamp(gate, -24, 24) + 24) * 4096) in [0, 196608]. */
MULTIVERSION
void swiglu_quant_portable(const int32_t *restrict acc, int64_t M, int64_t F,
                           const double *restrict ws, const double *restrict s,
                           const double *restrict sig, int8_t *restrict q, double *restrict qs,
                           int stacked) {
    /* three loops: gcc if-converts the clamp's comparisons only in a loop without operations that
     * could trap (loads, arithmetic), so gate and up, then the clamp, then the index and the
     * table gather (AVX2: vgatherdpd) */
    double *restrict a = malloc(sizeof(double) * F), *restrict gb = malloc(sizeof(double) * F);
    double *restrict ub = malloc(sizeof(double) * F);
    double *restrict tb = malloc(sizeof(double) * F);
    for (int64_t i = 0; i < M; i++) {
        const int32_t *hi = acc + i * 2 * F, *lo = acc + (M + i) * 2 * F;
        double si = s[i];
        if (stacked)
            for (int64_t n = 0; n < F; n++) {
                gb[n] = acc_value(hi, lo, n) * ws[n] * si;
                ub[n] = acc_value(hi, lo, F + n) * ws[F + n] * si;
            }
        else                                   /* an int8 input: one accumulator row per row */
            for (int64_t n = 0; n < F; n++) {
                gb[n] = (double)hi[n] * ws[n] * si;
                ub[n] = (double)hi[F + n] * ws[F + n] * si;
            }
        for (int64_t n = 0; n < F; n++) {
            double g = gb[n];
            double c = g < -SIG_RANGE ? -SIG_RANGE : g;       /* = MIN(MAX(g, -24), 24): no NaN */
            c = c > SIG_RANGE ? SIG_RANGE : c;
            tb[n] = c;
        }
        for (int64_t n = 0; n < F; n++) {
            int32_t t = (int32_t)round_even((tb[n] + SIG_RANGE) * SIG_STEPS);
            a[n] = gb[n] * sig[t] * ub[n];
        }
        quant_row(a, F, q + i * F, q + (M + i) * F, qs + i);
    }
    free(a); free(gb); free(ub); free(tb);
}

#ifdef HAVE_VNNI
/* ---- AVX-512 forms of quant_rows, rmsnorm_quant and swiglu_quant: the portable loops' operations
 * 8 doubles at a time (x / 128 of quant_row becomes x * 2^-7: the same bits, a power of two).
 * Rows are processed 16 entries per iteration, the last one masked. */
AVX512_TARGET static inline __mmask16 tail16(int64_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
}

AVX512_TARGET static inline __m512d round_even512(__m512d x) {
    const __m512d magic = _mm512_set1_pd(6755399441055744.0);
    return _mm512_sub_pd(_mm512_add_pd(x, magic), magic);
}

AVX512_TARGET static inline __m512d abs512(__m512d x) {
    return _mm512_andnot_pd(_mm512_set1_pd(-0.0), x);
}

/* max |x[k]| (0 when K = 0), as max_of(x, K, 1) */
AVX512_TARGET static double absmax512(const double *restrict x, int64_t K) {
    __m512d m0 = _mm512_setzero_pd(), m1 = m0;
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 km = tail16(K - k);
        m0 = _mm512_max_pd(m0, abs512(_mm512_maskz_loadu_pd((__mmask8)km, x + k)));
        m1 = _mm512_max_pd(m1, abs512(_mm512_maskz_loadu_pd((__mmask8)(km >> 8), x + k + 8)));
    }
    return _mm512_reduce_max_pd(_mm512_max_pd(m0, m1));
}

/* Masked stores only for a row's last block: on this Zen 4 they were far slower into fresh pages
 * (an AVX-512 combine with masked stores everywhere took 61-65 ms per 1024 tokens, 30 without) */
AVX512_TARGET static inline void store16(int8_t *p, __mmask16 km, __m128i v) {
    if (km == 0xFFFF)
        _mm_storeu_si128((__m128i *)p, v);
    else
        _mm_mask_storeu_epi8(p, km, v);
}

AVX512_TARGET static inline void store8x32(int32_t *p, __mmask8 k, __m256i v) {
    if (k == 0xFF)
        _mm256_storeu_si256((__m256i *)p, v);
    else
        _mm256_mask_storeu_epi32(p, k, v);
}

/* quant_row (int8 = 0) or quant_row8 (int8 = 1) of x given m = max|x| */
AVX512_TARGET static void quant_apply512(const double *restrict x, int64_t K, double m, int int8,
                                         int8_t *restrict hi, int8_t *restrict lo,
                                         double *restrict s_out) {
    double s = m > 0 ? m / (int8 ? ACT8_MAX : ACT_MAX) : 1.0;
    const __m512d vs = _mm512_set1_pd(s), c128 = _mm512_set1_pd(128.0),
                  inv128 = _mm512_set1_pd(1.0 / 128.0);
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 km = tail16(K - k);
        __m512d q0 = round_even512(_mm512_div_pd(_mm512_maskz_loadu_pd((__mmask8)km, x + k), vs));
        __m512d q1 =
            round_even512(_mm512_div_pd(_mm512_maskz_loadu_pd((__mmask8)(km >> 8), x + k + 8), vs));
        if (int8) {
            __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtpd_epi32(q0)),
                                           _mm512_cvtpd_epi32(q1), 1);
            store16(hi + k, km, _mm512_cvtepi32_epi8(v));
        } else {
            __m512d h0 = round_even512(_mm512_mul_pd(q0, inv128));
            __m512d h1 = round_even512(_mm512_mul_pd(q1, inv128));
            __m512d l0 = _mm512_sub_pd(q0, _mm512_mul_pd(h0, c128));
            __m512d l1 = _mm512_sub_pd(q1, _mm512_mul_pd(h1, c128));
            __m512i vh = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtpd_epi32(h0)),
                                            _mm512_cvtpd_epi32(h1), 1);
            __m512i vl = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtpd_epi32(l0)),
                                            _mm512_cvtpd_epi32(l1), 1);
            store16(hi + k, km, _mm512_cvtepi32_epi8(vh));
            store16(lo + k, km, _mm512_cvtepi32_epi8(vl));
        }
    }
    *s_out = s;
}

AVX512_TARGET static void quant_rows_avx512(const double *x, int64_t M, int64_t K, int8_t *q,
                                            double *s, int int8) {
    for (int64_t i = 0; i < M; i++)
        quant_apply512(x + i * K, K, absmax512(x + i * K, K), int8, q + i * K,
                       int8 ? NULL : q + (M + i) * K, s + i);
}

/* rmsnorm_quant_portable's operations; h = x * w and its max |h| in the pass that sums xi^2 */
AVX512_TARGET static void rmsnorm_quant_avx512(const double *x, int64_t M, int64_t K,
                                               const double *w, double eps, int8_t *q, double *s,
                                               int int8) {
    double *h = malloc(sizeof(double) * (K + 16));
    for (int64_t i = 0; i < M; i++) {
        const double *xr = x + i * K;
        double m = absmax512(xr, K);
        double sr = m > 0 ? m / 1048576.0 : 1.0;
        const __m512d vsr = _mm512_set1_pd(sr);
        __m512d ss0 = _mm512_setzero_pd(), ss1 = ss0, hm0 = ss0, hm1 = ss0;
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 km = tail16(K - k);
            __mmask8 k0 = (__mmask8)km, k1 = (__mmask8)(km >> 8);
            __m512d x0 = _mm512_maskz_loadu_pd(k0, xr + k), x1 = _mm512_maskz_loadu_pd(k1, xr + k + 8);
            __m512d i0 = round_even512(_mm512_div_pd(x0, vsr));
            __m512d i1 = round_even512(_mm512_div_pd(x1, vsr));
            ss0 = _mm512_add_pd(ss0, _mm512_mul_pd(i0, i0));   /* integers < 2^51: exact */
            ss1 = _mm512_add_pd(ss1, _mm512_mul_pd(i1, i1));
            __m512d h0 = _mm512_mul_pd(x0, _mm512_maskz_loadu_pd(k0, w + k));
            __m512d h1 = _mm512_mul_pd(x1, _mm512_maskz_loadu_pd(k1, w + k + 8));
            _mm512_storeu_pd(h + k, h0);
            _mm512_storeu_pd(h + k + 8, h1);
            hm0 = _mm512_max_pd(hm0, abs512(h0));
            hm1 = _mm512_max_pd(hm1, abs512(h1));
        }
        double d = _mm512_reduce_add_pd(_mm512_add_pd(ss0, ss1)) / (double)K;
        d = d * sr;
        d = d * sr;
        d = d + eps;
        double sh;
        quant_apply512(h, K, _mm512_reduce_max_pd(_mm512_max_pd(hm0, hm1)), int8, q + i * K,
                       int8 ? NULL : q + (M + i) * K, &sh);
        s[i] = sh / det_sqrt(d);
    }
    free(h);
}

/* swiglu_quant_portable's operations; a and its max |a| in one pass */
AVX512_TARGET static void swiglu_quant_avx512(const int32_t *restrict acc, int64_t M, int64_t F,
                                              const double *restrict ws, const double *restrict s,
                                              const double *restrict sig, int8_t *restrict q,
                                              double *restrict qs, int stacked) {
    double *restrict a = malloc(sizeof(double) * (F + 8));
    const __m512d c128 = _mm512_set1_pd(128.0), lo_c = _mm512_set1_pd(-SIG_RANGE),
                  hi_c = _mm512_set1_pd(SIG_RANGE), steps = _mm512_set1_pd(SIG_STEPS);
    for (int64_t i = 0; i < M; i++) {
        const int32_t *hi = acc + i * 2 * F, *lo = acc + (M + i) * 2 * F;
        const __m512d si = _mm512_set1_pd(s[i]);
        __m512d am = _mm512_setzero_pd();
        for (int64_t n = 0; n < F; n += 8) {
            __mmask8 k = (__mmask8)((1u << MIN(8, F - n)) - 1);
            /* the (rows, 2F) accumulators come from the GEMM just before (12.6 MB per 1024
             * rows): prefetching 512 bytes ahead took the kernel from 113 to 69 ms per 1024
             * tokens (30 layers) in the engine; the hardware prefetcher alone waits on memory.
             * (The LM head's pass over its accumulators gained nothing from it.) */
            _mm_prefetch((const char *)(hi + n + 128), _MM_HINT_T0);
            _mm_prefetch((const char *)(hi + F + n + 128), _MM_HINT_T0);
            if (stacked) {
                _mm_prefetch((const char *)(lo + n + 128), _MM_HINT_T0);
                _mm_prefetch((const char *)(lo + F + n + 128), _MM_HINT_T0);
            }
            __m512d g = _mm512_cvtepi32_pd(_mm256_maskz_loadu_epi32(k, hi + n));
            __m512d u = _mm512_cvtepi32_pd(_mm256_maskz_loadu_epi32(k, hi + F + n));
            if (stacked) {
                g = _mm512_add_pd(_mm512_mul_pd(g, c128),
                                  _mm512_cvtepi32_pd(_mm256_maskz_loadu_epi32(k, lo + n)));
                u = _mm512_add_pd(_mm512_mul_pd(u, c128),
                                  _mm512_cvtepi32_pd(_mm256_maskz_loadu_epi32(k, lo + F + n)));
            }
            g = _mm512_mul_pd(_mm512_mul_pd(g, _mm512_maskz_loadu_pd(k, ws + n)), si);
            u = _mm512_mul_pd(_mm512_mul_pd(u, _mm512_maskz_loadu_pd(k, ws + F + n)), si);
            /* g < -24 ? -24 : g, then c > 24 ? 24 : c (no NaN; equal operands are equal values) */
            __m512d c = _mm512_min_pd(_mm512_max_pd(g, lo_c), hi_c);
            __m256i t = _mm512_cvtpd_epi32(round_even512(_mm512_mul_pd(_mm512_add_pd(c, hi_c), steps)));
            __m512d sg = _mm512_mask_i32gather_pd(_mm512_setzero_pd(), k, t, sig, 8);
            __m512d av = _mm512_mul_pd(_mm512_mul_pd(g, sg), u);
            _mm512_storeu_pd(a + n, av);
            am = _mm512_max_pd(am, abs512(av));
        }
        quant_apply512(a, F, _mm512_reduce_max_pd(am), 0, q + i * F, q + (M + i) * F, qs + i);
    }
    free(a);
}
#endif

/* impl as head_freqs: 0 the fastest, 1 portable, 2 AVX-512; return the form that ran */
int quant_rows(const double *x, int64_t M, int64_t K, int8_t *q, double *s, int int8,
               int64_t impl) {
#ifdef HAVE_VNNI
    if (impl != 1 && have_avx512()) {
        quant_rows_avx512(x, M, K, q, s, int8);
        return 2;
    }
#endif
    quant_rows_portable(x, M, K, q, s, int8);
    return 1;
}

int rmsnorm_quant(const double *x, int64_t M, int64_t K, const double *w, double eps, int8_t *q,
                  double *s, int int8, int64_t impl) {
#ifdef HAVE_VNNI
    if (impl != 1 && have_avx512()) {
        rmsnorm_quant_avx512(x, M, K, w, eps, q, s, int8);
        return 2;
    }
#endif
    rmsnorm_quant_portable(x, M, K, w, eps, q, s, int8);
    return 1;
}

int swiglu_quant(const int32_t *acc, int64_t M, int64_t F, const double *ws, const double *s,
                 const double *sig, int8_t *q, double *qs, int stacked, int64_t impl) {
#ifdef HAVE_VNNI
    if (impl != 1 && have_avx512()) {
        swiglu_quant_avx512(acc, M, F, ws, s, sig, q, qs, stacked);
        return 2;
    }
#endif
    swiglu_quant_portable(acc, M, F, ws, s, sig, q, qs, stacked);
    return 1;
}

/* Queries, keys and values from the qkv projection (engine.Engine._qkv). h is (B, T, (nh + 2 nkv) hs);
 * row (b, t) sits at position qpos[b, t]. RoPE rotates channel pairs (2i, 2i+1) of q and k:
 * (a cos - b sin, a sin + b cos). Keys and values: clamp(round(x / scale), -lim, lim) on the fixed
 * per-channel power-of-two grid (|x / scale| <= lim by the weight bound). Queries: times the key
 * scale of their group (qkscale), then quantised per (token, head): qs = max|q| / qmax (or 1),
 * qi = round(q / qs), f = qs * fmul. Outputs qi (B, nh, T, hs), f (B, nh, T), ki, vi (B, nkv, T, hs). */
MULTIVERSION512
void qkv_post(const double *h, int64_t B, int64_t T, int64_t nh, int64_t nkv, int64_t hs,
              const int64_t *qpos, const double *cos, const double *sin, const double *kscale,
              const double *vscale, const double *qkscale, double lim, double qmax, double fmul,
              double *qi, double *f, double *ki, double *vi) {
    int64_t width = (nh + 2 * nkv) * hs, half = hs / 2;
    double *q = malloc(sizeof(double) * hs);
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            const double *row = h + (b * T + t) * width;
            const double *c = cos + qpos[b * T + t] * half, *sn = sin + qpos[b * T + t] * half;
            for (int64_t j = 0; j < nh + nkv; j++) {         /* query heads, then key heads */
                const double *x = row + j * hs;
                int is_q = j < nh;
                const double *sc = is_q ? qkscale + j * hs : kscale + (j - nh) * hs;
                for (int64_t i = 0; i < half; i++) {
                    double a = x[2 * i], bb = x[2 * i + 1];
                    double ra = a * c[i] - bb * sn[i];
                    double rb = a * sn[i] + bb * c[i];
                    if (is_q) {
                        q[2 * i] = ra * sc[2 * i];
                        q[2 * i + 1] = rb * sc[2 * i + 1];
                    } else {
                        q[2 * i] = MIN(MAX(round_even(ra / sc[2 * i]), -lim), lim);
                        q[2 * i + 1] = MIN(MAX(round_even(rb / sc[2 * i + 1]), -lim), lim);
                    }
                }
                if (is_q) {
                    double m = 0;
                    for (int64_t i = 0; i < hs; i++) m = MAX(m, fabs(q[i]));
                    double qs = m > 0 ? m / qmax : 1.0;
                    int64_t r = (b * nh + j) * T + t;
                    for (int64_t i = 0; i < hs; i++) qi[r * hs + i] = round_even(q[i] / qs);
                    f[r] = qs * fmul;
                } else {
                    int64_t r = (b * nkv + j - nh) * T + t;
                    for (int64_t i = 0; i < hs; i++) ki[r * hs + i] = q[i];
                }
            }
            for (int64_t j = 0; j < nkv; j++) {
                const double *x = row + (nh + nkv + j) * hs, *sc = vscale + j * hs;
                int64_t r = (b * nkv + j) * T + t;
                for (int64_t i = 0; i < hs; i++)
                    vi[r * hs + i] = MIN(MAX(round_even(x[i] / sc[i]), -lim), lim);
            }
        }
    free(q);
}

/* Attention weights from integer scores, in place (engine._softmax_weights). s is (B, G, Tq, Tk),
 * G = nkv * g query heads grouped under their key/value heads; query t of row b sits at position
 * qpos[b, t] and sees keys 0..qpos[b, t]. Visible: d = -(s - max), i = min(round(d * f[r]), ntab - 1),
 * p = table[i]; hidden keys get 0 (the table's last entry). l[r] = sum of the row (exact).
 * Clamping before rounding gives the same index (round is monotone, ntab - 1 an integer), keeps
 * the argument of round_even below 2^51 and, as MIN rather than a branch, costs no mispredictions
 * (softmax_digits 0.43 -> 0.31 s per 1024 tokens). */
void softmax_weights(double *s, int64_t B, int64_t G, int64_t Tq, int64_t Tk, const int64_t *qpos,
                     const double *f, const double *table, int64_t ntab, double *l) {
    double last = (double)(ntab - 1);
    for (int64_t r = 0; r < B * G * Tq; r++) {
        double *sr = s + r * Tk;
        int64_t b = r / (G * Tq), t = r % Tq;
        int64_t vis = MIN(qpos[b * Tq + t] + 1, Tk);
        double m = -INFINITY;
        for (int64_t k = 0; k < vis; k++) m = MAX(m, sr[k]);
        double fr = f[r], sum = 0;
        for (int64_t k = 0; k < vis; k++) {
            double v = -(sr[k] - m) * fr;
            double p = table[(int32_t)round_even(MIN(v, last))];
            sr[k] = p;
            sum += p;
        }
        for (int64_t k = vis; k < Tk; k++) sr[k] = 0;
        l[r] = sum;
    }
}

/* Attention output (engine._attn_out): o (B, nkv, g, Tq, hs) integer P.V sums -> out rows
 * t0..t0+Tq-1 of (B, T, nh * hs), head kv * g + j: o * vscale[kv] / l. */
void attn_out(const double *o, int64_t B, int64_t nkv, int64_t g, int64_t Tq, int64_t hs,
              const double *vscale, const double *l, double *out, int64_t T, int64_t t0) {
    int64_t nh = nkv * g;
    for (int64_t b = 0; b < B; b++)
        for (int64_t kv = 0; kv < nkv; kv++)
            for (int64_t j = 0; j < g; j++)
                for (int64_t t = 0; t < Tq; t++) {
                    int64_t r = ((b * nkv + kv) * g + j) * Tq + t;
                    const double *orow = o + r * hs, *vs = vscale + kv * hs;
                    double *dst = out + ((b * T + t0 + t) * nh + kv * g + j) * hs;
                    for (int64_t c = 0; c < hs; c++) dst[c] = orow[c] * vs[c] / l[r];
                }
}

/* ---- attention on int8 digit GEMMs (engine.FusedOps.attend) ----------------------------------------
 * The same exact integers as the float64 GEMMs. Keys and values |x| <= 2^14 are balanced base-2^8
 * digits x = 256 x1 + x0 (x0 in [-128, 127], |x1| <= 64); weights 0 <= p <= 2^13 are base-2^7
 * digits p = 128 p1 + p0 (p0 in [0, 127], p1 <= 64); queries are int8 already. Every digit GEMM
 * sums < 127 * 128 * 4096 < 2^31 terms' worth in int32; recombined values are exact in int64. */

/* keys, values (BK, T, hs) integer-valued -> key digits (BK, T, 2, hs) (rows of the score GEMM's
 * second operand) and value digits (BK, 2, hs, T) (keys along the reduction axis of P.V). */
void split_kv(const double *keys, const double *values, int64_t BK, int64_t T, int64_t hs,
              int8_t *kd, int8_t *vd) {
    for (int64_t bk = 0; bk < BK; bk++)
        for (int64_t t = 0; t < T; t++)
            for (int64_t c = 0; c < hs; c++) {
                int32_t k = (int32_t)keys[(bk * T + t) * hs + c];
                int32_t v = (int32_t)values[(bk * T + t) * hs + c];
                int32_t k0 = ((k + 128) & 255) - 128, v0 = ((v + 128) & 255) - 128;
                int8_t *kdst = kd + ((bk * T + t) * 2) * hs + c;
                kdst[0] = (int8_t)k0;
                kdst[hs] = (int8_t)((k - k0) / 256);
                int8_t *vdst = vd + bk * 2 * hs * T + c * T + t;
                vdst[0] = (int8_t)v0;
                vdst[hs * T] = (int8_t)((v - v0) / 256);
            }
}

/* softmax_weights from score digits S (B, nkv, g*Tq, 2*Tk) int32 (column 2k + d: digit d of key k):
 * s = S[2k] + 256 S[2k+1], then as softmax_weights; the weights go out as digits
 * P (B, nkv, 2, g*Tq, Tk) int8, their row sums as l (B, nkv*g, Tq). Row (j, t) of group (b, kv)
 * is query head kv*g + j at block position t. */
MULTIVERSION
void softmax_digits(const int32_t *restrict S, int64_t B, int64_t nkv, int64_t g, int64_t Tq,
                    int64_t Tk, const int64_t *restrict qpos, const double *restrict f,
                    const int32_t *restrict table, int64_t ntab, int8_t *restrict P,
                    double *restrict l) {
    double last = (double)(ntab - 1);
    int64_t gT = g * Tq, plane = gT * Tk;
    int32_t *restrict s = malloc(sizeof(int32_t) * Tk);
    for (int64_t r = 0; r < B * nkv * gT; r++) {
        const int32_t *Sr = S + r * 2 * Tk;
        int64_t b = r / (nkv * gT), t = r % Tq, bk = r / gT, jt = r % gT;
        int8_t *restrict p0 = P + bk * 2 * plane + jt * Tk, *restrict p1 = p0 + plane;
        int64_t vis = MIN(qpos[b * Tq + t] + 1, Tk);
        /* |s| <= 127 * 2^14 * 64 = 2^27 and max - s <= 2^28: int32, and (double)(max - s) equals
         * the float64 path's -(s - max) exactly */
        int32_t m = INT32_MIN;
        for (int64_t k = 0; k < vis; k++) {
            s[k] = Sr[2 * k] + 256 * Sr[2 * k + 1];
            m = MAX(m, s[k]);
        }
        double fr = f[r];
        /* three simple loops instead of one: each vectorises (the table lookup as a gather with
         * AVX2); the weights overwrite the scores. p <= 2^13 and vis <= 2^13: the sum fits int32 */
        for (int64_t k = 0; k < vis; k++) {
            double v = MIN((double)(m - s[k]) * fr, last);   /* = clamp after rounding: last is an integer */
            s[k] = table[(int32_t)round_even(v)];
        }
        int32_t sum = 0;
        for (int64_t k = 0; k < vis; k++) sum += s[k];
        for (int64_t k = 0; k < vis; k++) {
            p0[k] = (int8_t)(s[k] & 127);
            p1[k] = (int8_t)(s[k] >> 7);
        }
        for (int64_t k = vis; k < Tk; k++) p0[k] = p1[k] = 0;
        l[r] = (double)sum;
    }
    free(s);
}

/* attn_out from the digit products O (B, nkv, 2 g Tq, 2 hs) int32 (row block a: weight digit,
 * column block d: value digit): o = sum 2^(7a + 8d) O[a, d], then o * vscale / l as attn_out. */
void attn_out_digits(const int32_t *O, int64_t B, int64_t nkv, int64_t g, int64_t Tq, int64_t hs,
                     const double *vscale, const double *l, double *out, int64_t T, int64_t t0) {
    int64_t nh = nkv * g, gT = g * Tq;
    for (int64_t bk = 0; bk < B * nkv; bk++) {
        int64_t b = bk / nkv, kv = bk % nkv;
        const int32_t *Ob = O + bk * 2 * gT * 2 * hs;
        const double *vs = vscale + kv * hs;
        for (int64_t jt = 0; jt < gT; jt++) {
            int64_t j = jt / Tq, t = jt % Tq, r = bk * gT + jt;
            const int32_t *lo = Ob + jt * 2 * hs, *hi = Ob + (gT + jt) * 2 * hs;
            double *dst = out + ((b * T + t0 + t) * nh + kv * g + j) * hs;
            for (int64_t c = 0; c < hs; c++) {
                int64_t o = (int64_t)lo[c] + 256 * (int64_t)lo[hs + c]
                          + 128 * ((int64_t)hi[c] + 256 * (int64_t)hi[hs + c]);
                dst[c] = (double)o * vs[c] / l[r];
            }
        }
    }
}

/* Attention of one query per row over the int16 KV cache (engine.FusedOps.attend when decoding).
 * The float64 GEMM form read 8 bytes per cached value and was memory-bound (a (3, 64) by (64, Tk)
 * product per row and head group: 7 GFLOP/s, 150 of 204 ms per step at batch 16, position 960);
 * here 2 bytes, with the same integers: scores q.k (|q| <= 127, |k| <= 2^14, hs <= 64: int32),
 * weights as softmax_weights, P.V sums of p * v, out = o * vscale / l as attn_out. qi (B, nh, hs)
 * integer-valued, f (B, nh), K and V (B, nkv, L, hs); row b sees cache positions 0..pos[b].
 * out (B, nh * hs).
 *
 * Two forms: attend_step_vnni (AVX-512 VNNI intrinsics, the 3 heads of a group in one pass; used
 * when the CPU has it) and attend_step_portable, whose inner loops run over contiguous memory
 * through restrict pointers so gcc vectorises them, compiled twice (target_clones: AVX2 and
 * baseline SSE2, picked at load time).
 * P.V is integer arithmetic: 0 <= p <= 2^P_BITS = 2^13 and |v| <= 2^14, so p * v fits int32; the
 * products accumulate in int32 lanes (8 per AVX2 op, against 4 doubles converted from int16 before)
 * while the chunk's weight sum stays <= PV_CHUNK_P (then |sum| <= 2^14 * 131071 < 2^31), and each
 * chunk is added into int64. Integer sums are exact in any order: o is the same integer as the
 * float64 form's, and so is every output bit. The float steps (weights, output) keep their order
 * and one rounding per operation (-ffp-contract=off; AVX2 does not imply FMA). */
#define PV_CHUNK_P 131071

static inline int32_t dot16(const int16_t *restrict q, const int16_t *restrict k, int64_t hs) {
    int32_t acc = 0;
    for (int64_t c = 0; c < hs; c++) acc += (int32_t)q[c] * (int32_t)k[c];
    return acc;
}

static inline void axpy16(int32_t *restrict o, int32_t p, const int16_t *restrict v, int64_t hs) {
    for (int64_t c = 0; c < hs; c++) o[c] += p * (int32_t)v[c];
}

static inline void flush32(int64_t *restrict o64, int32_t *restrict o32, int64_t hs) {
    for (int64_t c = 0; c < hs; c++) {
        o64[c] += o32[c];
        o32[c] = 0;
    }
}

/* The portable form: one query head at a time, gcc-vectorised loops (AVX2 clone and baseline). */
MULTIVERSION
static void attend_step_portable(const double *restrict qi, const double *restrict f,
                                 const int16_t *restrict K, const int16_t *restrict V, int64_t B,
                                 int64_t nkv, int64_t g, int64_t L, int64_t hs,
                                 const int64_t *restrict pos, const int32_t *restrict table,
                                 int64_t ntab, const double *restrict vscale,
                                 double *restrict out) {
    double last = (double)(ntab - 1);
    int32_t *restrict s = malloc(sizeof(int32_t) * L);
    int32_t *restrict p = malloc(sizeof(int32_t) * L);
    int16_t *restrict q = malloc(sizeof(int16_t) * hs);  /* int16 x int16 -> int32: pmaddwd */
    int32_t *restrict o32 = malloc(sizeof(int32_t) * hs);
    int64_t *restrict o64 = malloc(sizeof(int64_t) * hs);
    for (int64_t b = 0; b < B; b++)
        for (int64_t kv = 0; kv < nkv; kv++) {
            const int16_t *Kb = K + (b * nkv + kv) * L * hs, *Vb = V + (b * nkv + kv) * L * hs;
            const double *vs = vscale + kv * hs;
            int64_t Tk = MIN(pos[b] + 1, L);
            for (int64_t j = 0; j < g; j++) {
                int64_t h = kv * g + j, r = b * nkv * g + h;
                for (int64_t c = 0; c < hs; c++) q[c] = (int16_t)qi[r * hs + c];
                int32_t m = INT32_MIN;
                for (int64_t k = 0; k < Tk; k++) s[k] = dot16(q, Kb + k * hs, hs);
                for (int64_t k = 0; k < Tk; k++) m = MAX(m, s[k]);
                double fr = f[r];
                int64_t l = 0;
                for (int64_t k = 0; k < Tk; k++) {
                    p[k] = table[(int32_t)round_even(MIN((double)(m - s[k]) * fr, last))];
                    l += p[k];
                }
                for (int64_t c = 0; c < hs; c++) o32[c] = 0, o64[c] = 0;
                int32_t chunk = 0;
                for (int64_t k = 0; k < Tk; k++) {
                    int32_t pk = p[k];
                    if (pk == 0) continue;                    /* most keys: nothing to add */
                    if (chunk > PV_CHUNK_P - pk) {
                        flush32(o64, o32, hs);
                        chunk = 0;
                    }
                    chunk += pk;
                    axpy16(o32, pk, Vb + k * hs, hs);
                }
                flush32(o64, o32, hs);
                double *dst = out + r * hs, dl = (double)l;
                for (int64_t c = 0; c < hs; c++) dst[c] = (double)o64[c] * vs[c] / dl;
            }
        }
    free(s); free(p); free(q); free(o32); free(o64);
}

#ifdef HAVE_VNNI
/* The AVX-512 VNNI form (vpdpwssd: 32 int16 x int16 products summed in pairs into 16 int32 lanes,
 * wrapping, i.e. exact whenever the true sum fits int32). The g query heads of a KV group share
 * one pass over the keys and one over the values, and the blocks of 16 value rows whose weight is
 * 0 in every head are not read (at late positions decoding reads the whole cache: 64 rows at
 * position 960 read 1.4 GB per step, 2.1 ms per layer ~ 22 GB/s).
 *   scores: per key, hs/32 vpdpwssd per head (|q| <= 127, |k| <= 2^14: |s| <= 2^27), then 16 keys'
 *     vectors are summed across lanes in a tree (hsum16);
 *   weights: as the portable form, 16 keys at a time: (double)(m - s) * f, min(., last),
 *     round_even, and a masked gather from the int32 table for the indices below `last` (the
 *     others are table[last] = 0), skipped when no lane is visible;
 *   P.V: keys in pairs (unpacklo/hi_epi16 interleaves the two value rows), the pair's weights
 *     (<= 2^13: int16) broadcast as one int32, one vpdpwssd per 16 channels; int32 lanes flushed
 *     to int64 before any head's chunk weight sum could pass PV_CHUNK_P (|lane| <= 2^14 * 131071
 *     < 2^31, the portable form's bound). unpack works within 128-bit lanes: lane 4L + i of the
 *     lo (hi) accumulator of channels 32c.. is channel 32c + 8L + i (+ 4).
 * Every integer equals the portable form's (integer sums are exact in any order), and the float
 * steps are the same IEEE operations in the same order: the outputs are the same bits
 * (tests/test_engine.py compares the two on random inputs at the bounds). */
/* acc + pairwise products in place. gcc 12 compiles _mm512_dpwssd_epi32 in unrolled loops with a
 * register copy and a stack store per accumulator and instruction (per 1024
 * tokens: encoding attention 0.30 -> 0.23 s); the asm keeps the accumulator in its register.
 * Same instruction, same result. */
VNNI_TARGET static inline __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}

#define GMAX 4
#define NCMAX 4

VNNI_TARGET static inline __m512i hsum16(const __m512i *v) {
    __m512i t[8], u[4], r[2];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        u[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * i], t[2 * i + 1]),
                                _mm512_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        r[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_i32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(r[0], r[1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(r[0], r[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* One (row, KV head) group: g heads, hs = 32 nc channels; qi, f, out at the group's first head.
 * Scratch s, p: g * Lr int32, p16: g * Lr int16, any: Lr / 16, bsum: g * Lr / 16 int32 (Lr = L
 * rounded up to 16). Inlined with constant g, nc for the model's shape (the accumulators then
 * live in registers). */
VNNI_TARGET static inline __attribute__((always_inline)) void
attend_group_vnni(const double *restrict qi, const double *restrict f,
                  const int16_t *restrict Kb, const int16_t *restrict Vb, int64_t Tk, int64_t Lr,
                  const int g, const int nc, const int32_t *restrict table, double last,
                  const double *restrict vs, double *restrict out, int32_t *restrict s,
                  int32_t *restrict p, uint16_t *restrict any, int16_t *restrict p16,
                  int32_t *restrict bsum) {
    const int64_t hs = 32 * nc;
    int16_t qb[GMAX * 32 * NCMAX];
    for (int64_t i = 0; i < g * hs; i++) qb[i] = (int16_t)qi[i];
    __m512i qv[GMAX][NCMAX];
    for (int j = 0; j < g; j++)
        for (int c = 0; c < nc; c++) qv[j][c] = _mm512_loadu_si512(qb + j * hs + 32 * c);

    /* scores, 16 keys per block; keys past Tk score 0 and are masked below */
    const int64_t nblk = (Tk + 15) / 16;
    for (int64_t k0 = 0; k0 < Tk; k0 += 16) {
        int64_t n = MIN(16, Tk - k0);
        /* the cache comes from memory (1.4 GB per step at batch 64, position 960): ask for the
         * keys PF_DIST ahead. Per layer there: none 2.6 ms, keys 2.1 ms; prefetching each block's
         * values here too was slower (2.3 ms): they are prefetched in the P.V loop instead. */
        if (k0 + PF_DIST < Tk)
            for (int64_t i = 0; i < 16 * hs; i += 32)
                _mm_prefetch((const char *)(Kb + (k0 + PF_DIST) * hs + i), _MM_HINT_T0);
        for (int j = 0; j < g; j++) {
            __m512i a[16];
            for (int64_t i = 0; i < 16; i++) {
                __m512i acc = _mm512_setzero_si512();
                if (i < n) {   /* vpmaddwd: vpdpwssd onto 0 without zeroing a register */
                    acc = _mm512_madd_epi16(qv[j][0], _mm512_loadu_si512(Kb + (k0 + i) * hs));
                    for (int c = 1; c < nc; c++)
                        acc = dpwssd(
                            acc, qv[j][c], _mm512_loadu_si512(Kb + (k0 + i) * hs + 32 * c));
                }
                a[i] = acc;
            }
            _mm512_storeu_si512(s + j * Lr + k0, hsum16(a));
        }
    }
    const __mmask16 tail = (__mmask16)(0xffffu >> (16 * nblk - Tk));
    for (int64_t bl = 0; bl < nblk; bl++) any[bl] = 0;
    int32_t l[GMAX];
    const __m512d lastv = _mm512_set1_pd(last), magic = _mm512_set1_pd(6755399441055744.0);
    const __m512i lasti = _mm512_set1_epi32((int32_t)last);
    for (int j = 0; j < g; j++) {
        const int32_t *sj = s + j * Lr;
        int32_t *pj = p + j * Lr;
        __m512i mv = _mm512_set1_epi32(INT32_MIN);
        for (int64_t bl = 0; bl < nblk; bl++) {
            __mmask16 vis = bl == nblk - 1 ? tail : 0xffff;
            mv = _mm512_mask_max_epi32(mv, vis, mv, _mm512_loadu_si512(sj + 16 * bl));
        }
        const __m512i m = _mm512_set1_epi32(_mm512_reduce_max_epi32(mv));
        const __m512d fr = _mm512_set1_pd(f[j]);
        __m512i lsum = _mm512_setzero_si512();
        for (int64_t bl = 0; bl < nblk; bl++) {
            __mmask16 vis = bl == nblk - 1 ? tail : 0xffff;
            __m512i d = _mm512_sub_epi32(m, _mm512_loadu_si512(sj + 16 * bl)); /* <= 2^28 */
            __m512d v0 = _mm512_cvtepi32_pd(_mm512_castsi512_si256(d));
            __m512d v1 = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(d, 1));
            v0 = _mm512_min_pd(_mm512_mul_pd(v0, fr), lastv);   /* MIN(v, last): v is no NaN */
            v1 = _mm512_min_pd(_mm512_mul_pd(v1, fr), lastv);
            v0 = _mm512_sub_pd(_mm512_add_pd(v0, magic), magic); /* round_even */
            v1 = _mm512_sub_pd(_mm512_add_pd(v1, magic), magic);
            __m512i ix = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtpd_epi32(v0)),
                                            _mm512_cvtpd_epi32(v1), 1);   /* integral: exact */
            __mmask16 nz = _mm512_mask_cmpneq_epi32_mask(vis, ix, lasti);
            __m512i pv = _mm512_setzero_si512();
            if (nz) pv = _mm512_mask_i32gather_epi32(pv, nz, ix, table, 4);
            _mm512_storeu_si512(pj + 16 * bl, pv);
            _mm256_storeu_si256((__m256i *)(p16 + j * Lr + 16 * bl), _mm512_cvtepi32_epi16(pv));
            lsum = _mm512_add_epi32(lsum, pv);   /* <= 2^13 * 2^12 / 16 per lane */
            any[bl] |= nz;
        }
        l[j] = _mm512_reduce_add_epi32(lsum);
        /* each block's weight sum (<= 16 * 2^13), 16 blocks per lane-sum tree */
        for (int64_t bl = 0; bl < nblk; bl += 16) {
            __m512i blk[16];
            int32_t sums[16];
            for (int i = 0; i < 16; i++)
                blk[i] = bl + i < nblk ? _mm512_loadu_si512(pj + 16 * (bl + i)) : _mm512_setzero_si512();
            _mm512_storeu_si512(sums, hsum16(blk));
            for (int i = 0; i < 16 && bl + i < nblk; i++) bsum[j * (Lr / 16) + bl + i] = sums[i];
        }
    }

    /* P.V over the 16-key blocks some head weighs, in key pairs (2i, 2i+1): their weights are
     * adjacent int16 in p16, one int32 broadcast per head. Before a block that could take some
     * head's chunk past PV_CHUNK_P the int32 lanes go to int64; a block's sum is at most
     * 16 * 2^13 = PV_CHUNK_P + 1, and then (all 16 weights 2^13) it is also flushed after 8 keys
     * and the chunk counts their bound 2^16. In the last block a pair's second row past Tk (weight
     * 0) is read as the first, so no row past the cache is touched. */
    __m512i acc[GMAX][2 * NCMAX];
    int64_t o64[GMAX][2 * NCMAX][16];
    int32_t chunk[GMAX];
    for (int j = 0; j < g; j++) {
        chunk[j] = 0;
        for (int c = 0; c < 2 * nc; c++) {
            acc[j][c] = _mm512_setzero_si512();
            for (int i = 0; i < 16; i++) o64[j][c][i] = 0;
        }
    }
#define FLUSH()                                                                                    \
    for (int j = 0; j < g; j++) {                                                                  \
        for (int c = 0; c < 2 * nc; c++) {                                                         \
            __m512i x0 = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc[j][c]));                 \
            __m512i x1 = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc[j][c], 1));           \
            _mm512_storeu_si512(o64[j][c], _mm512_add_epi64(_mm512_loadu_si512(o64[j][c]), x0));    \
            _mm512_storeu_si512(o64[j][c] + 8,                                                     \
                                _mm512_add_epi64(_mm512_loadu_si512(o64[j][c] + 8), x1));          \
            acc[j][c] = _mm512_setzero_si512();                                                    \
        }                                                                                          \
    }
    /* the values come from memory too: prefetch PF_DIST keys ahead here, where they are read
     * (per layer at batch 64, position 960: 2.27 -> 2.09 ms, medians of 6) */
    for (int64_t i = 0; i < MIN(PF_DIST, Tk) * hs; i += 32)
        _mm_prefetch((const char *)(Vb + i), _MM_HINT_T0);
    for (int64_t bl = 0; bl < nblk; bl++) {
        if (16 * bl + 16 + PF_DIST <= Tk)
            for (int64_t i = 0; i < 16 * hs; i += 32)
                _mm_prefetch((const char *)(Vb + (16 * bl + PF_DIST) * hs + i), _MM_HINT_T0);
        if (!any[bl]) continue;
        int full = 0, split = 0;
        for (int j = 0; j < g; j++) {
            int32_t w = bsum[j * (Lr / 16) + bl];
            full |= chunk[j] > PV_CHUNK_P - w;
            split |= w > PV_CHUNK_P;
        }
        if (full) {
            FLUSH();
            for (int j = 0; j < g; j++) chunk[j] = 0;
        }
        int64_t kend = MIN(16 * bl + 16, Tk);
        for (int64_t ka = 16 * bl; ka < kend; ka += 2) {
            if (split && ka == 16 * bl + 8) FLUSH();
            int64_t kb = ka + 1 < Tk ? ka + 1 : ka;
            for (int c = 0; c < nc; c++) {
                __m512i va = _mm512_loadu_si512(Vb + ka * hs + 32 * c);
                __m512i vb = _mm512_loadu_si512(Vb + kb * hs + 32 * c);
                __m512i lo = _mm512_unpacklo_epi16(va, vb), hi = _mm512_unpackhi_epi16(va, vb);
                for (int j = 0; j < g; j++) {
                    int32_t w;
                    __builtin_memcpy(&w, p16 + j * Lr + ka, 4);   /* p[ka] | p[ka + 1] << 16 */
                    __m512i wj = _mm512_set1_epi32(w);
                    acc[j][2 * c] = dpwssd(acc[j][2 * c], lo, wj);
                    acc[j][2 * c + 1] = dpwssd(acc[j][2 * c + 1], hi, wj);
                }
            }
        }
        for (int j = 0; j < g; j++) chunk[j] = split ? 65536 : chunk[j] + bsum[j * (Lr / 16) + bl];
    }
    FLUSH();
#undef FLUSH
    for (int j = 0; j < g; j++) {
        double *dst = out + j * hs, dl = (double)l[j];
        for (int c = 0; c < 2 * nc; c++)
            for (int i = 0; i < 16; i++) {
                int64_t ch = 32 * (c / 2) + 8 * (i / 4) + 4 * (c % 2) + i % 4;
                dst[ch] = (double)o64[j][c][i] * vs[ch] / dl;
            }
    }
}

VNNI_TARGET static void attend_step_vnni(const double *restrict qi, const double *restrict f,
                                         const int16_t *restrict K, const int16_t *restrict V,
                                         int64_t B, int64_t nkv, int64_t g, int64_t L, int64_t hs,
                                         const int64_t *restrict pos,
                                         const int32_t *restrict table, int64_t ntab,
                                         const double *restrict vscale, double *restrict out) {
    int64_t Lr = (L + 15) / 16 * 16;
    int32_t *s = malloc(sizeof(int32_t) * g * Lr), *p = malloc(sizeof(int32_t) * g * Lr);
    int16_t *p16 = malloc(sizeof(int16_t) * g * Lr);
    int32_t *bsum = malloc(sizeof(int32_t) * g * (Lr / 16));
    uint16_t *any = malloc(sizeof(uint16_t) * (Lr / 16));
    double last = (double)(ntab - 1);
    for (int64_t b = 0; b < B; b++)
        for (int64_t kv = 0; kv < nkv; kv++) {
            const int16_t *Kb = K + (b * nkv + kv) * L * hs, *Vb = V + (b * nkv + kv) * L * hs;
            int64_t Tk = MIN(pos[b] + 1, L), r = (b * nkv + kv) * g;
            const double *q = qi + r * hs, *fr = f + r, *vs = vscale + kv * hs;
            double *o = out + r * hs;
            if (g == 3 && hs == 64)
                attend_group_vnni(q, fr, Kb, Vb, Tk, Lr, 3, 2, table, last, vs, o, s, p, any, p16,
                                  bsum);
            else
                attend_group_vnni(q, fr, Kb, Vb, Tk, Lr, (int)g, (int)(hs / 32), table, last, vs, o,
                                  s, p, any, p16, bsum);
        }
    free(s); free(p); free(p16); free(bsum); free(any);
}
#endif

#ifdef HAVE_AVX2_KERNELS
/* The AVX2 form of attend_step (CPUs without AVX-512 VNNI), as attend_group_vnni with 8 int32
 * lanes: the g query heads of a KV group share one pass over the keys' scores and one over the
 * values per 16 channels, and 8-key blocks that no head weighs are not read.
 *   scores: per key, hs/16 vpmaddwd + vpaddd per head (|q| <= 127, |k| <= 2^14: pair sums and
 *     |s| <= 2^27 in int32), then 8 keys' vectors summed across lanes in a tree (hsum8x8);
 *   weights: the portable form's operations 8 keys at a time ((double)(m - s) * f, min(., last),
 *     round_even, an index into the int32 table, gathered for the visible keys whose index is not
 *     `last` and table[last] for the others: the portable form's p[k] in every case), into int16
 *     (p <= 2^13) with keys past Tk 0, and per 8 keys their sum (<= 8 * 2^13 = 65536);
 *   P.V: keys in pairs (unpacklo/hi_epi16 interleaves two value rows), the pair's weights as one
 *     int32 broadcast per head, one vpmaddwd + vpaddd per 8 channels; before an 8-key block that
 *     could take some head's chunk weight sum past PV_CHUNK_P the int32 lanes are added into
 *     int64, so |lane| <= 2^14 * 131071 < 2^31 (the portable form's bound; a block's sum alone is
 *     below PV_CHUNK_P). unpack works within 128-bit lanes: lane 4L + i of the lo (hi) accumulator
 *     of channels 16c.. is channel 16c + 8L + i (+ 4).
 * Integer sums are exact in any order and the float steps are the portable form's IEEE operations
 * in its order: the same bits (tests/test_engine.py compares them). */
#define GMAX2 4
#define NYMAX 8   /* hs <= 128: 8 ymm of 16 int16 */

AVX2_TARGET static inline __m256i hsum8x8(const __m256i *v) {
    __m256i u0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    __m256i u1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    /* u0: [v0..v3 lanes 0-3 | v0..v3 lanes 4-7], u1 the same for v4..v7 */
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20),
                            _mm256_permute2x128_si256(u0, u1, 0x31));
}

AVX2_TARGET static inline int32_t hsum_epi32(__m256i v) {
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    t = _mm_hadd_epi32(t, t);
    t = _mm_hadd_epi32(t, t);
    return _mm_cvtsi128_si32(t);
}

/* One (row, KV head) group: g heads, hs = 16 ny channels; qi, f, out at the group's first head.
 * Scratch s: g * Lr int32, p16: g * Lr int16, bsum: g * Lr / 8 int32, any: Lr / 8 (Lr = L rounded
 * up to 8). Inlined with constant g, ny for the model's shape. */
AVX2_TARGET static inline __attribute__((always_inline)) void
attend_group_avx2(const double *restrict qi, const double *restrict f,
                  const int16_t *restrict Kb, const int16_t *restrict Vb, int64_t Tk, int64_t Lr,
                  const int g, const int ny, const int32_t *restrict table, int64_t ntab,
                  const double *restrict vs, double *restrict out, int32_t *restrict s,
                  int16_t *restrict p16, int32_t *restrict bsum, uint8_t *restrict any) {
    const int64_t hs = 16 * ny, nb = Lr / 8;
    int16_t qb[GMAX2 * 16 * NYMAX];
    for (int64_t i = 0; i < g * hs; i++) qb[i] = (int16_t)qi[i];

    /* scores, 8 keys per block; keys past Tk score 0 and are masked below. The cache comes from
     * memory (decoding reads all of it every step): keys are asked for PF_DIST ahead, as in the
     * VNNI form, and the first PF_DIST keys' values before the weights */
    const int64_t nblk = (Tk + 7) / 8;
    for (int64_t k0 = 0; k0 < Tk; k0 += 8) {
        int64_t n = MIN(8, Tk - k0);
        if (k0 + PF_DIST < Tk)
            for (int64_t i = 0; i < 8 * hs; i += 32)
                _mm_prefetch((const char *)(Kb + (k0 + PF_DIST) * hs + i), _MM_HINT_T0);
        for (int j = 0; j < g; j++) {
            __m256i a[8];
            for (int64_t i = 0; i < 8; i++) {
                __m256i acc = _mm256_setzero_si256();
                if (i < n)
                    for (int c = 0; c < ny; c++)
                        acc = _mm256_add_epi32(
                            acc, _mm256_madd_epi16(
                                     _mm256_loadu_si256((const __m256i *)(qb + j * hs + 16 * c)),
                                     _mm256_loadu_si256((const __m256i *)(Kb + (k0 + i) * hs + 16 * c))));
                a[i] = acc;
            }
            _mm256_storeu_si256((__m256i *)(s + j * Lr + k0), hsum8x8(a));
        }
    }

    for (int64_t i = 0; i < MIN(PF_DIST, Tk) * hs; i += 32)
        _mm_prefetch((const char *)(Vb + i), _MM_HINT_T0);

    /* weights */
    for (int64_t bl = 0; bl < nblk; bl++) any[bl] = 0;
    int64_t l[GMAX2];
    const double last = (double)(ntab - 1);
    const __m256d lastv = _mm256_set1_pd(last), magic = _mm256_set1_pd(6755399441055744.0);
    const __m256i lasti = _mm256_set1_epi32((int32_t)last), tlast = _mm256_set1_epi32(table[ntab - 1]);
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int j = 0; j < g; j++) {
        const int32_t *sj = s + j * Lr;
        int32_t m = INT32_MIN;
        for (int64_t k = 0; k < Tk; k++) m = MAX(m, sj[k]);
        const __m256i mv = _mm256_set1_epi32(m);
        const __m256d fr = _mm256_set1_pd(f[j]);
        __m256i lsum = _mm256_setzero_si256();
        for (int64_t bl = 0; bl < nblk; bl++) {
            const int64_t k0 = 8 * bl;
            __m256i vis = _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)MIN(8, Tk - k0)), iota);
            __m256i d = _mm256_sub_epi32(mv, _mm256_loadu_si256((const __m256i *)(sj + k0)));
            __m256d v0 = _mm256_cvtepi32_pd(_mm256_castsi256_si128(d));
            __m256d v1 = _mm256_cvtepi32_pd(_mm256_extracti128_si256(d, 1));
            v0 = _mm256_min_pd(_mm256_mul_pd(v0, fr), lastv);   /* MIN(v, last): v is no NaN */
            v1 = _mm256_min_pd(_mm256_mul_pd(v1, fr), lastv);
            v0 = _mm256_sub_pd(_mm256_add_pd(v0, magic), magic); /* round_even */
            v1 = _mm256_sub_pd(_mm256_add_pd(v1, magic), magic);
            __m256i ix = _mm256_set_m128i(_mm256_cvtpd_epi32(v1), _mm256_cvtpd_epi32(v0)); /* exact */
            __m256i nz = _mm256_andnot_si256(_mm256_cmpeq_epi32(ix, lasti), vis);
            __m256i pv = _mm256_and_si256(vis, tlast);
            if (!_mm256_testz_si256(nz, nz))
                pv = _mm256_mask_i32gather_epi32(pv, (const int *)table, ix, nz, 4);
            __m256i p2 = _mm256_permute4x64_epi64(_mm256_packs_epi32(pv, pv), 0x08); /* <= 2^13 */
            _mm_storeu_si128((__m128i *)(p16 + j * Lr + k0), _mm256_castsi256_si128(p2));
            lsum = _mm256_add_epi32(lsum, pv);   /* <= 2^13 * Tk / 8 per lane */
            bsum[j * nb + bl] = hsum_epi32(pv);
            any[bl] |= !_mm256_testz_si256(pv, pv);
        }
        l[j] = hsum_epi32(lsum);
    }

    /* P.V, 16 channels per pass over the weighed blocks. In the last block a pair's second row
     * past Tk (weight 0) is read as the first, so no row past the cache is touched. */
    for (int c = 0; c < ny; c++) {
        __m256i acc[GMAX2][2];
        int64_t o64[GMAX2][2][8];
        int32_t chunk[GMAX2];
        for (int j = 0; j < g; j++) {
            chunk[j] = 0;
            acc[j][0] = acc[j][1] = _mm256_setzero_si256();
            for (int i = 0; i < 8; i++) o64[j][0][i] = o64[j][1][i] = 0;
        }
#define FLUSH8()                                                                                   \
    for (int j = 0; j < g; j++)                                                                    \
        for (int h = 0; h < 2; h++) {                                                              \
            int32_t t[8];                                                                          \
            _mm256_storeu_si256((__m256i *)t, acc[j][h]);                                          \
            for (int i = 0; i < 8; i++) o64[j][h][i] += t[i];                                      \
            acc[j][h] = _mm256_setzero_si256();                                                    \
        }
        for (int64_t bl = 0; bl < nblk; bl++) {
            if (c == 0 && 8 * bl + 8 + PF_DIST <= Tk)   /* the first pass reads the rows' lines */
                for (int64_t i = 0; i < 8 * hs; i += 32)
                    _mm_prefetch((const char *)(Vb + (8 * bl + PF_DIST) * hs + i), _MM_HINT_T0);
            if (!any[bl]) continue;
            int full = 0;
            for (int j = 0; j < g; j++) full |= chunk[j] > PV_CHUNK_P - bsum[j * nb + bl];
            if (full) {
                FLUSH8();
                for (int j = 0; j < g; j++) chunk[j] = 0;
            }
            int64_t kend = MIN(8 * bl + 8, Tk);
            for (int64_t ka = 8 * bl; ka < kend; ka += 2) {
                int64_t kb = ka + 1 < Tk ? ka + 1 : ka;
                __m256i va = _mm256_loadu_si256((const __m256i *)(Vb + ka * hs + 16 * c));
                __m256i vb = _mm256_loadu_si256((const __m256i *)(Vb + kb * hs + 16 * c));
                __m256i lo = _mm256_unpacklo_epi16(va, vb), hi = _mm256_unpackhi_epi16(va, vb);
                for (int j = 0; j < g; j++) {
                    int32_t w;
                    __builtin_memcpy(&w, p16 + j * Lr + ka, 4);   /* p[ka] | p[ka + 1] << 16 */
                    __m256i wj = _mm256_set1_epi32(w);
                    acc[j][0] = _mm256_add_epi32(acc[j][0], _mm256_madd_epi16(lo, wj));
                    acc[j][1] = _mm256_add_epi32(acc[j][1], _mm256_madd_epi16(hi, wj));
                }
            }
            for (int j = 0; j < g; j++) chunk[j] += bsum[j * nb + bl];
        }
        FLUSH8();
#undef FLUSH8
        for (int j = 0; j < g; j++) {
            double *dst = out + j * hs, dl = (double)l[j];
            for (int h = 0; h < 2; h++)
                for (int i = 0; i < 8; i++) {
                    int64_t ch = 16 * c + 8 * (i / 4) + 4 * h + i % 4;
                    dst[ch] = (double)o64[j][h][i] * vs[ch] / dl;
                }
        }
    }
}

AVX2_TARGET static void attend_step_avx2(const double *restrict qi, const double *restrict f,
                                         const int16_t *restrict K, const int16_t *restrict V,
                                         int64_t B, int64_t nkv, int64_t g, int64_t L, int64_t hs,
                                         const int64_t *restrict pos,
                                         const int32_t *restrict table, int64_t ntab,
                                         const double *restrict vscale, double *restrict out) {
    int64_t Lr = (L + 7) / 8 * 8;
    int32_t *s = malloc(sizeof(int32_t) * g * Lr), *bsum = malloc(sizeof(int32_t) * g * (Lr / 8));
    int16_t *p16 = malloc(sizeof(int16_t) * g * Lr);
    uint8_t *any = malloc(Lr / 8);
    for (int64_t b = 0; b < B; b++)
        for (int64_t kv = 0; kv < nkv; kv++) {
            const int16_t *Kb = K + (b * nkv + kv) * L * hs, *Vb = V + (b * nkv + kv) * L * hs;
            int64_t Tk = MIN(pos[b] + 1, L), r = (b * nkv + kv) * g;
            const double *q = qi + r * hs, *fr = f + r, *vs = vscale + kv * hs;
            double *o = out + r * hs;
            if (g == 3 && hs == 64)
                attend_group_avx2(q, fr, Kb, Vb, Tk, Lr, 3, 4, table, ntab, vs, o, s, p16, bsum, any);
            else
                attend_group_avx2(q, fr, Kb, Vb, Tk, Lr, (int)g, (int)(hs / 16), table, ntab, vs, o,
                                  s, p16, bsum, any);
        }
    free(s); free(bsum); free(p16); free(any);
}
#endif

#ifdef HAVE_VNNI
/* ---- int8 GEMM for decoding's few rows (engine.Engine._matmul) ------------------------------------
 * C (M, N) int32 = A (M, K) int8 @ W (N, K)^T, exact, with W packed once (engine: pack_weight) as
 * unsigned bytes W + 128 in panels of 16 columns, [N / 16][K / 4][16][4]: one 64-byte row per 4 k
 * holds 16 columns' 4 consecutive k. vpdpbusd multiplies unsigned bytes (the packed weight) by
 * signed ones (4 bytes of a row of A broadcast from memory) and adds the 4 products to each int32
 * lane; then C = acc - 128 * rowsum(A). |A| <= 128, W + 128 <= 255: |acc| <= 255 * 128 * K < 2^31
 * for K < 65,793 (checked by the caller), so the wrapping int32 adds are exact, and C is the same
 * integer as torch._int_mm's (tests compare them). Why: at decoding's 64-128 rows the weights come
 * from memory every step (135 MB), and torch._int_mm (oneDNN) reached 450-680 GOP/s there against
 * ~1000 on cached weights; this kernel reads the pre-packed panels as they are. */
VNNI_TARGET static inline __m512i dpbusd_b(__m512i acc, __m512i w, const int8_t *a) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const int32_t *)a));
    return acc;
}

/* rows m0.. (mr <= 8) x panels p0.. (np <= 3) of C; inlined with constants for the full block */
VNNI_TARGET static inline __attribute__((always_inline)) void
gemm_block(const int8_t *restrict A, int64_t K, const uint8_t *restrict Wp, int32_t *restrict C,
           int64_t N, const int32_t *restrict corr, int64_t m0, int64_t p0, const int mr,
           const int np, const int pf) {
    __m512i acc[8][3];
    for (int r = 0; r < mr; r++)
        for (int p = 0; p < np; p++) acc[r][p] = _mm512_setzero_si512();
    const uint8_t *w = Wp + p0 * 16 * K;
    const int8_t *a = A + m0 * K;
    for (int64_t k = 0; k < K; k += 4) {
        __m512i wv[3];
        for (int p = 0; p < np; p++) wv[p] = _mm512_loadu_si512(w + p * 16 * K + 16 * k);
        if (pf)   /* the first rows of a block: ask for the next block's panels (from memory) */
            for (int p = 0; p < 3; p++) _mm_prefetch((const char *)(w + (3 + p) * 16 * K + 16 * k), _MM_HINT_T0);
        for (int r = 0; r < mr; r++)
            for (int p = 0; p < np; p++) acc[r][p] = dpbusd_b(acc[r][p], wv[p], a + r * K + k);
    }
    for (int r = 0; r < mr; r++) {
        __m512i c = _mm512_set1_epi32(corr[m0 + r]);
        for (int p = 0; p < np; p++)
            _mm512_storeu_si512(C + (m0 + r) * N + (p0 + p) * 16, _mm512_sub_epi32(acc[r][p], c));
    }
}

/* panels [p_begin, p_end) of C for all M rows; corr[m] = 128 * rowsum(A[m]) */
VNNI_TARGET static void gemm_range_vnni(const int8_t *restrict A, int64_t M, int64_t K,
                                        const uint8_t *restrict Wp, int64_t N,
                                        int32_t *restrict C, const int32_t *restrict corr,
                                        int64_t p_begin, int64_t p_end) {
    for (int64_t p0 = p_begin; p0 < p_end; p0 += 3) {
        int np = (int)MIN(3, p_end - p0);
        int64_t m0 = 0;
        if (np == 3)
            for (; m0 + 8 <= M; m0 += 8)
                gemm_block(A, K, Wp, C, N, corr, m0, p0, 8, 3, m0 == 0 && p0 + 6 <= p_end);
        for (; m0 < M; m0 += 8) {
            int mr = (int)MIN(8, M - m0);
            gemm_block(A, K, Wp, C, N, corr, m0, p0, mr, np, 0);
        }
    }
}
#endif

#ifdef HAVE_AVX2_KERNELS
/* ---- the same GEMM with AVX2 only (CPUs without AVX-512 VNNI: AMD Zen 2/3, most Intel client
 * CPUs), on the same packed weights. vpmaddwd multiplies int16 pairs and adds each pair into an
 * int32 lane; it is exact here because both operands are widened bytes: W + 128 in 0..255
 * (zero-extended) and A in -128..127 (sign-extended once per call into A16), so a pair's sum is at
 * most 2 * 255 * 128 and never meets vpmaddwd's one overflow case (both products -32768^2).
 * (vpmaddubsw, the byte form, saturates its pair sums at int16 and would not be exact.)
 * 16 bytes of a panel's k-quad row are 4 columns x 4 consecutive k; widened to 16 int16 lanes and
 * multiplied with the row's 4 A values broadcast (one 64-bit load), lane 2c holds column c's
 * products of k, k+1 and lane 2c+1 those of k+2, k+3. Each lane sums K / 4 pairs: |lane| <=
 * 2 * 255 * 128 * K / 4, and the final pairwise add (hadd) gives acc, |acc| <= 255 * 128 * K <
 * 2^31 (K < 65,793), exact in wrapping int32 like the VNNI form; then C = acc - 128 * rowsum(A).
 *
 * Register blocking: a block is MR2 rows x 8 columns (half a panel: two 4-column groups), 12 int32
 * accumulators in ymm registers; per k-quad the two widened weight vectors are each used for MR2
 * rows and each row's broadcast for both groups, so the only port-5 shuffles are the two
 * widenings per 2 * MR2 vpmaddwd (vpbroadcastq from memory is a load). 12 accumulators + 2
 * weights + 1 broadcast + 1 product = the 16 ymm registers: a block of 3 rows x 16 columns (the
 * form before) needed 19 and the compiler kept 8 accumulators on the stack, loaded and stored on
 * every k-quad. The half panel's 32 bytes of each k-quad row are read in order (the other half on
 * the next pass, from L1: a panel is 16 x K bytes). */
#define MR2 6      /* rows per block */
#define ROWS_AVX2 48  /* rows of A16 per pass over the panels: 48 x K int16 stay in L2 */

/* A block's k loop, mr <= MR2 rows x 8 columns over nq k-quads: a rows at stride s int16 (already
 * at the first k), w the half panel (at the first k-quad); out[r][g] the 8 int32 lanes of group g;
 * each k-quad also prefetches the line pf bytes past its weights (the next panel's; 0: a no-op).
 * In assembly because gcc 12 hoists all of an iteration's broadcasts and products ahead of their
 * adds and then keeps accumulators on the stack (measured: 8 of 12 spilled and reloaded every
 * k-quad, also for the 5-row tail); here ymm0-11 hold the accumulators for the whole loop (row r in
 * ymm 2r, 2r+1), ymm12-13 the widened weights, ymm14 the broadcast row quad, ymm15 the product (the
 * reused temporaries are renamed by the CPU, so they serialise nothing). One asm statement per row
 * count, from the same pieces. */
#define K_ZERO(x, y) "vpxor %%xmm" #x ", %%xmm" #x ", %%xmm" #x "\n\tvpxor %%xmm" #y ", %%xmm" #y ", %%xmm" #y "\n\t"
#define K_ROW(mem, x, y)                                                                           \
    "vpbroadcastq " mem ", %%ymm14\n\t"                                                            \
    "vpmaddwd %%ymm14, %%ymm12, %%ymm15\n\t"                                                       \
    "vpaddd %%ymm15, %%ymm" #x ", %%ymm" #x "\n\t"                                                 \
    "vpmaddwd %%ymm14, %%ymm13, %%ymm15\n\t"                                                       \
    "vpaddd %%ymm15, %%ymm" #y ", %%ymm" #y "\n\t"
#define K_STORE(x, y, off) "vmovdqu %%ymm" #x ", " #off "(%[o])\n\tvmovdqu %%ymm" #y ", " #off "+32(%[o])\n\t"
/* rows 0-2 at a, a + s, a + 2s; rows 3-5 at a3 = a + 3s, a3 + s, a3 + 2s */
#define K_Z1 K_ZERO(0, 1)
#define K_Z2 K_Z1 K_ZERO(2, 3)
#define K_Z3 K_Z2 K_ZERO(4, 5)
#define K_Z4 K_Z3 K_ZERO(6, 7)
#define K_Z5 K_Z4 K_ZERO(8, 9)
#define K_Z6 K_Z5 K_ZERO(10, 11)
#define K_R1 K_ROW("(%[a])", 0, 1)
#define K_R2 K_R1 K_ROW("(%[a],%[sb])", 2, 3)
#define K_R3 K_R2 K_ROW("(%[a],%[sb],2)", 4, 5)
#define K_R4 K_R3 K_ROW("(%[a3])", 6, 7)
#define K_R5 K_R4 K_ROW("(%[a3],%[sb])", 8, 9)
#define K_R6 K_R5 K_ROW("(%[a3],%[sb],2)", 10, 11)
#define K_S1 K_STORE(0, 1, 0)
#define K_S2 K_S1 K_STORE(2, 3, 64)
#define K_S3 K_S2 K_STORE(4, 5, 128)
#define K_S4 K_S3 K_STORE(6, 7, 192)
#define K_S5 K_S4 K_STORE(8, 9, 256)
#define K_S6 K_S5 K_STORE(10, 11, 320)
#define K_LOOP(Z, R, S)                                                                            \
    __asm__ volatile("lea (%[a],%[sb],2), %[a3]\n\t"                                               \
                     "add %[sb], %[a3]\n\t" Z ".p2align 4\n"                                       \
                     "1:\n\t"                                                                      \
                     "vpmovzxbw (%[w]), %%ymm12\n\t"                                               \
                     "vpmovzxbw 16(%[w]), %%ymm13\n\t"                                           \
                     "prefetcht0 (%[w],%[pf])\n\t" R "add $64, %[w]\n\t"                           \
                     "add $8, %[a]\n\t"                                                            \
                     "add $8, %[a3]\n\t"                                                           \
                     "dec %[nq]\n\t"                                                               \
                     "jnz 1b\n\t" S                                                                \
                     : [a] "+r"(a), [a3] "=&r"(a3), [w] "+r"(w), [nq] "+r"(nq)                     \
                     : [sb] "r"(sb), [o] "r"(&out[0][0][0]), [pf] "r"(pf)                          \
                     : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",      \
                       "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory", "cc")
AVX2_TARGET static void kloop(const int16_t *a, int64_t s, const uint8_t *w, int64_t nq,
                              int32_t out[MR2][2][8], int mr, int64_t pf) {
    if (nq <= 0) {
        memset(out, 0, sizeof(int32_t) * MR2 * 2 * 8);
        return;
    }
    const int16_t *a3;
    int64_t sb = 2 * s; /* row stride in bytes */
    switch (mr) {
    case 6: K_LOOP(K_Z6, K_R6, K_S6); break;
    case 5: K_LOOP(K_Z5, K_R5, K_S5); break;
    case 4: K_LOOP(K_Z4, K_R4, K_S4); break;
    case 3: K_LOOP(K_Z3, K_R3, K_S3); break;
    case 2: K_LOOP(K_Z2, K_R2, K_S2); break;
    default: K_LOOP(K_Z1, K_R1, K_S1); break;
    }
}

AVX2_TARGET static inline __attribute__((always_inline)) void
gemm_block_avx2(const int16_t *restrict A16, int64_t K, const uint8_t *restrict w,
                int32_t *restrict C, int64_t N, const int32_t *restrict corr, int64_t m0,
                int64_t col0, const int mr, int64_t pf) {
    int32_t out[MR2][2][8];
    kloop(A16 + m0 * K, K, w, K / 4, out, mr, pf);
    for (int r = 0; r < mr; r++) {
        __m256i x = _mm256_loadu_si256((const __m256i *)out[r][0]);
        __m256i y = _mm256_loadu_si256((const __m256i *)out[r][1]);
        /* hadd: [c0 c1 c4 c5 | c2 c3 c6 c7]; qwords (0, 2, 1, 3): columns in order */
        __m256i v = _mm256_permute4x64_epi64(_mm256_hadd_epi32(x, y), 0xD8);
        _mm256_storeu_si256((__m256i *)(C + (m0 + r) * N + col0),
                            _mm256_sub_epi32(v, _mm256_set1_epi32(corr[m0 + r])));
    }
}

/* rows in blocks of ROWS_AVX2, each against panels [p_begin, p_end), each panel in two halves */
AVX2_TARGET static void gemm_range_avx2(const int16_t *restrict A16, int64_t M, int64_t K,
                                        const uint8_t *restrict Wp, int64_t N,
                                        int32_t *restrict C, const int32_t *restrict corr,
                                        int64_t p_begin, int64_t p_end) {
    for (int64_t mb = 0; mb < M; mb += ROWS_AVX2) {
        int64_t me = MIN(M, mb + ROWS_AVX2);
        for (int64_t p = p_begin; p < p_end; p++)
            for (int h = 0; h < 2; h++) {
                const uint8_t *w = Wp + p * 16 * K + 32 * h;
                int64_t m0 = mb, c0 = 16 * p + 8 * h;
                /* the first rows' pass over a panel asks for the next panel's lines: with
                 * few rows (decoding) the weights come from memory, once per call */
                const int64_t pfd = h == 0 ? 16 * K : 0;
                for (; m0 + MR2 <= me; m0 += MR2) gemm_block_avx2(A16, K, w, C, N, corr, m0, c0, MR2, m0 == 0 ? pfd : 0);
                switch (me - m0) {   /* the row tail, each with its own unrolled block */
                case 5: gemm_block_avx2(A16, K, w, C, N, corr, m0, c0, 5, m0 == 0 ? pfd : 0); break;
                case 4: gemm_block_avx2(A16, K, w, C, N, corr, m0, c0, 4, m0 == 0 ? pfd : 0); break;
                case 3: gemm_block_avx2(A16, K, w, C, N, corr, m0, c0, 3, m0 == 0 ? pfd : 0); break;
                case 2: gemm_block_avx2(A16, K, w, C, N, corr, m0, c0, 2, m0 == 0 ? pfd : 0); break;
                case 1: gemm_block_avx2(A16, K, w, C, N, corr, m0, c0, 1, m0 == 0 ? pfd : 0); break;
                default: break;
                }
            }
    }
}

/* The AVX2 GEMM of an int16 input (engine: qkv, down, the LM head), in one pass instead of two.
 * The engine splits such a row xq (|xq| <= ACT_MAX) into int8 halves hi and lo (xq = 128 hi + lo)
 * and stacks them, (2M, K), because int8 is what VNNI, BLAS-free int8 GEMMs and CUDA multiply; but
 * vpmaddwd multiplies int16 anyway, so here the row is rebuilt, a = 128 hi + lo (|a| <= 128 * 128
 * + 128 = 16512: never -32768, vpmaddwd's one wrapping case), and multiplied once, with the int8
 * form's register blocking. A pair sum is at most 2 * 16512 * 255 = 8,421,120 and a lane sums
 * KC16 / 4 pairs per K chunk: |lane| <= 255 * 8,421,120 = 2,147,385,600 < 2^31 - 1 for KC16 =
 * 1020, so after every chunk the lanes are added into int64 (the value needs up to ~2^34). The
 * largest chunk the bound allows: the model's K = 576 is one chunk, 1536 two (each chunk costs
 * its k loop's setup and flush). The result is
 * the exact value v = a @ W^T, written as the stacked accumulators every consumer reads (combine,
 * swiglu_quant, head_freqs take 128 hi + lo): hi = floor(v / 128), lo = v - 128 hi in [0, 127].
 * The value is the one the two int8 passes give, so are all the engine's outputs. */
#define KC16 1020
AVX2_TARGET static inline __attribute__((always_inline)) void
gemm_block16_avx2(const int16_t *restrict A16, int64_t K, const uint8_t *restrict w,
                  int32_t *restrict C, int64_t M, int64_t N, const int64_t *restrict corr,
                  int64_t m0, int64_t col0, const int mr, int64_t pf) {
    __m256i tot[MR2][4];   /* int64 sums: [2g + q] holds int32 lanes 4q..4q+3 of group g */
    for (int r = 0; r < mr; r++)
        for (int i = 0; i < 4; i++) tot[r][i] = _mm256_setzero_si256();
    for (int64_t k0 = 0; k0 < K; k0 += KC16) {
        int32_t out[MR2][2][8];
        kloop(A16 + m0 * K + k0, K, w + 16 * k0, (MIN(K, k0 + KC16) - k0) / 4, out, mr, pf);
        for (int r = 0; r < mr; r++)
            for (int g = 0; g < 2; g++) {
                __m256i acc = _mm256_loadu_si256((const __m256i *)out[r][g]);
                tot[r][2 * g] = _mm256_add_epi64(tot[r][2 * g],
                                                 _mm256_cvtepi32_epi64(_mm256_castsi256_si128(acc)));
                tot[r][2 * g + 1] = _mm256_add_epi64(
                    tot[r][2 * g + 1], _mm256_cvtepi32_epi64(_mm256_extracti128_si256(acc, 1)));
            }
    }
    /* int64 lane j of tot[r][2g + q]: int32 lane 4q + j of group g, i.e. column 4g + 2q + j / 2
     * (k, k+1 in even lanes, k+2, k+3 in odd ones), so the 16 int64 in order are columns 0..7's
     * two lanes each */
    for (int r = 0; r < mr; r++) {
        int64_t t[16];
        __builtin_memcpy(t, tot[r], sizeof(t));
        for (int c = 0; c < 8; c++) {
            int64_t v = t[2 * c] + t[2 * c + 1] - corr[m0 + r];
            int64_t h = v >> 7;                         /* floor(v / 128): arithmetic shift */
            C[(m0 + r) * N + col0 + c] = (int32_t)h;
            C[(M + m0 + r) * N + col0 + c] = (int32_t)(v - h * 128);
        }
    }
}

AVX2_TARGET static void gemm_range16_avx2(const int16_t *restrict A16, int64_t M, int64_t K,
                                          const uint8_t *restrict Wp, int64_t N,
                                          int32_t *restrict C, const int64_t *restrict corr,
                                          int64_t p_begin, int64_t p_end) {
    for (int64_t mb = 0; mb < M; mb += ROWS_AVX2) {
        int64_t me = MIN(M, mb + ROWS_AVX2);
        for (int64_t p = p_begin; p < p_end; p++)
            for (int h = 0; h < 2; h++) {
                const uint8_t *w = Wp + p * 16 * K + 32 * h;
                int64_t m0 = mb, c0 = 16 * p + 8 * h;
                /* the first rows' pass over a panel asks for the next panel's lines: with
                 * few rows (decoding) the weights come from memory, once per call */
                const int64_t pfd = h == 0 ? 16 * K : 0;
                for (; m0 + MR2 <= me; m0 += MR2)
                    gemm_block16_avx2(A16, K, w, C, M, N, corr, m0, c0, MR2, m0 == 0 ? pfd : 0);
                switch (me - m0) {
                case 5: gemm_block16_avx2(A16, K, w, C, M, N, corr, m0, c0, 5, m0 == 0 ? pfd : 0); break;
                case 4: gemm_block16_avx2(A16, K, w, C, M, N, corr, m0, c0, 4, m0 == 0 ? pfd : 0); break;
                case 3: gemm_block16_avx2(A16, K, w, C, M, N, corr, m0, c0, 3, m0 == 0 ? pfd : 0); break;
                case 2: gemm_block16_avx2(A16, K, w, C, M, N, corr, m0, c0, 2, m0 == 0 ? pfd : 0); break;
                case 1: gemm_block16_avx2(A16, K, w, C, M, N, corr, m0, c0, 1, m0 == 0 ? pfd : 0); break;
                default: break;
                }
            }
    }
}
#endif

/* Parallel loops over POSIX threads. The work is cut into chunks that the threads take from a
 * shared counter, the calling thread too: a thread that gets little CPU (the other core busy)
 * delays the call by at most its current chunk. Every output entry is computed by exactly one
 * thread with the same instructions, so the result does not depend on the number of threads.
 *
 * The helpers are a persistent pool that sleeps on a condition variable between calls: no
 * spinning (torch's OpenMP threads spin between calls and made a loaded 2-core machine 27-70x
 * slower), so idle threads cost nothing, and no thread creation per call (a GEMM call is ~0.1-1 ms
 * when decoding: creating and joining its helpers each time cost a measurable share). A call
 * wakes the helpers it wants, works itself, then waits until every helper that took part has left
 * the job. Priorities: nice is per thread on Linux and a thread inherits its creator's, and a
 * thread may raise its own nice but not lower it back, so there is one pool per nice value of the
 * calling threads (compaction runs at nice 19: its helpers are created by it and run at 19 too),
 * each created lazily by its first caller. One call at a time per pool: a second concurrent caller
 * (another engine on another thread) starts and joins its own helpers as before, rather than wait.
 * After fork() the child has none of the pools' threads: an atfork handler forgets them. */
#define MAX_THREADS 64
#define POOLS 4
struct par {
    void (*fn)(const void *ctx, int64_t begin, int64_t end);
    const void *ctx;
    int64_t n, step, next;
};

static void *par_worker(void *arg) {
    struct par *p = arg;
    for (;;) {
        int64_t b = __atomic_fetch_add(&p->next, p->step, __ATOMIC_RELAXED);
        if (b >= p->n)
            return NULL;
        p->fn(p->ctx, b, MIN(p->n, b + p->step));
    }
}

struct pool {
    int used, nice, nworkers;
    pthread_mutex_t busy;           /* held by the call that uses the pool */
    pthread_mutex_t lk;             /* guards the fields below */
    pthread_cond_t go, done;
    struct par *job;
    int slots;                      /* helpers the current call still wants */
    int active;                     /* helpers inside the current job */
};
static struct pool pools[POOLS];
static pthread_mutex_t pools_lk = PTHREAD_MUTEX_INITIALIZER;
static int pools_atfork;

static void *pool_worker(void *arg) {
    struct pool *P = arg;
    pthread_mutex_lock(&P->lk);
    for (;;) {
        while (P->slots == 0)
            pthread_cond_wait(&P->go, &P->lk);
        P->slots--;
        P->active++;
        struct par *j = P->job;
        pthread_mutex_unlock(&P->lk);
        par_worker(j);
        pthread_mutex_lock(&P->lk);
        if (--P->active == 0 && P->slots == 0)
            pthread_cond_signal(&P->done);
    }
    return NULL;
}

static void pools_forget(void) {     /* in a fork child: the helpers do not exist there */
    for (int i = 0; i < POOLS; i++) pools[i].used = 0;
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    pools_lk = fresh;
}

/* the pool of the calling thread's nice value, or NULL (all slots taken by other values) */
static struct pool *pool_of_caller(void) {
    errno = 0;
    int nice = getpriority(PRIO_PROCESS, 0);  /* Linux: the calling thread's */
    if (nice == -1 && errno != 0)
        return NULL;
    struct pool *P = NULL;
    pthread_mutex_lock(&pools_lk);
    if (!pools_atfork)
        pools_atfork = pthread_atfork(NULL, NULL, pools_forget) == 0 ? 1 : -1;
    for (int i = 0; i < POOLS && !P; i++)
        if (pools[i].used && pools[i].nice == nice)
            P = &pools[i];
    for (int i = 0; i < POOLS && !P; i++)
        if (!pools[i].used) {
            P = &pools[i];
            memset(P, 0, sizeof(*P));
            pthread_mutex_init(&P->busy, NULL);
            pthread_mutex_init(&P->lk, NULL);
            pthread_cond_init(&P->go, NULL);
            pthread_cond_init(&P->done, NULL);
            P->used = 1, P->nice = nice;
        }
    pthread_mutex_unlock(&pools_lk);
    return P;
}

/* fn(ctx, begin, end) over [0, n) in chunks of `step`, on up to nthreads threads */
static void par_for(void (*fn)(const void *, int64_t, int64_t), const void *ctx, int64_t n,
                    int64_t step, int64_t nthreads) {
    struct par p = {fn, ctx, n, step, 0};
    int64_t chunks = (n + step - 1) / step;
    int nt = (int)MAX(1, MIN(MIN(nthreads, MAX_THREADS), chunks));
    if (nt == 1) {
        par_worker(&p);
        return;
    }
    struct pool *P = pool_of_caller();
    if (P && pthread_mutex_trylock(&P->busy) == 0) {
        while (P->nworkers < nt - 1) {   /* grow: helpers inherit this thread's nice */
            pthread_t t;
            if (pthread_create(&t, NULL, pool_worker, P) != 0)
                break;
            pthread_detach(t);
            P->nworkers++;
        }
        pthread_mutex_lock(&P->lk);
        P->job = &p;
        P->slots = MIN(nt - 1, P->nworkers);
        P->active = 0;
        if (P->slots == 1)
            pthread_cond_signal(&P->go);
        else if (P->slots > 1)
            pthread_cond_broadcast(&P->go);
        pthread_mutex_unlock(&P->lk);
        par_worker(&p);                   /* helpers that get no CPU leave their share here */
        pthread_mutex_lock(&P->lk);
        P->slots = 0;                     /* the counter is spent: helpers not yet awake stay asleep */
        while (P->active > 0)
            pthread_cond_wait(&P->done, &P->lk);
        P->job = NULL;
        pthread_mutex_unlock(&P->lk);
        pthread_mutex_unlock(&P->busy);
        return;
    }
    /* the pool is in use by another call: threads of this call only */
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < nt; t++)
        started[t] = pthread_create(&tid[t], NULL, par_worker, &p) == 0;
    par_worker(&p);
    for (int t = 1; t < nt; t++)
        if (started[t]) pthread_join(tid[t], NULL);
}

struct gemm_job {
    int form;                    /* 2 VNNI, 3 AVX2, 4 AVX2 on the rebuilt int16 rows */
    const int8_t *A;
    const int16_t *A16;
    int64_t M, K, N;
    const uint8_t *Wp;
    int32_t *C;
    const int32_t *corr;
    const int64_t *corr64;       /* form 4 */
};

/* panels [p_begin, p_end) */
static void gemm_run(const void *ctx, int64_t p_begin, int64_t p_end) {
    const struct gemm_job *j = ctx;
#ifdef HAVE_VNNI
    if (j->form == 2)
        gemm_range_vnni(j->A, j->M, j->K, j->Wp, j->N, j->C, j->corr, p_begin, p_end);
#endif
#ifdef HAVE_AVX2_KERNELS
    if (j->form == 3)
        gemm_range_avx2(j->A16, j->M, j->K, j->Wp, j->N, j->C, j->corr, p_begin, p_end);
    if (j->form == 4)
        gemm_range16_avx2(j->A16, j->M, j->K, j->Wp, j->N, j->C, j->corr64, p_begin, p_end);
#endif
    (void)j; (void)p_begin; (void)p_end;
}

/* C = A @ W^T with W packed (above), on nthreads threads. impl: 0 the fastest this CPU runs,
 * 2 the VNNI form, 3 the AVX2 form. Returns the form that ran, or 0 (nothing done) when the CPU or
 * build has none of the asked forms or the shape does not fit (N % 16, K % 4, K too large): the
 * caller then uses another backend. A call with A = NULL only answers which form would run. */
int gemm_packed(const int8_t *A, int64_t M, int64_t K, const uint8_t *Wp, int64_t N, int32_t *C,
                int64_t impl, int64_t nthreads) {
    if (N % 16 != 0 || K % 4 != 0 || K >= 65536 || M < 0)
        return 0;
    int form = 0;
#ifdef HAVE_VNNI
    if ((impl == 0 || impl == 2) && have_vnni())
        form = 2;
#endif
#ifdef HAVE_AVX2_KERNELS
    if (!form && (impl == 0 || impl == 3) && have_avx2())
        form = 3;
#endif
    if (!form || A == NULL)
        return form;
    int32_t *corr = malloc(sizeof(int32_t) * (M > 0 ? M : 1));
    int16_t *A16 = form == 3 ? malloc(sizeof(int16_t) * (M * K > 0 ? M * K : 1)) : NULL;
    if (!corr || (form == 3 && !A16)) {
        free(corr); free(A16);
        return 0;                                            /* the caller falls back */
    }
    for (int64_t m = 0; m < M; m++) {
        int32_t t = 0;
        for (int64_t k = 0; k < K; k++) t += A[m * K + k];
        corr[m] = 128 * t;                                   /* |.| <= 128 * 128 * K < 2^31 */
    }
    if (A16)
        for (int64_t i = 0; i < M * K; i++) A16[i] = A[i];
    struct gemm_job job = {form, A, A16, M, K, N, Wp, C, corr, NULL};
    /* chunks of 6 panels (96 columns; the VNNI kernel's blocks are 3 panels) */
    par_for(gemm_run, &job, N / 16, 6, nthreads);
    free(corr); free(A16);
    return form;
}

/* The stacked hi/lo int8 rows A (2M, K) of an int16 input (xq = 128 hi + lo) times W packed ->
 * C (2M, N), the stacked accumulators of the value (gemm_block16_avx2), one int16 pass on AVX2.
 * Returns 3 when it ran, 0 (nothing done) when the CPU or build has no AVX2 or the shape does not
 * fit; A = NULL only answers. Other CPUs' forms multiply the two int8 halves (gemm_packed). */
int gemm_packed16(const int8_t *A, int64_t M, int64_t K, const uint8_t *Wp, int64_t N, int32_t *C,
                  int64_t nthreads) {
    if (N % 16 != 0 || K % 4 != 0 || K >= 65536 || M < 0)
        return 0;
#ifdef HAVE_AVX2_KERNELS
    if (!have_avx2())
        return 0;
    if (A == NULL)
        return 3;
    int64_t *corr = malloc(sizeof(int64_t) * (M > 0 ? M : 1));
    int16_t *A16 = malloc(sizeof(int16_t) * (M * K > 0 ? M * K : 1));
    if (!corr || !A16) {
        free(corr); free(A16);
        return 0;
    }
    for (int64_t m = 0; m < M; m++) {
        int64_t t = 0;
        for (int64_t k = 0; k < K; k++) {
            int16_t a = (int16_t)(128 * (int32_t)A[m * K + k] + A[(M + m) * K + k]);
            A16[m * K + k] = a;
            t += a;
        }
        corr[m] = 128 * t;
    }
    struct gemm_job job = {4, A, A16, M, K, N, Wp, C, NULL, corr};
    par_for(gemm_run, &job, N / 16, 6, nthreads);
    free(corr); free(A16);
    return 3;
#else
    (void)A; (void)Wp; (void)C; (void)nthreads;
    return 0;
#endif
}

/* The decoding KV cache write (engine.State on CPU, (B, nkv, L, hs) int16 keys and values): row b's
 * new key and value ki, vi (B, nkv, hs) float64 integers with |x| <= 2^KV_BITS (exact in int16) at
 * position pos[b] < L. The torch form (index_put per layer and tensor) cost ~5 ms per step at
 * batch 64, 4-5 % of a decoding step. */
MULTIVERSION512
void kv_store(const double *restrict ki, const double *restrict vi, int64_t B, int64_t nkv,
              int64_t hs, const int64_t *restrict pos, int64_t L, int16_t *restrict K,
              int16_t *restrict V) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t kv = 0; kv < nkv; kv++) {
            int64_t r = b * nkv + kv, at = (r * L + pos[b]) * hs;
            for (int64_t c = 0; c < hs; c++) {
                K[at + c] = (int16_t)ki[r * hs + c];
                V[at + c] = (int16_t)vi[r * hs + c];
            }
        }
}

/* impl: 0 the fastest this CPU runs, 1 the portable form, 2 the VNNI form (when the CPU and the
 * shape allow it: hs a multiple of 32 up to 128, g <= 4). Returns the form that ran (1 or 2).
 * per: rows that share one row of K and V (1 when decoding; encoding without attend_fwd passes its
 * B * T queries as rows, per = T, with the segment's keys as the cache: each query reads the keys
 * it sees, from L2, with the same integers and float steps as any other form). Rows go to
 * nthreads threads. */
struct step_job {
    int form;
    int64_t per;
    const double *qi, *f;
    const int16_t *K, *V;
    int64_t nkv, g, L, hs;
    const int64_t *pos;
    const int32_t *table;
    int64_t ntab;
    const double *vscale;
    double *out;
};

/* rows [b0, b1) of the batch: every array starts at row b0 (rows are independent) */
static void attend_step_rows(const void *ctx, int64_t b0, int64_t b1) {
    const struct step_job *j = ctx;
    int64_t nh = j->nkv * j->g, kvrow = j->nkv * j->L * j->hs;
    if (j->per > 1) {        /* rows share a cache row: one call per row, on its cache row */
        for (int64_t b = b0; b < b1; b++) {
            const int16_t *K = j->K + (b / j->per) * kvrow, *V = j->V + (b / j->per) * kvrow;
#ifdef HAVE_VNNI
            if (j->form == 2) {
                attend_step_vnni(j->qi + b * nh * j->hs, j->f + b * nh, K, V, 1, j->nkv, j->g,
                                 j->L, j->hs, j->pos + b, j->table, j->ntab, j->vscale,
                                 j->out + b * nh * j->hs);
                continue;
            }
#endif
#ifdef HAVE_AVX2_KERNELS
            if (j->form == 3) {
                attend_step_avx2(j->qi + b * nh * j->hs, j->f + b * nh, K, V, 1, j->nkv, j->g,
                                 j->L, j->hs, j->pos + b, j->table, j->ntab, j->vscale,
                                 j->out + b * nh * j->hs);
                continue;
            }
#endif
            attend_step_portable(j->qi + b * nh * j->hs, j->f + b * nh, K, V, 1, j->nkv, j->g,
                                 j->L, j->hs, j->pos + b, j->table, j->ntab, j->vscale,
                                 j->out + b * nh * j->hs);
        }
        return;
    }
#ifdef HAVE_VNNI
    if (j->form == 2) {
        attend_step_vnni(j->qi + b0 * nh * j->hs, j->f + b0 * nh, j->K + b0 * kvrow,
                         j->V + b0 * kvrow, b1 - b0, j->nkv, j->g, j->L, j->hs, j->pos + b0,
                         j->table, j->ntab, j->vscale, j->out + b0 * nh * j->hs);
        return;
    }
#endif
#ifdef HAVE_AVX2_KERNELS
    if (j->form == 3) {
        attend_step_avx2(j->qi + b0 * nh * j->hs, j->f + b0 * nh, j->K + b0 * kvrow,
                         j->V + b0 * kvrow, b1 - b0, j->nkv, j->g, j->L, j->hs, j->pos + b0,
                         j->table, j->ntab, j->vscale, j->out + b0 * nh * j->hs);
        return;
    }
#endif
    attend_step_portable(j->qi + b0 * nh * j->hs, j->f + b0 * nh, j->K + b0 * kvrow,
                         j->V + b0 * kvrow, b1 - b0, j->nkv, j->g, j->L, j->hs, j->pos + b0,
                         j->table, j->ntab, j->vscale, j->out + b0 * nh * j->hs);
}

int attend_step(const double *qi, const double *f, const int16_t *K, const int16_t *V, int64_t B,
                int64_t nkv, int64_t g, int64_t L, int64_t hs, const int64_t *pos,
                const int32_t *table, int64_t ntab, const double *vscale, double *out,
                int64_t impl, int64_t nthreads, int64_t per) {
    int form = 1;
#ifdef HAVE_VNNI
    if ((impl == 0 || impl == 2) && have_vnni() && hs % 32 == 0 && hs <= 32 * NCMAX && g <= GMAX)
        form = 2;
#endif
#ifdef HAVE_AVX2_KERNELS
    if (form == 1 && (impl == 0 || impl == 3) && have_avx2() && hs % 16 == 0 && hs <= 16 * NYMAX &&
        g <= GMAX2)
        form = 3;
#endif
    struct step_job job = {form, MAX(1, per), qi, f, K, V, nkv, g, L, hs, pos, table, ntab,
                           vscale, out};
    /* rows in chunks of 4 (at late positions a row's cache is 3 x 2 x 64 x 2 bytes per key) */
    par_for(attend_step_rows, &job, B, 4, nthreads);
    return form;
}

/* ---- attention of many queries per row on int16 operands (engine.FusedOps.attend, T > 1) --------
 * The digit form above costs 2 int8 GEMMs for the scores and 4 for P.V (plus splitting keys and
 * values into digits and recombining); vpdpwssd (AVX2: vpmaddwd then vpaddd, the same pair sums;
 * fwd_tile_avx2 below) multiplies the 15-bit integers directly, and
 * scores, weights and P.V run fused per tile of RT query rows, so no (rows, keys) temporary leaves
 * L1/L2. Per (row b, KV head): keys go to blocks of 16 keys with channel pairs as int32 lanes
 * (Kt[block][c/2][16]), values to key pairs per channel (Vp[k/2][c] = v[2i][c] | v[2i+1][c] << 16),
 * queries to channel pairs (Qp[row][c/2]). Tile rows are (head j, query t) of the group, j major.
 *   scores: |q| <= 127, |k| <= 2^14, hs <= 128: |s| < 2^28 in int32 (exact, wrapping adds);
 *   weights: the portable softmax's operations 16 keys at a time (see attend_group_vnni), into
 *     int16 (p <= 2^13) with hidden keys 0, and per 8 keys their sum;
 *   P.V: per key pair, the pair's weights as one int32 broadcast per row; int32 lanes are added
 *     into int64 before any row's chunk weight sum would pass PV_CHUNK_P (checked per 8 keys:
 *     <= 8 * 2^13 each), so |lane| <= 2^14 * 131071 < 2^31; 8-key groups no tile row weighs are
 *     skipped.
 * out = (double)o * vscale / l as attn_out. */
#define RT 6   /* query rows per tile: 6 x 4 accumulators (hs = 64) */

/* The P.V block of 16 keys whose per-row weight sums are bs[r * nb] (r < RT tile rows): used if
 * some row weighs it, full if it could take some row's int32 chunk past PV_CHUNK_P, split if one
 * row's block sum alone exceeds PV_CHUNK_P (all 16 weights 2^13: flushed after 8 keys). */
static inline void pv_block_flags(const int32_t *bs, int64_t nb, const int32_t *chunk, int *used,
                                  int *full, int *split) {
    int u = 0, f = 0, sp = 0;
    for (int r = 0; r < RT; r++) {
        int32_t w = bs[r * nb];
        u |= w;
        f |= chunk[r] > PV_CHUNK_P - w;
        sp |= w > PV_CHUNK_P;
    }
    *used = u, *full = f, *split = sp;
}

/* one tile of RT rows (attend_fwd_pairs calls one form): nc = hs / 32 */
typedef void (*fwd_tile_fn)(const int32_t *Qp, const int32_t *Kt, const int32_t *Vp,
                            const int64_t *vis, const double *fr, int64_t kspan, int nc,
                            const int32_t *table, double last, int32_t *S, int16_t *P, int32_t *bs,
                            int64_t *o64, int32_t *l);

#ifdef HAVE_VNNI
VNNI_TARGET static inline __attribute__((always_inline)) void
fwd_tile(const int32_t *restrict Qp, const int32_t *restrict Kt, const int32_t *restrict Vp,
         const int64_t *restrict vis, const double *restrict fr, int64_t kspan, const int nc,
         const int32_t *restrict table, double last, int32_t *restrict S, int16_t *restrict P,
         int32_t *restrict bs, int64_t *restrict o64, int32_t *restrict l) {
    const int64_t hs = 32 * nc, hp = 16 * nc;       /* channels, channel pairs */
    /* scores: S[r][k] for k < kspan (a multiple of 64). hs = 64 spelled out with named
     * accumulators: with an array gcc stored all 24 to the stack on every channel pair */
    if (nc == 2 && RT == 6) {
        for (int64_t kb = 0; kb < kspan / 16; kb += 4) {
#define SC_DECL(r) __m512i a##r##0 = _mm512_setzero_si512(), a##r##1 = a##r##0, a##r##2 = a##r##0, \
                          a##r##3 = a##r##0;
#define SC_FMA(r)                                                                                  \
    {                                                                                              \
        __m512i qb = _mm512_set1_epi32(Qp[r * 32 + cp]);                                           \
        a##r##0 = dpwssd(a##r##0, k0, qb);                                            \
        a##r##1 = dpwssd(a##r##1, k1, qb);                                            \
        a##r##2 = dpwssd(a##r##2, k2, qb);                                            \
        a##r##3 = dpwssd(a##r##3, k3, qb);                                            \
    }
#define SC_STORE(r)                                                                                \
    _mm512_storeu_si512(S + r * kspan + kb * 16, a##r##0);                                         \
    _mm512_storeu_si512(S + r * kspan + kb * 16 + 16, a##r##1);                                    \
    _mm512_storeu_si512(S + r * kspan + kb * 16 + 32, a##r##2);                                    \
    _mm512_storeu_si512(S + r * kspan + kb * 16 + 48, a##r##3);
            SC_DECL(0) SC_DECL(1) SC_DECL(2) SC_DECL(3) SC_DECL(4) SC_DECL(5)
            const int32_t *kt = Kt + kb * 32 * 16;
            for (int64_t cp = 0; cp < 32; cp++) {
                __m512i k0 = _mm512_loadu_si512(kt + cp * 16);
                __m512i k1 = _mm512_loadu_si512(kt + (32 + cp) * 16);
                __m512i k2 = _mm512_loadu_si512(kt + (64 + cp) * 16);
                __m512i k3 = _mm512_loadu_si512(kt + (96 + cp) * 16);
                SC_FMA(0) SC_FMA(1) SC_FMA(2) SC_FMA(3) SC_FMA(4) SC_FMA(5)
            }
            SC_STORE(0) SC_STORE(1) SC_STORE(2) SC_STORE(3) SC_STORE(4) SC_STORE(5)
#undef SC_DECL
#undef SC_FMA
#undef SC_STORE
        }
    } else
    for (int64_t kb = 0; kb < kspan / 16; kb += 4) {
        __m512i acc[RT][4];
        for (int r = 0; r < RT; r++)
            for (int n = 0; n < 4; n++) acc[r][n] = _mm512_setzero_si512();
        for (int64_t cp = 0; cp < hp; cp++) {
            __m512i kv[4];
            for (int n = 0; n < 4; n++) kv[n] = _mm512_loadu_si512(Kt + ((kb + n) * hp + cp) * 16);
            for (int r = 0; r < RT; r++) {
                __m512i qb = _mm512_set1_epi32(Qp[r * hp + cp]);
                for (int n = 0; n < 4; n++) acc[r][n] = dpwssd(acc[r][n], kv[n], qb);
            }
        }
        for (int r = 0; r < RT; r++)
            for (int n = 0; n < 4; n++) _mm512_storeu_si512(S + r * kspan + (kb + n) * 16, acc[r][n]);
    }
    /* weights: int16 into P, int32 over the scores in S, then per 16 keys their sum into bs
     * (16-vector lane-sum trees: a reduction per block cost ~15 % of the tile) */
    const __m512d lastv = _mm512_set1_pd(last), magic = _mm512_set1_pd(6755399441055744.0);
    const __m512i lasti = _mm512_set1_epi32((int32_t)last);
    for (int r = 0; r < RT; r++) {
        int32_t *sr = S + r * kspan;
        int16_t *pr = P + r * kspan;
        int64_t v = vis[r];
        __m512i mv = _mm512_set1_epi32(INT32_MIN);
        for (int64_t k = 0; k < v; k += 16) {
            __mmask16 mk = v - k >= 16 ? 0xffff : (__mmask16)((1u << (v - k)) - 1);
            mv = _mm512_mask_max_epi32(mv, mk, mv, _mm512_loadu_si512(sr + k));
        }
        const __m512i m = _mm512_set1_epi32(_mm512_reduce_max_epi32(mv));
        const __m512d f = _mm512_set1_pd(fr[r]);
        __m512i lsum = _mm512_setzero_si512();
        for (int64_t k = 0; k < kspan; k += 16) {
            __mmask16 mk = v - k >= 16 ? 0xffff : v - k <= 0 ? 0 : (__mmask16)((1u << (v - k)) - 1);
            __m512i pv = _mm512_setzero_si512();
            if (mk) {
                __m512i d = _mm512_sub_epi32(m, _mm512_loadu_si512(sr + k));
                __m512d v0 = _mm512_cvtepi32_pd(_mm512_castsi512_si256(d));
                __m512d v1 = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(d, 1));
                v0 = _mm512_min_pd(_mm512_mul_pd(v0, f), lastv);
                v1 = _mm512_min_pd(_mm512_mul_pd(v1, f), lastv);
                v0 = _mm512_sub_pd(_mm512_add_pd(v0, magic), magic);
                v1 = _mm512_sub_pd(_mm512_add_pd(v1, magic), magic);
                __m512i ix = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtpd_epi32(v0)),
                                                _mm512_cvtpd_epi32(v1), 1);
                __mmask16 nz = _mm512_mask_cmpneq_epi32_mask(mk, ix, lasti);
                if (nz) pv = _mm512_mask_i32gather_epi32(pv, nz, ix, table, 4);
            }
            _mm256_storeu_si256((__m256i *)(pr + k), _mm512_cvtepi32_epi16(pv));
            _mm512_storeu_si512(sr + k, pv);
            lsum = _mm512_add_epi32(lsum, pv);
        }
        l[r] = _mm512_reduce_add_epi32(lsum);
        for (int64_t k = 0; k < kspan; k += 256) {
            __m512i blk[16];
            int32_t sums[16];
            for (int i = 0; i < 16; i++)
                blk[i] = k + 16 * i < kspan ? _mm512_loadu_si512(sr + k + 16 * i) : _mm512_setzero_si512();
            _mm512_storeu_si512(sums, hsum16(blk));
            for (int i = 0; i < 16 && k + 16 * i < kspan; i++) bs[r * (kspan / 16) + k / 16 + i] = sums[i];
        }
    }
    /* P.V per 16 keys (8 pairs): a block no tile row weighs is skipped; before one that could
     * take some row's chunk past PV_CHUNK_P the accumulators go to int64. A block's sum is at most
     * 16 * 2^13 = PV_CHUNK_P + 1: then (all 16 weights 2^13) it is flushed after 8 keys too, and
     * the chunk counts the 8-key bound 2^16. */
    int32_t chunk[RT];
    for (int r = 0; r < RT; r++) {
        chunk[r] = 0;
        for (int64_t c = 0; c < hs; c++) o64[r * hs + c] = 0;
    }
    int64_t kend = 0;
    for (int r = 0; r < RT; r++) kend = MAX(kend, vis[r]);
#define FLUSH1(o, a)                                                                               \
    {                                                                                              \
        __m512i x0 = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(a));                             \
        __m512i x1 = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a, 1));                       \
        _mm512_storeu_si512((o), _mm512_add_epi64(_mm512_loadu_si512(o), x0));                     \
        _mm512_storeu_si512((o) + 8, _mm512_add_epi64(_mm512_loadu_si512((o) + 8), x1));           \
        a = _mm512_setzero_si512();                                                                \
    }
    const int64_t nb = kspan / 16;
    if (nc == 2 && RT == 6) {
#define PV_DECL(r) __m512i b##r##0 = _mm512_setzero_si512(), b##r##1 = b##r##0, b##r##2 = b##r##0, \
                          b##r##3 = b##r##0;
#define PV_FMA(r)                                                                                  \
    {                                                                                              \
        int32_t w;                                                                                 \
        __builtin_memcpy(&w, P + r * kspan + 2 * kp, 4);                                           \
        __m512i wb = _mm512_set1_epi32(w);                                                         \
        b##r##0 = dpwssd(b##r##0, v0, wb);                                            \
        b##r##1 = dpwssd(b##r##1, v1, wb);                                            \
        b##r##2 = dpwssd(b##r##2, v2, wb);                                            \
        b##r##3 = dpwssd(b##r##3, v3, wb);                                            \
    }
#define PV_FLUSH(r)                                                                                \
    FLUSH1(o64 + r * 64, b##r##0) FLUSH1(o64 + r * 64 + 16, b##r##1)                               \
    FLUSH1(o64 + r * 64 + 32, b##r##2) FLUSH1(o64 + r * 64 + 48, b##r##3)
#define PV_ALL(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define PV_PAIRS(k0, k1)                                                                           \
    for (int64_t kp = (k0); kp < (k1); kp++) {                                                     \
        const int32_t *vp = Vp + kp * 64;                                                          \
        __m512i v0 = _mm512_loadu_si512(vp), v1 = _mm512_loadu_si512(vp + 16);                     \
        __m512i v2 = _mm512_loadu_si512(vp + 32), v3 = _mm512_loadu_si512(vp + 48);                \
        PV_ALL(PV_FMA)                                                                             \
    }
        PV_ALL(PV_DECL)
        for (int64_t k = 0; k < kend; k += 16) {
            int full, used, split;
            pv_block_flags(bs + k / 16, nb, chunk, &used, &full, &split);
            if (!used) continue;
            if (full) {
                PV_ALL(PV_FLUSH)
                for (int r = 0; r < RT; r++) chunk[r] = 0;
            }
            if (split) {
                PV_PAIRS(k / 2, k / 2 + 4)
                PV_ALL(PV_FLUSH)
                PV_PAIRS(k / 2 + 4, k / 2 + 8)
                for (int r = 0; r < RT; r++) chunk[r] = 65536;
            } else {
                PV_PAIRS(k / 2, k / 2 + 8)
                for (int r = 0; r < RT; r++) chunk[r] += bs[r * nb + k / 16];
            }
        }
        PV_ALL(PV_FLUSH)
#undef PV_DECL
#undef PV_FMA
#undef PV_FLUSH
#undef PV_ALL
#undef PV_PAIRS
    } else {
        __m512i acc[RT][2 * NCMAX];
        for (int r = 0; r < RT; r++)
            for (int c = 0; c < 2 * nc; c++) acc[r][c] = _mm512_setzero_si512();
        for (int64_t k = 0; k < kend; k += 16) {
            int full, used, split;
            pv_block_flags(bs + k / 16, nb, chunk, &used, &full, &split);
            if (!used) continue;
            if (full)
                for (int r = 0; r < RT; r++) chunk[r] = 0;
            for (int64_t kp = k / 2; kp < k / 2 + 8; kp++) {
                if (full || (split && kp == k / 2 + 4)) {
                    for (int r = 0; r < RT; r++)
                        for (int c = 0; c < 2 * nc; c++) FLUSH1(o64 + r * hs + 16 * c, acc[r][c])
                    full = 0;
                }
                __m512i vv[2 * NCMAX];
                for (int c = 0; c < 2 * nc; c++) vv[c] = _mm512_loadu_si512(Vp + kp * hs + 16 * c);
                for (int r = 0; r < RT; r++) {
                    int32_t w;
                    __builtin_memcpy(&w, P + r * kspan + 2 * kp, 4);
                    __m512i wb = _mm512_set1_epi32(w);
                    for (int c = 0; c < 2 * nc; c++)
                        acc[r][c] = dpwssd(acc[r][c], vv[c], wb);
                }
            }
            for (int r = 0; r < RT; r++) chunk[r] = split ? 65536 : chunk[r] + bs[r * nb + k / 16];
        }
        for (int r = 0; r < RT; r++)
            for (int c = 0; c < 2 * nc; c++) FLUSH1(o64 + r * hs + 16 * c, acc[r][c])
    }
#undef FLUSH1
}

/* the VNNI tile, inlined with nc = 2 (SmolLM2's hs = 64) spelled out */
VNNI_TARGET static void fwd_tile_vnni(const int32_t *Qp, const int32_t *Kt, const int32_t *Vp,
                                      const int64_t *vis, const double *fr, int64_t kspan, int nc,
                                      const int32_t *table, double last, int32_t *S, int16_t *P,
                                      int32_t *bs, int64_t *o64, int32_t *l) {
    if (nc == 2)
        fwd_tile(Qp, Kt, Vp, vis, fr, kspan, 2, table, last, S, P, bs, o64, l);
    else
        fwd_tile(Qp, Kt, Vp, vis, fr, kspan, nc, table, last, S, P, bs, o64, l);
}
#endif

#ifdef HAVE_AVX2_KERNELS
/* The AVX2 tile: fwd_tile's integers and float steps, 8 lanes at a time, on the same packed
 * operands. vpmaddwd multiplies int16 pairs and adds each pair into an int32 lane (exact: no
 * operand here is -32768 paired with -32768, its one wrapping case: |q| <= 127, 0 <= p <= 2^13),
 * and vpaddd accumulates, wrapping like vpdpwssd: the bounds of the header hold lane by lane
 * (|s| < 2^28; P.V lanes <= 2^14 * PV_CHUNK_P < 2^31 between flushes). Scores: 16 keys (two
 * vectors of a Kt block) x RT rows = 12 accumulators; weights: two 4-double halves per 8 keys,
 * the table by a masked vpgatherdd (hidden keys and those at the table's last entry, which is 0,
 * are not loaded); P.V one 16-channel slice at a time (12 accumulators again), each slice with its
 * own chunk counters (the flush points only bound a lane, they do not change a sum). */
AVX2_TARGET static inline int32_t hsum8(__m256i v) {
    __m128i x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, _MM_SHUFFLE(1, 0, 3, 2)));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(x);
}

/* lanes i < n set (n may be <= 0 or >= 8) */
AVX2_TARGET static inline __m256i lanes_below(int64_t n) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int32_t c = (int32_t)(n < 0 ? 0 : n > 8 ? 8 : n);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), idx);
}

AVX2_TARGET static void fwd_tile_avx2(const int32_t *restrict Qp, const int32_t *restrict Kt,
                                      const int32_t *restrict Vp, const int64_t *restrict vis,
                                      const double *restrict fr, int64_t kspan, int nc,
                                      const int32_t *restrict table, double last,
                                      int32_t *restrict S, int16_t *restrict P,
                                      int32_t *restrict bs, int64_t *restrict o64,
                                      int32_t *restrict l) {
    const int64_t hs = 32 * nc, hp = 16 * nc;
    /* scores */
    for (int64_t kb = 0; kb < kspan / 16; kb++) {
        __m256i a[RT][2];
        for (int r = 0; r < RT; r++) a[r][0] = a[r][1] = _mm256_setzero_si256();
        const int32_t *kt = Kt + kb * hp * 16;
        for (int64_t cp = 0; cp < hp; cp++) {
            __m256i k0 = _mm256_loadu_si256((const __m256i *)(kt + cp * 16));
            __m256i k1 = _mm256_loadu_si256((const __m256i *)(kt + cp * 16 + 8));
            for (int r = 0; r < RT; r++) {
                __m256i qb = _mm256_set1_epi32(Qp[r * hp + cp]);
                a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(k0, qb));
                a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(k1, qb));
            }
        }
        for (int r = 0; r < RT; r++) {
            _mm256_storeu_si256((__m256i *)(S + r * kspan + kb * 16), a[r][0]);
            _mm256_storeu_si256((__m256i *)(S + r * kspan + kb * 16 + 8), a[r][1]);
        }
    }
    /* weights: int16 into P, int32 into S, per 16 keys their sum into bs */
    const __m256d lastv = _mm256_set1_pd(last), magic = _mm256_set1_pd(6755399441055744.0);
    const __m256i lasti = _mm256_set1_epi32((int32_t)last), zero = _mm256_setzero_si256();
    for (int r = 0; r < RT; r++) {
        int32_t *sr = S + r * kspan;
        int16_t *pr = P + r * kspan;
        int64_t v = vis[r];
        __m256i mv = _mm256_set1_epi32(INT32_MIN);
        for (int64_t k = 0; k < v; k += 8) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(sr + k));
            x = _mm256_blendv_epi8(_mm256_set1_epi32(INT32_MIN), x, lanes_below(v - k));
            mv = _mm256_max_epi32(mv, x);
        }
        __m128i m4 = _mm_max_epi32(_mm256_castsi256_si128(mv), _mm256_extracti128_si256(mv, 1));
        m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, _MM_SHUFFLE(1, 0, 3, 2)));
        m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, _MM_SHUFFLE(2, 3, 0, 1)));
        const __m256i m = _mm256_broadcastd_epi32(m4);
        const __m256d f = _mm256_set1_pd(fr[r]);
        __m256i lsum = zero;
        for (int64_t k = 0; k < kspan; k += 16) {
            __m256i pv[2];
            for (int h = 0; h < 2; h++) {
                __m256i vm = lanes_below(v - k - 8 * h);
                pv[h] = zero;
                if (!_mm256_testz_si256(vm, vm)) {
                    __m256i d = _mm256_sub_epi32(m, _mm256_loadu_si256((const __m256i *)(sr + k + 8 * h)));
                    __m256d v0 = _mm256_cvtepi32_pd(_mm256_castsi256_si128(d));
                    __m256d v1 = _mm256_cvtepi32_pd(_mm256_extracti128_si256(d, 1));
                    v0 = _mm256_min_pd(_mm256_mul_pd(v0, f), lastv);   /* MIN(v, last): no NaN */
                    v1 = _mm256_min_pd(_mm256_mul_pd(v1, f), lastv);
                    v0 = _mm256_sub_pd(_mm256_add_pd(v0, magic), magic); /* round_even */
                    v1 = _mm256_sub_pd(_mm256_add_pd(v1, magic), magic);
                    __m256i ix = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm256_cvtpd_epi32(v0)),
                                                         _mm256_cvtpd_epi32(v1), 1);
                    __m256i nz = _mm256_andnot_si256(_mm256_cmpeq_epi32(ix, lasti), vm);
                    if (!_mm256_testz_si256(nz, nz))
                        pv[h] = _mm256_mask_i32gather_epi32(zero, table, ix, nz, 4);
                }
                _mm256_storeu_si256((__m256i *)(sr + k + 8 * h), pv[h]);
                /* p <= 2^13: packs does not saturate; qwords (0, 2) hold p0..7 */
                __m256i p16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(pv[h], pv[h]), 0x08);
                _mm_storeu_si128((__m128i *)(pr + k + 8 * h), _mm256_castsi256_si128(p16));
            }
            __m256i b = _mm256_add_epi32(pv[0], pv[1]);
            lsum = _mm256_add_epi32(lsum, b);
            bs[r * (kspan / 16) + k / 16] = hsum8(b);
        }
        l[r] = hsum8(lsum);
    }
    /* P.V, 16 channels at a time */
    int64_t kend = 0;
    for (int r = 0; r < RT; r++) kend = MAX(kend, vis[r]);
    for (int64_t i = 0; i < RT * hs; i++) o64[i] = 0;
    const int64_t nb = kspan / 16;
#define FLUSH2(o, a)                                                                               \
    {                                                                                              \
        __m256i x0 = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(a));                             \
        __m256i x1 = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(a, 1));                        \
        _mm256_storeu_si256((__m256i *)(o), _mm256_add_epi64(_mm256_loadu_si256((__m256i *)(o)), x0)); \
        _mm256_storeu_si256((__m256i *)((o) + 4),                                                  \
                            _mm256_add_epi64(_mm256_loadu_si256((__m256i *)((o) + 4)), x1));       \
        a = _mm256_setzero_si256();                                                                \
    }
#define FLUSH_SLICE()                                                                              \
    for (int r = 0; r < RT; r++) {                                                                 \
        FLUSH2(o64 + r * hs + c0, acc[r][0])                                                       \
        FLUSH2(o64 + r * hs + c0 + 8, acc[r][1])                                                   \
    }
    for (int64_t c0 = 0; c0 < hs; c0 += 16) {
        __m256i acc[RT][2];
        int32_t chunk[RT];
        for (int r = 0; r < RT; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256(), chunk[r] = 0;
        for (int64_t k = 0; k < kend; k += 16) {
            int full, used, split;
            pv_block_flags(bs + k / 16, nb, chunk, &used, &full, &split);
            if (!used) continue;
            if (full) {
                FLUSH_SLICE()
                for (int r = 0; r < RT; r++) chunk[r] = 0;
            }
            for (int64_t kp = k / 2; kp < k / 2 + 8; kp++) {
                if (split && kp == k / 2 + 4) FLUSH_SLICE()
                __m256i v0 = _mm256_loadu_si256((const __m256i *)(Vp + kp * hs + c0));
                __m256i v1 = _mm256_loadu_si256((const __m256i *)(Vp + kp * hs + c0 + 8));
                for (int r = 0; r < RT; r++) {
                    int32_t w;
                    __builtin_memcpy(&w, P + r * kspan + 2 * kp, 4);   /* p[2kp] | p[2kp+1] << 16 */
                    __m256i wb = _mm256_set1_epi32(w);
                    acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(v0, wb));
                    acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(v1, wb));
                }
            }
            for (int r = 0; r < RT; r++) chunk[r] = split ? 65536 : chunk[r] + bs[r * nb + k / 16];
        }
        FLUSH_SLICE()
    }
#undef FLUSH_SLICE
#undef FLUSH2
}
#endif

/* attend_fwd's work: (row b, KV head) pairs, each packed once and run tile by tile */
struct fwd_job {
    fwd_tile_fn tile;
    const double *qi, *f, *keys, *values;
    int64_t nkv, g, T, Tkeys, hs;
    const int64_t *qpos;
    const int32_t *table;
    int64_t ntab;
    const double *vscale;
    double *out;
};

/* pairs [bk0, bk1) of (b, kv), b major; scratch per call (calls run on the engine's threads) */
static void attend_fwd_pairs(const void *ctx, int64_t bk0, int64_t bk1) {
    const struct fwd_job *J = ctx;
    const int64_t hs = J->hs, g = J->g, T = J->T, Tkeys = J->Tkeys, nkv = J->nkv;
    const int64_t hp = hs / 2, nh = nkv * g, Tr = (Tkeys + 63) / 64 * 64;
    const int64_t Rg = g * T, Rgr = (Rg + RT - 1) / RT * RT;
    const double last = (double)(J->ntab - 1);
    int32_t *Kt = aligned_alloc(64, sizeof(int32_t) * Tr * hp);
    int32_t *Vp = aligned_alloc(64, sizeof(int32_t) * Tr / 2 * hs);
    int32_t *Qp = calloc(Rgr * hp, sizeof(int32_t));
    int32_t *S = aligned_alloc(64, sizeof(int32_t) * RT * Tr);
    int16_t *P = aligned_alloc(64, sizeof(int16_t) * RT * Tr);
    int32_t *bs = malloc(sizeof(int32_t) * RT * Tr / 16);
    int64_t *o64 = malloc(sizeof(int64_t) * RT * hs);
    int64_t *vis = malloc(sizeof(int64_t) * Rgr);
    double *fr = calloc(Rgr, sizeof(double));
    int32_t l[RT];
    for (int64_t bk = bk0; bk < bk1; bk++) {
        const int64_t b = bk / nkv, kv = bk % nkv;
        const double *kb = J->keys + (b * nkv + kv) * Tkeys * hs;
        const double *vb = J->values + (b * nkv + kv) * Tkeys * hs;
        for (int64_t k = 0; k < Tr; k++)
            for (int64_t cp = 0; cp < hp; cp++) {
                int32_t x0 = 0, x1 = 0;
                if (k < Tkeys) x0 = (int32_t)kb[k * hs + 2 * cp], x1 = (int32_t)kb[k * hs + 2 * cp + 1];
                Kt[((k / 16) * hp + cp) * 16 + k % 16] = (int32_t)((uint32_t)(uint16_t)x0 | ((uint32_t)(uint16_t)x1 << 16));
            }
        for (int64_t kp = 0; kp < Tr / 2; kp++)
            for (int64_t c = 0; c < hs; c++) {
                int32_t x0 = 0, x1 = 0;
                if (2 * kp < Tkeys) x0 = (int32_t)vb[2 * kp * hs + c];
                if (2 * kp + 1 < Tkeys) x1 = (int32_t)vb[(2 * kp + 1) * hs + c];
                Vp[kp * hs + c] = (int32_t)((uint32_t)(uint16_t)x0 | ((uint32_t)(uint16_t)x1 << 16));
            }
        /* rows (j, t), j major; padding rows: q = 0, nothing visible */
        for (int64_t j = 0; j < g; j++)
            for (int64_t t = 0; t < T; t++) {
                int64_t r = j * T + t, h = kv * g + j;
                const double *q = J->qi + ((b * nh + h) * T + t) * hs;
                for (int64_t cp = 0; cp < hp; cp++)
                    Qp[r * hp + cp] = (int32_t)((uint32_t)(uint16_t)(int16_t)q[2 * cp] |
                                                ((uint32_t)(uint16_t)(int16_t)q[2 * cp + 1] << 16));
                vis[r] = MIN(J->qpos[b * T + t] + 1, Tkeys);
                fr[r] = J->f[(b * nh + h) * T + t];
            }
        for (int64_t r = Rg; r < Rgr; r++) vis[r] = 0;
        for (int64_t r0 = 0; r0 < Rgr; r0 += RT) {
            int64_t mv = 0;
            for (int r = 0; r < RT; r++) mv = MAX(mv, vis[r0 + r]);
            int64_t kspan = MAX((mv + 63) / 64 * 64, 64);
            J->tile(Qp + r0 * hp, Kt, Vp, vis + r0, fr + r0, kspan, (int)(hs / 32), J->table, last,
                    S, P, bs, o64, l);
            const double *vs = J->vscale + kv * hs;
            for (int r = 0; r < RT && r0 + r < Rg; r++) {
                int64_t j = (r0 + r) / T, t = (r0 + r) % T;
                double *dst = J->out + ((b * T + t) * nh + kv * g + j) * hs, dl = (double)l[r];
                for (int64_t c = 0; c < hs; c++) dst[c] = (double)o64[r * hs + c] * vs[c] / dl;
            }
        }
    }
    free(Kt); free(Vp); free(Qp); free(S); free(P); free(bs); free(o64); free(vis); free(fr);
}

/* qi (B, nh, T, hs), f (B, nh, T), keys, values (B, nkv, Tkeys, hs) integer-valued doubles; query
 * (b, t) sees keys 0..qpos[b, t]; out (B, T, nh * hs). impl: 0 the fastest this CPU runs, 2 the
 * VNNI tile, 3 the AVX2 tile. The (b, KV head) pairs go to nthreads threads. Returns the form
 * that ran, or 0 (nothing done) when the CPU or build has none of the asked forms or hs is not a
 * multiple of 32 up to 128: the caller then uses another form. */
int attend_fwd(const double *qi, const double *f, const double *keys, const double *values,
               int64_t B, int64_t nkv, int64_t g, int64_t T, int64_t Tkeys, int64_t hs,
               const int64_t *qpos, const int32_t *table, int64_t ntab, const double *vscale,
               double *out, int64_t impl, int64_t nthreads) {
    if (hs % 32 != 0 || hs <= 0 || hs > 128)
        return 0;
    fwd_tile_fn tile = NULL;
    int form = 0;
#ifdef HAVE_VNNI
    if ((impl == 0 || impl == 2) && have_vnni())
        tile = fwd_tile_vnni, form = 2;
#endif
#ifdef HAVE_AVX2_KERNELS
    if (!tile && (impl == 0 || impl == 3) && have_avx2())
        tile = fwd_tile_avx2, form = 3;
#endif
    if (!tile)
        return 0;
    struct fwd_job job = {tile, qi, f, keys, values, nkv, g, T, Tkeys, hs, qpos, table, ntab,
                          vscale, out};
    par_for(attend_fwd_pairs, &job, B * nkv, 1, nthreads);
    return form;
}

/* LM head (engine._freq_rows): logits z = value * ws[v] * s[m] (2^12 per nat folded into ws),
 * d = -(z - max z), i = round(min(d, ntab - 1)) (the same), e = table[i] (<= 2^30),
 * freq = e * budget // sum(e) + 1  (e * budget < 2^54, exact in int64). */
MULTIVERSION512
void head_freqs_portable(const int32_t *restrict acc, int64_t M, int64_t V,
                         const double *restrict ws, const double *restrict s,
                         const int64_t *restrict table, int64_t ntab, int64_t budget,
                         int32_t *restrict out) {
    double *restrict z = malloc(sizeof(double) * V);
    double last = (double)(ntab - 1);
    for (int64_t i = 0; i < M; i++) {
        const int32_t *hi = acc + i * V, *lo = acc + (M + i) * V;
        double si = s[i];
        for (int64_t v = 0; v < V; v++) z[v] = acc_value(hi, lo, v) * ws[v] * si;
        /* no z is NaN, and none is -0: value 0 gives +0, ws and s are nonzero */
        double m = max_of(z, V, 0);
        int32_t *restrict o = out + i * V;
        int64_t total = 0;
        for (int64_t v = 0; v < V; v++) {
            double d = -(z[v] - m);
            int64_t e = table[(int32_t)round_even(MIN(d, last))];
            o[v] = (int32_t)e;
            total += e;
        }
        /* floor(e * budget / total) without a 64-bit division per entry (the slowest step): the
         * double estimate is within 1 of the quotient (quotient <= budget < 2^24, relative error
         * < 2^-51), and one correction each way makes it exact. */
        double inv = 1.0 / (double)total;
        for (int64_t v = 0; v < V; v++) {
            int64_t n = (int64_t)o[v] * budget;
            int64_t q = (int64_t)((double)n * inv);
            int64_t r = n - q * total;
            q -= r < 0;
            q += r >= total;
            o[v] = (int32_t)(q + 1);
        }
    }
    free(z);
}

#ifdef HAVE_VNNI
/* head_freqs 8 entries at a time. Indices at the table's last entry (logits more than ~21 nats
 * below the maximum: a third of them) still load their (last) entry: skipping them in a masked
 * gather was slower. The kernel is bound by memory: reading the (2 * 64, V) accumulators (25 MB
 * per call) and, in the engine, first-touch page faults of the 200 MB-per-segment output. */
AVX512_TARGET static void head_freqs_avx512(const int32_t *restrict acc, int64_t M, int64_t V,
                                            const double *restrict ws, const double *restrict s,
                                            const int64_t *restrict table, int64_t ntab,
                                            int64_t budget, int32_t *restrict out) {
    double *restrict z = malloc(sizeof(double) * V);
    const double last = (double)(ntab - 1);
    const __m512d c128 = _mm512_set1_pd(128.0), vlast = _mm512_set1_pd(last),
                  magic = _mm512_set1_pd(6755399441055744.0), sign = _mm512_set1_pd(-0.0);
    const __m512i vb = _mm512_set1_epi64(budget), one = _mm512_set1_epi64(1);
    for (int64_t i = 0; i < M; i++) {
        const int32_t *hi = acc + i * V, *lo = acc + (M + i) * V;
        const __m512d vs = _mm512_set1_pd(s[i]);
        __m512d mx0 = _mm512_set1_pd(-INFINITY), mx1 = mx0;
        int64_t v = 0;
        for (; v + 16 <= V; v += 16) {
            __m512d a0 = _mm512_add_pd(
                _mm512_mul_pd(_mm512_cvtepi32_pd(_mm256_loadu_si256((const void *)(hi + v))), c128),
                _mm512_cvtepi32_pd(_mm256_loadu_si256((const void *)(lo + v))));
            __m512d a1 = _mm512_add_pd(
                _mm512_mul_pd(_mm512_cvtepi32_pd(_mm256_loadu_si256((const void *)(hi + v + 8))),
                              c128),
                _mm512_cvtepi32_pd(_mm256_loadu_si256((const void *)(lo + v + 8))));
            a0 = _mm512_mul_pd(_mm512_mul_pd(a0, _mm512_loadu_pd(ws + v)), vs);
            a1 = _mm512_mul_pd(_mm512_mul_pd(a1, _mm512_loadu_pd(ws + v + 8)), vs);
            _mm512_storeu_pd(z + v, a0);
            _mm512_storeu_pd(z + v + 8, a1);
            mx0 = _mm512_max_pd(mx0, a0);
            mx1 = _mm512_max_pd(mx1, a1);
        }
        for (; v < V; v += 8) {
            __mmask8 k = (__mmask8)((1u << MIN(8, V - v)) - 1);
            __m512d a = _mm512_add_pd(
                _mm512_mul_pd(_mm512_cvtepi32_pd(_mm256_maskz_loadu_epi32(k, hi + v)), c128),
                _mm512_cvtepi32_pd(_mm256_maskz_loadu_epi32(k, lo + v)));
            a = _mm512_mul_pd(_mm512_mul_pd(a, _mm512_maskz_loadu_pd(k, ws + v)), vs);
            _mm512_mask_storeu_pd(z + v, k, a);
            mx0 = _mm512_mask_max_pd(mx0, k, mx0, a);
        }
        const __m512d m = _mm512_set1_pd(_mm512_reduce_max_pd(_mm512_max_pd(mx0, mx1)));
        int32_t *restrict o = out + i * V;
        /* indices 8 at a time into o, then the table entries by scalar loads: on this AMD EPYC
         * (Zen 4) the kernel alone took ~60-65 ms per 1024 rows so, 75-85 ms with vpgatherdq
         * (masked or not), 65-85 ms in L1-sized blocks of 128-2048 entries */
        for (v = 0; v < V; v += 8) {
            __mmask8 k = (__mmask8)((1u << MIN(8, V - v)) - 1);
            __m512d d = _mm512_xor_pd(_mm512_sub_pd(_mm512_maskz_loadu_pd(k, z + v), m), sign);
            d = _mm512_min_pd(d, vlast);                        /* d < last ? d : last */
            d = _mm512_sub_pd(_mm512_add_pd(d, magic), magic);  /* round_even */
            store8x32(o + v, k, _mm512_cvtpd_epi32(d));          /* exact integers */
        }
        int64_t total = 0;
        for (v = 0; v < V; v++) {
            int64_t e = table[o[v]];
            o[v] = (int32_t)e;
            total += e;
        }
        /* the portable loop's exact floor division: double estimate, one correction each way */
        const __m512d inv = _mm512_set1_pd(1.0 / (double)total);
        const __m512i vt = _mm512_set1_epi64(total);
        for (v = 0; v < V; v += 8) {
            __mmask8 k = (__mmask8)((1u << MIN(8, V - v)) - 1);
            __m512i n = _mm512_mullo_epi64(_mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(k, o + v)),
                                           vb);
            __m512i q = _mm512_cvttpd_epi64(_mm512_mul_pd(_mm512_cvtepi64_pd(n), inv));
            __m512i r = _mm512_sub_epi64(n, _mm512_mullo_epi64(q, vt));
            q = _mm512_mask_sub_epi64(q, _mm512_cmplt_epi64_mask(r, _mm512_setzero_si512()), q, one);
            q = _mm512_mask_add_epi64(q, _mm512_cmpge_epi64_mask(r, vt), q, one);
            store8x32(o + v, k, _mm512_cvtepi64_epi32(_mm512_add_epi64(q, one)));
        }
    }
    free(z);
}
#endif

/* impl: 0 the fastest this CPU runs, 1 the portable form, 2 the AVX-512 form (where the CPU has
 * it). Returns the form that ran (1 or 2). */
int head_freqs(const int32_t *acc, int64_t M, int64_t V, const double *ws, const double *s,
               const int64_t *table, int64_t ntab, int64_t budget, int32_t *out, int64_t impl) {
#ifdef HAVE_VNNI
    if (impl != 1 && have_avx512()) {
        head_freqs_avx512(acc, M, V, ws, s, table, ntab, budget, out);
        return 2;
    }
#endif
    head_freqs_portable(acc, M, V, ws, s, table, ntab, budget, out);
    return 1;
}
