/* pyccl native core: shared-memory segments, node-local collectives and slot rings.
 *
 * Two users, both on one host:
 *  - ccl/shm_collectives.py: one segment per communicator.  Every rank owns a line with a
 *    step counter and a data area of two halves (double buffering by the parity of the step).
 *    A collective is a sequence of steps; in each step a rank writes its data into its half,
 *    publishes the step number, waits for the ranks it reads from and copies (or reduces) out.
 *  - transports/shm.py: per directed pair a ring of slots with head/tail counters; the sender
 *    copies into free slots, the receiver copies (or reduces) out.
 *
 * Every wait spins briefly (only while the awaited rank runs on another core), then blocks
 * in the kernel (futex) until the awaited rank publishes; it has a deadline, checks that the awaited process is alive, and on failure records what it waited
 * for in the handle's err_* fields (read by Python for the error message).
 * cffi releases the GIL around every call into these functions.
 */
#ifndef PYCCL_SHM_H
#define PYCCL_SHM_H

#include <stddef.h>
#include <stdint.h>

/* Return codes of the collectives (and, negated, of the ring calls). */
#define PYCCL_SHM_OK 0
#define PYCCL_SHM_TIMEOUT 1        /* a wait ran past its deadline */
#define PYCCL_SHM_PEER_DEAD 2      /* the awaited process no longer exists */
#define PYCCL_SHM_PEER_ABORT 3     /* another rank gave up (timeout/death it saw) */
#define PYCCL_SHM_SIZE_MISMATCH 4  /* the peer's message length / call differs */
#define PYCCL_SHM_OUT_OF_STEP 5    /* ring: message numbers disagree */
#define PYCCL_SHM_CALL_MISMATCH 8  /* ring: the message belongs to a different call (callsig) */
#define PYCCL_SHM_ABORTED 7        /* this rank aborted the communicator (pyccl_coll_abort) */
#define PYCCL_SHM_CMA_FAILED 9     /* reading a peer's buffer failed (err_cause: the errno) */

/* ---- segments ------------------------------------------------------------------------- */

/* Map the POSIX shared-memory object `name` ("/pyccl-..."), read-write.
 * create=1: O_CREAT|O_EXCL, mode 0600, *size bytes, pages reserved with posix_fallocate (so a
 *           full /dev/shm fails here with ENOSPC instead of SIGBUS later).
 * create=0: open an existing one; *size receives its size.
 * Returns the address, or NULL with *err = errno. */
void *pyccl_shm_map(const char *name, size_t *size, int create, int *err);
int pyccl_shm_unmap(void *base, size_t size);
/* shm_unlink; returns 0 or errno. */
int pyccl_shm_unlink(const char *name);
/* 1 if process `pid` exists and is not a zombie (kill(pid, 0) + /proc/<pid>/stat), else 0. */
int pyccl_pid_alive(int pid);

/* ---- node-local collectives ------------------------------------------------------------ */

/* Local handle of one rank on one collectives segment (malloc'ed; the segment is shared).
 * The first fields are read by Python; the rest is private to shm_coll.c and shm_coll_ops.c. */
typedef struct pyccl_coll {
    int rank, nranks;
    uint64_t half_bytes;   /* bytes of one half of a rank's data area */
    uint64_t part_bytes;   /* large all-reduce: bytes per rank per step */
    uint64_t small_bytes;  /* all-reduce up to this size is one-shot */
    uint32_t flags;        /* agreed config flags (PYCCL_COLL_*) */
    /* why the last call failed (valid after a non-zero return) */
    int err_code, err_rank;
    uint64_t err_target, err_have; /* the counter value waited for / the one seen */
    int64_t err_step;              /* step within the collective (0-based) */
    int err_cause;                 /* PEER_ABORT: the code the aborting rank failed with */
    uint64_t err_peer_bytes;       /* SIZE_MISMATCH: the peer's call (see sig_*) */
    uint32_t err_peer_what;
    /* single-copy collectives (shm_cma.c): calls of at least cma_bytes per rank read the peers'
     * buffers in place (0: off); when the probe found cross-memory attach refused, cma_errno is
     * the errno rank cma_rank got reading rank cma_peer */
    uint64_t cma_bytes;
    int cma_errno, cma_rank, cma_peer;
    /* broadcasts of at least cma_bcast_bytes (0: none but those of cma_bytes) take the shared
     * single copy (shm_cma.c: cma_broadcast); set by the probe, only where every rank has a core.
     * all_reduce (root < 0) of at least cma_crowd_bytes takes the single copy too: set by the
     * probe only where ranks outnumber rank 0's CPUs (fewer bytes moved, 3 handshakes) */
    uint64_t cma_bcast_bytes, cma_crowd_bytes;
    /* private */
    char *base;
    size_t size;
    uint64_t g;      /* my step counter (last published) */
    uint64_t seen;   /* every peer's counter was seen >= this */
    uint64_t op_g0;  /* my counter when the current collective began */
    uint64_t pidns;  /* inode of /proc/self/ns/pid: peers' pids are checked when equal */
    double spin_s;   /* wait policy: spin up to spin_s, then block (futex) */
    int crowded;     /* ranks outnumber the CPUs this process may run on (set by attach) */
    double timeout;  /* of the current call: bounds each wait */
    uint64_t move_bytes; /* data movement: bytes per rank per step (<= half_bytes) */
    uint64_t nt_bytes;   /* outputs at least this big are written with streaming stores */
    uint64_t sig_bytes;  /* this rank's current call (see PYCCL_COLL_ALL_REDUCE...) */
    uint32_t sig_what;
    uint64_t prev_bytes; /* and its previous one */
    uint32_t prev_what;
    uint64_t ncall;      /* calls so far (the same on every rank) */
    /* kind of stores into shared areas (shm_coll_ops.c, choose_kind): per (op, size class)
     * the times per KiB of the last KIND_KEEP calls made with plain [0] / streaming [1] stores */
#define KIND_OPS 6
#define KIND_SIZES 6
#define KIND_KEEP 4
    uint64_t kind_time[KIND_OPS * KIND_SIZES][2][KIND_KEEP];
    uint64_t kind_timed[KIND_OPS * KIND_SIZES][2];
    uint64_t kind_calls[KIND_OPS * KIND_SIZES];
    int kind_cls;        /* class of the call in progress, -1: not timed */
    int aborted_here;    /* set by pyccl_coll_abort (any thread): this rank's waits end */
    uint64_t kind_t0;
    char *cma_tmp;       /* single-copy reductions: peers' blocks and the result (malloc'ed) */
    uint64_t cma_probe;  /* a word of this process the peers read in pyccl_coll_cma_probe */
} pyccl_coll;

#define PYCCL_COLL_ENABLED 1u

/* Op codes of a call's signature (what | (op + 1) << 4 | (dtype + 1) << 8 | (root + 1) << 16,
 * with sig_bytes the bytes per rank): every rank
 * publishes its signature with the first step of a call, and a rank that finds a peer's
 * differing fails with PYCCL_SHM_SIZE_MISMATCH instead of reading a wrong-sized area. */
#define PYCCL_COLL_ALL_REDUCE 1
#define PYCCL_COLL_REDUCE 2
#define PYCCL_COLL_REDUCE_SCATTER 3
#define PYCCL_COLL_ALL_GATHER 4
#define PYCCL_COLL_BROADCAST 5
#define PYCCL_COLL_ALL_TO_ALL 6
#define PYCCL_COLL_BARRIER 7

/* Bytes a segment for `nranks` ranks with `half_bytes` halves needs. */
size_t pyccl_coll_bytes(int nranks, uint64_t half_bytes);
/* Creator: write the header (config) of a fresh segment. */
int pyccl_coll_format(void *base, size_t size, int nranks, uint64_t half_bytes,
                      uint64_t part_bytes, uint64_t small_bytes, uint64_t nt_bytes,
                      uint32_t flags);
/* Every rank (creator too): check the header, register pid/pidns, count itself attached.
 * Returns NULL with *err set (EINVAL: bad header or size, ENOMEM). */
pyccl_coll *pyccl_coll_attach(void *base, size_t size, int rank, int nranks, int pid,
                              uint64_t pidns, int *err);
/* Override the wait policy: spin at most spin_s (while the peer is on another core), then
 * block in the kernel until the peer publishes. */
void pyccl_coll_set_spin(pyccl_coll *c, double spin_s);
/* Tuning knobs for experiments and tests: bytes per step of the data-movement collectives
 * (every rank must set the same), streaming-store threshold (0: never). */
void pyccl_coll_tune(pyccl_coll *c, uint64_t move_bytes, uint64_t nt_bytes);
/* Stores into shared areas: kind 0 plain, 1 streaming, -1 (default) the cheaper as timed per
 * communicator (shm_coll_ops.c, choose_kind); pyccl_share_hint() is the kind ring sends use. */
void pyccl_share_force(int kind);
int pyccl_share_hint(void);
/* How many ranks have attached so far. */
int pyccl_coll_attached(pyccl_coll *c);
void pyccl_coll_free(pyccl_coll *c);   /* frees the handle, not the mapping */
uint64_t pyccl_coll_counter(pyccl_coll *c, int r);
int pyccl_coll_pid(pyccl_coll *c, int r);
/* Mark the segment failed (peers waiting on this rank then fail fast). */
void pyccl_coll_abort(pyccl_coll *c);

/* The collectives.  Buffers are contiguous; `count` in elements of `dtype` (reduce.h codes),
 * byte counts per rank.  `timeout` (seconds) bounds every single wait.  Return 0 or a code
 * above; on failure the err_* fields say who and where.
 *
 * all_reduce: out = in_0 (op) in_1 (op) ... in rank order, bit-identical on every rank;
 *   root >= 0 makes it a reduce: only the root's `out` is written.  out may equal in.
 * reduce_scatter: in holds nranks*count, out gets block `rank` (count) of the reduction.
 * all_gather: out (nranks*nbytes) = every rank's in (nbytes), in rank order.
 * broadcast: buf (nbytes) of `root` to every rank.
 * all_to_all: block j (nbytes) of in goes to rank j; out's block i comes from rank i. */
int pyccl_coll_all_reduce(pyccl_coll *c, void *out, const void *in, size_t count, int dtype,
                          int op, int root, double timeout);
int pyccl_coll_reduce_scatter(pyccl_coll *c, void *out, const void *in, size_t count, int dtype,
                              int op, double timeout);
int pyccl_coll_all_gather(pyccl_coll *c, void *out, const void *in, size_t nbytes, double timeout);
int pyccl_coll_broadcast(pyccl_coll *c, void *buf, size_t nbytes, int root, double timeout);
int pyccl_coll_all_to_all(pyccl_coll *c, void *out, const void *in, size_t nbytes, double timeout);
int pyccl_coll_barrier(pyccl_coll *c, double timeout);

/* Single-copy collectives (shm_cma.c).  Every rank calls this once after attaching: each
 * reads a word of every peer with process_vm_readv (Linux cross-memory attach), then all
 * agree.  Where every read worked, all_reduce (root < 0), reduce_scatter, all_gather and
 * broadcast of at least rank 0's min_bytes per rank (0: never) read the peers' user buffers
 * in place, so each byte crosses memory once instead of through the segment, and so do
 * broadcasts of at least rank 0's bcast_bytes (0: never) when rank 0 may run on at least
 * nranks CPUs (cma_bcast_bytes), and all_reduces of at least crowd_bytes when it may run on
 * fewer (cma_crowd_bytes); else cma_bytes, cma_bcast_bytes and cma_crowd_bytes stay 0 and
 * cma_errno/cma_rank/cma_peer say why.  Returns 0 or a wait's code. */
int pyccl_coll_cma_probe(pyccl_coll *c, uint64_t min_bytes, uint64_t bcast_bytes, uint64_t crowd_bytes,
                         double timeout);
/* The kernel's copy alone: n bytes of process pid at src into dst; 0 or errno (benchmarks). */
int pyccl_cma_read(int pid, void *dst, uint64_t src, size_t n);

/* ---- slot rings (transport) ------------------------------------------------------------ */

/* Bytes one ring of `nslots` slots of `slot_bytes` occupies (a multiple of 4096). */
size_t pyccl_ring_bytes(uint64_t slot_bytes, uint32_t nslots);
/* Receiver (creator): initialise a ring at `ring`. slot_bytes: a multiple of 64. */
void pyccl_ring_format(void *ring, uint64_t slot_bytes, uint32_t nslots);
uint64_t pyccl_ring_slot_bytes(void *ring);

/* Sender: copy slots `slot`.. of a `len`-byte message numbered `msg_no` of collective call
 * `call` (ccl/callsig.py; 0: unchecked) into free slots.
 * A message takes max(1, ceil(len / slot_bytes)) slots.  Returns the next slot index
 * (== the total when the message is fully sent); never blocks. */
int64_t pyccl_ring_send(void *ring, const void *src, uint64_t len, uint64_t slot,
                        uint32_t msg_no, uint64_t call);
/* Receiver: take slots `slot`.. of the message the receiver expects (len, msg_no) out of the
 * ring.  red == NULL: copy into dst.  Else dst = red (op) slot, element-wise in `dtype`.
 * Returns the next slot index, or -PYCCL_SHM_SIZE_MISMATCH / -PYCCL_SHM_OUT_OF_STEP /
 * -PYCCL_SHM_CALL_MISMATCH (both calls non-zero and different) (nothing
 * consumed; pyccl_ring_peek tells what arrived). */
int64_t pyccl_ring_recv(void *ring, void *dst, const void *red, uint64_t len, uint64_t slot,
                        uint32_t msg_no, uint64_t call, int dtype, int op);
/* The message length, number and call in the next unread slot; returns 0 if none is there. */
int pyccl_ring_peek(void *ring, uint64_t *len, uint32_t *msg_no, uint64_t *call);
/* Mark this end closed (receiver=1: the receiving end) with `how` (1: closed, 2: failed);
 * pyccl_ring_peer_closed returns the other end's mark (0: open). */
void pyccl_ring_close(void *ring, int receiver, uint32_t how);
int pyccl_ring_peer_closed(void *ring, int receiver);

#endif
