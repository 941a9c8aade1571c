"""GPU collectives (ccl/engines/cuda/ over transports/cuda_ipc.py), on real GPUs.

Skips, with the reason, without cupy or without a CUDA GPU (every CI machine). On the GPU
machine `bench/gpu_suite.sh` runs it. Ranks use GPU rank % device count, so one GPU also
works (two processes on one device still go through CUDA IPC). Data is integer-valued so
every result is compared exactly with a torch CPU reference (float64 for sums).
"""
import os
import signal
import time

import numpy as np
import pytest

from cuda_available import require_gpu

NGPU = require_gpu()

import cupy  # noqa: E402  (only on GPU machines)

import torch  # noqa: E402  (only on GPU machines)

import pyccl  # noqa: E402
from pyccl.errors import InvalidArgument, PeerFailure, PycclError  # noqa: E402
from spawned import assert_every_check_passed, run_spawned  # noqa: E402

SIZES = [0, 1, 7, 1000, 4099, 65539, 300_007, 2_000_003]
TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
         "float64": torch.float64, "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32,
         "int64": torch.int64, "bool": torch.bool}


def _dev(comm):
    d = comm.rank % cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(d).use()
    torch.cuda.set_device(d)
    return d


def _data(dtype, n, rank, seed, op="SUM"):
    g = torch.Generator().manual_seed(seed * 31 + rank)
    t = TORCH[dtype]
    if dtype == "bool":
        return torch.randint(0, 2, (n,), generator=g).bool()
    if op == "PROD":
        v = torch.randint(-1, 3, (n,), generator=g)
        v[v == 0] = 1
    elif dtype == "uint8":
        v = torch.randint(0, 256, (n,), generator=g)
    elif dtype == "int8":
        v = torch.randint(-128, 128, (n,), generator=g)
    else:
        v = torch.randint(-60, 61, (n,), generator=g)
    return v.to(t)


def _reference(xs, op, dtype):
    out = xs[0].clone()
    for x in xs[1:]:
        if op in ("SUM", "AVG"):
            out = (out | x) if dtype == "bool" else out + x
        elif op == "PROD":
            out = (out & x) if dtype == "bool" else out * x
        elif op == "MIN":
            out = torch.minimum(out, x)
        else:
            out = torch.maximum(out, x)
    if op == "AVG":
        if out.is_floating_point():
            out = (out.float() / len(xs)).to(out.dtype) if out.dtype in (torch.float16, torch.bfloat16) \
                else out / len(xs)
        else:
            out = torch.div(out, len(xs), rounding_mode="trunc")
    return out


def _setup(comm, mode=None, oneshot_max=None, scratch=None, copy=None, stage_max=16 << 20, a2av=None):
    _dev(comm)
    comm.all_reduce(torch.zeros(1, device="cuda"))        # creates comm.cuda
    cc = comm.cuda
    cc.twoshot_mode = "auto" if mode is None else mode     # the groups are reused: set every knob
    cc.copy_mode = "auto" if copy is None else copy
    cc.a2av_mode = "mailbox" if a2av is None else a2av
    cc.stage_max = stage_max
    if mode is not None:
        cc.twoshot_mode = mode
    if oneshot_max is not None:
        cc.oneshot_max = oneshot_max
    if scratch is not None:
        cc.scratch_max = scratch
    return cc


# ---- rank functions (module level: they travel to the spawned ranks by name) -------------------
def rank_all_reduce(comm, dtype, op, sizes, mode, oneshot_max=None, scratch=None):
    _setup(comm, mode, oneshot_max, scratch)
    bad = []
    for seed, n in enumerate(sizes):
        xs = [_data(dtype, n, r, seed, op) for r in range(comm.size)]
        x = xs[comm.rank].cuda()
        comm.all_reduce(x, op=getattr(pyccl, op))
        got = x.cpu()
        ref = _reference(xs, op, dtype)
        if not torch.equal(got, ref):
            idx = (got != ref).nonzero()[:3].flatten().tolist()
            bad.append(f"n={n}: first differences at {idx}: got {got[idx].tolist()} want {ref[idx].tolist()}")
    comm.cuda.synchronize("test")
    return bad


def rank_cupy_collectives(comm, n, mode=None, copy=None):
    _setup(comm, mode, copy=copy)
    size, rank = comm.size, comm.rank
    bad = []
    base = np.arange(n * size, dtype=np.float32)
    # all_gather
    inp = cupy.asarray(base[:n] + 1000 * rank)
    out = cupy.full(n * size, -1, dtype=cupy.float32)
    comm.all_gather(out, inp)
    want = np.concatenate([base[:n] + 1000 * r for r in range(size)])
    if not np.array_equal(cupy.asnumpy(out), want):
        bad.append(f"all_gather n={n}")
    # broadcast from each root
    for root in range(size):
        x = cupy.asarray(base[:n] * (rank + 1))
        comm.broadcast(x, root=root)
        if not np.array_equal(cupy.asnumpy(x), base[:n] * (root + 1)):
            bad.append(f"broadcast root={root} n={n}")
    # reduce_scatter SUM and MAX
    for op in (pyccl.SUM, pyccl.MAX):
        full = [base * (r + 1) for r in range(size)]
        o = cupy.zeros(n, dtype=cupy.float32)
        comm.reduce_scatter(o, cupy.asarray(full[rank]), op=op)
        stack = np.stack(full)
        red = stack.sum(0) if op is pyccl.SUM else stack.max(0)
        if not np.array_equal(cupy.asnumpy(o), red[rank * n:(rank + 1) * n]):
            bad.append(f"reduce_scatter {op.name} n={n}")
    # all_to_all, equal splits
    a = cupy.asarray(base + 10000 * rank)
    b = cupy.zeros(n * size, dtype=cupy.float32)
    comm.all_to_all(b, a)
    want = np.concatenate([(base + 10000 * r)[rank * n:(rank + 1) * n] for r in range(size)])
    if not np.array_equal(cupy.asnumpy(b), want):
        bad.append(f"all_to_all n={n}")
    # reduce to the last rank: non-roots keep their input
    root = size - 1
    x = cupy.asarray(base[:n] + rank)
    comm.reduce(x, root=root)
    want = sum(base[:n] + r for r in range(size)) if rank == root else base[:n] + rank
    if not np.array_equal(cupy.asnumpy(x), want):
        bad.append(f"reduce n={n}")
    # gather / scatter at root 0
    g_out = cupy.full(n * size, -1, dtype=cupy.float32) if rank == 0 else None
    comm.gather(g_out, cupy.asarray(base[:n] + 7 * rank), root=0)
    if rank == 0 and not np.array_equal(cupy.asnumpy(g_out),
                                        np.concatenate([base[:n] + 7 * r for r in range(size)])):
        bad.append(f"gather n={n}")
    s_out = cupy.full(n, -1, dtype=cupy.float32)
    comm.scatter(s_out, cupy.asarray(base * 3) if rank == 0 else None, root=0)
    if not np.array_equal(cupy.asnumpy(s_out), (base * 3)[rank * n:(rank + 1) * n]):
        bad.append(f"scatter n={n}")
    comm.cuda.synchronize("test")
    return bad


def _even_on_rank_0(src, dst, scale):
    """Rank 0's own splits are all equal, its peers' are not (only the peers can tell)."""
    return 512 * scale if 0 in (src, dst) else 512 * scale + src + dst


def rank_uneven_all_to_all(comm, copy=None, a2av=None, scale=1, calls=1, count=None):
    """Rank r sends count(r, d, scale) int64s to rank d (default (r + 1) * (d + 2) * scale),
    `calls` times with new values; (every result right, host mailbox exchanges after the first call)."""
    cc = _setup(comm, copy=copy, a2av=a2av)
    size, rank = comm.size, comm.rank
    count = count or (lambda s, d, k: (s + 1) * (d + 2) * k)
    in_splits = [count(rank, d, scale) for d in range(size)]
    out_splits = [count(s, rank, scale) for s in range(size)]
    out = torch.empty((sum(out_splits),), dtype=torch.int64, device="cuda")
    ok, seq0 = True, None
    for k in range(calls):
        if k == 1:
            seq0 = cc._mail_seq
        inp = torch.cat([torch.arange(in_splits[d], dtype=torch.int64) * 7 + 100 * rank + d + 1000 * k
                         for d in range(size)]).cuda()
        out.fill_(-1)
        comm.all_to_all(out, inp, out_splits=out_splits, in_splits=in_splits)
        want = torch.cat([torch.arange(out_splits[s], dtype=torch.int64) * 7 + 100 * s + rank + 1000 * k
                          for s in range(size)])
        ok &= torch.equal(out.cpu(), want)
    torch.cuda.synchronize()
    return ok if calls == 1 else (ok, cc._mail_seq - seq0)


def rank_uneven_mismatch(comm, a2av):
    """Rank 0 expects one element more from rank 1 and one less from itself (its total is
    right, so only the peers' counts can tell): every rank raises InvalidArgument."""
    _setup(comm, a2av=a2av)
    size, rank = comm.size, comm.rank
    in_splits = [2 + d for d in range(size)]
    out_splits = [2 + rank] * size
    if rank == 0:
        out_splits[0] -= 1
        out_splits[1] += 1
    inp = torch.zeros(sum(in_splits), device="cuda")
    out = torch.zeros(sum(out_splits), device="cuda")
    try:
        comm.all_to_all(out, inp, out_splits=out_splits, in_splits=in_splits)
        comm.all_reduce(torch.ones(4, device="cuda"))
        comm.cuda.synchronize("test")
        return "no error"
    except InvalidArgument as e:
        return "ok" if "disagree" in str(e) or "expects" in str(e) else repr(e)


def rank_streams(comm):
    """pyccl waits for the caller's stream and the caller's stream waits for pyccl."""
    _setup(comm)
    s = torch.cuda.Stream()
    x = torch.zeros(1 << 20, device="cuda")
    ok = []
    with torch.cuda.stream(s):
        torch.cuda._sleep(20_000_000)             # the producer is slow...
        x.fill_(comm.rank + 1)
        comm.all_reduce(x)                         # ...and must be waited for
        y = x * 2                                  # must see the result
    torch.cuda.synchronize()
    ok.append(bool((y == 2 * sum(range(1, comm.size + 1))).all()))
    # async: the caller's stream is not held back until wait()
    with torch.cuda.stream(s):
        x.fill_(comm.rank + 1)
        w = comm.all_reduce(x, async_op=True)
        w.wait()
        z = x + 0
    w2 = comm.all_reduce(torch.ones(8, device="cuda"), async_op=True)
    ok.append(w2.wait(timeout=30))
    torch.cuda.synchronize()
    ok.append(bool((z == sum(range(1, comm.size + 1))).all()))
    ok.append(w.is_completed())
    return ok


def rank_mismatch(comm, small):
    _setup(comm)
    n = (100 if small else 3_000_000) * (comm.rank + 1)    # both one-shot, or both two-shot
    x = torch.ones(n, device="cuda")
    t = time.monotonic()
    try:
        w = comm.all_reduce(x, async_op=True)
        w.wait(timeout=30)
    except PycclError as e:
        return type(e).__name__, str(e), time.monotonic() - t
    return None


def rank_byte_collectives(comm, n, stage_max):
    """The copy collectives on uint8 pieces of n bytes: odd n puts the pieces of the output (and
    the scratch copies) on every alignment. stage_max 0: the mailbox path; else 'staged'."""
    _setup(comm, stage_max=stage_max)
    size, rank = comm.size, comm.rank
    bad = []

    def piece(r, salt):
        return ((torch.arange(n, dtype=torch.int64) * (r + 3) + salt) % 251).to(torch.uint8)
    out = torch.full((n * size,), 7, dtype=torch.uint8, device="cuda")
    comm.all_gather(out, piece(rank, 1).cuda())
    if not torch.equal(out.cpu(), torch.cat([piece(r, 1) for r in range(size)])):
        bad.append(f"all_gather n={n}")
    inp = torch.cat([piece(rank, 10 + d) for d in range(size)]).cuda()
    out = torch.full((n * size,), 7, dtype=torch.uint8, device="cuda")
    comm.all_to_all(out, inp)
    if not torch.equal(out.cpu(), torch.cat([piece(s, 10 + rank) for s in range(size)])):
        bad.append(f"all_to_all n={n}")
    for root in range(size):
        x = piece(rank, 20 + root).cuda()
        comm.broadcast(x, root=root)
        if not torch.equal(x.cpu(), piece(root, 20 + root)):
            bad.append(f"broadcast root={root} n={n}")
    root = size - 1
    g = torch.full((n * size,), 7, dtype=torch.uint8, device="cuda") if rank == root else None
    comm.gather(g, piece(rank, 30).cuda(), root=root)
    if rank == root and not torch.equal(g.cpu(), torch.cat([piece(r, 30) for r in range(size)])):
        bad.append(f"gather n={n}")
    s_out = torch.full((n,), 7, dtype=torch.uint8, device="cuda")
    src = torch.cat([piece(root, 40 + r) for r in range(size)]).cuda() if rank == root else None
    comm.scatter(s_out, src, root=root)
    if not torch.equal(s_out.cpu(), piece(root, 40 + rank)):
        bad.append(f"scatter n={n}")
    full = [torch.cat([piece(r, 50 + q) for q in range(size)]) for r in range(size)]
    o = torch.zeros(n, dtype=torch.uint8, device="cuda")
    comm.reduce_scatter(o, full[rank].cuda())
    want = sum(f[rank * n:(rank + 1) * n].to(torch.int64) for f in full) % 256
    if not torch.equal(o.cpu(), want.to(torch.uint8)):
        bad.append(f"reduce_scatter n={n}")
    comm.cuda.synchronize("test")
    return bad


def rank_staged_exchanges(comm, calls):
    """How many host mailbox exchanges `calls` rounds of every copy collective (and a 2-rank
    reduce-scatter) make on repeated 1 MiB buffers after one warm-up round, and whether every
    round's result was right."""
    cc = _setup(comm)
    size, rank = comm.size, comm.rank
    n = 1 << 18
    inp = torch.full((n,), float(rank + 1), device="cuda")
    gathered = torch.empty(n * size, device="cuda")
    big_in = torch.arange(n * size, dtype=torch.float32, device="cuda") + 1000 * rank
    ok = True
    seq0 = None
    for k in range(calls + 1):
        if k == 1:
            seq0 = cc._mail_seq
        inp.fill_(float(rank + 1 + k))
        comm.all_gather(gathered, inp)
        ok &= bool(torch.equal(gathered.view(size, n)[:, 0].cpu(), torch.arange(1, size + 1.0) + k))
        comm.all_to_all(gathered, big_in)
        ok &= bool(gathered[0].item() == rank * n)
        comm.broadcast(inp, root=0)
        ok &= bool(inp[0].item() == 1 + k)
        comm.reduce_scatter(inp, big_in)
        ok &= bool(inp[0].item() == rank * n * size + 1000 * sum(range(size)))
    torch.cuda.synchronize()
    return cc._mail_seq - seq0, ok


def rank_copy_mismatch(comm):
    _setup(comm)
    x = torch.ones(100 * (comm.rank + 1), device="cuda")
    out = torch.empty(x.numel() * comm.size, device="cuda")
    t = time.monotonic()
    try:
        w = comm.all_gather(out, x, async_op=True)
        w.wait(timeout=30)
    except PycclError as e:
        return type(e).__name__, str(e), time.monotonic() - t
    return None


def rank_mailbox_segment(comm):
    _setup(comm)
    return [f for f in os.listdir("/dev/shm") if f.startswith("pyccl-cuda-")]


# ---- tests ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def g2(groups):
    return groups(2, env={"PYCCL_TIMEOUT": "60", "PYCCL_TRANSPORT": "tcp"})


@pytest.mark.parametrize("mode", ["kernel", "ce", "pull"])
def test_all_reduce_float32_sizes_and_paths(g2, mode):
    for bad in g2.run(rank_all_reduce, "float32", "SUM", SIZES, mode):
        assert not bad, bad


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64", "int8", "uint8", "int32", "int64"])
def test_all_reduce_dtypes(g2, dtype):
    for bad in g2.run(rank_all_reduce, dtype, "SUM", [0, 5, 4099, 300_007], "kernel"):
        assert not bad, bad


@pytest.mark.parametrize("op", ["PROD", "MIN", "MAX", "AVG"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32"])
def test_all_reduce_ops(g2, op, dtype):
    for bad in g2.run(rank_all_reduce, dtype, op, [3, 4099, 300_007], "kernel"):
        assert not bad, bad


def test_all_reduce_bool_min_max(g2):
    for op in ("MIN", "MAX"):
        for bad in g2.run(rank_all_reduce, "bool", op, [1, 4099, 2_000_003], "kernel"):
            assert not bad, (op, bad)


@pytest.mark.parametrize("mode", ["kernel", "ce", "pull"])
def test_all_reduce_in_rounds(g2, mode):
    """Messages bigger than the scratch go in rounds (scratch forced down to 1 MiB)."""
    for bad in g2.run(rank_all_reduce, "float32", "SUM", [3_000_001], mode, None, 1 << 20):
        assert not bad, bad


def test_one_shot_vs_two_shot_boundary(g2):
    for bad in g2.run(rank_all_reduce, "float32", "SUM", [16383, 16384, 16385], "kernel", 65536):
        assert not bad, bad


@pytest.mark.parametrize("n", [1, 1001, 262147])
def test_other_collectives_cupy(g2, n):
    for bad in g2.run(rank_cupy_collectives, n):
        assert not bad, bad


def test_uneven_all_to_all(g2):
    assert all(g2.run(rank_uneven_all_to_all))


@pytest.mark.parametrize("scale", [1, 1000, 300_001], ids=["small", "one-round", "many-rounds"])
def test_uneven_all_to_all_through_the_scratch(g2, scale):
    """PYCCL_CUDA_A2AV=staged: uneven pieces (up to ~14 MiB: several rounds of the 4 MiB
    region, the last one partial) through the peers' scratch, 5 calls with new values, and no
    host mailbox exchange after the first call (which makes the scratch)."""
    for ok, exchanges in g2.run(rank_uneven_all_to_all, None, "staged", scale, 5):
        assert ok
        assert exchanges == 0, f"{exchanges} host mailbox exchanges in 4 calls"


@pytest.mark.parametrize("a2av", ["mailbox", "staged"])
@pytest.mark.parametrize("nranks", [2, 3])
def test_uneven_all_to_all_equal_on_one_rank_only(groups, nranks, a2av):
    """Given splits that are equal on rank 0 but not on its peers take one path on every rank
    (a shortcut chosen from one rank's own splits used to split them between two kernels)."""
    g = groups(nranks, env={"PYCCL_TIMEOUT": "30"})
    for scale in (1, 4000):
        assert all(g.run(rank_uneven_all_to_all, None, a2av, scale, 1, _even_on_rank_0))


@pytest.mark.parametrize("a2av", ["mailbox", "staged"])
def test_uneven_all_to_all_mismatch_raises_on_every_rank(groups, a2av):
    g = groups(2, env={"PYCCL_TIMEOUT": "20", "PYCCL_TRANSPORT": "tcp"})
    results = g.run(rank_uneven_mismatch, a2av)
    g.broken = True
    assert results == ["ok", "ok"], results


@pytest.mark.parametrize("mode,copy", [("pull", "pull"), ("kernel", "push")])
def test_sm_copy_and_pull_paths_on_2_ranks(g2, mode, copy):
    """The paths picked on more than 2 ranks, forced on 2 (pull two-shot, SM copy kernel)."""
    for n in (1, 1001, 262147):
        for bad in g2.run(rank_cupy_collectives, n, mode, copy):
            assert not bad, (n, bad)
    assert all(g2.run(rank_uneven_all_to_all, copy))
    for bad in g2.run(rank_all_reduce, "bfloat16", "AVG", [3, 4099, 300_007], mode, 0):
        assert not bad, bad


@pytest.fixture(scope="module")
def g4(groups):
    if NGPU < 2:
        pytest.skip(f"4-rank GPU tests need at least 2 GPUs ({NGPU} here)")
    return groups(4, env={"PYCCL_TIMEOUT": "60", "PYCCL_TRANSPORT": "tcp"})


@pytest.mark.parametrize("mode,copy", [(None, None), ("pull", "pull"), ("kernel", "ce"), ("ce", "push")])
def test_four_ranks(g4, mode, copy):
    """4 ranks (on 2 or 3 GPUs, two ranks share a GPU: correctness only): the defaults and every
    path (pull two-shot and SM pulls, push kernel and copy engines, ce two-shot and SM pushes),
    all collectives."""
    if NGPU < 4 and mode is not None and mode != "pull":
        pytest.skip("the other 4-rank paths run on 4 GPUs only (ranks sharing a GPU time-slice)")
    for bad in g4.run(rank_all_reduce, "float32", "SUM", SIZES, mode):
        assert not bad, bad
    for bad in g4.run(rank_all_reduce, "bfloat16", "MAX", [4099, 300_007, 2_000_003], mode, 0):
        assert not bad, bad
    for n in (1, 1001, 262147):
        for bad in g4.run(rank_cupy_collectives, n, mode, copy):
            assert not bad, (n, bad)
    assert all(g4.run(rank_uneven_all_to_all, copy))


@pytest.mark.parametrize("stage_max", [16 << 20, 0], ids=["staged", "mailbox"])
@pytest.mark.parametrize("n", [1, 7, 4099, 65537])
def test_copy_collectives_on_any_alignment(g2, n, stage_max):
    for bad in g2.run(rank_byte_collectives, n, stage_max):
        assert not bad, bad


def test_staged_copies_make_no_host_exchange(g2):
    """Issue 16 item 1: after a warm-up (which grows the scratch), all_gather, all_to_all,
    broadcast and reduce-scatter up to PYCCL_CUDA_STAGE_MAX exchange nothing through the host."""
    for exchanges, ok in g2.run(rank_staged_exchanges, 20):
        assert ok
        assert exchanges == 0, f"{exchanges} host mailbox exchanges in 20 rounds"


def test_copy_mismatch_raises_on_every_rank(groups):
    g = groups(2, env={"PYCCL_TIMEOUT": "20", "PYCCL_TRANSPORT": "tcp"})
    results = g.run(rank_copy_mismatch)
    g.broken = True
    for r in results:
        assert r is not None, "an all_gather with different sizes on the two ranks finished"
        kind, msg, took = r
        assert kind == "InvalidArgument" and took < 15, (kind, took, msg)
        assert "different" in msg and "rank" in msg, msg


def test_stream_semantics(g2):
    for ok in g2.run(rank_streams):
        assert all(ok), ok


@pytest.mark.parametrize("small", [True, False])
def test_size_mismatch_raises_on_every_rank(groups, small):
    g = groups(2, env={"PYCCL_TIMEOUT": "20", "PYCCL_TRANSPORT": "tcp"})
    results = g.run(rank_mismatch, small)
    g.broken = True
    for r in results:
        assert r is not None, "an all_reduce with different sizes on the two ranks finished"
        kind, msg, took = r
        assert took < 15, (took, msg)
        assert "rank" in msg, msg


def test_mailbox_segment_is_unlinked_after_setup(g2):
    for shm in g2.run(rank_mailbox_segment):
        assert not shm, shm                 # nothing in /dev/shm to leak, even after SIGKILL


# ---- separate processes: peer death, torch.distributed -----------------------------------------
def _run_spawned(scenario, size=2, timeout=180, env=None):
    env = {"PYCCL_TIMEOUT": "60", "PYCCL_TRANSPORT": "tcp", **(env or {})}
    return run_spawned(__name__, scenario, size, [env] * size, timeout)


def _comm(rank, size, port):
    from pyccl.store import StoreServer, TCPStore
    secret = b"k" * 32
    server = StoreServer("127.0.0.1", port, secret) if rank == 0 else None
    store = TCPStore("127.0.0.1", port, secret, timeout=60)
    return pyccl.Communicator(rank, size, store=store, secret=secret), server


def scenario_peer_dies(rank, size, port):
    comm, server = _comm(rank, size, port)
    _dev(comm)
    x = torch.ones(1 << 16, device="cuda")
    comm.all_reduce(x)
    comm.cuda.synchronize("warm-up")
    comm.barrier()
    if rank == 1:
        os._exit(3)                                   # dies without a word
    t = time.monotonic()
    try:
        w = comm.all_reduce(x, async_op=True)
        w.wait(timeout=60)
        return ("finished", time.monotonic() - t)
    except PeerFailure as e:
        return ("PeerFailure", time.monotonic() - t, str(e))
    except PycclError as e:
        return (type(e).__name__, time.monotonic() - t, str(e))


def test_dead_peer_raises_peer_failure():
    out = _run_spawned("scenario_peer_dies")
    assert 0 in out, out
    kind, val = out[0]
    assert kind == "ok", val
    assert val[0] == "PeerFailure", val
    assert val[1] < 10, val
    assert "rank 1" in val[2], val


def _killed_during(rank, size, port, count):
    """Rank 1 queues its part of an all_reduce behind 3 s of GPU sleep and is SIGKILLed while
    rank 0's side is under way (its kernel spinning on rank 1's flags, or its host waiting in
    the exchange); rank 0 must get PeerFailure/Timeout naming the op and rank 1, not hang."""
    comm, server = _comm(rank, size, port)
    _dev(comm)
    x = torch.ones(count, device="cuda")
    comm.all_reduce(x)
    comm.cuda.synchronize("warm-up")
    comm.barrier()
    if rank == 1:
        torch.cuda._sleep(3_000_000_000)
        comm.all_reduce(x, async_op=True)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.2)
    t = time.monotonic()
    try:
        w = comm.all_reduce(x, async_op=True)
        w.wait(timeout=60)
        return ("finished", time.monotonic() - t)
    except PycclError as e:
        after = torch.ones(4, device="cuda") * 2          # this process's CUDA context still works
        return (type(e).__name__, time.monotonic() - t, str(e), after.sum().item())


def scenario_killed_during_oneshot(rank, size, port):
    return _killed_during(rank, size, port, 1 << 14)


def scenario_killed_during_twoshot(rank, size, port):
    return _killed_during(rank, size, port, 8 << 20)


@pytest.mark.parametrize("scenario", ["scenario_killed_during_oneshot", "scenario_killed_during_twoshot"])
def test_peer_sigkilled_during_collective(scenario):
    out = _run_spawned(scenario)
    assert 0 in out, out
    kind, val = out[0]
    assert kind == "ok", val
    assert val[0] in ("PeerFailure", "Timeout"), val
    assert val[1] < 15, val
    assert "rank 1" in val[2] and "all_reduce" in val[2], val
    assert val[3] == 8.0, val


def _torch_init(rank, size, port):
    import torch.distributed as dist
    import pyccl.torch_backend  # noqa: F401 - registers "pyccl"
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dev = torch.device("cuda", rank % torch.cuda.device_count())
    dist.init_process_group("pyccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            device_id=dev)
    return dist, dev


def scenario_torch_distributed(rank, size, port):
    dist, dev = _torch_init(rank, size, port)
    res = {}
    t = torch.arange(1000, dtype=torch.float32, device=dev) + rank
    dist.all_reduce(t)
    res["all_reduce"] = torch.equal(t.cpu(), 2 * torch.arange(1000, dtype=torch.float32) + 1)
    t = torch.full((300_000,), float(rank + 1), device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.AVG)
    res["all_reduce_avg_large"] = bool((t == 1.5).all())
    # fast lane: dtypes x ops x sizes, repeated calls on one tensor (both scratch slots, cached launch)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64, torch.uint8):
        for op, name in ((dist.ReduceOp.SUM, "sum"), (dist.ReduceOp.MAX, "max"), (dist.ReduceOp.PRODUCT, "prod"),
                         (dist.ReduceOp.MIN, "min")):
            for n in (1, 999, 65539):
                base = (torch.arange(n, device=dev) % 5 + 1).to(dtype)
                x = base * (rank + 1) if name != "prod" else base
                want = {"sum": base * 3, "max": base * 2, "prod": base * base, "min": base}[name]
                if name == "prod":
                    want = base * base
                dist.all_reduce(x, op=op)
                res[f"lane {dtype} {name} n={n}"] = torch.equal(x, want)
    x = torch.ones(4099, device=dev)
    for _ in range(7):
        dist.all_reduce(x)
    res["lane repeated"] = bool((x == 128).all())
    # mixing the lane with two-shot, copy-engine ops and another stream
    big = torch.ones(5 << 20, device=dev)
    small = torch.ones(100, device=dev)
    ag_out = torch.empty(2 * 1000, device=dev)
    s = torch.cuda.Stream()
    dist.all_reduce(small)
    dist.all_reduce(big)
    dist.all_gather_into_tensor(ag_out, torch.full((1000,), float(rank), device=dev))
    dist.all_reduce(small)
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)                    # a slow producer on another stream...
        y = torch.full((3000,), float(rank + 1), device=dev)
        dist.all_reduce(y)                               # ...is waited for
        y2 = y * 2                                       # and the result is seen on that stream
    dist.all_reduce(small)
    torch.cuda.synchronize()
    res["mixed"] = bool((big == 2).all() and (small == 8).all() and (ag_out[1000:] == 1).all()
                        and (y2 == 6).all())
    # async: lane and general path
    x = torch.full((5000,), float(rank + 1), device=dev)
    w = dist.all_reduce(x, async_op=True)
    w.wait()
    z = x + 0
    fut = dist.all_reduce(torch.ones(10, device=dev), async_op=True).get_future()
    res["async lane"] = bool((z == 3).all()) and bool((fut.wait()[0] == 2).all())
    out = torch.empty(2 * 70_000, device=dev)
    w = dist.all_gather_into_tensor(out, torch.full((70_000,), float(rank), device=dev), async_op=True)
    w.wait(timeout=30)
    res["async general"] = bool((out[:70_000] == 0).all() and (out[70_000:] == 1).all()) and w.is_completed()
    inp = torch.full((1000,), float(rank), device=dev, dtype=torch.bfloat16)
    out = torch.empty(2000, device=dev, dtype=torch.bfloat16)
    dist.all_gather_into_tensor(out, inp)
    res["all_gather"] = bool((out[:1000] == 0).all() and (out[1000:] == 1).all())
    outs = [torch.empty(3, 5, device=dev) for _ in range(size)]
    dist.all_gather(outs, torch.full((3, 5), float(rank + 10), device=dev))
    res["all_gather list"] = all(bool((o == r + 10).all()) for r, o in enumerate(outs))
    rs_in = torch.arange(2000, dtype=torch.float32, device=dev)
    rs_out = torch.empty(1000, device=dev)
    dist.reduce_scatter_tensor(rs_out, rs_in)
    res["reduce_scatter"] = torch.equal(rs_out.cpu(), 2 * (torch.arange(1000, dtype=torch.float32) + 1000 * rank))
    a = torch.arange(8, dtype=torch.int64, device=dev) + 100 * rank
    b = torch.empty(8, dtype=torch.int64, device=dev)
    dist.all_to_all_single(b, a)
    want = torch.cat([torch.arange(4) + 4 * rank + 100 * s for s in range(size)])
    res["all_to_all"] = torch.equal(b.cpu(), want)
    # all_to_all_single with uneven splits (MoE dispatch): rank r sends (r + 1) * (d + 2) rows to d
    in_splits = [(rank + 1) * (d + 2) for d in range(size)]
    out_splits = [(src + 1) * (rank + 2) for src in range(size)]
    a = torch.cat([torch.full((in_splits[d], 3), 100.0 * rank + d) for d in range(size)]).to(dev)
    b = torch.full((sum(out_splits), 3), -1.0, device=dev)
    dist.all_to_all_single(b, a, output_split_sizes=out_splits, input_split_sizes=in_splits)
    want = torch.cat([torch.full((out_splits[src], 3), 100.0 * src + rank) for src in range(size)])
    res["all_to_all uneven"] = torch.equal(b.cpu(), want)
    c = torch.full((77,), float(rank), device=dev)
    dist.broadcast(c, src=1)
    res["broadcast"] = bool((c == 1).all())
    band = torch.tensor([0b1100 | rank, 0b1010], dtype=torch.int32, device=dev)
    dist.all_reduce(band, op=dist.ReduceOp.BAND)
    res["bitwise (general path)"] = band.tolist() == [0b1100, 0b1010]
    # point-to-point on CUDA tensors (staged through pinned host memory)
    peer = 1 - rank
    if rank == 0:
        dist.send(torch.arange(1000, dtype=torch.float32, device=dev), dst=1, tag=3)
        got = torch.empty(10, device=dev)
        dist.recv(got, src=1, tag=4)
        res["send/recv"] = bool((got == 7).all())
    else:
        got = torch.empty(1000, device=dev)
        dist.recv(got, src=0, tag=3)
        dist.send(torch.full((10,), 7.0, device=dev), dst=0, tag=4)
        res["send/recv"] = torch.equal(got.cpu(), torch.arange(1000, dtype=torch.float32))
    mine = torch.full((4096,), float(rank), device=dev)
    theirs = torch.empty(4096, device=dev)
    reqs = [dist.isend(mine, dst=peer), dist.irecv(theirs, src=peer)]
    for r in reqs:
        r.wait()
    res["isend/irecv"] = bool((theirs * 1 == peer).all())
    mine2 = torch.full((3, 7), float(rank + 5), device=dev)
    theirs2 = torch.empty(3, 7, device=dev).t()            # non-contiguous target
    ops = [dist.P2POp(dist.isend, mine2.t().contiguous(), peer), dist.P2POp(dist.irecv, theirs2, peer)]
    for r in dist.batch_isend_irecv(ops):
        r.wait()
    res["batch_isend_irecv"] = bool((theirs2 == peer + 5).all())
    dist.barrier()
    # a mismatched call (other sizes) raises on every rank, at the next call at the latest
    x = torch.ones(100 * (rank + 1), device=dev)
    err = None
    try:
        dist.all_reduce(x)
        torch.cuda.synchronize()
        dist.all_reduce(torch.ones(8, device=dev))
    except PycclError as e:
        err = e
    res["mismatch raises"] = isinstance(err, InvalidArgument) and "rank" in str(err)
    if not res["mismatch raises"]:
        res["mismatch error"] = repr(err)
    dist.destroy_process_group()
    return res


def scenario_torch_copy_lanes(rank, size, port):
    """all_gather_into_tensor, reduce_scatter_tensor, all_to_all_single, broadcast, all_reduce and
    reduce on the same CUDA tensors call after call (sync and async): exact results, no host mailbox exchange and
    no flight-recorder entry (the lane, not the general path) once the first round has run."""
    dist, dev = _torch_init(rank, size, port)
    pg = dist.distributed_c10d._get_default_group()
    n = 4099                                  # odd: byte pieces on every alignment
    x = torch.empty(n, device=dev)
    ag = torch.empty(n * size, device=dev)
    rs_in = torch.empty(n * size, dtype=torch.bfloat16, device=dev)
    rs_out = torch.empty(n, dtype=torch.bfloat16, device=dev)
    a_in = torch.empty(n * size, device=dev)
    a_out = torch.empty(n * size, device=dev)
    ar = torch.arange(n * size, dtype=torch.float32)

    def one_round(k):
        bad = []
        asy = k % 2 == 1
        x.copy_(ar[:n] * (rank + 1) + k)
        w = dist.all_gather_into_tensor(ag, x, async_op=asy)
        if asy:
            w.wait()
        if not torch.equal(ag.cpu(), torch.cat([ar[:n] * (r + 1) + k for r in range(size)])):
            bad.append(f"all_gather round {k}")
        rs_in.copy_(ar % 7 + rank + k % 3)
        dist.reduce_scatter_tensor(rs_out, rs_in)
        want = sum(ar % 7 + r + k % 3 for r in range(size))[rank * n:(rank + 1) * n].to(torch.bfloat16)
        if not torch.equal(rs_out.cpu(), want):
            bad.append(f"reduce_scatter round {k}")
        a_in.copy_(ar + 100000 * rank + k)
        dist.all_to_all_single(a_out, a_in)
        if not torch.equal(a_out.cpu(), torch.cat([ar[rank * n:(rank + 1) * n] + 100000 * s + k
                                                   for s in range(size)])):
            bad.append(f"all_to_all_single round {k}")
        x.fill_(float(rank + k))
        w = dist.broadcast(x, src=k % size, async_op=asy)
        if asy:
            w.wait()
        if not bool((x == k % size + k).all()):
            bad.append(f"broadcast round {k}")
        dist.all_reduce(x)
        v = size * (k % size + k)
        if not bool((x == v).all()):
            bad.append(f"all_reduce round {k}")
        root = (k + 1) % size
        dist.reduce(x, dst=root, op=dist.ReduceOp.MAX if k % 3 == 2 else dist.ReduceOp.SUM)
        if not bool((x == (v * (1 if k % 3 == 2 else size) if rank == root else v)).all()):
            bad.append(f"reduce round {k} (root {root})")
        return bad
    bad = one_round(0)                        # creates the lanes (general path, grows the scratch)
    comm = pg._comm
    seq0, rec0 = comm.cuda._mail_seq, comm.recorder.entries[-1][0]
    for k in range(1, 31):
        bad += one_round(k)
    torch.cuda.synchronize()
    res = {"results": bad or True,
           "no host exchange": comm.cuda._mail_seq == seq0 or f"{comm.cuda._mail_seq - seq0} exchanges",
           "lane taken": comm.recorder.entries[-1][0] == rec0 or
           f"general path: recorder at #{comm.recorder.entries[-1][0]} (was #{rec0})"}
    dist.destroy_process_group()
    return res


@pytest.mark.parametrize("alloc", ["default", "expandable_segments"])
def test_torch_copy_lanes(alloc):
    """Also with torch's expandable segments (cuMemCreate memory, which CUDA IPC cannot export):
    the staged copies and the fast lanes never export a user buffer, so they work there too."""
    env = {"PYCCL_TIMEOUT": "60", "PYCCL_TRANSPORT": "tcp"}
    if alloc != "default":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    out = run_spawned(__name__, "scenario_torch_copy_lanes", 2, [env] * 2, 300)
    assert_every_check_passed(out, 2)


def test_torch_distributed_backend_on_cuda():
    out = _run_spawned("scenario_torch_distributed", timeout=300)
    assert_every_check_passed(out, 2)


def scenario_torch_peer_killed(rank, size, port):
    dist, dev = _torch_init(rank, size, port)
    x = torch.ones(1 << 12, device=dev)
    dist.all_reduce(x)
    torch.cuda.synchronize()
    dist.barrier()
    if rank == 1:
        torch.cuda._sleep(3_000_000_000)
        dist.all_reduce(x)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.2)
    t = time.monotonic()
    try:
        for _ in range(100):
            dist.all_reduce(x)
            torch.cuda.synchronize()                 # returns: the kernel gives up when rank 1 dies
            time.sleep(0.1)
        return ("finished", time.monotonic() - t)
    except PycclError as e:
        return (type(e).__name__, time.monotonic() - t, str(e), (torch.ones(4, device=dev) * 2).sum().item())


def test_torch_peer_sigkilled_during_all_reduce():
    out = _run_spawned("scenario_torch_peer_killed")
    assert 0 in out, out
    kind, val = out[0]
    assert kind == "ok", val
    assert val[0] in ("PeerFailure", "Timeout"), val
    assert val[1] < 15, val
    assert "rank 1" in val[2] and "all_reduce" in val[2], val
    assert val[3] == 8.0, val


# ---- CUDA-graph capture ---------------------------------------------------------------------------
def _graph_cases(dist, dev, rank, size):
    """(name, set inputs for replay k, the call, the expected output for replay k, the output)."""
    S = size * (size + 1) // 2                     # sum over ranks of (rank + 1)
    small, big = 4099, 3 << 20                      # one-shot (fast lane); two-shot (12 MiB)
    cases = []
    for name, n in (("all_reduce one-shot", small), ("all_reduce two-shot", big)):
        ar = (torch.arange(n, device=dev) % 97).float()
        x = torch.empty(n, device=dev)
        cases.append((name, lambda k, x=x, ar=ar: x.copy_(ar * (rank + 1) + k),
                      lambda x=x: dist.all_reduce(x), lambda k, ar=ar: ar * S + size * k, x))
    n = 1031
    ar = (torch.arange(n * size, device=dev) % 89).float()
    inp, out = torch.empty(n, device=dev), torch.empty(n * size, device=dev)
    cases.append(("all_gather_into_tensor", lambda k: inp.copy_(ar[:n] * (rank + 1) + k),
                  lambda: dist.all_gather_into_tensor(out, inp),
                  lambda k: torch.cat([ar[:n] * (r + 1) + k for r in range(size)]), out))
    inp2, out2 = torch.empty(n * size, device=dev), torch.empty(n, device=dev)
    cases.append(("reduce_scatter_tensor", lambda k: inp2.copy_(ar * (rank + 1) + k),
                  lambda: dist.reduce_scatter_tensor(out2, inp2),
                  lambda k: ar[rank * n:(rank + 1) * n] * S + size * k, out2))
    b = torch.empty(n, device=dev)
    cases.append(("broadcast", lambda k: b.copy_(ar[:n] + k) if rank == 0 else b.fill_(-1),
                  lambda: dist.broadcast(b, 0), lambda k: ar[:n] + k, b))
    inp3, out3 = torch.empty(n * size, device=dev), torch.empty(n * size, device=dev)
    cases.append(("all_to_all_single", lambda k: inp3.copy_(ar * (rank + 1) + k),
                  lambda: dist.all_to_all_single(out3, inp3),
                  lambda k: torch.cat([ar[rank * n:(rank + 1) * n] * (r + 1) + k for r in range(size)]), out3))
    return cases


def scenario_cuda_graph_capture(rank, size, port, replays=100):
    dist, dev = _torch_init(rank, size, port)
    res = {}
    graphs = {}
    for name, prep, call, want, out in _graph_cases(dist, dev, rank, size):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):              # warm-up on a side stream, as torch asks
            for k in range(3):
                prep(k)
                call()
        torch.cuda.current_stream().wait_stream(side)
        res[f"{name}: eager warm-up"] = torch.equal(out, want(2))
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                call()
        except Exception as e:  # noqa: BLE001 - reported as the result
            res[f"{name}: capture"] = f"{type(e).__name__}: {e}"
            continue
        wrong = []
        for k in range(replays):                     # new input values before every replay
            prep(1000 + k)
            g.replay()
            if not torch.equal(out, want(1000 + k)):
                wrong.append(k)
        res[f"{name}: {replays} replays"] = not wrong or f"wrong after replays {wrong[:10]}"
        prep(7)                                      # eager again after the replays (epochs agree)
        call()
        res[f"{name}: eager after replays"] = torch.equal(out, want(7))
        graphs[name] = g
    # a replay whose peer replays another call: the kernels find the mismatch, and the next
    # host call on the group raises it
    x = torch.ones(4096 if rank == 0 else 4092, device=dev)     # (the kernel is compiled already)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        dist.all_reduce(x)
    g.replay()
    torch.cuda.synchronize()
    try:
        dist.all_reduce(torch.ones(16, device=dev))
        torch.cuda.synchronize()
        res["replay error surfaces on the next call"] = "no error raised"
    except PycclError as e:
        res["replay error surfaces on the next call"] = isinstance(e, InvalidArgument) and \
            "different call" in str(e) or repr(e)
    return res


def test_cuda_graph_capture_and_replay():
    """Every collective the torch backend runs on CUDA: captured in a CUDA graph after a warm-up
    on a side stream, replayed 100 times with new inputs, compared with the expected result."""
    out = _run_spawned("scenario_cuda_graph_capture", timeout=300)
    assert_every_check_passed(out, 2)


# ---- all-to-all with the split sizes on the GPU ---------------------------------------------------
def _split_patterns(size, count, seed):
    g = torch.Generator().manual_seed(seed)
    pats = [torch.zeros(size, size, dtype=torch.int64), torch.full((size, size), 3, dtype=torch.int64)]
    while len(pats) < count:
        m = torch.randint(0, 40, (size, size), generator=g)
        m[torch.rand(size, size, generator=g) < 0.3] = 0          # empty pieces too
        pats.append(m)
    return pats                                                     # m[q, r]: rows rank q sends to rank r


def scenario_device_split_all_to_all(rank, size, port, replays=100):
    dist, dev = _torch_init(rank, size, port)
    from pyccl.torch_backend import all_to_all_single as a2a
    res = {}
    D = 3                                                           # row width (float32)
    cap = 40 * size + 5

    def expected(m, make_input):
        """What rank `rank` receives: from every source q, q's rows for it, in source order."""
        parts = []
        for q in range(size):
            off = int(m[q, :rank].sum())
            parts.append(make_input(q)[off:off + int(m[q, rank])])
        return torch.cat(parts)

    pats = _split_patterns(size, 8, seed=11)
    big = torch.randint(0, 600_000, (size, size), generator=torch.Generator().manual_seed(5))
    pats.append(big)                                                # up to 7 MB a piece: 2 rounds of 4 MiB
    for k, m in enumerate(pats):
        send, recv = m[rank], m[:, rank]

        def make_input(q, k=k, m=m):
            return (torch.arange(int(m[q].sum()) * D, device=dev, dtype=torch.float32) + 1000 * q + k).view(-1, D)
        inp = make_input(rank)
        out = torch.full((max(cap, int(recv.sum()) + 5), D), -1.0, device=dev)
        sizes_dtype = torch.int32 if k % 3 == 2 else torch.int64
        a2a(out, inp, recv.to(dev, sizes_dtype) if k % 2 else None, send.to(dev, sizes_dtype))
        got = int(recv.sum())
        res[f"pattern {k}"] = torch.equal(out[:got], expected(m, make_input)) and bool((out[got:] == -1).all())
    # captured once, replayed with new split sizes and new data before every replay
    pats = _split_patterns(size, replays, seed=12)
    inp = torch.empty(cap, D, device=dev)
    out = torch.empty(cap, D, device=dev)
    splits = torch.zeros(size, dtype=torch.int64, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            a2a(out, inp, None, splits)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        a2a(out, inp, None, splits)
    wrong = []
    for k, m in enumerate(pats):
        def make_input(q, k=k):
            return (torch.arange(cap * D, device=dev, dtype=torch.float32) + 7 * k + 1000 * q).view(cap, D)
        splits.copy_(m[rank])
        inp.copy_(make_input(rank))
        g.replay()
        got = int(m[:, rank].sum())
        if not torch.equal(out[:got], expected(m, make_input)):
            wrong.append(k)
    res[f"captured, {replays} replays with new splits"] = not wrong or f"wrong at {wrong[:10]}"
    # out_splits that disagree with what the peers send: raised by the next call, on every rank
    m = pats[3]
    bad = m[:, rank].clone()
    bad[0] += 1
    inp = torch.zeros(int(m[rank].sum()), D, device=dev)
    out = torch.zeros(cap, D, device=dev)
    a2a(out, inp, bad.to(dev), m[rank].to(dev))
    try:
        dist.all_reduce(torch.ones(4, device=dev))
        torch.cuda.synchronize()
        res["split mismatch raises"] = "no error"
    except PycclError as e:
        res["split mismatch raises"] = isinstance(e, InvalidArgument) and "split sizes disagree" in str(e) or repr(e)
    return res


@pytest.mark.parametrize("a2av", ["mailbox", "staged"])
def test_all_to_all_with_device_splits(a2av):
    """MoE dispatch: split sizes in CUDA tensors (no device-to-host copy), uneven and empty pieces,
    up to 7 MB a piece, output larger than needed, int32 and int64 counts; compared with what the
    sources hold; then captured in a CUDA graph and replayed 100 times with new split sizes and
    data. Both flavours: peers' outputs named through the mailbox, or rounds through the scratch."""
    out = _run_spawned("scenario_device_split_all_to_all", timeout=300, env={"PYCCL_CUDA_A2AV": a2av})
    assert_every_check_passed(out, 2)
