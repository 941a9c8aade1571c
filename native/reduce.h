/* pyccl native core: element-wise reduction kernels.
 *
 * These are the hot loops of every reducing collective (all_reduce, reduce, reduce_scatter):
 * the executor calls them on each received chunk.  The Python wrapper (ccl/reduce.py)
 * validates arguments; these functions trust their inputs.  Each has a pure-numpy twin in
 * ccl/reduce.py that gives identical results and is used by the tests.
 */
#ifndef PYCCL_REDUCE_H
#define PYCCL_REDUCE_H

#include <stddef.h>
#include <stdint.h>

/* dtype codes */
#define PYCCL_FLOAT16 0
#define PYCCL_BFLOAT16 1
#define PYCCL_FLOAT32 2
#define PYCCL_FLOAT64 3
#define PYCCL_INT8 4
#define PYCCL_UINT8 5
#define PYCCL_INT32 6
#define PYCCL_INT64 7
#define PYCCL_BOOL 8

/* op codes (AVG = SUM followed by pyccl_divide) */
#define PYCCL_SUM 0
#define PYCCL_PROD 1
#define PYCCL_MIN 2
#define PYCCL_MAX 3

/* dst[i] = a[i] (op) b[i] for i < n.  dst may be a or b (in place) or disjoint from both;
 * a partial overlap is not allowed.
 *  - integers wrap (two's complement, like numpy);
 *  - float16/bfloat16 are computed in float32 and rounded back to nearest-even;
 *  - MIN/MAX on floats propagate NaN like numpy's np.minimum/np.maximum
 *    (min(a, b) = isnan(a) ? a : (a < b ? a : b), so equal values and signed zeros give b);
 *  - bool: MIN = and, MAX = or; SUM = or, PROD = and (as numpy's add/multiply on bool). */
void pyccl_reduce(void *dst, const void *a, const void *b, size_t n, int dtype, int op);

/* x[i] /= divisor in place (AVG).  Floats: x / (float)divisor (float16/bfloat16 via float32,
 * rounded to nearest-even); float64: x / (double)divisor.  Integers: truncate toward zero, as
 * C's '/'.  divisor >= 1.  bool: no-op. */
void pyccl_divide(void *x, size_t n, int dtype, int64_t divisor);

/* memcpy, for the executor's pipeline copies (releases the GIL through cffi). */
void pyccl_copy(void *dst, const void *src, size_t nbytes);

/* Reproducible mode (ccl/reproducible.py): dst[i] = round((src[0][i] + src[1][i] + ... +
 * src[nrows-1][i]) / divisor).  The additions run left to right in rank order in a wider type
 * (float32 for float16/bfloat16, float64 for float32 and float64), the division (only when
 * divisor > 1) in that type too, then one rounding to nearest-even; a NaN result is written as
 * the canonical quiet NaN (0x7e00, 0x7fc0, 0x7fc00000, 0x7ff8000000000000) so the bytes do not
 * depend on which NaN came first.  float16, bfloat16, float32, float64 only.  dst may be
 * src[0], no other overlap. */
void pyccl_sum_ptrs(void *dst, const void *const *src, size_t nrows, size_t n, int dtype,
                    int64_t divisor);
/* The same over rows src + r * stride elements. */
void pyccl_sum_rows(void *dst, const void *src, size_t nrows, size_t stride, size_t n, int dtype,
                    int64_t divisor);

/* Op codes the node-local (shm) collectives take besides the four above: SUM and AVG by
 * pyccl_sum_ptrs over every rank's part in rank order (reproducible mode). */
#define PYCCL_SUM_WIDE 4
#define PYCCL_AVG_WIDE 5

#endif
