/* pyccl native core: a segment of the node-local collectives: its set-up, the record of a
 * failure, the signature checks and the wait for a peer (spin, then futex).  One call's begin
 * and end and the algorithms are shm_coll_ops.c, the segments and slot rings shm.c (see shm.h
 * for the contract, ccl/engines/shm.py for the user).
 *
 * The step protocol of the collectives, in one paragraph.  Every rank r owns a counter
 * cnt[r] (its own cache line) and a data area of two halves.  A collective is a sequence of
 * steps numbered globally g = 1, 2, ... (all ranks run the same collectives with the same
 * sizes, so they number the steps alike).  The invariant is
 *
 *     cnt[r] == g  means  r has finished reading every step < g, and, if r writes in step g,
 *                         its data of step g is in half (g & 1) of its area.
 *
 * So a rank that writes in step g first waits until every peer's cnt >= g - 1 (nobody still
 * reads half (g & 1) from step g - 2; usually already known), writes, publishes cnt = g
 * (release), then waits for the counters of the ranks it reads (acquire) and reads.  A rank
 * that only reads publishes g before waiting.  Double buffering falls out: a writer can run
 * one step ahead of its readers, and no second handshake is needed.
 */
#define _GNU_SOURCE
#include "shm_internal.h"

#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define COLL_MAGIC 0x31636f6c6c636370ULL /* "pcclloc1" */

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield" ::: "memory")
#else
#define CPU_RELAX() __asm__ __volatile__("" ::: "memory")
#endif

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

size_t pyccl_coll_bytes(int nranks, uint64_t half_bytes) {
    return round_up(LINE * (size_t)(1 + nranks), PAGE) + 2 * (size_t)nranks * half_bytes;
}

int pyccl_coll_format(void *base, size_t size, int nranks, uint64_t half_bytes,
                      uint64_t part_bytes, uint64_t small_bytes, uint64_t nt_bytes,
                      uint32_t flags) {
    if (size < pyccl_coll_bytes(nranks, half_bytes) || half_bytes % LINE)
        return EINVAL;
    coll_hdr *h = (coll_hdr *)base;
    memset(base, 0, LINE * (size_t)(1 + nranks));
    h->version = 1;
    h->nranks = (uint32_t)nranks;
    h->half_bytes = half_bytes;
    h->part_bytes = part_bytes;
    h->small_bytes = small_bytes;
    h->nt_bytes = nt_bytes ? nt_bytes : UINT64_MAX;
    h->data_off = round_up(LINE * (size_t)(1 + nranks), PAGE);
    h->size = size;
    h->flags = flags;
    STORE_REL(&h->magic, COLL_MAGIC);
    return 0;
}

pyccl_coll *pyccl_coll_attach(void *base, size_t size, int rank, int nranks, int pid,
                              uint64_t pidns, int *err) {
    coll_hdr *h = (coll_hdr *)base;
    if (LOAD_ACQ(&h->magic) != COLL_MAGIC || h->version != 1 || h->nranks != (uint32_t)nranks ||
        rank < 0 || rank >= nranks || h->size != size ||
        size < pyccl_coll_bytes(nranks, h->half_bytes)) {
        *err = EINVAL;
        return NULL;
    }
    pyccl_coll *c = calloc(1, sizeof *c);
    if (!c) {
        *err = ENOMEM;
        return NULL;
    }
    c->base = (char *)base;
    c->size = size;
    c->rank = rank;
    c->nranks = nranks;
    c->half_bytes = h->half_bytes;
    c->part_bytes = h->part_bytes;
    c->small_bytes = h->small_bytes;
    c->flags = h->flags;
    c->move_bytes = h->half_bytes;
    c->nt_bytes = h->nt_bytes;
    c->pidns = pidns;
    c->err_rank = -1;
    c->kind_cls = -1;
    /* Spin while every rank can have a core; when ranks outnumber cores, block almost at
     * once so the rank we wait for gets the CPU. */
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
        ncpu = CPU_COUNT(&set);
    c->crowded = ncpu < nranks;
    c->spin_s = c->crowded ? 2e-6 : 20e-6;
    rank_line *me = LINE_OF(c, rank);
    me->pid = pid;
    me->cpu = -1;
    me->pidns = pidns;
    STORE_REL(&me->cnt, 0);
    __atomic_fetch_add(&h->attached, 1, __ATOMIC_ACQ_REL);
    *err = 0;
    return c;
}

void pyccl_coll_set_spin(pyccl_coll *c, double spin_s) { c->spin_s = spin_s; }

void pyccl_coll_tune(pyccl_coll *c, uint64_t move_bytes, uint64_t nt_bytes) {
    if (move_bytes >= 64 && move_bytes <= c->half_bytes)
        c->move_bytes = move_bytes / 64 * 64;
    c->nt_bytes = nt_bytes ? nt_bytes : UINT64_MAX;
}

int pyccl_coll_attached(pyccl_coll *c) { return (int)LOAD_ACQ(&HDR(c)->attached); }
void pyccl_coll_free(pyccl_coll *c) {
    if (c)
        free(c->cma_tmp);
    free(c);
}
uint64_t pyccl_coll_counter(pyccl_coll *c, int r) { return LOAD_ACQ(&LINE_OF(c, r)->cnt); }
int pyccl_coll_pid(pyccl_coll *c, int r) { return LINE_OF(c, r)->pid; }

static void abort_with(pyccl_coll *c, int code) {
    uint32_t zero = 0;
    __atomic_compare_exchange_n(&HDR(c)->abort_by, &zero, ((uint32_t)c->rank + 1) | (uint32_t)code << 24,
                                0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    for (int r = 0; r < c->nranks; r++) /* blocked waiters: look at the flag now */
        if (__atomic_load_n(&LINE_OF(c, r)->waiters, __ATOMIC_SEQ_CST))
            futex_wake_all(&LINE_OF(c, r)->wake);
}

/* comm.abort(): the peers see the segment failed; this rank's own waits (another thread may be
 * blocked in one) end within a futex period with PYCCL_SHM_ABORTED. */
void pyccl_coll_abort(pyccl_coll *c) {
    STORE_REL(&c->aborted_here, 1);
    abort_with(c, 0);
}

int fail(pyccl_coll *c, int code, int r, uint64_t target) {
    c->err_code = code;
    c->err_rank = r;
    c->err_target = target;
    c->err_have = r >= 0 ? LOAD_ACQ(&LINE_OF(c, r)->cnt) : 0;
    c->err_step = (int64_t)(target - c->op_g0) - 1;
    abort_with(c, code);
    return code;
}

/* Another rank marked the segment failed. */
int aborted(pyccl_coll *c, uint32_t ab, uint64_t target) {
    c->err_code = PYCCL_SHM_PEER_ABORT;
    c->err_rank = (int)(ab & 0xffffffu) - 1;
    c->err_cause = (int)(ab >> 24);
    c->err_target = target;
    c->err_step = target ? (int64_t)(target - c->op_g0) - 1 : -1;
    return PYCCL_SHM_PEER_ABORT;
}

/* Did peer r make the same call as this rank (call number n)?  Read from r's signature
 * history (a seqlock: r zeroes the tag while it rewrites a slot).  A slot already reused by a
 * later call cannot be checked; ranks run at most a call or so apart, so 4 slots suffice. */
static int check_call(pyccl_coll *c, int r, uint64_t n, uint64_t bytes, uint32_t what,
                      uint64_t target) {
    rank_line *p = LINE_OF(c, r);
    uint64_t tag = LOAD_ACQ(&p->sig[n & 3].call);
    if (tag != n)
        return 0;
    uint64_t b = LOAD_RLX(&p->sig[n & 3].bytes);
    uint32_t w = LOAD_RLX(&p->sig[n & 3].what);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (LOAD_RLX(&p->sig[n & 3].call) != n || (b == bytes && w == what))
        return 0;
    c->err_peer_bytes = b;
    c->err_peer_what = w;
    if (n != c->ncall) { /* report the call that differed */
        c->sig_bytes = bytes;
        c->sig_what = what;
    }
    return fail(c, PYCCL_SHM_SIZE_MISMATCH, r, target);
}

/* After every successful wait on r: check its current and previous call against ours, so a
 * rank that finished a call without waiting (a broadcast root) still learns of a mismatch on
 * its next call, and a reader learns even when the writer has moved on. */
static int check_sig(pyccl_coll *c, int r, uint64_t target) {
    int rc = check_call(c, r, c->ncall, c->sig_bytes, c->sig_what, target);
    if (!rc && c->ncall > 1)
        rc = check_call(c, r, c->ncall - 1, c->prev_bytes, c->prev_what, target);
    return rc;
}

/* Wait until cnt[r] >= target, or fail: deadline passed, r dead, or some rank aborted.
 * Spinning only pays while r runs on another core.  When r last showed itself on the core we
 * are running on (its line holds the CPU it published or began waiting on), it is not running
 * now: hand the core over.  A large call blocks at once (on a busy machine, other jobs or more
 * ranks than cores, that is most handoffs).  A small one (up to the one-shot size: barriers,
 * small all_reduces) yields first, as when r is elsewhere: r, once it has published, finds us
 * runnable and we see its counter, where a futex sleep costs r a wake-up call and us a wake-up
 * (and the rank woken took the core from the rank that woke it, mid-call).  4 ranks on 2 cores, a
 * lone 8 B all_reduce after a barrier, the two policies alternated in blocks of 200 calls of one
 * run: 15.6-16.9 against 26.8-28.0 us (three runs); beside MPICH, rounds alternated, 20.9-47.2
 * against 43.5-56.1 us (MPICH 27.0-35.5); 2 ranks unchanged (bench/JOURNAL.md, 2026-12-08). */
#define YIELD_S 1e-3 /* after spinning, poll with sched_yield() this long, then block */

int wait_one(pyccl_coll *c, int r, uint64_t target) {
    rank_line *peer = LINE_OF(c, r);
    uint64_t *cnt = &peer->cnt;
    if (LOAD_ACQ(cnt) >= target)
        return check_sig(c, r, target);
    rank_line *me = LINE_OF(c, c->rank);
    uint32_t *abort_by = &HDR(c)->abort_by;
    int check_pid = peer->pid > 0 && peer->pidns == c->pidns;
    int cpu = sched_getcpu();
    STORE_REL(&me->cpu, cpu);
    const double start = now_s();
    double now = start, next_slow = start + 1e-3;
    unsigned n = 0, ticks = 0;
    for (;;) {
        if (LOAD_ACQ(cnt) >= target)
            return check_sig(c, r, target);
        if (LOAD_RLX(&c->aborted_here)) {
            c->err_code = PYCCL_SHM_ABORTED;
            c->err_rank = c->rank;
            return PYCCL_SHM_ABORTED;
        }
        uint32_t ab = LOAD_RLX(abort_by);
        if (ab && (ab & 0xffffffu) != (uint32_t)c->rank + 1) {
            if (LOAD_ACQ(cnt) >= target) /* it may have aborted after serving us */
                return check_sig(c, r, target);
            c->err_have = LOAD_ACQ(cnt);
            return aborted(c, ab, target);
        }
        const int elsewhere = LOAD_RLX(&peer->cpu) != cpu;
        if (now - start < c->spin_s && elsewhere) {
            CPU_RELAX();
            if (++n & 31)
                continue;
        } else if (now - start < YIELD_S && (elsewhere || c->sig_bytes <= c->small_bytes)) {
            /* poll through the kernel: frees the core's pipeline for an SMT sibling (a vCPU
             * may share a physical core with the rank we wait for) */
            sched_yield();
        } else {
            /* Announce, then re-check: a publisher that bumps `wake` after our load sees
             * waiters > 0 and wakes us; one that bumped it before makes FUTEX_WAIT return. */
            __atomic_fetch_add(&peer->waiters, 1, __ATOMIC_SEQ_CST);
            uint32_t w = __atomic_load_n(&peer->wake, __ATOMIC_SEQ_CST);
            if (LOAD_ACQ(cnt) < target && !LOAD_RLX(abort_by))
                futex_wait_1ms(&peer->wake, w);
            __atomic_fetch_sub(&peer->waiters, 1, __ATOMIC_SEQ_CST);
            cpu = sched_getcpu(); /* we may wake up on another core */
            STORE_REL(&me->cpu, cpu);
        }
        now = now_s();
        if (now < next_slow)
            continue;
        next_slow = now + 1e-3;
        if (check_pid && ++ticks % 8 == 1 && !pyccl_pid_alive(peer->pid)) {
            if (LOAD_ACQ(cnt) >= target)
                return 0;
            return fail(c, PYCCL_SHM_PEER_DEAD, r, target);
        }
        if (now - start > c->timeout)
            return fail(c, PYCCL_SHM_TIMEOUT, r, target);
    }
}
