/* Private to the shared-memory C files (shm.c, shm_coll.c, shm_coll_ops.c, shm_cma.c; never
 * cdef'ed): the macros, small helpers, the writes into shared areas, the collectives' segment
 * layout and the step protocol's helpers that more than one of them uses.  shm.h is the
 * contract with Python.
 *
 * The split: shm.c holds the segments and the slot rings (the shm transport); shm_coll.c a
 * collectives segment (set-up, failure records, signature checks, waiting for a peer);
 * shm_coll_ops.c one collective call (its begin and end, the choice of stores, the
 * algorithms and their per-step helpers); shm_cma.c the single-copy algorithms (peers'
 * buffers read in place with process_vm_readv).  Helpers called per step are `static` (here
 * or in the file that calls them), so the split moves no inlining on the hot path; the
 * functions shared between files (wait_one, aborted, fail, cma_*) are hidden (not exported
 * from pyccl._native).
 */
#ifndef PYCCL_SHM_INTERNAL_H
#define PYCCL_SHM_INTERNAL_H

#include "shm.h"
#include "reduce.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SHM_HIDDEN __attribute__((visibility("hidden")))
#define SHM_UNUSED __attribute__((unused)) /* a helper some of the files do not call */

#define LINE 128 /* two 64-byte lines: the adjacent-line prefetcher must not cause sharing */
#define PAGE 4096

#define LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LOAD_RLX(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

static SHM_UNUSED size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }
static SHM_UNUSED size_t min_sz(size_t a, size_t b) { return a < b ? a : b; }

static SHM_UNUSED size_t itemsize(int dtype) {
    switch (dtype) {
    case PYCCL_FLOAT16: case PYCCL_BFLOAT16: return 2;
    case PYCCL_FLOAT32: case PYCCL_INT32: return 4;
    case PYCCL_FLOAT64: case PYCCL_INT64: return 8;
    default: return 1;
    }
}

/* Copy into the caller's buffer.  nt: with streaming (non-temporal) stores, for big outputs
 * that no step has touched yet (all_gather, all_to_all): no read-for-ownership of each
 * destination line and no eviction of the shared buffers the next steps reuse.  Measured
 * here: all_to_all 16-128 MiB +15-35%; all_reduce and broadcast lose (their destination is
 * the in-place buffer, already cached), so they never stream. */
#if defined(__x86_64__)
#include <emmintrin.h>
static SHM_UNUSED void copy_out(void *dst_, const void *src_, size_t n, int nt) {
    char *dst = dst_;
    const char *src = src_;
    if (!nt || n < 4096) {
        memcpy(dst, src, n);
        return;
    }
    size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
    memcpy(dst, src, head);
    dst += head, src += head, n -= head;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    _mm_sfence();
    memcpy(dst + i, src + i, n - i);
}
#else
static SHM_UNUSED void copy_out(void *dst, const void *src, size_t n, int nt) {
    (void)nt;
    memcpy(dst, src, n);
}
#endif

/* ---- writes into shared areas (the choice of stores: shm_coll_ops.c) ----------------------- */
#define SHARE_MIN 16384          /* smaller writes: always plain */
/* the kind of the call in progress on this thread (defined in shm_coll_ops.c) */
extern __thread int call_kind SHM_HIDDEN;

/* Stream a write of n bytes into a shared area?  The current call's kind, for big writes. */
static SHM_UNUSED int stream_shared(size_t n) { return n >= SHARE_MIN && call_kind; }

/* dst (shared) = src, with the current call's kind of stores. */
static SHM_UNUSED void put_shared(void *dst, const void *src, size_t n) {
    copy_out(dst, src, n, stream_shared(n));
}

/* ---- waiting ---------------------------------------------------------------------------
 * A waiter spins while that can pay off (the awaited rank runs on another core), then blocks
 * in futex(FUTEX_WAIT) on the awaited rank's wake word; a publisher wakes blocked waiters.
 * Blocking, not sched_yield(): on a shared core a yield often hands the CPU back to the
 * yielder (the scheduler owes the peer nothing yet), while a futex sleep is a clean handoff.
 * Sleeps are cut to 1 ms so the caller checks its deadline and the peer's liveness. */
#if defined(__linux__)
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
static SHM_UNUSED void futex_wait_1ms(uint32_t *addr, uint32_t val) {
    struct timespec ts = {0, 1000000};
    syscall(SYS_futex, addr, FUTEX_WAIT, val, &ts, NULL, 0); /* shared: not _PRIVATE */
}
static SHM_UNUSED void futex_wake_all(uint32_t *addr) {
    syscall(SYS_futex, addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}
#else
static SHM_UNUSED void futex_wait_1ms(uint32_t *addr, uint32_t val) {
    (void)addr, (void)val;
    struct timespec ts = {0, 50000};
    nanosleep(&ts, NULL);
}
static SHM_UNUSED void futex_wake_all(uint32_t *addr) { (void)addr; }
#endif

/* ---- collectives: shared layout --------------------------------------------------------- */

typedef struct {
    uint64_t magic;
    uint32_t version, nranks;
    uint64_t half_bytes, part_bytes, small_bytes, data_off, size, nt_bytes;
    uint32_t flags;
    uint32_t attached;   /* atomic */
    uint32_t abort_by;   /* (rank + 1) | code << 24 of the first rank that gave up; 0: none */
} coll_hdr;

typedef struct {
    uint64_t cnt;        /* written only by its rank */
    int32_t pid;
    int32_t cpu;         /* where the rank last published or began waiting (sched_getcpu) */
    uint64_t pidns;
    uint32_t wake;       /* futex word: bumped by every publish */
    uint32_t waiters;    /* ranks blocked (or about to block) on `wake` */
    struct {             /* signatures of the last 4 calls, slot call % 4 (check_sig) */
        uint64_t call;   /* call number (0 while the slot is rewritten) */
        uint64_t bytes;
        uint32_t what, pad;
    } sig[4];
} rank_line;

#define HDR(c) ((coll_hdr *)(c)->base)
typedef char rank_line_fits_a_line[sizeof(rank_line) <= LINE ? 1 : -1];
#define LINE_OF(c, r) ((rank_line *)((c)->base + LINE * (size_t)(1 + (r))))

/* Defined in shm_coll.c, used by shm_coll_ops.c too. */
SHM_HIDDEN int wait_one(pyccl_coll *c, int r, uint64_t target);
SHM_HIDDEN int aborted(pyccl_coll *c, uint32_t ab, uint64_t target);
/* Record a failure (err_* fields), mark the segment failed; returns code. */
SHM_HIDDEN int fail(pyccl_coll *c, int code, int r, uint64_t target);

/* Single-copy collectives (shm_cma.c), called by shm_coll_ops.c after op_begin when the call
 * is at least c->cma_bytes per rank. */
SHM_HIDDEN int cma_all_reduce(pyccl_coll *c, char *out, const char *in, size_t count, int dtype, int op);
SHM_HIDDEN int cma_reduce_scatter(pyccl_coll *c, char *out, const char *in, size_t count, int dtype, int op);
SHM_HIDDEN int cma_all_gather(pyccl_coll *c, char *out, const char *in, size_t nbytes);
SHM_HIDDEN int cma_broadcast(pyccl_coll *c, char *buf, size_t nbytes, int root);


/* ---- the step protocol's helpers (shm_coll.c explains it), used by shm_coll_ops.c and
 * shm_cma.c: static here so each file inlines them on its hot path ------------------------ */
#include <sched.h>

static SHM_UNUSED char *half_of(pyccl_coll *c, int r, uint64_t g) {
    return c->base + HDR(c)->data_off + (2 * (size_t)r + (size_t)(g & 1)) * c->half_bytes;
}

/* Wait until every peer's counter >= target. */
static SHM_UNUSED int wait_all(pyccl_coll *c, uint64_t target) {
    if (c->seen >= target)
        return 0;
    for (int i = 1; i < c->nranks; i++) {
        int rc = wait_one(c, (c->rank + i) % c->nranks, target);
        if (rc)
            return rc;
    }
    c->seen = target;
    return 0;
}

/* Start a step in which this rank writes: its half (g & 1) must be free (every peer has
 * finished reading step g - 2, i.e. reached g - 1).  Returns the step number. */
static SHM_UNUSED int begin_write(pyccl_coll *c, uint64_t *g) {
    *g = c->g + 1;
    return wait_all(c, *g - 1);
}

static SHM_UNUSED void publish(pyccl_coll *c, uint64_t g) {
    rank_line *me = LINE_OF(c, c->rank);
    c->g = g;
    me->cpu = sched_getcpu();
    STORE_REL(&me->cnt, g);
    __atomic_store_n(&me->wake, (uint32_t)g, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&me->waiters, __ATOMIC_SEQ_CST))
        futex_wake_all(&me->wake);
}

#define TRY(x)                  \
    do {                        \
        int rc_ = (x);          \
        if (rc_)                \
            return rc_;         \
    } while (0)

/* dst = src[0] (op) src[1] (op) ... (op) src[n-1], left to right: the one reduction order every
 * path uses, so every rank gets the same bits (ccl/shm_collectives.py: reduce_in_order is
 * the numpy twin).  dst may alias any src only if it is src[0]. */
static SHM_UNUSED void reduce_in_order(void *dst, const void *const *src, int n, size_t count, int dtype,
                            int op) {
    if (op >= PYCCL_SUM_WIDE) { /* reproducible mode: one wide pass, rank order, one rounding */
        pyccl_sum_ptrs(dst, src, (size_t)n, count, dtype, op == PYCCL_AVG_WIDE ? n : 1);
        return;
    }
    if (n == 1) {
        if (dst != src[0])
            memcpy(dst, src[0], count * itemsize(dtype));
        return;
    }
    pyccl_reduce(dst, src[0], src[1], count, dtype, op);
    for (int r = 2; r < n; r++)
        pyccl_reduce(dst, dst, src[r], count, dtype, op);
}

#define MAX_LOCAL_SRC 1024

#endif
