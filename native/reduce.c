/* pyccl native core: element-wise reduction kernels (see reduce.h for the contract).
 *
 * Written as plain loops that gcc/clang auto-vectorize at -O3.  On x86-64 Linux the portable
 * loops are built twice (AVX2 and baseline SSE2) with target_clones and the loader picks one
 * per CPU, so one wheel is fast everywhere; float16/bfloat16 additionally have hand-written
 * AVX2+F16C loops, chosen at run time (__builtin_cpu_supports), because their conversions
 * dominate otherwise.  Every path gives the same bits; tests/test_reduce.py checks them
 * against the numpy twin in ccl/reduce.py.
 *
 * Nothing here uses -ffast-math semantics: NaN, Inf and signed zeros follow IEEE and numpy.
 * build.py passes -ffp-contract=off (no fused multiply-add changes a rounding) and
 * -fno-trapping-math (we never read FP exception flags; it lets gcc if-convert the NaN-aware
 * MIN/MAX selects so those loops vectorize).
 *
 * Aliasing: dst may equal a or b.  Each iteration reads a[i], b[i] and then writes dst[i]
 * only, so there is no loop-carried dependence even in place; the ivdep pragma tells the
 * compiler so, instead of it versioning every loop on a runtime overlap check.
 */
#include "reduce.h"

#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define PYCCL_INLINE static inline __attribute__((always_inline))
#else
#define PYCCL_INLINE static inline
#endif

#if defined(__clang__)
#define PYCCL_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define PYCCL_IVDEP _Pragma("GCC ivdep")
#else
#define PYCCL_IVDEP
#endif

/* Function multi-versioning needs ifunc (ELF + glibc), so Linux x86-64 only. */
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    defined(__has_attribute) && !defined(PYCCL_NO_CLONES)
#if __has_attribute(target_clones)
#define PYCCL_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef PYCCL_CLONES
#define PYCCL_CLONES
#endif

typedef union {
    float f;
    uint32_t u;
} pyccl_f32bits;

PYCCL_INLINE uint32_t f2u(float f) {
    pyccl_f32bits v;
    v.f = f;
    return v.u;
}

PYCCL_INLINE float u2f(uint32_t u) {
    pyccl_f32bits v;
    v.u = u;
    return v.f;
}

/* ---- float16 <-> float32, branch-free so the loops vectorize -------------------------- */

PYCCL_INLINE float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t em = (uint32_t)(h & 0x7fffu);
    uint32_t normal = (em << 13) + (112u << 23);       /* rebias exponent 15 -> 127 */
    uint32_t infnan = (em << 13) | 0x7f800000u;         /* keeps the NaN payload, like numpy */
    uint32_t sub = f2u((float)(int32_t)em * 5.9604644775390625e-8f); /* em * 2^-24, exact */
    uint32_t m_inf = 0u - (uint32_t)(em >= 0x7c00u); /* all-ones masks: bit-select, no branch */
    uint32_t m_sub = 0u - (uint32_t)(em < 0x0400u);
    uint32_t r = (infnan & m_inf) | (sub & m_sub) | (normal & ~(m_inf | m_sub));
    return u2f(r | sign);
}

/* Round to nearest-even.  NaN keeps its sign and top payload bits and is never turned into
 * Inf (numpy's npy_floatbits_to_halfbits does exactly this). */
PYCCL_INLINE uint16_t f2h(float f) {
    uint32_t u = f2u(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    uint32_t nanp = (a >> 13) & 0x3ffu;
    uint32_t nan = 0x7c00u | nanp | (uint32_t)(nanp == 0u);
    /* |f| < 2^-14: subnormal or zero.  Adding 0.5f (ulp 2^-24, the f16 subnormal step) rounds
     * the mantissa to nearest-even in hardware; the low bits are then the f16 bits. */
    uint32_t sub = f2u(u2f(a) + 0.5f) - 0x3f000000u;
    /* normal: rebias, then round to nearest-even on the 13 dropped bits (a carry into the
     * exponent is the right answer, up to Inf). */
    uint32_t norm = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    uint32_t m_nan = 0u - (uint32_t)(a > 0x7f800000u);
    uint32_t m_inf = 0u - (uint32_t)(a >= 0x47800000u);
    uint32_t m_sub = 0u - (uint32_t)(a < 0x38800000u);
    uint32_t r = (nan & m_nan) | (0x7c00u & m_inf & ~m_nan) | (sub & m_sub) |
                 (norm & ~(m_inf | m_sub));
    return (uint16_t)(r | sign);
}

/* ---- bfloat16 <-> float32 -------------------------------------------------------------- */

PYCCL_INLINE float b2f(uint16_t h) { return u2f((uint32_t)h << 16); }

/* Round to nearest-even; NaN becomes the quiet NaN 0x7fc0 with its sign, as ml_dtypes does. */
PYCCL_INLINE uint16_t f2b(float f) {
    uint32_t u = f2u(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = ((u >> 16) & 0x8000u) | 0x7fc0u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

/* ---- element ops ----------------------------------------------------------------------- */

/* numpy's np.minimum/np.maximum for float32/float64: a NaN in either input gives NaN (a's if
 * a is NaN); ties (including -0 vs +0) give b. */
#define FMIN(x, y) ((x) != (x) ? (x) : ((x) < (y) ? (x) : (y)))
#define FMAX(x, y) ((x) != (x) ? (x) : ((x) > (y) ? (x) : (y)))
#define IMIN(x, y) ((x) < (y) ? (x) : (y))
#define IMAX(x, y) ((x) > (y) ? (x) : (y))

#define LOOP(T, EXPR)                                                   \
    do {                                                                \
        T *d_ = (T *)dst;                                               \
        const T *a_ = (const T *)a;                                     \
        const T *b_ = (const T *)b;                                     \
        PYCCL_IVDEP                                                     \
        for (size_t i = 0; i < n; i++) {                                \
            T x = a_[i], y = b_[i];                                     \
            d_[i] = (EXPR);                                             \
        }                                                               \
    } while (0)

/* float16 / bfloat16: widen, op in float32, round back. */
#define LOOP16(TO32, FROM32, OP32) LOOP(uint16_t, FROM32(OP32(TO32(x), TO32(y))))
#define ADD(x, y) ((x) + (y))
#define MUL(x, y) ((x) * (y))

/* Integers: wrap-around arithmetic done in the unsigned type U (no signed-overflow UB). */
#define INT_CASES(T, U)                                                 \
    switch (op) {                                                       \
    case PYCCL_SUM: LOOP(T, (T)((U)x + (U)y)); return;                  \
    case PYCCL_PROD: LOOP(T, (T)((U)x * (U)y)); return;                 \
    case PYCCL_MIN: LOOP(T, IMIN(x, y)); return;                        \
    case PYCCL_MAX: LOOP(T, IMAX(x, y)); return;                        \
    default: return;                                                    \
    }

#define FLOAT_CASES(T)                                                  \
    switch (op) {                                                       \
    case PYCCL_SUM: LOOP(T, x + y); return;                             \
    case PYCCL_PROD: LOOP(T, x * y); return;                            \
    case PYCCL_MIN: LOOP(T, FMIN(x, y)); return;                        \
    case PYCCL_MAX: LOOP(T, FMAX(x, y)); return;                        \
    default: return;                                                    \
    }

#define HALF_CASES(TO32, FROM32)                                        \
    switch (op) {                                                       \
    case PYCCL_SUM: LOOP16(TO32, FROM32, ADD); return;                  \
    case PYCCL_PROD: LOOP16(TO32, FROM32, MUL); return;                 \
    case PYCCL_MIN: LOOP16(TO32, FROM32, FMIN); return;                 \
    case PYCCL_MAX: LOOP16(TO32, FROM32, FMAX); return;                 \
    default: return;                                                    \
    }

PYCCL_CLONES
static void reduce_portable(void *dst, const void *a, const void *b, size_t n, int dtype, int op) {
    switch (dtype) {
    case PYCCL_FLOAT16: HALF_CASES(h2f, f2h)
    case PYCCL_BFLOAT16: HALF_CASES(b2f, f2b)
    case PYCCL_FLOAT32: FLOAT_CASES(float)
    case PYCCL_FLOAT64: FLOAT_CASES(double)
    case PYCCL_INT8: INT_CASES(int8_t, uint8_t)
    case PYCCL_UINT8: INT_CASES(uint8_t, uint8_t)
    case PYCCL_INT32: INT_CASES(int32_t, uint32_t)
    case PYCCL_INT64: INT_CASES(int64_t, uint64_t)
    case PYCCL_BOOL:
        /* numpy bool: add = or, multiply = and; MIN = and, MAX = or.  Output is 0/1. */
        if (op == PYCCL_MIN || op == PYCCL_PROD)
            LOOP(uint8_t, (uint8_t)((x != 0) & (y != 0)));
        else
            LOOP(uint8_t, (uint8_t)((x != 0) | (y != 0)));
        return;
    default:
        return;
    }
}

#define DIV_LOOP(T, EXPR)                                               \
    do {                                                                \
        T *x_ = (T *)x;                                                 \
        for (size_t i = 0; i < n; i++) {                                \
            T v = x_[i];                                                \
            x_[i] = (EXPR);                                             \
        }                                                               \
    } while (0)

PYCCL_CLONES
static void divide_portable(void *x, size_t n, int dtype, int64_t divisor) {
    const float fd = (float)divisor;
    const double dd = (double)divisor;
    switch (dtype) {
    case PYCCL_FLOAT16: DIV_LOOP(uint16_t, f2h(h2f(v) / fd)); return;
    case PYCCL_BFLOAT16: DIV_LOOP(uint16_t, f2b(b2f(v) / fd)); return;
    case PYCCL_FLOAT32: DIV_LOOP(float, v / fd); return;
    case PYCCL_FLOAT64: DIV_LOOP(double, v / dd); return;
    /* Small integers divide in floating point so the loop vectorizes (x86 has no SIMD integer
     * divide).  Exact: for |v| < 2^24 (float) or 2^53 (double) a non-integer quotient is at
     * least 1/divisor away from an integer, more than the division's rounding error, so the
     * truncating conversion gives C's v / divisor. */
    case PYCCL_INT8: DIV_LOOP(int8_t, (int8_t)(int32_t)((float)v / fd)); return;
    case PYCCL_UINT8: DIV_LOOP(uint8_t, (uint8_t)(int32_t)((float)v / fd)); return;
    case PYCCL_INT32: DIV_LOOP(int32_t, (int32_t)((double)v / dd)); return;
    case PYCCL_INT64: DIV_LOOP(int64_t, v / divisor); return;
    default: return; /* bool: AVG is not defined; nothing to do */
    }
}

/* ---- x86-64: AVX2 + F16C paths for float16 / bfloat16 ----------------------------------
 * The portable 16-bit loops vectorize but spend most of their time in the bit-twiddling
 * conversions.  Here F16C converts float16 in one instruction, and bfloat16 widens with an
 * in-lane unpack against zero (its bits become the float32's high half) and narrows with the
 * matching in-lane pack, so element order needs no shuffles.  Results are bit-identical to
 * the portable code: F16C rounds to nearest-even exactly like f2h (and quiets NaN the same
 * way for the NaNs arithmetic produces), and MIN/MAX select an input's original bits. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(PYCCL_NO_X86_SIMD)
#define PYCCL_X86_SIMD 1
#include <immintrin.h>

#define X86_TARGET __attribute__((target("avx2,f16c")))

static int have_avx2_f16c(void) {
    static int cached = -1; /* benign race: every thread computes the same value */
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    }
    return cached;
}

/* lanes where numpy's minimum/maximum pick x: x is NaN, or x < y (x > y). */
X86_TARGET static inline __m256 pick_x_min(__m256 x, __m256 y) {
    return _mm256_or_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q), _mm256_cmp_ps(x, y, _CMP_LT_OQ));
}
X86_TARGET static inline __m256 pick_x_max(__m256 x, __m256 y) {
    return _mm256_or_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q), _mm256_cmp_ps(x, y, _CMP_GT_OQ));
}
X86_TARGET static inline __m256 v_add(__m256 x, __m256 y) { return _mm256_add_ps(x, y); }
X86_TARGET static inline __m256 v_mul(__m256 x, __m256 y) { return _mm256_mul_ps(x, y); }
X86_TARGET static inline __m256 v_min(__m256 x, __m256 y) {
    return _mm256_blendv_ps(y, x, pick_x_min(x, y));
}
X86_TARGET static inline __m256 v_max(__m256 x, __m256 y) {
    return _mm256_blendv_ps(y, x, pick_x_max(x, y));
}

#define LOADH(p) _mm_loadu_si128((const __m128i *)(p))
#define F16_ARITH_LOOP(VOP)                                                          \
    for (; i + 8 <= n; i += 8) {                                                     \
        __m256 x = _mm256_cvtph_ps(LOADH(a + i)), y = _mm256_cvtph_ps(LOADH(b + i)); \
        _mm_storeu_si128((__m128i *)(d + i),                                         \
                         _mm256_cvtps_ph(VOP(x, y), _MM_FROUND_TO_NEAREST_INT));     \
    }
/* MIN/MAX: decide in float32, then blend the original 16-bit inputs (no rounding at all). */
#define F16_SELECT_LOOP(PICK)                                                        \
    for (; i + 8 <= n; i += 8) {                                                     \
        __m128i xh = LOADH(a + i), yh = LOADH(b + i);                                \
        __m256i m = _mm256_castps_si256(PICK(_mm256_cvtph_ps(xh), _mm256_cvtph_ps(yh))); \
        __m128i m16 = _mm_packs_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1)); \
        _mm_storeu_si128((__m128i *)(d + i), _mm_blendv_epi8(yh, xh, m16));          \
    }

/* Returns how many leading elements it did (a multiple of 8); the caller does the rest. */
X86_TARGET static size_t f16_reduce_x86(uint16_t *d, const uint16_t *a, const uint16_t *b,
                                        size_t n, int op) {
    size_t i = 0;
    switch (op) {
    case PYCCL_SUM: F16_ARITH_LOOP(v_add) break;
    case PYCCL_PROD: F16_ARITH_LOOP(v_mul) break;
    case PYCCL_MIN: F16_SELECT_LOOP(pick_x_min) break;
    case PYCCL_MAX: F16_SELECT_LOOP(pick_x_max) break;
    default: break;
    }
    return i;
}

X86_TARGET static size_t f16_divide_x86(uint16_t *x, size_t n, float fd) {
    size_t i = 0;
    const __m256 vd = _mm256_set1_ps(fd);
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_div_ps(_mm256_cvtph_ps(LOADH(x + i)), vd);
        _mm_storeu_si128((__m128i *)(x + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
    return i;
}

/* bfloat16: 16 elements per step.  unpacklo/hi(0, v) put v's bits in each float's high half
 * (per 128-bit lane); packus(lo, hi) undoes it exactly. */
X86_TARGET static inline __m256 bf_lo(__m256i v) {
    return _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), v));
}
X86_TARGET static inline __m256 bf_hi(__m256i v) {
    return _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), v));
}
/* f2b on 8 floats: round to nearest-even, NaN -> sign | 0x7fc0; result in the low 16 bits. */
X86_TARGET static inline __m256i bf_round(__m256 f) {
    const __m256i u = _mm256_castps_si256(f);
    const __m256i hi = _mm256_srli_epi32(u, 16);
    __m256i r = _mm256_add_epi32(u, _mm256_set1_epi32(0x7fff));
    r = _mm256_srli_epi32(_mm256_add_epi32(r, _mm256_and_si256(hi, _mm256_set1_epi32(1))), 16);
    const __m256i nan = _mm256_or_si256(_mm256_and_si256(hi, _mm256_set1_epi32(0x8000)),
                                        _mm256_set1_epi32(0x7fc0));
    return _mm256_blendv_epi8(r, nan, _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
}
#define LOADB(p) _mm256_loadu_si256((const __m256i *)(p))
#define BF16_LOOP(VOP)                                                               \
    for (; i + 16 <= n; i += 16) {                                                   \
        __m256i xv = LOADB(a + i), yv = LOADB(b + i);                                \
        __m256i lo = bf_round(VOP(bf_lo(xv), bf_lo(yv)));                            \
        __m256i hi = bf_round(VOP(bf_hi(xv), bf_hi(yv)));                            \
        _mm256_storeu_si256((__m256i *)(d + i), _mm256_packus_epi32(lo, hi));        \
    }

X86_TARGET static size_t bf16_reduce_x86(uint16_t *d, const uint16_t *a, const uint16_t *b,
                                         size_t n, int op) {
    size_t i = 0;
    switch (op) {
    case PYCCL_SUM: BF16_LOOP(v_add) break;
    case PYCCL_PROD: BF16_LOOP(v_mul) break;
    case PYCCL_MIN: BF16_LOOP(v_min) break; /* exact values: bf_round only canonicalizes NaN */
    case PYCCL_MAX: BF16_LOOP(v_max) break;
    default: break;
    }
    return i;
}

X86_TARGET static size_t bf16_divide_x86(uint16_t *x, size_t n, float fd) {
    size_t i = 0;
    const __m256 vd = _mm256_set1_ps(fd);
    for (; i + 16 <= n; i += 16) {
        __m256i v = LOADB(x + i);
        __m256i lo = bf_round(_mm256_div_ps(bf_lo(v), vd));
        __m256i hi = bf_round(_mm256_div_ps(bf_hi(v), vd));
        _mm256_storeu_si256((__m256i *)(x + i), _mm256_packus_epi32(lo, hi));
    }
    return i;
}
#endif /* PYCCL_X86_SIMD */

/* ---- entry points ---------------------------------------------------------------------- */

void pyccl_reduce(void *dst, const void *a, const void *b, size_t n, int dtype, int op) {
#ifdef PYCCL_X86_SIMD
    if ((dtype == PYCCL_FLOAT16 || dtype == PYCCL_BFLOAT16) && have_avx2_f16c()) {
        size_t done = dtype == PYCCL_FLOAT16
            ? f16_reduce_x86((uint16_t *)dst, (const uint16_t *)a, (const uint16_t *)b, n, op)
            : bf16_reduce_x86((uint16_t *)dst, (const uint16_t *)a, (const uint16_t *)b, n, op);
        if (done == n)
            return;
        dst = (uint16_t *)dst + done;
        a = (const uint16_t *)a + done;
        b = (const uint16_t *)b + done;
        n -= done;
    }
#endif
    reduce_portable(dst, a, b, n, dtype, op);
}

void pyccl_divide(void *x, size_t n, int dtype, int64_t divisor) {
#ifdef PYCCL_X86_SIMD
    if ((dtype == PYCCL_FLOAT16 || dtype == PYCCL_BFLOAT16) && have_avx2_f16c()) {
        size_t done = dtype == PYCCL_FLOAT16 ? f16_divide_x86((uint16_t *)x, n, (float)divisor)
                                             : bf16_divide_x86((uint16_t *)x, n, (float)divisor);
        if (done == n)
            return;
        x = (uint16_t *)x + done;
        n -= done;
    }
#endif
    divide_portable(x, n, dtype, divisor);
}

void pyccl_copy(void *dst, const void *src, size_t nbytes) {
    if (nbytes)
        memcpy(dst, src, nbytes);
}

/* ---- reproducible mode: the rank-ordered wide sum (reduce.h, ccl/reproducible.py) -------- */

#define SUMROWS_BLOCK 64

/* One block of `m` <= SUMROWS_BLOCK elements at a time: acc = row 0, acc += row r for
 * r = 1..nrows-1 (in that order for every element: vectorizing over elements never reorders a
 * row's additions), acc /= divisor, then round once.  WIDE is float for the 16-bit types,
 * double otherwise.  Each block reads every row before it writes dst, so dst may be src[0]. */
#define SUMROWS(T, WIDE, LOAD, STORE)                                           \
    do {                                                                        \
        T *d_ = (T *)dst;                                                       \
        WIDE acc[SUMROWS_BLOCK];                                                \
        const WIDE div = (WIDE)divisor;                                         \
        for (size_t b0 = start; b0 < n; b0 += SUMROWS_BLOCK) {                  \
            size_t m = n - b0 < SUMROWS_BLOCK ? n - b0 : SUMROWS_BLOCK;         \
            const T *r0 = (const T *)src[0] + b0;                               \
            for (size_t j = 0; j < m; j++)                                      \
                acc[j] = LOAD(r0[j]);                                           \
            for (size_t r = 1; r < nrows; r++) {                                \
                const T *rr = (const T *)src[r] + b0;                           \
                for (size_t j = 0; j < m; j++)                                  \
                    acc[j] += LOAD(rr[j]);                                      \
            }                                                                   \
            if (divisor > 1)                                                    \
                for (size_t j = 0; j < m; j++)                                  \
                    acc[j] /= div;                                              \
            for (size_t j = 0; j < m; j++)                                      \
                d_[b0 + j] = STORE(acc[j]);                                     \
        }                                                                       \
    } while (0)

typedef union {
    double f;
    uint64_t u;
} pyccl_f64bits;

#define ID(x) (x)
/* round once; a NaN becomes the canonical quiet NaN (positive, only the top mantissa bit) */
PYCCL_INLINE uint16_t sr_f16(float a) { return a != a ? (uint16_t)0x7e00u : f2h(a); }
PYCCL_INLINE uint16_t sr_bf16(float a) { return a != a ? (uint16_t)0x7fc0u : f2b(a); }
PYCCL_INLINE float sr_f32(double a) { return a != a ? u2f(0x7fc00000u) : (float)a; }
PYCCL_INLINE double sr_f64(double a) {
    pyccl_f64bits v;
    v.u = 0x7ff8000000000000ull;
    return a != a ? v.f : a;
}

#ifdef PYCCL_X86_SIMD
/* The 16-bit wide sums in AVX2 + F16C registers, 8 (float16) or 16 (bfloat16) elements per
 * step, every row added in rank order in float32: the same bits as SUMROWS (F16C and bf_round
 * round to nearest-even like f2h and f2b; NaN lanes are then set to the canonical NaN).
 * Return how many leading elements they did. */
X86_TARGET static size_t f16_sum_x86(uint16_t *d, const void *const *src, size_t nrows, size_t n,
                                     int64_t divisor) {
    size_t i = 0;
    const __m256 vd = _mm256_set1_ps((float)divisor);
    const __m128i canon = _mm_set1_epi16(0x7e00);
    for (; i + 8 <= n; i += 8) {
        __m256 acc = _mm256_cvtph_ps(LOADH((const uint16_t *)src[0] + i));
        for (size_t r = 1; r < nrows; r++)
            acc = _mm256_add_ps(acc, _mm256_cvtph_ps(LOADH((const uint16_t *)src[r] + i)));
        if (divisor > 1)
            acc = _mm256_div_ps(acc, vd);
        __m256i m = _mm256_castps_si256(_mm256_cmp_ps(acc, acc, _CMP_UNORD_Q));
        __m128i m16 = _mm_packs_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
        __m128i h = _mm256_cvtps_ph(acc, _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(d + i), _mm_blendv_epi8(h, canon, m16));
    }
    return i;
}

X86_TARGET static size_t bf16_sum_x86(uint16_t *d, const void *const *src, size_t nrows, size_t n,
                                      int64_t divisor) {
    size_t i = 0;
    const __m256 vd = _mm256_set1_ps((float)divisor);
    const __m256i canon = _mm256_set1_epi32(0x7fc0);
    for (; i + 16 <= n; i += 16) {
        __m256i v = LOADB((const uint16_t *)src[0] + i);
        __m256 lo = bf_lo(v), hi = bf_hi(v);
        for (size_t r = 1; r < nrows; r++) {
            v = LOADB((const uint16_t *)src[r] + i);
            lo = _mm256_add_ps(lo, bf_lo(v));
            hi = _mm256_add_ps(hi, bf_hi(v));
        }
        if (divisor > 1) {
            lo = _mm256_div_ps(lo, vd);
            hi = _mm256_div_ps(hi, vd);
        }
        __m256i rl = _mm256_blendv_epi8(bf_round(lo), canon, _mm256_castps_si256(_mm256_cmp_ps(lo, lo, _CMP_UNORD_Q)));
        __m256i rh = _mm256_blendv_epi8(bf_round(hi), canon, _mm256_castps_si256(_mm256_cmp_ps(hi, hi, _CMP_UNORD_Q)));
        _mm256_storeu_si256((__m256i *)(d + i), _mm256_packus_epi32(rl, rh));
    }
    return i;
}

/* float32 rows in float64 registers, 8 elements per step (vcvtps2pd is exact; vcvtpd2ps rounds
 * with the default mode, nearest-even, as C's (float)). */
X86_TARGET static size_t f32_sum_x86(float *d, const void *const *src, size_t nrows, size_t n,
                                     int64_t divisor) {
    size_t i = 0;
    const __m256d vd = _mm256_set1_pd((double)divisor);
    const __m256 canon = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000));
    for (; i + 8 <= n; i += 8) {
        const float *r0 = (const float *)src[0] + i;
        __m256d lo = _mm256_cvtps_pd(_mm_loadu_ps(r0)), hi = _mm256_cvtps_pd(_mm_loadu_ps(r0 + 4));
        for (size_t r = 1; r < nrows; r++) {
            const float *rr = (const float *)src[r] + i;
            lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm_loadu_ps(rr)));
            hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm_loadu_ps(rr + 4)));
        }
        if (divisor > 1) {
            lo = _mm256_div_pd(lo, vd);
            hi = _mm256_div_pd(hi, vd);
        }
        __m256 f = _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
        _mm256_storeu_ps(d + i, _mm256_blendv_ps(f, canon, _mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
    }
    return i;
}
#endif

PYCCL_CLONES
void pyccl_sum_ptrs(void *dst, const void *const *src, size_t nrows, size_t n, int dtype,
                    int64_t divisor) {
    size_t start = 0; /* elements already done by the SIMD loops */
    if (n == 0 || nrows == 0)
        return;
#ifdef PYCCL_X86_SIMD
    if (dtype == PYCCL_FLOAT16 && have_avx2_f16c())
        start = f16_sum_x86((uint16_t *)dst, src, nrows, n, divisor);
    else if (dtype == PYCCL_BFLOAT16 && have_avx2_f16c())
        start = bf16_sum_x86((uint16_t *)dst, src, nrows, n, divisor);
    else if (dtype == PYCCL_FLOAT32 && have_avx2_f16c())
        start = f32_sum_x86((float *)dst, src, nrows, n, divisor);
#endif
    switch (dtype) {
    case PYCCL_FLOAT16: SUMROWS(uint16_t, float, h2f, sr_f16); return;
    case PYCCL_BFLOAT16: SUMROWS(uint16_t, float, b2f, sr_bf16); return;
    case PYCCL_FLOAT32: SUMROWS(float, double, (double), sr_f32); return;
    case PYCCL_FLOAT64: SUMROWS(double, double, ID, sr_f64); return;
    default: return;
    }
}

void pyccl_sum_rows(void *dst, const void *src, size_t nrows, size_t stride, size_t n, int dtype,
                    int64_t divisor) {
    const void *ptrs[64];
    const void **p = nrows <= 64 ? ptrs : (const void **)malloc(nrows * sizeof(void *));
    if (p == NULL)
        return;
    const size_t item = dtype == PYCCL_FLOAT32 ? 4 : dtype == PYCCL_FLOAT64 ? 8 : 2;
    for (size_t r = 0; r < nrows; r++)
        p[r] = (const char *)src + r * stride * item;
    pyccl_sum_ptrs(dst, p, nrows, n, dtype, divisor);
    if (p != ptrs)
        free((void *)p);
}
