/* pyccl native core: shared-memory segments, node-local collectives and slot rings
 * (see shm.h for the contract, ccl/shm_collectives.py and transports/shm.py for the users).
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
#include "shm.h"
#include "reduce.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define LINE 128 /* two 64-byte lines: the adjacent-line prefetcher must not cause sharing */
#define PAGE 4096
#define COLL_MAGIC 0x31636f6c6c636370ULL /* "pcclloc1" */
#define RING_MAGIC 0x31676e69726c6370ULL

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield" ::: "memory")
#else
#define CPU_RELAX() __asm__ __volatile__("" ::: "memory")
#endif

#define LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LOAD_RLX(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

static size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }
static size_t min_sz(size_t a, size_t b) { return a < b ? a : b; }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static size_t itemsize(int dtype) {
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
static void copy_out(void *dst_, const void *src_, size_t n, int nt) {
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
static void copy_out(void *dst, const void *src, size_t n, int nt) {
    (void)nt;
    memcpy(dst, src, n);
}
#endif

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
#define SHARE_MIN 16384          /* smaller writes: always plain */
static int share_forced = -1;     /* PYCCL_SHM_STREAM: -1 measure (default), 0 plain, 1 streaming */
static int share_hint;            /* the kind the collectives found cheaper last (ring sends) */
static __thread int call_kind;    /* the kind of the call in progress on this thread */

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

/* Stream a write of n bytes into a shared area?  The current call's kind, for big writes. */
static int stream_shared(size_t n) { return n >= SHARE_MIN && call_kind; }

/* dst (shared) = src, with the current call's kind of stores. */
static void put_shared(void *dst, const void *src, size_t n) {
    copy_out(dst, src, n, stream_shared(n));
}

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

/* ---- segments ------------------------------------------------------------------------- */

void *pyccl_shm_map(const char *name, size_t *size, int create, int *err) {
    int fd = create ? shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600) : shm_open(name, O_RDWR, 0);
    if (fd < 0) {
        *err = errno;
        return NULL;
    }
    if (create) {
        int rc = ftruncate(fd, (off_t)*size);
        if (rc == 0 && create == 1)
            rc = posix_fallocate(fd, 0, (off_t)*size); /* returns the error, not -1 */
        else
            rc = errno;
        if (rc != 0) {
            close(fd);
            shm_unlink(name);
            *err = rc;
            return NULL;
        }
    } else {
        struct stat st;
        if (fstat(fd, &st) != 0) {
            *err = errno;
            close(fd);
            return NULL;
        }
        *size = (size_t)st.st_size;
    }
    void *p = mmap(NULL, *size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    *err = p == MAP_FAILED ? errno : 0;
    close(fd); /* the mapping keeps the object alive */
    return p == MAP_FAILED ? NULL : p;
}

int pyccl_shm_unmap(void *base, size_t size) { return munmap(base, size) == 0 ? 0 : errno; }

int pyccl_shm_unlink(const char *name) { return shm_unlink(name) == 0 ? 0 : errno; }

int pyccl_pid_alive(int pid) {
    if (pid <= 0)
        return 1; /* unknown: never claim a death we cannot see */
    if (kill(pid, 0) != 0 && errno == ESRCH)
        return 0;
    /* A killed process stays a zombie until its parent reaps it; kill() still succeeds. */
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return errno == ENOENT ? 0 : 1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    const char *rp = strrchr(buf, ')'); /* "pid (comm) S ..." ; comm may hold spaces */
    return !(rp && rp[1] == ' ' && (rp[2] == 'Z' || rp[2] == 'X'));
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
static void futex_wait_1ms(uint32_t *addr, uint32_t val) {
    struct timespec ts = {0, 1000000};
    syscall(SYS_futex, addr, FUTEX_WAIT, val, &ts, NULL, 0); /* shared: not _PRIVATE */
}
static void futex_wake_all(uint32_t *addr) {
    syscall(SYS_futex, addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}
#else
static void futex_wait_1ms(uint32_t *addr, uint32_t val) {
    (void)addr, (void)val;
    struct timespec ts = {0, 50000};
    nanosleep(&ts, NULL);
}
static void futex_wake_all(uint32_t *addr) { (void)addr; }
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

static char *half_of(pyccl_coll *c, int r, uint64_t g) {
    return c->base + HDR(c)->data_off + (2 * (size_t)r + (size_t)(g & 1)) * c->half_bytes;
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
    c->spin_s = ncpu >= nranks ? 20e-6 : 2e-6;
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
void pyccl_coll_free(pyccl_coll *c) { free(c); }
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

static int fail(pyccl_coll *c, int code, int r, uint64_t target) {
    c->err_code = code;
    c->err_rank = r;
    c->err_target = target;
    c->err_have = r >= 0 ? LOAD_ACQ(&LINE_OF(c, r)->cnt) : 0;
    c->err_step = (int64_t)(target - c->op_g0) - 1;
    abort_with(c, code);
    return code;
}

/* Another rank marked the segment failed. */
static int aborted(pyccl_coll *c, uint32_t ab, uint64_t target) {
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
 * now: block at once and hand the core over.  On a busy machine (other jobs, more ranks than
 * cores) that is most handoffs. */
#define YIELD_S 1e-3 /* after spinning, poll with sched_yield() this long, then block */

static int wait_one(pyccl_coll *c, int r, uint64_t target) {
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
        } else if (now - start < YIELD_S && elsewhere) {
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

/* Wait until every peer's counter >= target. */
static int wait_all(pyccl_coll *c, uint64_t target) {
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
static int begin_write(pyccl_coll *c, uint64_t *g) {
    *g = c->g + 1;
    return wait_all(c, *g - 1);
}

static void publish(pyccl_coll *c, uint64_t g) {
    rank_line *me = LINE_OF(c, c->rank);
    c->g = g;
    me->cpu = sched_getcpu();
    STORE_REL(&me->cnt, g);
    __atomic_store_n(&me->wake, (uint32_t)g, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&me->waiters, __ATOMIC_SEQ_CST))
        futex_wake_all(&me->wake);
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

#define TRY(x)                  \
    do {                        \
        int rc_ = (x);          \
        if (rc_)                \
            return rc_;         \
    } while (0)

/* dst = src[0] (op) src[1] (op) ... (op) src[n-1], left to right: the one reduction order every
 * path uses, so every rank gets the same bits (ccl/shm_collectives.py: reduce_in_order is
 * the numpy twin).  dst may alias any src only if it is src[0]. */
static void reduce_in_order(void *dst, const void *const *src, int n, size_t count, int dtype,
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
    const int nt = 0; /* measured: plain stores win here (the reader's copy is the bottleneck) */
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

/* ---- slot rings --------------------------------------------------------------------------
 * Layout of one ring (it lives in the receiver's segment):
 *   line 0  geometry (written once by the receiver)
 *   line 1  head: slots written by the sender (only the sender writes it)
 *   line 2  tail: slots consumed by the receiver (only the receiver writes it)
 *   meta    nslots x {message length, message number, bytes in this slot, call} (sender-written)
 *   data    nslots x slot_bytes, page aligned */
typedef struct {
    uint64_t magic, slot_bytes, data_off;
    uint32_t nslots;
} ring_geom;

typedef struct {
    uint64_t v;
    uint32_t closed;
} ring_end;

typedef struct {
    uint64_t msg_len;
    uint32_t msg_no;
    uint32_t nbytes;
    uint64_t call;       /* the collective call the message belongs to (ccl/callsig.py); 0: unchecked */
} slot_meta;

#define GEOM(r) ((ring_geom *)(r))
#define SENDER(r) ((ring_end *)((char *)(r) + LINE))
#define RECEIVER(r) ((ring_end *)((char *)(r) + 2 * LINE))
#define META(r) ((slot_meta *)((char *)(r) + 3 * LINE))
#define SLOT(r, i) ((char *)(r) + GEOM(r)->data_off + (size_t)(i) * GEOM(r)->slot_bytes)

size_t pyccl_ring_bytes(uint64_t slot_bytes, uint32_t nslots) {
    return round_up(3 * LINE + nslots * sizeof(slot_meta), PAGE) + round_up(nslots * slot_bytes, PAGE);
}

void pyccl_ring_format(void *ring, uint64_t slot_bytes, uint32_t nslots) {
    memset(ring, 0, 3 * LINE + nslots * sizeof(slot_meta));
    GEOM(ring)->slot_bytes = slot_bytes;
    GEOM(ring)->nslots = nslots;
    GEOM(ring)->data_off = round_up(3 * LINE + nslots * sizeof(slot_meta), PAGE);
    STORE_REL(&GEOM(ring)->magic, RING_MAGIC);
}

uint64_t pyccl_ring_slot_bytes(void *ring) {
    return LOAD_ACQ(&GEOM(ring)->magic) == RING_MAGIC ? GEOM(ring)->slot_bytes : 0;
}

static uint64_t msg_slots(uint64_t len, uint64_t sb) { return len ? (len + sb - 1) / sb : 1; }

int64_t pyccl_ring_send(void *ring, const void *src, uint64_t len, uint64_t slot,
                        uint32_t msg_no, uint64_t call) {
    const uint64_t sb = GEOM(ring)->slot_bytes;
    const uint32_t ns = GEOM(ring)->nslots;
    const uint64_t total = msg_slots(len, sb);
    uint64_t head = LOAD_RLX(&SENDER(ring)->v);
    uint64_t tail = LOAD_ACQ(&RECEIVER(ring)->v);
    call_kind = pyccl_share_hint();
    while (slot < total) {
        if (head - tail >= ns) {
            tail = LOAD_ACQ(&RECEIVER(ring)->v);
            if (head - tail >= ns)
                break;
        }
        const uint64_t off = slot * sb;
        const uint64_t nb = len ? min_sz(sb, len - off) : 0;
        const uint32_t i = (uint32_t)(head % ns);
        if (nb)
            put_shared(SLOT(ring, i), (const char *)src + off, nb);
        META(ring)[i].msg_len = len;
        META(ring)[i].msg_no = msg_no;
        META(ring)[i].nbytes = (uint32_t)nb;
        META(ring)[i].call = call;
        STORE_REL(&SENDER(ring)->v, ++head);
        slot++;
    }
    call_kind = 0;
    return (int64_t)slot;
}

int64_t pyccl_ring_recv(void *ring, void *dst, const void *red, uint64_t len, uint64_t slot,
                        uint32_t msg_no, uint64_t call, int dtype, int op) {
    const uint64_t sb = GEOM(ring)->slot_bytes;
    const uint32_t ns = GEOM(ring)->nslots;
    const uint64_t total = msg_slots(len, sb);
    uint64_t tail = LOAD_RLX(&RECEIVER(ring)->v);
    uint64_t head = LOAD_ACQ(&SENDER(ring)->v);
    while (slot < total) {
        if (tail == head) {
            head = LOAD_ACQ(&SENDER(ring)->v);
            if (tail == head)
                break;
        }
        const uint32_t i = (uint32_t)(tail % ns);
        const slot_meta m = META(ring)[i];
        if (m.msg_no != msg_no)
            return -PYCCL_SHM_OUT_OF_STEP;
        if (call && m.call && m.call != call)
            return -PYCCL_SHM_CALL_MISMATCH;
        if (m.msg_len != len)
            return -PYCCL_SHM_SIZE_MISMATCH;
        const uint64_t off = slot * sb;
        if (m.nbytes) {
            if (red)
                pyccl_reduce((char *)dst + off, (const char *)red + off, SLOT(ring, i),
                             m.nbytes / itemsize(dtype), dtype, op);
            else
                memcpy((char *)dst + off, SLOT(ring, i), m.nbytes);
        }
        STORE_REL(&RECEIVER(ring)->v, ++tail);
        slot++;
    }
    return (int64_t)slot;
}

int pyccl_ring_peek(void *ring, uint64_t *len, uint32_t *msg_no, uint64_t *call) {
    uint64_t tail = LOAD_RLX(&RECEIVER(ring)->v);
    if (tail == LOAD_ACQ(&SENDER(ring)->v))
        return 0;
    const slot_meta *m = &META(ring)[tail % GEOM(ring)->nslots];
    *len = m->msg_len;
    *msg_no = m->msg_no;
    *call = m->call;
    return 1;
}

void pyccl_ring_close(void *ring, int receiver, uint32_t how) {
    STORE_REL(&(receiver ? RECEIVER(ring) : SENDER(ring))->closed, how);
}

int pyccl_ring_peer_closed(void *ring, int receiver) {
    return (int)LOAD_ACQ(&(receiver ? SENDER(ring) : RECEIVER(ring))->closed);
}
