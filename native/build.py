"""cffi build script for pyccl._native, the C core (``setup.py``: cffi_modules).

Out-of-line API mode: cffi compiles a real C extension, and every call into it releases the GIL
(cffi's default), so a progress thread can reduce one chunk while Python code runs elsewhere.

Builds from any working directory:  ``python native/build.py`` compiles in place (next to this
file's ``../ccl``), ``pip install .`` / ``pip install -e .`` build it through setuptools.
"""
import glob
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def _path(p):
    # setuptools prefers source paths relative to the project root (its cwd during a build);
    # fall back to absolute paths when built from elsewhere.
    rel = os.path.relpath(p)
    return p if rel.startswith(os.pardir) else rel


CDEF = """
void pyccl_reduce(void *dst, const void *a, const void *b, size_t n, int dtype, int op);
void pyccl_divide(void *x, size_t n, int dtype, int64_t divisor);
void pyccl_copy(void *dst, const void *src, size_t nbytes);
void pyccl_sum_rows(void *dst, const void *src, size_t nrows, size_t stride, size_t n, int dtype,
                    int64_t divisor);
"""

# Shared memory (native/shm.h): segments, node-local collectives, slot rings.
CDEF_SHM = """
void *pyccl_shm_map(const char *name, size_t *size, int create, int *err);
int pyccl_shm_unmap(void *base, size_t size);
int pyccl_shm_unlink(const char *name);
int pyccl_pid_alive(int pid);

typedef struct pyccl_coll {
    int rank, nranks;
    uint64_t half_bytes, part_bytes, small_bytes;
    uint32_t flags;
    int err_code, err_rank;
    uint64_t err_target, err_have;
    int64_t err_step;
    int err_cause;
    uint64_t err_peer_bytes;
    uint32_t err_peer_what;
    uint64_t sig_bytes;
    uint32_t sig_what;
    uint64_t cma_bytes;
    int cma_errno, cma_rank, cma_peer;
    uint64_t cma_bcast_bytes, cma_crowd_bytes;
    ...;
} pyccl_coll;
size_t pyccl_coll_bytes(int nranks, uint64_t half_bytes);
int pyccl_coll_format(void *base, size_t size, int nranks, uint64_t half_bytes,
                      uint64_t part_bytes, uint64_t small_bytes, uint64_t nt_bytes,
                      uint32_t flags);
pyccl_coll *pyccl_coll_attach(void *base, size_t size, int rank, int nranks, int pid,
                              uint64_t pidns, int *err);
void pyccl_coll_set_spin(pyccl_coll *c, double spin_s);
void pyccl_coll_tune(pyccl_coll *c, uint64_t move_bytes, uint64_t nt_bytes);
void pyccl_share_force(int kind);
int pyccl_share_hint(void);
int pyccl_coll_attached(pyccl_coll *c);
void pyccl_coll_free(pyccl_coll *c);
uint64_t pyccl_coll_counter(pyccl_coll *c, int r);
int pyccl_coll_pid(pyccl_coll *c, int r);
void pyccl_coll_abort(pyccl_coll *c);
int pyccl_coll_all_reduce(pyccl_coll *c, void *out, const void *in, size_t count, int dtype,
                          int op, int root, double timeout);
int pyccl_coll_reduce_scatter(pyccl_coll *c, void *out, const void *in, size_t count, int dtype,
                              int op, double timeout);
int pyccl_coll_all_gather(pyccl_coll *c, void *out, const void *in, size_t nbytes, double timeout);
int pyccl_coll_broadcast(pyccl_coll *c, void *buf, size_t nbytes, int root, double timeout);
int pyccl_coll_all_to_all(pyccl_coll *c, void *out, const void *in, size_t nbytes, double timeout);
int pyccl_coll_barrier(pyccl_coll *c, double timeout);
int pyccl_coll_cma_probe(pyccl_coll *c, uint64_t min_bytes, uint64_t bcast_bytes, uint64_t crowd_bytes,
                         double timeout);
int pyccl_cma_read(int pid, void *dst, uint64_t src, size_t n);

size_t pyccl_ring_bytes(uint64_t slot_bytes, uint32_t nslots);
void pyccl_ring_format(void *ring, uint64_t slot_bytes, uint32_t nslots);
uint64_t pyccl_ring_slot_bytes(void *ring);
int64_t pyccl_ring_send(void *ring, const void *src, uint64_t len, uint64_t slot, uint32_t msg_no,
                        uint64_t call);
int64_t pyccl_ring_recv(void *ring, void *dst, const void *red, uint64_t len, uint64_t slot,
                        uint32_t msg_no, uint64_t call, int dtype, int op);
int pyccl_ring_peek(void *ring, uint64_t *len, uint32_t *msg_no, uint64_t *call);
void pyccl_ring_close(void *ring, int receiver, uint32_t how);
int pyccl_ring_peer_closed(void *ring, int receiver);
"""

# The proxy's watchdog (native/watchdog.h): a thread that needs no GIL.
CDEF_WATCHDOG = """
typedef struct pyccl_watch_layout {
    uint64_t posted, handled, beat, abort_word, fired;
    uint64_t release_lo, release_n;
} pyccl_watch_layout;
typedef struct pyccl_watch_state {
    uint64_t seen_handled, seen_beat;
    int64_t progress_ns;
} pyccl_watch_state;
int pyccl_watchdog_check(const volatile uint64_t *words, const pyccl_watch_layout *lay,
                         pyccl_watch_state *st, int64_t now_ns, int64_t timeout_ns);
void pyccl_watchdog_fire(volatile uint64_t *words, const pyccl_watch_layout *lay, int64_t now_ns);
typedef struct pyccl_watchdog pyccl_watchdog;
pyccl_watchdog *pyccl_watchdog_start(volatile uint64_t *words, const pyccl_watch_layout *lay,
                                     double timeout_s, double period_s);
int pyccl_watchdog_stop(pyccl_watchdog *w);
int64_t pyccl_monotonic_ns(void);
"""

SOURCES = sorted(_path(p) for p in glob.glob(os.path.join(HERE, "*.c")))

if sys.platform == "win32":
    EXTRA_COMPILE_ARGS = ["/O2", "/fp:precise"]
else:
    # -O3 for auto-vectorization; no -ffast-math (NaN/Inf/-0 must follow IEEE and numpy);
    # -ffp-contract=off so no fused multiply-add changes a rounding; -fno-trapping-math (we
    # never read FP exception flags) lets gcc vectorize the NaN-aware MIN/MAX selects.
    # Baseline code only, never -march=native: the x86-64 AVX2/F16C variants are chosen at
    # run time inside reduce.c (target_clones, __builtin_cpu_supports), so a wheel is portable.
    EXTRA_COMPILE_ARGS = ["-O3", "-std=c99", "-ffp-contract=off", "-fno-math-errno",
                          "-fno-trapping-math"]

# shm_open/shm_unlink live in librt on glibc < 2.34 (an empty stub library after that).
# pthread: the watchdog's thread (part of libc from glibc 2.34).
LIBRARIES = ["rt", "pthread"] if sys.platform.startswith("linux") else []

ffibuilder = FFI()
ffibuilder.cdef(CDEF + ("" if sys.platform == "win32" else CDEF_SHM + CDEF_WATCHDOG))
ffibuilder.set_source(
    "pyccl._native",
    '#include "reduce.h"\n' + ("" if sys.platform == "win32" else '#include "shm.h"\n#include "watchdog.h"\n'),
    # shm*.c (segments, slot rings, collectives: POSIX shared memory, futex) and watchdog.c
    # (pthreads) are not built on Windows
    sources=[s for s in SOURCES if sys.platform != "win32" or
             not os.path.basename(s).startswith(("shm", "watchdog"))],
    include_dirs=[_path(HERE)],
    libraries=LIBRARIES,
    extra_compile_args=EXTRA_COMPILE_ARGS,
    depends=sorted(_path(p) for p in glob.glob(os.path.join(HERE, "*.h"))),
)

if __name__ == "__main__":
    # Standalone build into ccl/ (where the editable install finds pyccl._native).
    out = os.path.join(os.path.dirname(HERE), "ccl")
    tmp = os.path.join(os.path.dirname(HERE), "build", "cffi-native")
    so = ffibuilder.compile(tmpdir=tmp, verbose=True)
    import shutil
    for old in glob.glob(os.path.join(out, "_native*.so")) + glob.glob(os.path.join(out, "_native*.pyd")):
        os.remove(old)  # a stale _native.abi3.so from pip would shadow (or be shadowed by) this one
    dst = os.path.join(out, os.path.basename(so))
    shutil.copy2(so, dst)
    print("built", dst)
