"""Single-copy collectives on one host (native/shm_cma.c): ranks read each other's buffers with
process_vm_readv.  Off by default (PYCCL_SHM_CMA_BYTES=0), so these tests turn it on with a
tiny threshold and run test_shm.py's bit-for-bit fast-path checks through it (sizes on both
sides of the threshold), compare the C results with the numpy twin, and make the kernel refuse
(a non-dumpable rank, CAP_SYS_PTRACE dropped) to see every rank fall back, say why at INFO, and
a refusal in the middle of a call raise an error instead of a hang or wrong bytes; and inputs
that overlap the output where the peers read them (the C copies them first; a build without that
copy fails test_threads_overlapping_buffers).
"""
import ctypes
import logging
import os

import numpy as np
import pytest

from pyccl.dtypes import ReduceOp
from pyccl.errors import PeerFailure, TransportError
from reference import make
from ranks import RankGroup

shm = pytest.importorskip("pyccl.transports.shm")
if not shm.NATIVE_SHM:
    pytest.skip("pyccl._native is not built with shared memory (pip install -e .)", allow_module_level=True)
import pyccl.engines.shm as shm_engine  # noqa: E402
from pyccl.engines.shm import (DEFAULT_CMA_BROADCAST_BYTES, DEFAULT_CMA_CROWD_BYTES, broadcast_parts,  # noqa: E402
                               reduce_in_order, single_copy_slices, single_copy_twin)
from pyccl.transports.shm import ffi, lib  # noqa: E402
from test_shm import (FAST, FAST_SIZES, _bits, _thread_all_reduce, rank_fast_all_reduce,  # noqa: E402
                      rank_fast_data_movement, rank_fast_reduce_scatter, run_threads)

pytestmark = pytest.mark.timeout(300)

RANKS = [2, 3, 4]
#: test_shm's small thresholds, and single copy from 4 KiB per rank: both paths in every run
CMA = {**FAST, "PYCCL_SHM_CMA_BYTES": "4096"}


def cma_threads(size, fn):
    """fn(coll) on `size` ShmCollectives with single copy from 4 KiB, ranks as threads."""
    return run_threads(size, fn, env={k: v for k, v in CMA.items() if k != "PYCCL_TRANSPORT"})


def test_twin_equals_rank_order():
    """The slices change nothing elementwise: the twin is reduce_in_order, bit for bit."""
    for P in (2, 3, 4, 5):
        for n in (0, 1, 2, 7, 1031):
            ins = [make(q, n, "float32", "sum") for q in range(P)]
            assert np.array_equal(_bits(single_copy_twin(ins, "sum")), _bits(reduce_in_order(ins, "sum")))
            s = single_copy_slices(n, P)
            assert s[0][0] == 0 and s[-1][1] == n and all(a[1] == b[0] for a, b in zip(s, s[1:]))


def test_cma_read_is_a_copy():
    """pyccl_cma_read of this process's own memory: the bytes numpy holds."""
    src = np.arange(100003, dtype=np.uint8)
    dst = np.zeros_like(src)
    assert lib.pyccl_cma_read(os.getpid(), ffi.from_buffer(dst), ffi.cast("uint64_t", ffi.from_buffer(src)),
                              src.nbytes) == 0
    assert np.array_equal(dst, src)


def _cma_all_reduce(coll):
    assert coll.single_copy_bytes == 4096, coll.single_copy_bytes
    bad = _thread_all_reduce(coll)
    P, r = coll.size, coll.rank
    ins = [make(q, 40009, "float32", "sum") for q in range(P)]
    x = ins[r].copy()
    coll.all_reduce(x, ReduceOp("sum"), "t")
    if not np.array_equal(_bits(x), _bits(single_copy_twin(ins, "sum"))):
        bad.append("float32 sum n=40009: not single_copy_twin's bits")
    return bad


@pytest.mark.parametrize("size", [2, 3])
def test_threads_single_copy_bitwise(size):
    """Ranks as threads of one process (process_vm_readv of its own pid)."""
    res = cma_threads(size, _cma_all_reduce)
    assert not any(res), res


def rank_single_copy_on(comm):
    return comm.local.single_copy_bytes


@pytest.mark.parametrize("nranks", RANKS)
@pytest.mark.parametrize("check", ["all_reduce", "reduce_scatter", "data_movement"])
def test_single_copy_fast_paths(groups, nranks, check):
    g = groups(nranks, env=CMA, transport="shm")
    assert g.run(rank_single_copy_on) == [4096] * nranks, "single copy did not turn on"
    fn = {"all_reduce": rank_fast_all_reduce, "reduce_scatter": rank_fast_reduce_scatter,
          "data_movement": rank_fast_data_movement}[check]
    sizes = FAST_SIZES if check == "all_reduce" else [0, 1, 7, 257, 1031, 9973]
    failures = [f for bad in g.run(fn, sizes) for f in bad]
    assert not failures, failures[:20]


# ==== broadcast: the copies shared (on by default where every rank has a core) ====================
def test_broadcast_parts_twin():
    """Every reader gets every byte exactly once, and every rank (the root too) copies about
    (P-1)/P of them: the split cma_broadcast uses (shm_cma.c: part_at)."""
    for P in (2, 3, 4, 5):
        for n in (0, 1, 63, 64, 65, 1000, 4097, (1 << 20) + 3):
            for root in range(P):
                parts = broadcast_parts(n, P, root)
                copied = [0] * P
                for copier, reader, lo, hi in parts:
                    assert 0 <= lo < hi <= n and reader != root and copier in (root, reader)
                    copied[copier] += hi - lo
                for q in set(range(P)) - {root}:
                    got = sorted((lo, hi) for _, reader, lo, hi in parts if reader == q)
                    assert (got[0][0] if got else 0) == 0 and (got[-1][1] if got else 0) == n
                    assert all(a[1] == b[0] for a, b in zip(got, got[1:])), (P, n, root, got)
                assert max(copied) <= n * (P - 1) // P + 64 * P, (P, n, root, copied)


def rank_broadcast_default(comm, sizes):
    """The thresholds the probe agreed, then broadcasts around the broadcast threshold, every root."""
    P, r = comm.size, comm.rank
    bad = [] if comm.local.single_copy_bytes == 0 else [f"every-op threshold {comm.local.single_copy_bytes}"]
    cpus = len(os.sched_getaffinity(0))
    want = DEFAULT_CMA_BROADCAST_BYTES if cpus >= P else 0
    if comm.local.single_copy_broadcast_bytes != want:
        bad.append(f"broadcast threshold {comm.local.single_copy_broadcast_bytes}, want {want}")
    want = DEFAULT_CMA_CROWD_BYTES if cpus < P else 0
    if comm.local.single_copy_crowd_bytes != want:
        bad.append(f"crowded all_reduce threshold {comm.local.single_copy_crowd_bytes}, want {want}")
    for n in sizes:
        for root in range(P):
            every = [(np.arange(n) * (q + 3) + 11 * q).astype(np.uint8) for q in range(P)]
            x = every[r].copy()
            comm.broadcast(x, root=root)
            if not np.array_equal(x, every[root]):
                bad.append(f"broadcast n={n} root={root}: {int((x != every[root]).sum())} bytes wrong")
    return bad


@pytest.mark.parametrize("nranks", [2, 3])
def test_broadcast_single_copy_default(groups, nranks):
    """PYCCL_SHM_CMA_BYTES unset: broadcast from DEFAULT_CMA_BROADCAST_BYTES shares its copies
    (only where every rank has a core: on this 2-core VM 2 ranks do, 3 keep the segment)."""
    g = groups(nranks, env=FAST, transport="shm")
    t = DEFAULT_CMA_BROADCAST_BYTES
    sizes = [t - 1, t, t + 1, 3 * t + 65, (1 << 20) + 4099]
    failures = [f for bad in g.run(rank_broadcast_default, sizes) for f in bad]
    assert not failures, failures[:20]


def _broadcast_threads(coll):
    P, r, bad = coll.size, coll.rank, []
    if coll.single_copy_broadcast_bytes != (DEFAULT_CMA_BROADCAST_BYTES if len(os.sched_getaffinity(0)) >= P
                                            else 0):
        bad.append(f"threshold {coll.single_copy_broadcast_bytes}")
    for n in (DEFAULT_CMA_BROADCAST_BYTES, 5 * DEFAULT_CMA_BROADCAST_BYTES + 3):
        for root in range(P):
            x = (np.arange(n) * 5 + root).astype(np.uint8) if r == root else np.zeros(n, np.uint8)
            coll.broadcast(x, root, "t")
            if not np.array_equal(x, (np.arange(n) * 5 + root).astype(np.uint8)):
                bad.append(f"n={n} root={root}")
    return bad


def test_threads_broadcast_single_copy():
    """Ranks as threads of one process: process_vm_writev/readv of its own pid."""
    res = run_threads(2, _broadcast_threads, env={k: v for k, v in FAST.items() if k != "PYCCL_TRANSPORT"})
    assert not any(res), res


def test_broadcast_single_copy_off():
    """PYCCL_SHM_CMA_BYTES=0 turns the shared broadcast and the crowded all_reduce off too."""
    for P in (2, 3):
        res = run_threads(P, lambda c: (c.single_copy_bytes, c.single_copy_broadcast_bytes,
                                        c.single_copy_crowd_bytes), env={"PYCCL_SHM_CMA_BYTES": "0"})
        assert res == [(0, 0, 0)] * P, res


def _crowded_all_reduce(coll):
    P, r, bad = coll.size, coll.rank, []
    if coll.single_copy_crowd_bytes != 4096 or coll.single_copy_bytes:
        return [f"thresholds {coll.single_copy_bytes}, {coll.single_copy_crowd_bytes}"]
    for n, op in ((1023, "sum"), (1025, "sum"), (40009, "sum"), (40009, "max"), (9973, "prod")):
        ins = [make(q, n, "float32", op) for q in range(P)]
        x = ins[r].copy()
        g0 = lib.pyccl_coll_counter(coll._c, r)
        coll.all_reduce(x, ReduceOp(op), "t")
        steps = lib.pyccl_coll_counter(coll._c, r) - g0
        if (steps == 3) != (n * 4 >= 4096):   # the single copy's 3 handshakes, not the pipeline's 2 per step
            bad.append(f"float32 {op} n={n}: {steps} steps")
        if not np.array_equal(_bits(x), _bits(single_copy_twin(ins, op))):
            bad.append(f"float32 {op} n={n}: not single_copy_twin's bits")
    return bad


def test_threads_crowded_all_reduce(monkeypatch):
    """More ranks than CPUs: all_reduce from the crowd threshold (4 KiB here) takes the single
    copy; ranks as threads, so the module's default is patched for all of them."""
    P = len(os.sched_getaffinity(0)) + 1
    if P > 8:
        pytest.skip("many CPUs: a crowded group would be large")
    monkeypatch.setattr(shm_engine, "DEFAULT_CMA_CROWD_BYTES", 4096)
    res = run_threads(P, _crowded_all_reduce, env={k: v for k, v in FAST.items() if k != "PYCCL_TRANSPORT"})
    assert not any(res), res


# ==== the kernel refuses ==========================================================================
CAP_SYS_PTRACE = 19


def _refuse_ptrace(rank):
    """Make the kernel refuse process_vm_readv of rank 1 (for real): rank 1 becomes non-dumpable,
    and every rank drops CAP_SYS_PTRACE from its effective set (root keeps it otherwise)."""
    libc = ctypes.CDLL(None, use_errno=True)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    hdr, data = Header(0x20080522, 0), (Data * 2)()
    if libc.capget(ctypes.byref(hdr), data) == 0:
        data[0].effective &= ~(1 << CAP_SYS_PTRACE)
        libc.capset(ctypes.byref(hdr), data)
    if rank == 1:
        libc.prctl(4, 0, 0, 0, 0)            # PR_SET_DUMPABLE, 0


def rank_refused(comm):
    """After the refusal: a new communicator falls back (and says why); the old one, which
    probed before, fails its next single-copy call with an error naming process_vm_readv."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("pyccl")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        _refuse_ptrace(comm.rank)
        comm.barrier()
        sub = comm.split(0, comm.rank)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    bad, P, r = [], sub.size, sub.rank
    if sub.local.single_copy_bytes != 0 or sub.local.single_copy_broadcast_bytes != 0:
        bad.append(f"single copy still on: {sub.local.single_copy_bytes}, {sub.local.single_copy_broadcast_bytes}")
    why = [rec.getMessage() for rec in records if "single-copy collectives off" in rec.getMessage()]
    if not why or "EPERM" not in why[0] or "rank 0 cannot read rank 1" not in why[0]:
        bad.append(f"no INFO line saying why: {[rec.getMessage() for rec in records]}")
    for n in (5003, 40009):                                 # above the threshold: the segment path
        ins = [make(q, n, "float32", "sum") for q in range(P)]
        x = ins[r].copy()
        sub.all_reduce(x)
        if not np.array_equal(_bits(x), _bits(reduce_in_order(ins, "sum"))):
            bad.append(f"fallback all_reduce n={n}")
        out = np.zeros(n * P, np.float32)
        sub.all_gather(out, ins[r])
        if not np.array_equal(out, np.concatenate(ins)):
            bad.append(f"fallback all_gather n={n}")
    sub.close()
    try:
        comm.all_reduce(np.ones(40009, np.float32))
        bad.append("the refused read went unnoticed")
    except (TransportError, PeerFailure) as e:
        if r == 0 and "process_vm_readv" not in str(e):
            bad.append(f"rank 0's error does not name process_vm_readv: {e}")
    return bad


def test_refused_cross_memory_attach_falls_back():
    g = RankGroup(3, env={**CMA, "PYCCL_TIMEOUT": "30"}, transport="shm")
    try:
        assert g.run(rank_single_copy_on) == [4096] * 3
        failures = [f for bad in g.run(rank_refused) for f in bad]
    finally:
        g.close()
    assert not failures, failures


def _overlapping_buffers(coll):
    """Inputs that overlap the output where the peers read them: the C copies them first."""
    assert coll.single_copy_bytes == 4096, coll.single_copy_bytes
    bad, P, r, n = [], coll.size, coll.rank, 3001
    every = [make(q, n, "float32") for q in range(P)]
    out = np.zeros(n * P + 1, np.float32)
    out[r * n + 1:r * n + 1 + n] = every[r]                   # in = out shifted by one element
    coll.all_gather(out[:n * P], out[r * n + 1:r * n + 1 + n], "t")
    if not np.array_equal(out[:n * P], np.concatenate(every)):
        bad.append("all_gather, input overlapping another block of the output")
    full = [make(q, n * P, "float32", "sum", salt=3) for q in range(P)]
    inp = full[r].copy()
    nxt = (r + 1) % P                                         # out = this rank's block r+1 of inp
    coll.reduce_scatter(inp[nxt * n:(nxt + 1) * n], inp, ReduceOp("sum"), "t")
    want = reduce_in_order([f[r * n:(r + 1) * n] for f in full], "sum")
    if not np.array_equal(_bits(inp[nxt * n:(nxt + 1) * n]), _bits(want)):
        bad.append("reduce_scatter, output overlapping a block the peers read")
    return bad


@pytest.mark.parametrize("size", [2, 3])
def test_threads_overlapping_buffers(size):
    res = cma_threads(size, _overlapping_buffers)
    assert not any(res), res
