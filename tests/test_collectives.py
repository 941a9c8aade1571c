"""Every collective x dtype x op, on 2, 3 and 4 real processes over real transports,
checked against a numpy float64 reference. Sizes: 0, 1, primes (never divisible by the
rank count) and a 64 MiB buffer; a tiny chunk size makes the pipelined path run too."""
import numpy as np
import pytest

import pyccl
from pyccl.dtypes import DTYPES
from reference import OPS, make, mismatch, reduce_cases, reduce_ref

SIZES = [0, 1, 7, 1031]
RANKS = [2, 3, 4]
SETTINGS = {"default": {}, "tiny-chunks": {"PYCCL_CHUNK_BYTES": "64", "PYCCL_TCP_STRIPE_MIN": "32"},
            # one host: the single-copy collectives (native/shm_cma.c, off by default) from 64 B
            "single-copy": {"PYCCL_SHM_CMA_BYTES": "64", "PYCCL_SHM_SMALL_BYTES": "64"}}

pytestmark = pytest.mark.timeout(300)


# ---- rank-side checks: each returns a list of failure strings ------------------------------------
def rank_all_reduce(comm, sizes):
    bad = []
    for dtype, op in reduce_cases(OPS):
        for n in sizes:
            x = make(comm.rank, n, dtype, op)
            comm.all_reduce(x, op=getattr(pyccl, op.upper()))
            err = mismatch(x, [make(r, n, dtype, op) for r in range(comm.size)], op, dtype)
            if err:
                bad.append(f"all_reduce {dtype} {op} n={n}: {err}")
    return bad


def rank_reduce(comm, sizes):
    bad = []
    for dtype, op in reduce_cases(OPS):
        for n in sizes:
            root = (n + len(dtype)) % comm.size
            x = make(comm.rank, n, dtype, op)
            orig = x.copy()
            comm.reduce(x, root=root, op=op)
            if comm.rank == root:
                err = mismatch(x, [make(r, n, dtype, op) for r in range(comm.size)], op, dtype)
            else:
                err = "" if np.array_equal(x.view(np.uint8), orig.view(np.uint8)) else "non-root input changed"
            if err:
                bad.append(f"reduce {dtype} {op} n={n} root={root}: {err}")
    return bad


def rank_reduce_scatter(comm, sizes):
    bad = []
    for dtype, op in reduce_cases(OPS):
        for n in sizes:
            inp = make(comm.rank, n * comm.size, dtype, op)
            out = np.zeros(n, DTYPES[dtype])
            comm.reduce_scatter(out, inp, op=op)
            full = [make(r, n * comm.size, dtype, op) for r in range(comm.size)]
            err = mismatch(out, [f[comm.rank * n:(comm.rank + 1) * n] for f in full], op, dtype)
            if err:
                bad.append(f"reduce_scatter {dtype} {op} n={n}: {err}")
    return bad


def rank_data_movement(comm, sizes):
    """broadcast, all_gather, gather, scatter, all_to_all: exact byte equality."""
    bad = []
    s = comm.size
    for dtype in DTYPES:
        for n in sizes:
            mine = make(comm.rank, n, dtype)
            every = [make(r, n, dtype) for r in range(s)]
            root = (n + 1) % s
            x = mine.copy()
            comm.broadcast(x, root=root)
            if not np.array_equal(x.view(np.uint8), every[root].view(np.uint8)):
                bad.append(f"broadcast {dtype} n={n}")
            out = np.zeros(n * s, DTYPES[dtype])
            comm.all_gather(out, mine)
            if not np.array_equal(out.view(np.uint8), np.concatenate(every).view(np.uint8)):
                bad.append(f"all_gather {dtype} n={n}")
            g = np.zeros(n * s, DTYPES[dtype]) if comm.rank == root else None
            comm.gather(g, mine, root=root)
            if comm.rank == root and not np.array_equal(g.view(np.uint8), np.concatenate(every).view(np.uint8)):
                bad.append(f"gather {dtype} n={n}")
            full = make(root, n * s, dtype, salt=1)
            part = np.zeros(n, DTYPES[dtype])
            comm.scatter(part, full if comm.rank == root else None, root=root)
            if not np.array_equal(part.view(np.uint8), full[comm.rank * n:(comm.rank + 1) * n].view(np.uint8)):
                bad.append(f"scatter {dtype} n={n}")
            src = make(comm.rank, n * s, dtype, salt=2)
            dst = np.zeros(n * s, DTYPES[dtype])
            comm.all_to_all(dst, src)
            want = np.concatenate([make(r, n * s, dtype, salt=2)[comm.rank * n:(comm.rank + 1) * n] for r in range(s)])
            if not np.array_equal(dst.view(np.uint8), want.view(np.uint8)):
                bad.append(f"all_to_all {dtype} n={n}")
    return bad


def _splits(sender, s, n):
    return [(sender * 7 + j * 3 + n) % 5 for j in range(s)]


def _splits_even_on_rank_0(sender, s, n):
    """Rank 0 sends and receives n + 1 everywhere; the other ranks' pieces differ. Each rank
    sees only its own splits, so a shortcut for 'all pieces equal' chosen from them would send
    rank 0 down another path than its peers."""
    return [n + 1 if sender == 0 or j == 0 else n + 1 + sender + j for j in range(s)]


def rank_all_to_all_uneven(comm, n, splits=_splits):
    s, r = comm.size, comm.rank
    ins = splits(r, s, n)
    outs = [splits(j, s, n)[r] for j in range(s)]
    src = make(r, sum(ins), "float32", salt=n)
    dst = np.full(sum(outs), -1, np.float32)
    comm.all_to_all(dst, src, out_splits=outs, in_splits=ins)
    pieces = []
    for j in range(s):
        sj = splits(j, s, n)
        data = make(j, sum(sj), "float32", salt=n)
        pieces.append(data[sum(sj[:r]):sum(sj[:r]) + sj[r]])
    return [] if np.array_equal(dst, np.concatenate(pieces)) else [f"uneven all_to_all n={n}"]


def rank_send_recv_barrier(comm, n):
    bad = []
    r, s = comm.rank, comm.size
    x = make(r, n, "int32")
    y = np.zeros(n, np.int32)
    # a ring shift done with point-to-point; even ranks send first to avoid waiting
    nxt, prv = (r + 1) % s, (r - 1) % s
    if r % 2 == 0:
        comm.send(x, nxt)
        comm.recv(y, prv)
    else:
        comm.recv(y, prv)
        comm.send(x, nxt)
    if not np.array_equal(y, make(prv, n, "int32")):
        bad.append(f"send/recv n={n}")
    for _ in range(3):
        comm.barrier()
    return bad


def rank_big_all_reduce(comm, mib):
    n = mib * (1 << 20) // 4
    x = np.full(n, comm.rank + 1, np.float32)
    x[::4097] = comm.rank * 0.5
    comm.all_reduce(x)
    want_main = comm.size * (comm.size + 1) / 2
    want_marks = sum(r * 0.5 for r in range(comm.size))
    mask = np.zeros(n, bool)
    mask[::4097] = True
    ok = np.all(x[~mask] == want_main) and np.all(x[mask] == want_marks)
    return [] if ok else [f"64 MiB all_reduce wrong: {np.unique(x)[:5]}"]


def rank_async_mix(comm):
    """Several async ops in flight at once complete in call order with the right results."""
    xs = [np.full(1000 + i, comm.rank + i, np.float64) for i in range(6)]
    works = [comm.all_reduce(x, async_op=True) for x in xs]
    outs = np.zeros(4 * comm.size, np.int64)
    w2 = comm.all_gather(outs, np.arange(4, dtype=np.int64) + 10 * comm.rank, async_op=True)
    comm.barrier()                       # a synchronous op queued behind the async ones
    for w in works + [w2]:
        assert w.wait() is True and w.is_completed()
    bad = []
    for i, x in enumerate(xs):
        if not np.all(x == sum(r + i for r in range(comm.size))):
            bad.append(f"async all_reduce {i}")
    if not np.array_equal(outs, np.concatenate([np.arange(4) + 10 * r for r in range(comm.size)])):
        bad.append("async all_gather")
    return bad


def rank_split(comm):
    """Split into even/odd ranks, reversed order by key; collectives on both halves."""
    sub = comm.split(comm.rank % 2, key=-comm.rank)
    members = [r for r in range(comm.size) if r % 2 == comm.rank % 2]
    bad = []
    if sub.size != len(members) or sub.rank != sorted(members, reverse=True).index(comm.rank):
        bad.append(f"split gave rank {sub.rank}/{sub.size}")
    x = np.array([comm.rank], np.int64)
    sub.all_reduce(x)
    if x[0] != sum(members):
        bad.append(f"split all_reduce {x[0]} != {sum(members)}")
    none = comm.split(None if comm.rank == 0 else 1)
    if (none is None) != (comm.rank == 0):
        bad.append("split with color None")
    if none is not None:
        y = np.ones(3, np.float32)
        none.all_reduce(y)
        if not np.all(y == comm.size - 1):
            bad.append("split without rank 0")
        none.close()
    sub.close()
    comm.all_reduce(np.zeros(1))         # the parent still works
    return bad


def _settings(name):
    return SETTINGS[name]


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("nranks", RANKS)
@pytest.mark.parametrize("check", ["all_reduce", "reduce", "reduce_scatter", "data_movement"])
def test_collective(groups, nranks, check, setting):
    g = groups(nranks, env=_settings(setting))
    fn = {"all_reduce": rank_all_reduce, "reduce": rank_reduce, "reduce_scatter": rank_reduce_scatter,
          "data_movement": rank_data_movement}[check]
    failures = [f for rank_bad in g.run(fn, SIZES) for f in rank_bad]
    assert not failures, failures[:20]


@pytest.mark.parametrize("nranks", RANKS)
def test_uneven_all_to_all_p2p_barrier(groups, nranks):
    g = groups(nranks)
    for n in (0, 1, 5, 17):
        assert not any(g.run(rank_all_to_all_uneven, n))
        assert not any(g.run(rank_all_to_all_uneven, n, _splits_even_on_rank_0))
        assert not any(g.run(rank_send_recv_barrier, n))


@pytest.mark.parametrize("nranks", RANKS)
def test_64mib_all_reduce(groups, nranks):
    g = groups(nranks)
    assert not any(g.run(rank_big_all_reduce, 64))


@pytest.mark.parametrize("nranks", RANKS)
def test_async_and_split(groups, nranks):
    g = groups(nranks)
    assert not any(g.run(rank_async_mix))
    assert not any(g.run(rank_split))


def test_reference_itself():
    """The reference must catch a wrong answer (guards against a test that cannot fail)."""
    ins = [make(r, 5, "float32") for r in range(3)]
    good = reduce_ref(ins, "sum", "float32").astype(np.float32)
    assert mismatch(good, ins, "sum", "float32") == ""
    bad = good.copy()
    bad[2] += 0.5
    assert "1 wrong" in mismatch(bad, ins, "sum", "float32")
