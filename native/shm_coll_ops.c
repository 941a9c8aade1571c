/* pyccl native core: one node-local collective call: its begin and end (the signature the
 * peers check, the choice of plain or streaming stores, timed per call), the algorithms
 * (all_reduce/reduce, reduce_scatter, all_gather, broadcast, all_to_all, barrier) and the
 * per-step helpers they inline.  The step protocol and the waits are shm_coll.c; see shm.h
 * for the contract.
 */
#define _GNU_SOURCE
#include "shm_internal.h"

#include <sched.h>
#include <string.h>

/* ---- writes into shared areas ------------------------------------------------------------
 * A shared line the peer has just read sits in the peer's cache: a plain store must first take
 * it back (read-for-ownership, invalidating the peer's copy).  What that costs depends on
 * where the two cores sit.  Measured on this project's 2-vCPU VM, whose vCPUs the host moves
 * around: plain stores ran at ~40 GB/s in some minutes and ~2.5 GB/s in others, streaming
 * stores at 14-27 GB/s in both, but data written that way is slower for the peer to read
 * (from memory, not from a cache).  Timing the stores alone misleads (streaming stores look
 * cheap to issue), so each communicator times whole calls per (op, size class) with either
 * kind (calls 2-7 of a class alternate; the first, which pays for first touches, is not timed),
 * then uses the cheaper and tries the other every 16th call (choose_kind/op_end).
 * All ranks make the same calls, so they explore on the same calls.  Measured here (2 ranks,
 * 1-128 MiB, bench/collectives.py): while plain stores were slow, plain-only collectives ran
 * 3-5x slower than streaming or measured ones; while they were fast, streaming-only ran up to 2x
 * slower than plain.  PYCCL_SHM_STREAM=0/1 forces one kind.  Only speed depends on the choice,
 * never the bytes written. */
static int share_forced = -1;     /* PYCCL_SHM_STREAM: -1 measure (default), 0 plain, 1 streaming */
static int share_hint;            /* the kind the collectives found cheaper last (ring sends) */
__thread int call_kind;           /* the kind of the call in progress on this thread */

void pyccl_share_force(int kind) { share_forced = kind < 0 ? -1 : !!kind; }
int pyccl_share_hint(void) { return share_forced >= 0 ? share_forced : share_hint; }

#if defined(__x86_64__)
#include <x86intrin.h>
static uint64_t ticks(void) { return __rdtsc(); }
#else
static uint64_t ticks(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
#endif

/* This rank's own block of an all_gather/all_to_all output: streamed like the peers' blocks
 * (nt) unless it overlaps the input (then memmove).  Measured, all_to_all 16 MiB on 2 ranks,
 * runs alternated: 1484-1625 us streamed against 1616-1738 us with memmove. */
static void move_own(char *dst, const char *src, size_t n, int nt) {
    if (dst == src)
        return;
    if (dst + n <= src || src + n <= dst)
        copy_out(dst, src, n, nt);
    else
        memmove(dst, src, n);
}

/* A kind's cost in a class: the least of its last KIND_KEEP call times (0: none yet).  The
 * least, not an average: a call's time also holds the wait for a late peer, which only adds. */
static uint64_t kind_cost(pyccl_coll *c, int cls, int kind) {
    const uint64_t n = c->kind_timed[cls][kind] < KIND_KEEP ? c->kind_timed[cls][kind] : KIND_KEEP;
    uint64_t best = 0;
    for (uint64_t i = 0; i < n; i++)
        if (!best || c->kind_time[cls][kind][i] < best)
            best = c->kind_time[cls][kind][i];
    return best;
}

/* Pick the kind of shared stores for a call of `bytes` (op code `what`): forced, or the cheaper
 * as timed for its (op, size class), or, every 16th call of a class or while one kind has no
 * time yet, the other one. */
#define KIND_MIN_BYTES (256u << 10) /* smaller calls: plain stores, not timed */
static void choose_kind(pyccl_coll *c, int what, uint64_t bytes) {
    c->kind_cls = -1;
    call_kind = 0;
    if (share_forced >= 0) {
        call_kind = share_forced;
        return;
    }
    if (bytes < KIND_MIN_BYTES || what < 1 || what > KIND_OPS)
        return;
    int size_cls = 0;
    for (uint64_t b = bytes / KIND_MIN_BYTES; b >= 4 && size_cls < KIND_SIZES - 1; b /= 4)
        size_cls++;
    const int cls = (what - 1) * KIND_SIZES + size_cls;
    const uint64_t cost[2] = {kind_cost(c, cls, 0), kind_cost(c, cls, 1)};
    const uint64_t n = ++c->kind_calls[cls];
    if (n == 1)
        return; /* the first call of a class pays for first touches: plain, not timed */
    int kind = cost[1] && cost[1] < cost[0];
    if (n < 8)
        kind = (int)(n & 1); /* calls 2..7 alternate, so both kinds have a fair start */
    else if (n % 16 == 0)
        kind = !kind;
    c->kind_cls = cls;
    call_kind = kind;
    c->kind_t0 = ticks();
}

/* Every collective starts here: note the call's signature for the peers (check_sig).  A
 * segment some rank marked failed stays failed: the communicator is broken, and a late rank
 * must not find stale data that looks complete. */
static int op_begin(pyccl_coll *c, double timeout, int what, int op, int dtype, uint64_t bytes,
                    int root) {
    c->timeout = timeout;
    c->op_g0 = c->g;
    c->err_code = c->err_cause = 0;
    c->err_rank = -1;
    uint32_t ab = LOAD_ACQ(&HDR(c)->abort_by);
    if (ab && (ab & 0xffffffu) != (uint32_t)c->rank + 1)
        return aborted(c, ab, 0);
    rank_line *me = LINE_OF(c, c->rank);
    c->prev_bytes = c->sig_bytes;
    c->prev_what = c->sig_what;
    c->sig_bytes = bytes;
    c->sig_what = (uint32_t)what | (uint32_t)(op + 1) << 4 | (uint32_t)(dtype + 1) << 8 |
                  (uint32_t)(root + 1) << 16;
    uint64_t n = ++c->ncall;
    STORE_REL(&me->sig[n & 3].call, 0);
    STORE_REL(&me->sig[n & 3].bytes, c->sig_bytes);
    STORE_REL(&me->sig[n & 3].what, c->sig_what);
    STORE_REL(&me->sig[n & 3].call, n);
    choose_kind(c, what, bytes);
    return 0;
}

/* After a call: its time per KiB goes into the average of the kind it used. */
static int op_end(pyccl_coll *c, int rc) {
    if (c->kind_cls < 0)
        return rc;
    if (!rc) {
        const uint64_t per_kib = (ticks() - c->kind_t0) * 1024 / (c->sig_bytes ? c->sig_bytes : 1);
        const int cls = c->kind_cls;
        c->kind_time[cls][call_kind][c->kind_timed[cls][call_kind]++ % KIND_KEEP] = per_kib ? per_kib : 1;
        const uint64_t plain = kind_cost(c, cls, 0), stream = kind_cost(c, cls, 1);
        if (plain && stream)
            share_hint = stream < plain;
    }
    call_kind = 0;
    c->kind_cls = -1;
    return rc;
}

/* Single copy (shm_cma.c) for a call of `bytes` per rank, from `threshold` (0: never)?  The same
 * answer on every rank (the thresholds were agreed by pyccl_coll_cma_probe).  Such a call writes no shared area, so it is
 * not timed for the choice of stores. */
static int single_copy_from(pyccl_coll *c, uint64_t bytes, uint64_t threshold) {
    if (!threshold || bytes < threshold)
        return 0;
    c->kind_cls = -1;
    call_kind = 0;
    return 1;
}
static int single_copy(pyccl_coll *c, uint64_t bytes) { return single_copy_from(c, bytes, c->cma_bytes); }

/* ---- all_reduce / reduce --------------------------------------------------------------- */

/* res (shared) and, unless out is NULL, out (private) = the reduction of src, in blocks that
 * stay in L1: the result is computed once, stored into the shared area with the call's kind of
 * stores, and copied to out from the cache instead of re-reading res. */
#define BLOCK_BYTES 8192
static void reduce_to_both(char *res, char *out, const void *const *src, int n, size_t count,
                           int dtype, int op) {
    static __thread char tmp[BLOCK_BYTES] __attribute__((aligned(64)));
    const size_t item = itemsize(dtype), per = BLOCK_BYTES / item;
    const int kind = stream_shared(count * item); /* for the whole result, as put_shared */
    const void *s[MAX_LOCAL_SRC];
    for (size_t k = 0; k < count; k += per) {
        const size_t L = min_sz(per, count - k);
        for (int r = 0; r < n; r++)
            s[r] = (const char *)src[r] + k * item;
        reduce_in_order(tmp, s, n, L, dtype, op);
        copy_out(res + k * item, tmp, L * item, kind);
        if (out)
            memcpy(out + k * item, tmp, L * item);
    }
}

/* One-shot: everybody copies its whole input into its half, then every reader reduces all the
 * halves itself.  One handshake; used while the message is small. */
static int all_reduce_one_shot(pyccl_coll *c, char *out, const char *in, size_t count,
                               int dtype, int op, int root) {
    uint64_t g;
    size_t nbytes = count * itemsize(dtype);
    TRY(begin_write(c, &g));
    put_shared(half_of(c, c->rank, g), in, nbytes);
    publish(c, g);
    if (root >= 0 && root != c->rank)
        return 0;
    TRY(wait_all(c, g));
    const void *src[MAX_LOCAL_SRC];
    for (int r = 0; r < c->nranks; r++)
        src[r] = half_of(c, r, g);
    reduce_in_order(out, src, c->nranks, count, dtype, op);
    return 0;
}

/* Pipelined reduce-scatter + all-gather in shared memory.  Each step covers nranks parts of
 * part_bytes: (A) every rank copies the parts the others own into its half; (B) every rank
 * reduces its own part from everybody's copies (its own straight from `in`) into its other
 * half and copies that to `out`; then gathers the others' reduced parts. */
static int all_reduce_pipelined(pyccl_coll *c, char *out, const char *in, size_t count,
                                int dtype, int op, int root) {
    const int P = c->nranks, me = c->rank;
    const size_t item = itemsize(dtype);
    size_t part = c->part_bytes / item;
    if (part == 0)
        part = 1;
    const size_t step = part * (size_t)P;
    const int gather = root < 0 || root == me;
    const int nt = 0; /* in place: `out` was just read, so its lines are cached already */
    const void *src[MAX_LOCAL_SRC];
    for (size_t s0 = 0; s0 < count; s0 += step) {
        const size_t L = min_sz(step, count - s0);
#define BLO(j) (L * (size_t)(j) / (size_t)P)
#define BLEN(j) (BLO((j) + 1) - BLO(j))
        uint64_t g;
        TRY(begin_write(c, &g));
        char *mine = half_of(c, me, g);
        for (int j = 0; j < P; j++)
            if (j != me)
                put_shared(mine + BLO(j) * item, in + (s0 + BLO(j)) * item, BLEN(j) * item);
        publish(c, g);
        TRY(wait_all(c, g));
        /* (B) step g + 1: my reduced part into my other half */
        const uint64_t g2 = g + 1;
        char *res = half_of(c, me, g2) + BLO(me) * item;
        for (int r = 0; r < P; r++)
            src[r] = r == me ? (const void *)(in + (s0 + BLO(me)) * item)
                             : (const void *)(half_of(c, r, g) + BLO(me) * item);
        if (BLEN(me))
            reduce_to_both(res, gather ? out + (s0 + BLO(me)) * item : NULL, src, P, BLEN(me),
                           dtype, op);
        publish(c, g2);
        if (!gather)
            continue;
        for (int i = 1; i < P; i++) {
            int j = (me + i) % P;
            TRY(wait_one(c, j, g2));
            copy_out(out + (s0 + BLO(j)) * item, half_of(c, j, g2) + BLO(j) * item, BLEN(j) * item, nt);
        }
        c->seen = g2;
#undef BLO
#undef BLEN
    }
    return 0;
}

static int coll_all_reduce(pyccl_coll *c, void *out, const void *in, size_t count, int dtype,
                          int op, int root, double timeout) {
    TRY(op_begin(c, timeout, root < 0 ? PYCCL_COLL_ALL_REDUCE : PYCCL_COLL_REDUCE, op, dtype,
                 count * itemsize(dtype), root));
    if (count == 0 || c->nranks > MAX_LOCAL_SRC)
        return 0;
    if (count * itemsize(dtype) <= c->small_bytes)
        return all_reduce_one_shot(c, out, in, count, dtype, op, root);
    if (root < 0 && (single_copy(c, count * itemsize(dtype)) ||
                     single_copy_from(c, count * itemsize(dtype), c->cma_crowd_bytes)))
        return cma_all_reduce(c, out, in, count, dtype, op);
    return all_reduce_pipelined(c, out, in, count, dtype, op, root);
}

/* ---- reduce_scatter ----------------------------------------------------------------------
 * Each step: every rank copies the slices the others own into its half, then reduces its own
 * slice from everybody's copies straight into `out`. */
static int coll_reduce_scatter(pyccl_coll *c, void *out_, const void *in_, size_t count,
                              int dtype, int op, double timeout) {
    TRY(op_begin(c, timeout, PYCCL_COLL_REDUCE_SCATTER, op, dtype, count * itemsize(dtype), -1));
    const int P = c->nranks, me = c->rank;
    if (count == 0 || P > MAX_LOCAL_SRC)
        return 0;
    char *out = out_;
    const char *in = in_;
    if (single_copy(c, count * itemsize(dtype)))
        return cma_reduce_scatter(c, out, in, count, dtype, op);
    const size_t item = itemsize(dtype);
    size_t slice = c->half_bytes / ((size_t)P * item);
    /* out overlapping in (e.g. out = in's own block): reduce my block from a copy, because
     * reduce_in_order writes out before it has read in's block when rank > 0 */
    const int alias = out < in + (size_t)P * count * item && in < out + count * item;
    const void *src[MAX_LOCAL_SRC];
    for (size_t k = 0; k < count; k += slice) {
        const size_t L = min_sz(slice, count - k);
        uint64_t g;
        TRY(begin_write(c, &g));
        char *mine = half_of(c, me, g);
        for (int j = 0; j < P; j++)
            if (j != me || alias)
                put_shared(mine + (size_t)j * L * item, in + ((size_t)j * count + k) * item, L * item);
        publish(c, g);
        TRY(wait_all(c, g));
        for (int r = 0; r < P; r++)
            src[r] = r == me && !alias ? (const void *)(in + ((size_t)me * count + k) * item)
                                       : (const void *)(half_of(c, r, g) + (size_t)me * L * item);
        reduce_in_order(out + k * item, src, P, L, dtype, op);
    }
    return 0;
}

/* ---- data movement ------------------------------------------------------------------------ */

static int coll_all_gather(pyccl_coll *c, void *out_, const void *in_, size_t nbytes,
                          double timeout) {
    TRY(op_begin(c, timeout, PYCCL_COLL_ALL_GATHER, -1, -1, nbytes, -1));
    const int P = c->nranks, me = c->rank;
    char *out = out_;
    const char *in = in_;
    if (nbytes && single_copy(c, nbytes))
        return cma_all_gather(c, out, in, nbytes);
    const int nt = (size_t)P * nbytes >= c->nt_bytes;
    for (size_t k = 0; k < nbytes; k += c->move_bytes) {
        const size_t L = min_sz(c->move_bytes, nbytes - k);
        uint64_t g;
        TRY(begin_write(c, &g));
        put_shared(half_of(c, me, g), in + k, L);
        publish(c, g);
        char *own = out + (size_t)me * nbytes + k;
        move_own(own, in + k, L, nt);
        for (int i = 1; i < P; i++) {
            int r = (me + i) % P;
            TRY(wait_one(c, r, g));
            copy_out(out + (size_t)r * nbytes + k, half_of(c, r, g), L, nt);
        }
        c->seen = g;
    }
    return 0;
}

static int coll_broadcast(pyccl_coll *c, void *buf_, size_t nbytes, int root, double timeout) {
    TRY(op_begin(c, timeout, PYCCL_COLL_BROADCAST, -1, -1, nbytes, root));
    char *buf = buf_;
    if (nbytes && (single_copy(c, nbytes) || single_copy_from(c, nbytes, c->cma_bcast_bytes)))
        return cma_broadcast(c, buf, nbytes, root);
    /* Readers store with streaming stores from nt_bytes only where ranks outnumber the cores:
     * there every reader's copy of the root's cached chunk takes core time the others need, and a
     * streaming store skips reading each destination line first.  4 ranks on the 2-core VM,
     * rounds alternated: 16/64/128 MiB 1.36/1.29/1.37x (load 15-30), 16/128 MiB 0.99/1.13x
     * (load ~1) and 0.93/1.28x (load 8-11).  Where every rank has a core, plain stores won
     * (2 ranks, 16 MiB 0.80x with streaming stores, 128 MiB 1.00x). */
    const int nt = c->crowded && nbytes >= c->nt_bytes;
    for (size_t k = 0; k < nbytes; k += c->move_bytes) {
        const size_t L = min_sz(c->move_bytes, nbytes - k);
        uint64_t g;
        if (c->rank == root) {
            TRY(begin_write(c, &g));
            put_shared(half_of(c, root, g), buf + k, L);
            publish(c, g);
        } else {
            g = c->g + 1;
            publish(c, g); /* finished reading every step < g */
            TRY(wait_one(c, root, g));
            copy_out(buf + k, half_of(c, root, g), L, nt);
        }
    }
    return 0;
}

static int coll_all_to_all(pyccl_coll *c, void *out_, const void *in_, size_t nbytes,
                          double timeout) {
    TRY(op_begin(c, timeout, PYCCL_COLL_ALL_TO_ALL, -1, -1, nbytes, -1));
    const int P = c->nranks, me = c->rank;
    char *out = out_;
    const char *in = in_;
    const size_t slice = c->move_bytes / (size_t)P ? c->move_bytes / (size_t)P : 1;
    const int nt = (size_t)P * nbytes >= c->nt_bytes;
    for (size_t k = 0; k < nbytes; k += slice) {
        const size_t L = min_sz(slice, nbytes - k);
        uint64_t g;
        TRY(begin_write(c, &g));
        char *mine = half_of(c, me, g);
        for (int j = 0; j < P; j++)
            if (j != me)
                put_shared(mine + (size_t)j * L, in + (size_t)j * nbytes + k, L);
        publish(c, g);
        char *own = out + (size_t)me * nbytes + k;
        move_own(own, in + (size_t)me * nbytes + k, L, nt);
        for (int i = 1; i < P; i++) {
            int r = (me + i) % P;
            TRY(wait_one(c, r, g));
            copy_out(out + (size_t)r * nbytes + k, half_of(c, r, g) + (size_t)me * L, L, nt);
        }
        c->seen = g;
    }
    return 0;
}

/* The public collectives: the bodies above, with the call timed for the choice of stores. */
int pyccl_coll_all_reduce(pyccl_coll *c, void *out, const void *in, size_t count, int dtype,
                          int op, int root, double timeout) {
    return op_end(c, coll_all_reduce(c, out, in, count, dtype, op, root, timeout));
}
int pyccl_coll_reduce_scatter(pyccl_coll *c, void *out, const void *in, size_t count,
                              int dtype, int op, double timeout) {
    return op_end(c, coll_reduce_scatter(c, out, in, count, dtype, op, timeout));
}
int pyccl_coll_all_gather(pyccl_coll *c, void *out, const void *in, size_t nbytes,
                          double timeout) {
    return op_end(c, coll_all_gather(c, out, in, nbytes, timeout));
}
int pyccl_coll_broadcast(pyccl_coll *c, void *buf, size_t nbytes, int root, double timeout) {
    return op_end(c, coll_broadcast(c, buf, nbytes, root, timeout));
}
int pyccl_coll_all_to_all(pyccl_coll *c, void *out, const void *in, size_t nbytes,
                          double timeout) {
    return op_end(c, coll_all_to_all(c, out, in, nbytes, timeout));
}

int pyccl_coll_barrier(pyccl_coll *c, double timeout) {
    TRY(op_begin(c, timeout, PYCCL_COLL_BARRIER, -1, -1, 0, -1));
    uint64_t g = c->g + 1;
    publish(c, g);
    return wait_all(c, g);
}
