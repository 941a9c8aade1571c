/* pyccl native core: single-copy collectives on one host, through Linux cross-memory attach
 * (process_vm_readv).  The segment's collectives (shm_coll_ops.c) copy every byte into a
 * shared area and out again; here a rank reads the peers' user buffers in place, so for
 * large messages each byte crosses memory once.  What is shared is only a few addresses per
 * call (in the rank's half of the segment) and the step counters of shm_coll.c, whose waits,
 * deadlines, liveness checks and call signatures apply unchanged.
 *
 * Per call, with P ranks and "slice q" the q-th of P near-equal element ranges:
 *  - all_reduce: exchange (in, out) addresses; rank r reads slice r of every peer's `in` in
 *    blocks that stay in cache, reduces them in rank order with its own and stores slice r of
 *    its `out` (the reduce-scatter); handshake (nobody reads `in` any more, every slice is
 *    final); rank r reads slice q of peer q's `out` straight into its own (the all-gather);
 *    handshake (nobody reads my `out` any more).  Three handshakes, no shared data area.
 *  - reduce_scatter: exchange `in`; reduce block r from every peer's `in`; handshake.
 *  - all_gather: exchange `in`; read every peer's `in` into its block of `out`; handshake.
 *  - broadcast: exchange the buffers' addresses; the root writes part k-1 of its `buf` into
 *    the reader k places after it (process_vm_writev) while every reader reads the other parts
 *    from the root's, so the root's core copies its share too; handshake.  Also on its own
 *    threshold (cma_bcast_bytes, where every rank has a core): of every use of cross-memory
 *    attach measured here, only this one was faster than the segment's path.
 * A rank's own input that overlaps its output where the peers read it is copied first.
 * Reductions run in rank order as everywhere else (ccl/engines/shm.py: single_copy_twin).
 *
 * Whether it can run is decided once per segment by pyccl_coll_cma_probe: every rank reads a
 * word of every peer; the kernel refuses (EPERM) under ptrace restrictions (Yama scope >= 1
 * between siblings, containers without CAP_SYS_PTRACE, non-dumpable processes) or across pid
 * namespaces, and then every rank keeps to the segment's path.
 */
#define _GNU_SOURCE
#include "shm_internal.h"

#include <errno.h>
#include <stdlib.h>
#if defined(__linux__)
#include <sched.h>
#include <sys/uio.h>
#endif

#define CMA_MAX_RANKS 64
#define CMA_PROBE_MAGIC 0x9e3779b97f4a7c15ULL

/* Bytes per source of one reduction block: the P sources and the result stay in L2. */
static size_t cma_block(const pyccl_coll *c) {
    size_t b = (size_t)(512u << 10) / (size_t)c->nranks;
    return b < 16384 ? 16384 : b / 64 * 64;
}

#if defined(__linux__)
int pyccl_cma_read(int pid, void *dst_, uint64_t src, size_t n) {
    char *dst = dst_;
    while (n) {
        struct iovec l = {dst, n}, r = {(void *)(uintptr_t)src, n};
        ssize_t got = process_vm_readv((pid_t)pid, &l, 1, &r, 1, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return got < 0 ? errno : EIO;
        dst += got, src += (uint64_t)got, n -= (size_t)got;
    }
    return 0;
}
/* n bytes of this process at src into process pid's memory at dst (process_vm_writev). */
static int cma_write_pid(int pid, uint64_t dst, const void *src_, size_t n) {
    const char *src = src_;
    while (n) {
        struct iovec l = {(void *)src, n}, r = {(void *)(uintptr_t)dst, n};
        ssize_t got = process_vm_writev((pid_t)pid, &l, 1, &r, 1, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return got < 0 ? errno : EIO;
        dst += (uint64_t)got, src += got, n -= (size_t)got;
    }
    return 0;
}

/* The CPUs this process may run on (its affinity mask; the online count without one). */
static int usable_cpus(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
        return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}
#else /* no cross-memory attach: the probe fails with ENOSYS and every rank keeps the segment */
int pyccl_cma_read(int pid, void *dst, uint64_t src, size_t n) {
    (void)pid, (void)dst, (void)src, (void)n;
    return ENOSYS;
}
static int cma_write_pid(int pid, uint64_t dst, const void *src, size_t n) {
    (void)pid, (void)dst, (void)src, (void)n;
    return ENOSYS;
}
static int usable_cpus(void) { return 1; }
#endif

/* n bytes of peer q at address src into dst, or fail the call naming q. */
static int cma_read(pyccl_coll *c, int q, void *dst, uint64_t src, size_t n) {
    int e = pyccl_cma_read(LINE_OF(c, q)->pid, dst, src, n);
    if (!e)
        return 0;
    c->err_cause = e;
    return fail(c, e == ESRCH ? PYCCL_SHM_PEER_DEAD : PYCCL_SHM_CMA_FAILED, q, c->g);
}

/* n bytes at src into peer q's memory at dst, or fail the call naming q. */
static int cma_write(pyccl_coll *c, int q, uint64_t dst, const void *src, size_t n) {
    int e = cma_write_pid(LINE_OF(c, q)->pid, dst, src, n);
    if (!e)
        return 0;
    c->err_cause = e;
    return fail(c, e == ESRCH ? PYCCL_SHM_PEER_DEAD : PYCCL_SHM_CMA_FAILED, q, c->g);
}

/* Step g: publish (a, b) in this rank's half, wait for everybody's, copy theirs out. */
static int exchange(pyccl_coll *c, uint64_t a, uint64_t b, uint64_t *as, uint64_t *bs) {
    uint64_t g;
    TRY(begin_write(c, &g));
    uint64_t *mine = (uint64_t *)half_of(c, c->rank, g);
    mine[0] = a, mine[1] = b;
    publish(c, g);
    TRY(wait_all(c, g));
    for (int q = 0; q < c->nranks; q++) {
        const uint64_t *h = (const uint64_t *)half_of(c, q, g);
        as[q] = h[0];
        if (bs)
            bs[q] = h[1];
    }
    return 0;
}

/* A handshake: this rank is done reading (and writing) everything of this call so far. */
static int handshake(pyccl_coll *c) {
    const uint64_t g = c->g + 1;
    publish(c, g);
    return wait_all(c, g);
}

static int overlap(const char *a, size_t na, const char *b, size_t nb) {
    return a < b + nb && b < a + na;
}

/* This rank's output overlaps its input where the peers read it: they read a copy (*own,
 * freed by the caller) instead.  Returns 0 or the failure's code. */
static int copy_for_peers(pyccl_coll *c, const char **in, size_t n, char **own) {
    *own = malloc(n);
    if (!*own) {
        c->err_cause = ENOMEM;
        return fail(c, PYCCL_SHM_CMA_FAILED, c->rank, c->g);
    }
    memcpy(*own, *in, n);
    *in = *own;
    return 0;
}

int pyccl_coll_cma_probe(pyccl_coll *c, uint64_t min_bytes, uint64_t bcast_bytes, uint64_t crowd_bytes,
                         double timeout) {
    const int P = c->nranks, me = c->rank;
    c->timeout = timeout;
    c->op_g0 = c->g;
    c->cma_bytes = c->cma_bcast_bytes = c->cma_crowd_bytes = 0;
    c->cma_errno = 0;
    c->cma_rank = c->cma_peer = -1;
    if (P < 2)
        return 0;
    c->cma_probe = CMA_PROBE_MAGIC ^ (uint64_t)me;
    uint64_t addr[CMA_MAX_RANKS], want[CMA_MAX_RANKS], g;
    /* step 1: the address of this rank's probe word; rank 0's thresholds: the shared broadcast
     * only where the ranks need not share cores, the single-copy all_reduce only where they
     * must (measured: bench/JOURNAL.md, 2026-12-07, the shared broadcast) */
    TRY(begin_write(c, &g));
    uint64_t *mine = (uint64_t *)half_of(c, me, g);
    const int cpus = usable_cpus();
    mine[0] = (uint64_t)(uintptr_t)&c->cma_probe, mine[1] = min_bytes;
    mine[2] = cpus >= P ? bcast_bytes : 0;
    mine[3] = cpus < P ? crowd_bytes : 0;
    publish(c, g);
    TRY(wait_all(c, g));
    want[0] = ((const uint64_t *)half_of(c, 0, g))[1];
    want[1] = ((const uint64_t *)half_of(c, 0, g))[2];
    want[2] = ((const uint64_t *)half_of(c, 0, g))[3];
    int err = P > CMA_MAX_RANKS ? E2BIG : 0, bad = -1;
    for (int i = 1; i < P && !err; i++) {
        const int q = (me + i) % P;
        uint64_t word = 0;
        const rank_line *line = LINE_OF(c, q);
        addr[0] = ((const uint64_t *)half_of(c, q, g))[0];
        if (line->pidns != c->pidns)
            err = ESRCH; /* another pid namespace: its pid means nothing here */
        else
            err = pyccl_cma_read(line->pid, &word, addr[0], sizeof word);
        if (!err && word != (CMA_PROBE_MAGIC ^ (uint64_t)q))
            err = EIO;
        if (err)
            bad = q;
    }
    if (!err && (want[0] || want[2])) {
        c->cma_tmp = aligned_alloc(64, (size_t)(P + 1) * cma_block(c));
        if (!c->cma_tmp)
            err = ENOMEM, bad = me;
    }
    /* step 2: every rank's verdict; single copy only if all could read all */
    TRY(begin_write(c, &g));
    mine = (uint64_t *)half_of(c, me, g);
    mine[0] = (uint64_t)err, mine[1] = (uint64_t)(int64_t)bad;
    publish(c, g);
    TRY(wait_all(c, g));
    for (int q = 0; q < P && !c->cma_errno; q++) {
        const uint64_t *h = (const uint64_t *)half_of(c, q, g);
        if (h[0])
            c->cma_errno = (int)h[0], c->cma_rank = q, c->cma_peer = (int)(int64_t)h[1];
    }
    if (!c->cma_errno)
        c->cma_bytes = want[0], c->cma_bcast_bytes = want[1], c->cma_crowd_bytes = want[2];
    return 0;
}

/* ---- the collectives (after op_begin; the arguments are checked by shm_coll_ops.c) ---------- */

int cma_all_reduce(pyccl_coll *c, char *out, const char *in, size_t count, int dtype, int op) {
    const int P = c->nranks, me = c->rank;
    const size_t item = itemsize(dtype), blk = cma_block(c), per = blk / item;
    uint64_t ins[CMA_MAX_RANKS], outs[CMA_MAX_RANKS];
    TRY(exchange(c, (uint64_t)(uintptr_t)in, (uint64_t)(uintptr_t)out, ins, outs));
    /* reduce-scatter: slice `me` of everybody's in, in blocks, into my out */
    const size_t lo = count * (size_t)me / (size_t)P, hi = count * (size_t)(me + 1) / (size_t)P;
    char *acc = c->cma_tmp + (size_t)P * blk;
    const void *src[CMA_MAX_RANKS];
    for (size_t k = lo; k < hi; k += per) {
        const size_t L = min_sz(per, hi - k);
        for (int q = 0; q < P; q++) {
            if (q == me) {
                src[q] = in + k * item;
                continue;
            }
            char *t = c->cma_tmp + (size_t)q * blk;
            TRY(cma_read(c, q, t, ins[q] + k * item, L * item));
            src[q] = t;
        }
        if (me == 0 && op < PYCCL_SUM_WIDE) { /* out aliases src[0] at most: allowed */
            reduce_in_order(out + k * item, src, P, L, dtype, op);
        } else {
            reduce_in_order(acc, src, P, L, dtype, op);
            memcpy(out + k * item, acc, L * item);
        }
    }
    TRY(handshake(c));
    /* all-gather: slice q of peer q's out into mine */
    for (int i = 1; i < P; i++) {
        const int q = (me + i) % P;
        const size_t qlo = count * (size_t)q / (size_t)P, qhi = count * (size_t)(q + 1) / (size_t)P;
        if (qhi > qlo)
            TRY(cma_read(c, q, out + qlo * item, outs[q] + qlo * item, (qhi - qlo) * item));
    }
    return handshake(c);
}

int cma_reduce_scatter(pyccl_coll *c, char *out, const char *in, size_t count, int dtype, int op) {
    const int P = c->nranks, me = c->rank;
    const size_t item = itemsize(dtype), blk = cma_block(c), per = blk / item;
    const size_t total = (size_t)P * count * item;
    char *own = NULL;
    if (overlap(out, count * item, in, total) && out != in + (size_t)me * count * item)
        TRY(copy_for_peers(c, &in, total, &own));
    uint64_t ins[CMA_MAX_RANKS];
    int rc = exchange(c, (uint64_t)(uintptr_t)in, 0, ins, NULL);
    char *acc = c->cma_tmp + (size_t)P * blk;
    const void *src[CMA_MAX_RANKS];
    const size_t base = (size_t)me * count;
    for (size_t k = 0; k < count && !rc; k += per) {
        const size_t L = min_sz(per, count - k);
        for (int q = 0; q < P && !rc; q++) {
            if (q == me) {
                src[q] = in + (base + k) * item;
                continue;
            }
            char *t = c->cma_tmp + (size_t)q * blk;
            rc = cma_read(c, q, t, ins[q] + (base + k) * item, L * item);
            src[q] = t;
        }
        if (rc)
            break;
        reduce_in_order(acc, src, P, L, dtype, op);
        memcpy(out + k * item, acc, L * item);
    }
    if (!rc)
        rc = handshake(c);
    free(own);
    return rc;
}

int cma_all_gather(pyccl_coll *c, char *out, const char *in, size_t nbytes) {
    const int P = c->nranks, me = c->rank;
    char *mine = out + (size_t)me * nbytes;
    char *own = NULL;
    if (in != mine && overlap(in, nbytes, out, (size_t)P * nbytes))
        TRY(copy_for_peers(c, &in, nbytes, &own));
    uint64_t ins[CMA_MAX_RANKS];
    int rc = exchange(c, (uint64_t)(uintptr_t)in, 0, ins, NULL);
    for (int i = 1; i < P && !rc; i++) {
        const int q = (me + i) % P;
        rc = cma_read(c, q, out + (size_t)q * nbytes, ins[q], nbytes);
    }
    if (!rc && in != mine)
        memcpy(mine, in, nbytes);
    if (!rc)
        rc = handshake(c);
    free(own);
    return rc;
}

/* Broadcast with the copies shared: part j of buf is [part_at(j), part_at(j + 1)), N * j / P
 * rounded down to 64 bytes.  The root writes part k - 1 into the reader k places after it
 * (process_vm_writev) while each reader reads every other part from the root
 * (process_vm_readv): every rank, the root too, copies (P-1)/P of the bytes, where in the
 * segment's broadcast the root copies them all in and each reader all out.  Two handshakes:
 * the addresses, then "done" (ccl/engines/shm.py: broadcast_parts is the twin). */
static size_t part_at(size_t n, int j, int P) {
    return j >= P ? n : (n * (size_t)j / (size_t)P) / 64 * 64;
}

int cma_broadcast(pyccl_coll *c, char *buf, size_t nbytes, int root) {
    const int P = c->nranks, me = c->rank;
    uint64_t bufs[CMA_MAX_RANKS];
    TRY(exchange(c, (uint64_t)(uintptr_t)buf, 0, bufs, NULL));
    if (me == root) {
        for (int k = 1; k < P; k++) {
            const int q = (root + k) % P;
            const size_t lo = part_at(nbytes, k - 1, P), hi = part_at(nbytes, k, P);
            if (hi > lo)
                TRY(cma_write(c, q, bufs[q] + lo, buf + lo, hi - lo));
        }
    } else {
        const int k = (me - root + P) % P;
        const size_t lo = part_at(nbytes, k - 1, P), hi = part_at(nbytes, k, P);
        if (lo)
            TRY(cma_read(c, root, buf, bufs[root], lo));
        if (nbytes > hi)
            TRY(cma_read(c, root, buf + hi, bufs[root] + hi, nbytes - hi));
    }
    return handshake(c); /* nobody reads the root's buf or writes a reader's any more */
}
