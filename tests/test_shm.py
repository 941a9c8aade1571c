"""Shared memory: the slot rings and ShmConnection (transports/shm.py), the node-local
collectives (ccl/engines/shm.py, native/shm.c) and their hygiene in /dev/shm.

In-process tests drive the C pieces directly (rings from one thread, collectives from one
thread per rank); multi-process tests use real ranks: the executor over ShmConnection
(PYCCL_TRANSPORT=shm, fast path off, tiny chunks and slots so messages span several slots and
the rings wrap), the fast paths (every dtype x op, sizes around the one-shot threshold and
over several pipeline steps, compared bit for bit with the numpy twin of the C reduction
order), a killed or absent peer (PeerFailure / Timeout, not a hang), and that nothing of ours
is left in /dev/shm.
"""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import pyccl
from pyccl.dtypes import DTYPES, ReduceOp
from pyccl.errors import PeerFailure, Timeout, TransportError
from pyccl.reduce import divide_numpy, reduce_numpy
from reference import OPS, make, mismatch, reduce_cases
from ranks import RankGroup

shm = pytest.importorskip("pyccl.transports.shm")
if not shm.NATIVE_SHM:
    pytest.skip("pyccl._native is not built with shared memory (pip install -e .)", allow_module_level=True)
from pyccl.engines.shm import ShmCollectives, layout, reduce_in_order  # noqa: E402
from pyccl.transports.shm import Segment, ShmConnection, clean_leftovers, ffi, lib  # noqa: E402

pytestmark = pytest.mark.timeout(300)

RANKS = [2, 3, 4]
#: fast paths with small thresholds: one-shot up to 1 KiB, pipeline parts of 4 KiB, streaming
#: stores for every output (the default configuration is tested too)
FAST = {"PYCCL_TRANSPORT": "shm", "PYCCL_SHM_SMALL_BYTES": "1024", "PYCCL_SHM_CHUNK_BYTES": "4096",
        "PYCCL_SHM_NT_BYTES": "1"}
#: the executor over the rings: fast path off, 4 KiB chunks in 256-byte slots, 3 per ring
EXEC = {"PYCCL_TRANSPORT": "shm", "PYCCL_SHM_COLLECTIVES": "0", "PYCCL_CHUNK_BYTES": "4096",
        "PYCCL_SHM_SLOT_BYTES": "256", "PYCCL_SHM_SLOTS": "3"}
#: around each dtype's one-shot threshold (1024 B) and over several pipeline steps
FAST_SIZES = [0, 1, 2, 7, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 9973, 40009]


def _bits(x):
    return np.ascontiguousarray(x).view(np.uint8)


def _twin(inputs, op, size):
    """What every rank must hold after all_reduce: the C order's numpy twin (+ AVG's divide)."""
    want = reduce_in_order(inputs, op)
    if op == "avg":
        divide_numpy(want, size)
    return want


def ours(pids):
    """Names in /dev/shm created by any of `pids` (this uid)."""
    pat = re.compile(rf"^pyccl-{os.getuid()}-(\d+)-")
    try:
        names = os.listdir(shm.SHM_DIR)
    except OSError:
        return []
    return [n for n in names if (m := pat.match(n)) and int(m.group(1)) in set(pids)]


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ==== in-process: rings =======================================================================
@pytest.fixture
def ring_pair():
    """Two rings (a->b, b->a) of 4 slots x 64 B in one segment, and their connections."""
    rb = lib.pyccl_ring_bytes(64, 4)
    seg = Segment(shm.segment_name("test", "ring"), 2 * rb, create=True)
    seg.unlink()
    r0, r1 = seg.base, seg.base + rb
    lib.pyccl_ring_format(r0, 64, 4)
    lib.pyccl_ring_format(r1, 64, 4)
    a = ShmConnection(1, r0, r1, 0, False, "t")   # rank 0: sends on r0, receives on r1
    b = ShmConnection(0, r1, r0, 0, False, "t")
    yield a, b
    seg.close()


def _drive(conns, reqs, limit=10000):
    for _ in range(limit):
        if all(r.done for r in reqs):
            return
        for c in conns:
            c.progress()
    raise AssertionError("requests did not complete")


def test_ring_multi_slot_fifo(ring_pair):
    a, b = ring_pair
    msgs = [np.arange(n, dtype=np.uint8) * 3 for n in (0, 1, 63, 64, 65, 1000, 257)]
    outs = [np.zeros_like(m) for m in msgs]
    reqs = [a.isend(memoryview(m)) for m in msgs] + [b.irecv(memoryview(o)) for o in outs]
    _drive([a, b], reqs)
    for m, o in zip(msgs, outs):
        assert np.array_equal(m, o)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_ring_irecv_reduce_matches_twin(ring_pair, dtype):
    a, b = ring_pair
    for op in ("sum", "prod", "min", "max", "avg"):
        if dtype == "bool" and op not in ("min", "max"):
            continue
        for n in (0, 1, 13, 200):
            x, y = make(0, n, dtype, op), make(1, n, dtype, op)
            dst = np.zeros(n, DTYPES[dtype])
            reqs = [a.isend(memoryview(x.view(np.uint8))), b.irecv_reduce(dst, y, ReduceOp(op))]
            _drive([a, b], reqs)
            want = reduce_numpy(np.empty_like(y), y, x, op)       # dst = src (op) received
            assert np.array_equal(_bits(dst), _bits(want)), (dtype, op, n)
            inplace = y.copy()                                    # dst is src
            reqs = [a.isend(memoryview(x.view(np.uint8))), b.irecv_reduce(inplace, inplace, ReduceOp(op))]
            _drive([a, b], reqs)
            assert np.array_equal(_bits(inplace), _bits(want)), (dtype, op, n, "in place")


def test_ring_size_mismatch_names_both_sizes(ring_pair):
    a, b = ring_pair
    a.isend(memoryview(np.zeros(100, np.uint8)))
    req = b.irecv(memoryview(np.zeros(96, np.uint8)))
    with pytest.raises(TransportError, match=r"rank 0.*sent 100 bytes.*expected 96"):
        _drive([a, b], [req])


def test_ring_closed_peer_is_peer_failure(ring_pair):
    a, b = ring_pair
    req = b.irecv(memoryview(np.zeros(8, np.uint8)))
    a.close()
    with pytest.raises(PeerFailure, match="rank 0 closed"):
        _drive([b], [req], limit=10 ** 7)


def test_ring_dead_peer_is_peer_failure():
    rb = lib.pyccl_ring_bytes(64, 2)
    seg = Segment(shm.segment_name("test", "ring"), rb, create=True)
    seg.unlink()
    try:
        lib.pyccl_ring_format(seg.base, 64, 2)
        conn = ShmConnection(5, seg.base, seg.base, dead_pid(), True, "t")
        req = conn.irecv(memoryview(np.zeros(8, np.uint8)))
        with pytest.raises(PeerFailure, match=r"rank 5 \(pid \d+\) is gone"):
            _drive([conn], [req], limit=10 ** 7)
    finally:
        seg.close()


# ==== in-process: collectives, one thread per rank ===============================================
class DictStore:
    """The store interface over a dict, for ranks that are threads of this process."""

    def __init__(self):
        self.d, self.cv = {}, threading.Condition()

    def set(self, key, value):
        with self.cv:
            self.d[key] = bytes(value)
            self.cv.notify_all()

    def get(self, key, timeout=None):
        self.wait([key], timeout)
        return self.d[key]

    def wait(self, keys, timeout=None):
        with self.cv:
            if not self.cv.wait_for(lambda: all(k in self.d for k in keys), timeout):
                raise Timeout(f"keys {keys}")

    def check(self, keys):
        return [k in self.d for k in keys]


def run_threads(size, fn, timeout=30.0, env=None):
    """fn(coll) on `size` ShmCollectives, one thread each; returns their results."""
    store, out, errs = DictStore(), [None] * size, []
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})

    def main(r):
        try:
            coll = ShmCollectives(r, size, store, "thr", timeout)
            try:
                out[r] = fn(coll)
            finally:
                coll.close()
        except BaseException as e:  # handed to the test
            errs.append((r, e))
    try:
        ts = [threading.Thread(target=main, args=(r,)) for r in range(size)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout * 3)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if errs:
        raise errs[0][1]
    return out


def _thread_all_reduce(coll):
    bad = []
    P, r = coll.size, coll.rank
    for dtype, op in reduce_cases(["sum", "prod", "min", "max"]):
        for n in FAST_SIZES:
            ins = [make(q, n, dtype, op) for q in range(P)]
            x = ins[r].copy()
            coll.all_reduce(x, ReduceOp(op), "t")
            if not np.array_equal(_bits(x), _bits(_twin(ins, op, P))):
                bad.append(f"{dtype} {op} n={n}")
    return bad


@pytest.mark.parametrize("size", [2, 3])
def test_threads_all_reduce_bitwise(size):
    res = run_threads(size, _thread_all_reduce, env={"PYCCL_SHM_SMALL_BYTES": "1024",
                                                     "PYCCL_SHM_CHUNK_BYTES": "4096"})
    assert not any(res), res


def test_threads_timeout_names_missing_rank():
    def fn(coll):
        if coll.rank == 1:
            time.sleep(1.5)          # never calls the collective in time
            return None
        coll.timeout = 0.3
        t0 = time.monotonic()
        with pytest.raises(Timeout) as e:
            coll.all_reduce(np.ones(4, np.float32), ReduceOp.SUM, "all_reduce #1")
        return str(e.value), time.monotonic() - t0
    msg, took = run_threads(2, fn)[0]
    assert "all_reduce #1" in msg and "ranks [1] have not arrived" in msg and "step 0" in msg, msg
    assert took < 2.0


def test_dead_peer_detected_in_c():
    """A peer whose process is gone: the wait returns PEER_DEAD long before the timeout."""
    half, part, small = layout(2, 1024, 4096)
    size = lib.pyccl_coll_bytes(2, half)
    seg = Segment(shm.segment_name("test", "coll"), size, create=True)
    seg.unlink()
    err = ffi.new("int *")
    try:
        assert lib.pyccl_coll_format(seg.base, size, 2, half, part, small, 0, 1) == 0
        c0 = lib.pyccl_coll_attach(seg.base, size, 0, 2, os.getpid(), shm.pid_namespace(), err)
        c1 = lib.pyccl_coll_attach(seg.base, size, 1, 2, dead_pid(), shm.pid_namespace(), err)
        assert lib.pyccl_coll_attached(c0) == 2
        x = np.ones(4, np.float32)
        t0 = time.monotonic()
        rc = lib.pyccl_coll_all_reduce(c0, ffi.from_buffer(x), ffi.from_buffer(x), 4, 2, 0, -1, 30.0)
        assert rc == 2 and c0.err_rank == 1 and time.monotonic() - t0 < 5
        # rank 0 marked the segment failed: the other rank's next collective fails at once
        rc = lib.pyccl_coll_barrier(c1, 30.0)
        assert rc == 3 and c1.err_rank == 0
        lib.pyccl_coll_free(c0)
        lib.pyccl_coll_free(c1)
    finally:
        seg.close()


def test_layout_fits_every_step():
    for P in (2, 3, 4, 8, 64, 256):
        half, part, small = layout(P, 65536, 262144)
        assert half % 4096 == 0 and half >= P * part and half >= small and part % 128 == 0
        assert 2 * P * half <= (600 << 20)


def test_clean_leftovers_removes_dead_creators_only():
    dead = dead_pid()
    uid = os.getuid()
    stale = f"pyccl-{uid}-{dead}-world0.coll-deadbeef"
    live = f"pyccl-{uid}-{os.getppid()}-world0.coll-cafecafe"
    for n in (stale, live):
        with open(os.path.join(shm.SHM_DIR, n), "wb") as f:
            f.write(b"x")
    try:
        removed = clean_leftovers()
        assert stale in removed and live not in removed
        assert not os.path.exists(os.path.join(shm.SHM_DIR, stale))
        assert os.path.exists(os.path.join(shm.SHM_DIR, live))
    finally:
        for n in (stale, live):
            if os.path.exists(os.path.join(shm.SHM_DIR, n)):
                os.unlink(os.path.join(shm.SHM_DIR, n))


# ==== real processes: the executor over ShmConnection ===========================================
def rank_transport_kinds(comm):
    return sorted({type(c).__name__ for c in comm.conns.values()}), comm.local is not None and comm.local.enabled


@pytest.mark.parametrize("nranks", RANKS)
@pytest.mark.parametrize("check", ["all_reduce", "reduce", "reduce_scatter", "data_movement", "p2p"])
def test_executor_over_shm(groups, nranks, check):
    import test_collectives as tc
    g = groups(nranks, env=EXEC, transport="shm")
    for kinds, fast in g.run(rank_transport_kinds):
        assert kinds == ["ShmConnection"] and not fast
    sizes = [0, 1, 7, 1031, 5003]   # 5003 float64 = 10 chunks of 4 KiB, 16 slots each
    if check == "p2p":
        for n in (0, 1, 5, 17, 3001):
            assert not any(g.run(tc.rank_all_to_all_uneven, n))
            assert not any(g.run(tc.rank_send_recv_barrier, n))
        return
    fn = {"all_reduce": tc.rank_all_reduce, "reduce": tc.rank_reduce, "reduce_scatter": tc.rank_reduce_scatter,
          "data_movement": tc.rank_data_movement}[check]
    failures = [f for bad in g.run(fn, sizes) for f in bad]
    assert not failures, failures[:20]


def rank_size_mismatch(comm):
    x = np.zeros(10 + 4 * comm.rank, np.float32)   # ring blocks differ in both directions
    try:
        comm.all_reduce(x)
    except TransportError as e:
        return str(e)
    return ""


def test_executor_size_mismatch_is_transport_error():
    g = RankGroup(2, env={**EXEC, "PYCCL_TIMEOUT": "20"}, transport="shm")
    try:
        msgs = g.run(rank_size_mismatch)
    finally:
        g.close()
    # the calls' counts differ: named as such (a size mismatch is left for plans that differ)
    assert all("call mismatch" in m and "the count differs" in m for m in msgs), msgs


# ==== real processes: the fast paths ==============================================================
def rank_fast_all_reduce(comm, sizes):
    assert comm.local is not None and comm.local.enabled and comm.local.wants("all_reduce", 8)
    bad, P, r = [], comm.size, comm.rank
    for dtype, op in reduce_cases(OPS):
        for n in sizes:
            ins = [make(q, n, dtype, op) for q in range(P)]
            x = ins[r].copy()
            comm.all_reduce(x, op=op)
            if not np.array_equal(_bits(x), _bits(_twin(ins, op, P))):
                bad.append(f"all_reduce {dtype} {op} n={n}: not the twin's bits")
            err = mismatch(x, ins, op, dtype)
            if err:
                bad.append(f"all_reduce {dtype} {op} n={n}: {err}")
            # reduce to a root through the same C path (the communicator may route it here)
            root = n % P
            y = ins[r].copy()
            comm.local.reduce(y, root, ReduceOp(op), "reduce")
            want = reduce_in_order(ins, op) if r == root else ins[r]
            if not np.array_equal(_bits(y), _bits(want)):
                bad.append(f"reduce {dtype} {op} n={n} root={root}")
    return bad


def rank_fast_reduce_scatter(comm, sizes):
    bad, P, r = [], comm.size, comm.rank
    for dtype, op in reduce_cases(OPS):
        for n in sizes:
            full = [make(q, n * P, dtype, op) for q in range(P)]
            parts = [f[r * n:(r + 1) * n] for f in full]
            out = np.zeros(n, DTYPES[dtype])
            comm.reduce_scatter(out, full[r], op=op)
            if not np.array_equal(_bits(out), _bits(_twin(parts, op, P))):
                bad.append(f"reduce_scatter {dtype} {op} n={n}")
            inp = full[r].copy()                     # in place: out is this rank's block of inp
            comm.reduce_scatter(inp[r * n:(r + 1) * n], inp, op=op)
            if not np.array_equal(_bits(inp[r * n:(r + 1) * n]), _bits(_twin(parts, op, P))):
                bad.append(f"reduce_scatter in place {dtype} {op} n={n}")
    return bad


def rank_fast_data_movement(comm, sizes):
    bad, P, r = [], comm.size, comm.rank
    for dtype in DTYPES:
        for n in sizes:
            every = [make(q, n, dtype) for q in range(P)]
            root = (n + 1) % P
            x = every[r].copy()
            comm.broadcast(x, root=root)
            if not np.array_equal(_bits(x), _bits(every[root])):
                bad.append(f"broadcast {dtype} n={n}")
            out = np.zeros(n * P, DTYPES[dtype])
            comm.all_gather(out, every[r])
            if not np.array_equal(_bits(out), _bits(np.concatenate(every))):
                bad.append(f"all_gather {dtype} n={n}")
            out2 = np.zeros(n * P, DTYPES[dtype])           # in place: inp is out's own block
            out2[r * n:(r + 1) * n] = every[r]
            comm.all_gather(out2, out2[r * n:(r + 1) * n])
            if not np.array_equal(_bits(out2), _bits(np.concatenate(every))):
                bad.append(f"all_gather in place {dtype} n={n}")
            src = make(r, n * P, dtype, salt=2)
            want = np.concatenate([make(q, n * P, dtype, salt=2)[r * n:(r + 1) * n] for q in range(P)])
            dst = np.zeros(n * P, DTYPES[dtype])
            comm.all_to_all(dst, src)
            if not np.array_equal(_bits(dst), _bits(want)):
                bad.append(f"all_to_all {dtype} n={n}")
            comm.all_to_all(src, src)                        # in place
            if not np.array_equal(_bits(src), _bits(want)):
                bad.append(f"all_to_all in place {dtype} n={n}")
    for _ in range(3):
        comm.barrier()
    return bad


@pytest.mark.parametrize("nranks", RANKS)
@pytest.mark.parametrize("check", ["all_reduce", "reduce_scatter", "data_movement"])
def test_fast_paths(groups, nranks, check):
    g = groups(nranks, env=FAST, transport="shm")
    fn = {"all_reduce": rank_fast_all_reduce, "reduce_scatter": rank_fast_reduce_scatter,
          "data_movement": rank_fast_data_movement}[check]
    sizes = FAST_SIZES if check == "all_reduce" else [0, 1, 7, 257, 1031, 9973]
    failures = [f for bad in g.run(fn, sizes) for f in bad]
    assert not failures, failures[:20]


def rank_default_large(comm):
    """The default configuration over several 256 KiB pipeline steps, and a bfloat16 AVG."""
    bad, P, r = [], comm.size, comm.rank
    for dtype, op, n in (("float32", "sum", (3 << 20) // 4 * P + 7), ("bfloat16", "avg", 700001),
                         ("int64", "max", 300007)):
        ins = [make(q, n, dtype, op) for q in range(P)]
        x = ins[r].copy()
        comm.all_reduce(x, op=op)
        if not np.array_equal(_bits(x), _bits(_twin(ins, op, P))):
            bad.append(f"all_reduce {dtype} {op} n={n}")
    n = 1 << 20
    mine = np.full(n, r + 1, np.float32)
    out = np.empty(n * P, np.float32)
    comm.all_gather(out, mine)
    if not np.array_equal(out, np.repeat(np.arange(1, P + 1, dtype=np.float32), n)):
        bad.append("all_gather 4 MiB")
    return bad


@pytest.mark.parametrize("nranks", RANKS)
def test_fast_default_config_large(groups, nranks):
    g = groups(nranks, transport="shm")
    assert not any(g.run(rank_default_large))


def rank_four_on_two_cores(comm, mib, reps):
    x = np.ones(mib * (1 << 18), np.float32)
    t0 = time.monotonic()
    for _ in range(reps):
        comm.all_reduce(x)
        comm.barrier()
        comm.all_reduce(x[:2])
    return time.monotonic() - t0, float(x[5])


def test_more_ranks_than_cores_finish():
    """4 ranks on this machine's 2 cores: no livelock, the waits yield."""
    g = RankGroup(4, env={"PYCCL_TRANSPORT": "shm"})
    try:
        res = g.run(rank_four_on_two_cores, 8, 20, timeout=120)
    finally:
        g.close()
    assert all(took < 60 for took, _ in res), res


# ==== failures: a killed peer, a peer that never comes =========================================
def rank_die_or_wait(comm, victim, nbytes):
    if comm.rank == victim:
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)
    x = np.ones(nbytes // 4, np.float32)
    t0 = time.monotonic()
    try:
        comm.all_reduce(x)
        comm.all_reduce(x)
    except (PeerFailure, Timeout) as e:
        return type(e).__name__, str(e), time.monotonic() - t0
    return "no error", "", time.monotonic() - t0


@pytest.mark.parametrize("path", ["fast", "executor"])
@pytest.mark.parametrize("nbytes", [64, 8 << 20])
def test_killed_peer_fails_fast(path, nbytes):
    env = {"PYCCL_TRANSPORT": "shm", "PYCCL_TIMEOUT": "30"}
    if path == "executor":
        env["PYCCL_SHM_COLLECTIVES"] = "0"
    g = RankGroup(3, env=env, transport="shm")
    try:
        for pipe in g.pipes:
            pipe.send((rank_die_or_wait, (1, nbytes)))
        results = {}
        for r, pipe in enumerate(g.pipes):
            assert pipe.poll(60), f"rank {r} hung"
            try:
                results[r] = pipe.recv()[1]
            except EOFError:
                results[r] = "died"
    finally:
        g.broken = True
        g.close()
    assert results[1] == "died"
    for r in (0, 2):
        kind, msg, took = results[r]
        assert kind in ("PeerFailure", "Timeout"), results
        assert took < 20, results
    # at least one survivor names the dead rank
    assert any("rank 1" in results[r][1] for r in (0, 2)), results


def rank_late(comm):
    if comm.rank == 1:
        time.sleep(4)
    t0 = time.monotonic()
    try:
        comm.all_reduce(np.ones(16, np.float32))
    except (PeerFailure, Timeout) as e:
        return type(e).__name__, str(e), time.monotonic() - t0
    return "no error", "", time.monotonic() - t0


def test_absent_peer_times_out_naming_it():
    g = RankGroup(3, env={"PYCCL_TRANSPORT": "shm", "PYCCL_TIMEOUT": "2"}, transport="shm")
    try:
        res = g.run(rank_late)
    finally:
        g.close()
    for r in (0, 2):
        kind, msg, took = res[r]
        assert kind in ("Timeout", "PeerFailure") and took < 5, res
    timeouts = [res[r][1] for r in (0, 2) if res[r][0] == "Timeout"]
    assert timeouts and all("ranks [1] have not arrived" in m and "all_reduce" in m for m in timeouts), res
    assert res[1][0] == "PeerFailure", res   # the late rank finds the segment marked failed


def rank_mismatch(comm, kind):
    """Calls that differ across ranks: TransportError naming the mismatch, on the call or the next."""
    r, s = comm.rank, comm.size
    t0 = time.monotonic()
    errors = []
    for call in range(2):
        try:
            if call == 1:
                comm.all_reduce(np.ones(2, np.float32))
            elif kind == "all_reduce":
                comm.all_reduce(np.ones(1000 + r, np.float32))
            elif kind == "all_reduce_large":
                comm.all_reduce(np.ones((1 << 20) + 64 * r, np.float32))
            elif kind == "dtype":
                comm.all_reduce(np.ones(64, np.float32 if r else np.int32))
            elif kind == "op":
                comm.all_reduce(np.ones(64, np.float32), op="max" if r == s - 1 else "sum")
            elif kind == "broadcast":
                comm.broadcast(np.ones(10 + (r == s - 1), np.float32), root=0)
            elif kind == "all_gather":
                comm.all_gather(np.empty((5 + r) * s, np.float32), np.ones(5 + r, np.float32))
            elif kind == "all_to_all":
                n = 2 * s + (r == 0) * s
                comm.all_to_all(np.empty(n, np.float32), np.ones(n, np.float32))
            elif kind == "reduce_scatter":
                n = 3 + (r == 1)
                comm.reduce_scatter(np.empty(n, np.float32), np.ones(n * s, np.float32))
            errors.append("")
        except (TransportError, PeerFailure, Timeout) as e:
            errors.append(f"{type(e).__name__}: {e}")
    return errors, time.monotonic() - t0


@pytest.mark.parametrize("kind", ["all_reduce", "all_reduce_large", "dtype", "op", "broadcast", "all_gather",
                                  "all_to_all", "reduce_scatter"])
def test_fast_path_mismatch_detected(kind):
    g = RankGroup(3, env={"PYCCL_TRANSPORT": "shm", "PYCCL_TIMEOUT": "20"}, transport="shm")
    try:
        res = g.run(rank_mismatch, kind, timeout=60)
    finally:
        g.close()
    for r, (errors, took) in enumerate(res):
        assert took < 10, res
        first = next((e for e in errors if e), "")
        assert "mismatch" in first and first.startswith("TransportError"), (r, res)
    # at least one rank names the peer and both calls
    assert any("call mismatch with rank" in e and "it called" in e for errors, _ in res for e in errors), res


# ==== hygiene ====================================================================================
def rank_pid(comm):
    return os.getpid()


@pytest.mark.parametrize("env", [{}, {"PYCCL_SHM_COLLECTIVES": "0"}])
def test_nothing_left_in_dev_shm(env):
    stale = f"pyccl-{os.getuid()}-{dead_pid()}-crashed.coll-0badf00d"
    with open(os.path.join(shm.SHM_DIR, stale), "wb") as f:
        f.write(b"x")
    g = RankGroup(3, env={"PYCCL_TRANSPORT": "shm", **env}, transport="shm")
    try:
        pids = g.run(rank_pid)
        # unlinked as soon as every rank mapped them, while the communicators are alive
        assert ours(pids + [os.getpid()]) == []
        assert not os.path.exists(os.path.join(shm.SHM_DIR, stale)), "leftover of a dead job not cleaned"
    finally:
        g.close()
    assert ours(pids + [os.getpid()]) == []


def test_nothing_left_after_this_module(groups):
    """Runs last in this module: no segment of this process or of the shared groups' ranks."""
    pids = [os.getpid()]
    for n in RANKS:
        for kw in ({"env": FAST, "transport": "shm"}, {"env": EXEC, "transport": "shm"}, {"transport": "shm"}):
            pids += groups(n, **kw).run(rank_pid)
    assert ours(pids) == []
