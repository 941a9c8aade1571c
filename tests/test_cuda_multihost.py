"""CUDA tensors across hosts (ccl/engines/staged.py, ccl/engines/cuda_composed.py), on a real GPU, ranks posing as hosts.

Every rank sets PYCCL_HOST_ID (2 hosts x 1 rank, 2 or 3 hosts x 2 ranks, numbered host by host
or not), all on the GPUs there are (one GPU works: the ranks share it). Every collective through
the Communicator and through torch.distributed, several dtypes and sizes (0, 1, primes, several
MiB: many executor passes), sync and async, in place, stream order, a killed peer, a mismatched
call; results against a float64 reference. Skips, with the reason, without cupy or a CUDA GPU.
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
from pyccl.errors import PycclError  # noqa: E402
from spawned import assert_every_check_passed, run_spawned  # noqa: E402

TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
         "float64": torch.float64, "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32,
         "int64": torch.int64}
SIZES = [0, 1, 7, 4099, 300_007, 2_000_003]


def _dev(rank):
    d = rank % torch.cuda.device_count()
    torch.cuda.set_device(d)
    cupy.cuda.Device(d).use()
    return torch.device("cuda", d)


def _data(dtype, n, rank, seed):
    g = torch.Generator().manual_seed(seed * 131 + rank)
    lo, hi = (0, 4) if dtype in ("uint8", "int8") else (-40, 41)
    return torch.randint(lo, hi, (n,), generator=g).to(TORCH[dtype])


def _ref(xs, op):
    s = torch.stack([x.double() for x in xs])
    r = {"SUM": s.sum(0), "MAX": s.amax(0), "MIN": s.amin(0), "AVG": s.sum(0) / len(xs)}[op]
    if op == "AVG" and not xs[0].is_floating_point():
        r = torch.trunc(r)
    return r.to(xs[0].dtype)


def _same(got, want):
    return torch.equal(got.cpu(), want.cpu())


# ---- rank functions (module level: they travel to the spawned ranks by name) -------------------
def rank_every_op(comm, dtype, sizes, async_op):
    dev = _dev(comm.rank)
    size, rank = comm.size, comm.rank
    bad = []

    def done(w):
        if w is not None:
            w.wait()
    for seed, n in enumerate(sizes):
        xs = [_data(dtype, n, r, seed) for r in range(size)]
        for op in ("SUM", "MAX", "AVG"):
            if dtype in ("int8", "uint8") and op == "SUM":
                continue
            x = xs[rank].to(dev)
            done(comm.all_reduce(x, op=getattr(pyccl, op), async_op=async_op))
            if not _same(x, _ref(xs, op)):
                bad.append(f"all_reduce {op} n={n}")
        for root in range(size):
            x = xs[rank].to(dev)
            done(comm.broadcast(x, root=root, async_op=async_op))
            if not _same(x, xs[root]):
                bad.append(f"broadcast root={root} n={n}")
        root = size - 1
        x = xs[rank].to(dev)
        done(comm.reduce(x, root=root, op=pyccl.MAX, async_op=async_op))
        if not _same(x, _ref(xs, "MAX") if rank == root else xs[rank]):
            bad.append(f"reduce n={n}")
        out = torch.full((n * size,), 3, dtype=TORCH[dtype], device=dev)
        done(comm.all_gather(out, xs[rank].to(dev), async_op=async_op))
        if not _same(out, torch.cat(xs)):
            bad.append(f"all_gather n={n}")
        full = [torch.cat([x.roll(k) for k in range(size)]) for x in xs]
        o = torch.zeros(n, dtype=TORCH[dtype], device=dev)
        done(comm.reduce_scatter(o, full[rank].to(dev), op=pyccl.MAX, async_op=async_op))
        if not _same(o, _ref(full, "MAX")[rank * n:(rank + 1) * n]):
            bad.append(f"reduce_scatter n={n}")
        b = torch.zeros(n * size, dtype=TORCH[dtype], device=dev)
        done(comm.all_to_all(b, full[rank].to(dev), async_op=async_op))
        if not _same(b, torch.cat([full[s][rank * n:(rank + 1) * n] for s in range(size)])):
            bad.append(f"all_to_all n={n}")
        g = torch.zeros(n * size, dtype=TORCH[dtype], device=dev) if rank == 0 else None
        done(comm.gather(g, xs[rank].to(dev), root=0, async_op=async_op))
        if rank == 0 and not _same(g, torch.cat(xs)):
            bad.append(f"gather n={n}")
        s_out = torch.zeros(n, dtype=TORCH[dtype], device=dev)
        done(comm.scatter(s_out, torch.cat(xs).to(dev) if rank == 1 else None, root=1, async_op=async_op))
        if not _same(s_out, xs[rank]):
            bad.append(f"scatter n={n}")
    # all_to_allv: rank r sends (r + 1) * (d + 2) elements to rank d
    in_splits = [(rank + 1) * (d + 2) for d in range(size)]
    out_splits = [(s + 1) * (rank + 2) for s in range(size)]
    inp = torch.cat([torch.full((in_splits[d],), 100 * rank + d, dtype=torch.int64) for d in range(size)]).to(dev)
    out = torch.full((sum(out_splits),), -1, dtype=torch.int64, device=dev)
    done(comm.all_to_all(out, inp, out_splits=out_splits, in_splits=in_splits, async_op=async_op))
    if not _same(out, torch.cat([torch.full((out_splits[s],), 100 * s + rank, dtype=torch.int64)
                                 for s in range(size)])):
        bad.append("all_to_allv")
    comm.cuda.synchronize("test")
    return bad


def rank_streams(comm):
    """The collective waits for the caller's stream; later work on that stream sees the result."""
    dev = _dev(comm.rank)
    want = sum(range(1, comm.size + 1))
    s = torch.cuda.Stream()
    x = torch.zeros(3 << 20, device=dev)
    ok = {}
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)            # a slow producer...
        x.fill_(comm.rank + 1)
        comm.all_reduce(x)                       # ...is waited for
        y = x * 2                                # and the result is seen on that stream
    torch.cuda.synchronize()
    ok["sync"] = bool((y == 2 * want).all())
    with torch.cuda.stream(s):
        torch.cuda._sleep(20_000_000)
        x.fill_(comm.rank + 1)
        w = comm.all_reduce(x, async_op=True)    # returns at once
        w.wait()                                 # the stream waits for the copies back
        z = x + 0
    torch.cuda.synchronize()
    ok["async"] = bool((z == want).all()) and w.is_completed()
    w = comm.all_reduce(torch.ones(1000, device=dev), async_op=True)
    ok["wait(timeout)"] = w.wait(timeout=30) and w.is_completed()
    a, b = torch.full((5000,), 1.0, device=dev), torch.full((70_000,), 2.0, device=dev)
    wa, wb = comm.all_reduce(a, async_op=True), comm.all_reduce(b, async_op=True)   # two queued
    wb.wait()
    wa.wait()
    ok["queued"] = bool((a == comm.size).all() and (b == 2 * comm.size).all())
    return ok


def rank_composed(comm, dtype):
    """all_reduce and broadcast on 2 hosts x 2 ranks take ccl/engines/cuda_composed.py (local CUDA phase,
    staged rail, local CUDA phase): every op, counts with and without a tail (n % 2), each root."""
    dev = _dev(comm.rank)
    size, rank = comm.size, comm.rank
    bad = []
    for seed, n in enumerate([2, 3, 8, 4098, 4099, 1_000_000, 2_000_003]):
        xs = [_data(dtype, n, r, seed) for r in range(size)]
        if dtype in ("float32", "float64"):
            xs = [(x % 3 + 1) for x in xs]                  # PROD stays exact
        for op in ("SUM", "AVG", "MIN", "PROD"):
            if op == "PROD" and dtype not in ("float32", "float64"):
                continue
            x = xs[rank].to(dev)
            comm.all_reduce(x, op=getattr(pyccl, op))
            want = torch.stack([v.double() for v in xs]).prod(0).to(xs[0].dtype) if op == "PROD" else _ref(xs, op)
            if not _same(x, want):
                bad.append(f"all_reduce {op} n={n}")
        for root in range(size):
            x = xs[rank].to(dev)
            w = comm.broadcast(x, root=root, async_op=bool(root % 2))
            if w is not None:
                w.wait()
            if not _same(x, xs[root]):
                bad.append(f"broadcast root={root} n={n}")
    comm.cuda.synchronize("test")
    return getattr(comm.cuda, "composed", None) is not None, bad


def _composed_epoch(comm):
    """The epoch of the composed path's local CUDA engine (ccl/engines/cuda_composed.py): every kernel
    its local phases launch advances it; the flat staged path never does. -1: not made yet."""
    comp = getattr(getattr(comm, "cuda", None), "composed", None)
    return -1 if comp is None else comp.local._epoch


def _gather_scatter(comm, dtype, sizes):
    """all_gather and reduce_scatter (SUM, AVG, MAX), sync and async, out of place and in place,
    against a float64 reference in the communicator's rank order; each call with data must run
    kernels on the composed path's local engine."""
    dev = _dev(comm.rank)
    size, rank = comm.size, comm.rank
    bad = []

    def check(ok, what, n, e):
        if not ok:
            bad.append(f"{what} n={n}")
        if n and _composed_epoch(comm) <= e:
            bad.append(f"{what} n={n}: not the composed path")
    for seed, n in enumerate(sizes):
        xs = [_data(dtype, n, r, seed) for r in range(size)]
        mine = slice(rank * n, (rank + 1) * n)
        e = _composed_epoch(comm)
        out = torch.full((n * size,), 3, dtype=TORCH[dtype], device=dev)
        w = comm.all_gather(out, xs[rank].to(dev), async_op=bool(seed % 2))
        if w is not None:
            w.wait()
        check(_same(out, torch.cat(xs)), "all_gather", n, e)
        e = _composed_epoch(comm)
        out = torch.full((n * size,), 3, dtype=TORCH[dtype], device=dev)
        out[mine] = xs[rank].to(dev)
        comm.all_gather(out, out[mine])                     # in place: my block of the output
        check(_same(out, torch.cat(xs)), "all_gather in place", n, e)
        ins = [_data(dtype, n * size, r, seed + 1000) for r in range(size)]
        for op in ("SUM", "AVG", "MAX"):
            e = _composed_epoch(comm)
            inp = ins[rank].to(dev, copy=True)
            o = torch.full((n,), 5, dtype=TORCH[dtype], device=dev)
            w = comm.reduce_scatter(o, inp, op=getattr(pyccl, op), async_op=op == "MAX")
            if w is not None:
                w.wait()
            check(_same(o, _ref(ins, op)[mine]), f"reduce_scatter {op}", n, e)
            if not _same(inp, ins[rank]):
                bad.append(f"reduce_scatter {op} n={n} changed its input")
        e = _composed_epoch(comm)
        inp = ins[rank].to(dev, copy=True)
        comm.reduce_scatter(inp[mine], inp, op=pyccl.AVG)  # in place: my block of the input
        check(_same(inp[mine], _ref(ins, "AVG")[mine]), "reduce_scatter AVG in place", n, e)
    comm.cuda.synchronize("test")
    return bad


def rank_composed_gather_scatter(comm, dtype, sizes):
    bad = _gather_scatter(comm, dtype, sizes)
    return comm.cuda.composed.rank_order, bad


def rank_composed_min_gather_scatter(comm):
    """PYCCL_CUDA_COMPOSED_MIN compares the call's largest buffer: all_gather's output,
    reduce_scatter's input (`size` times its output)."""
    dev = _dev(comm.rank)
    comm.all_reduce(torch.ones(1 << 10, device=dev))     # decides composed_min (every rank alike)
    least, size, res = comm.cuda.composed_min, comm.size, {}
    n = max(1, -(-least // (4 * size)))          # float32 blocks: the fewest with size * n * 4 >= least
    small = n - 1 if least else None
    for name, count in (("at least", n), ("below", small)):
        if count is None:
            continue
        e = _composed_epoch(comm)
        out = torch.empty(count * size, device=dev)
        comm.all_gather(out, torch.full((count,), float(comm.rank), device=dev))
        ok = bool((out.view(size, count) == torch.arange(size, device=dev).float()[:, None]).all())
        res[f"all_gather {name}"] = (ok, _composed_epoch(comm) > e)
        e = _composed_epoch(comm)
        o = torch.empty(count, device=dev)
        comm.reduce_scatter(o, torch.ones(count * size, device=dev))
        res[f"reduce_scatter {name}"] = (bool((o == size).all()), _composed_epoch(comm) > e)
    comm.cuda.synchronize("test")
    return least, res


def rank_composed_min(comm):
    """With ranks of a host sharing a GPU, small messages stay on the flat staged path."""
    dev = _dev(comm.rank)
    x = torch.ones(1 << 18, device=dev)
    comm.all_reduce(x)
    small_flat = comm.cuda.composed is None and bool((x == comm.size).all())
    shares = torch.cuda.device_count() < 2          # _dev: ranks 0 and 1 (host 0) on one GPU
    return small_flat, comm.cuda.composed_min, shares


def rank_peer_gives_up(comm):
    """One rank's communicator is aborted while its peers call all_reduce: every other rank
    raises in seconds (the host peer through the CUDA mailbox's abort word, the rail peer
    through the closed connection), not after the 60 s timeout."""
    dev = _dev(comm.rank)
    x = torch.ones(4 << 20, device=dev)
    comm.all_reduce(x)
    comm.cuda.synchronize("warm-up")
    comm.barrier()
    if comm.rank == 1:
        comm.abort()
        return None
    t = time.monotonic()
    try:
        for _ in range(3):
            comm.all_reduce(x)
        comm.cuda.synchronize("after")
    except PycclError as e:
        return type(e).__name__, str(e), time.monotonic() - t
    return ("finished", "", time.monotonic() - t)


def rank_mismatch(comm, big):
    dev = _dev(comm.rank)
    n = (3_000_000 if big else 1000) * (comm.rank + 1)
    t = time.monotonic()
    try:
        comm.all_reduce(torch.ones(n, device=dev))
        comm.all_reduce(torch.ones(8, device=dev))
        comm.cuda.synchronize("after")           # the proxy's calls return before their transfer
    except PycclError as e:
        return type(e).__name__, str(e), time.monotonic() - t
    return None


# ---- tests ---------------------------------------------------------------------------------------
LAYOUTS = {"2x1": (2, 1), "2x2": (4, 2)}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def hosts(groups, request):
    size, per = LAYOUTS[request.param]
    return groups(size, env={"PYCCL_TIMEOUT": "60"}, ranks_per_host=per)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32"])
def test_every_op_sync(hosts, dtype):
    for bad in hosts.run(rank_every_op, dtype, SIZES, False):
        assert not bad, bad


@pytest.mark.parametrize("dtype", ["float16", "float64", "uint8", "int64"])
def test_every_op_async(hosts, dtype):
    for bad in hosts.run(rank_every_op, dtype, [0, 1, 4099, 300_007], True):
        assert not bad, bad


def test_stream_order(hosts):
    for ok in hosts.run(rank_streams):
        assert all(ok.values()), ok


#: every op of ccl/cuda_hierarchy.OPS composed (all_gather and reduce_scatter are opt-in until run on a GPU)
ALL_OPS = {"PYCCL_CUDA_COMPOSED_OPS": "all_reduce,broadcast,all_gather,reduce_scatter"}
COMPOSED_ALWAYS = {"PYCCL_TIMEOUT": "60", "PYCCL_CUDA_COMPOSED_MIN": "0", **ALL_OPS}


def test_composed_min_on_a_shared_gpu(groups):
    from pyccl.engines.cuda_composed import SHARED_GPU_MIN
    g = groups(4, env={"PYCCL_TIMEOUT": "60"}, ranks_per_host=2)
    for small_flat, least, shares in g.run(rank_composed_min):
        assert small_flat
        assert least == (SHARED_GPU_MIN if shares else 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int64"])
def test_composed_with_several_ranks_per_host(groups, dtype):
    g = groups(4, env=COMPOSED_ALWAYS, ranks_per_host=2)
    for used, bad in g.run(rank_composed, dtype):
        assert used, "2 hosts x 2 ranks did not take the composed path (ccl/engines/cuda_composed.py)"
        assert not bad, bad


GATHER_SCATTER_SIZES = [0, 1, 7, 4099, 300_007, 1_000_003]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int32"])
def test_composed_all_gather_reduce_scatter(groups, dtype):
    """2 hosts x 2 ranks, numbered host by host: the rail-major stage is a scratch buffer, copied
    into (reduce_scatter) and out of (all_gather) the communicator's rank order."""
    g = groups(4, env=COMPOSED_ALWAYS, ranks_per_host=2)
    for rank_order, bad in g.run(rank_composed_gather_scatter, dtype, GATHER_SCATTER_SIZES):
        assert rank_order is False
        assert not bad, bad


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_composed_all_gather_reduce_scatter_3_hosts(groups, dtype):
    g = groups(6, env=COMPOSED_ALWAYS, ranks_per_host=2)
    for rank_order, bad in g.run(rank_composed_gather_scatter, dtype, GATHER_SCATTER_SIZES[:-1]):
        assert rank_order is False
        assert not bad, bad


def test_composed_min_gather_scatter(groups):
    g = groups(4, env={"PYCCL_TIMEOUT": "60", **ALL_OPS}, ranks_per_host=2)
    for least, res in g.run(rank_composed_min_gather_scatter):
        for name, (ok, composed) in res.items():
            assert ok, (name, res)
            assert composed == name.endswith("at least"), (least, name, res)


def test_composed_peer_gives_up(groups):
    g = groups(4, env=COMPOSED_ALWAYS, ranks_per_host=2)
    results = g.run(rank_peer_gives_up)
    g.broken = True
    for r, res in enumerate(results):
        if r == 1:
            continue
        kind, msg, took = res
        assert kind in ("PeerFailure", "TransportError"), (r, kind, msg)
        assert took < 20, (r, took, msg)
        assert "all_reduce" in msg, (r, msg)


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("size,per_host", [(2, 1), (4, 2)])
def test_mismatch_raises_on_every_rank(groups, big, size, per_host):
    g = groups(size, env={"PYCCL_TIMEOUT": "20", "PYCCL_CUDA_COMPOSED_MIN": "0"}, ranks_per_host=per_host)
    results = g.run(rank_mismatch, big)
    g.broken = True
    for r in results:
        assert r is not None, "an all_reduce with different sizes on the two hosts finished"
        kind, msg, took = r
        assert took < 15, (took, msg)
        assert "rank" in msg and "all_reduce" in msg, msg


# ---- separate processes: a killed peer, torch.distributed --------------------------------------
def _run_spawned(scenario, size, per_host, timeout=240, env=None):
    envs = [{"PYCCL_TIMEOUT": "60", "PYCCL_HOST_ID": f"host{r // per_host}", **(env or {})} for r in range(size)]
    return run_spawned(__name__, scenario, size, envs, timeout)


def scenario_killed(rank, size, port):
    """The last rank dies (SIGKILL) in the middle of a big staged all_reduce; the others raise
    PeerFailure (or Timeout) naming the op, in seconds."""
    from pyccl.store import StoreServer, TCPStore
    secret = b"k" * 32
    server = StoreServer("127.0.0.1", port, secret) if rank == 0 else None  # noqa: F841 - kept alive
    comm = pyccl.Communicator(rank, size, store=TCPStore("127.0.0.1", port, secret, timeout=60), secret=secret)
    dev = _dev(rank)
    x = torch.ones(16 << 20, device=dev)
    comm.all_reduce(x)
    comm.barrier()
    if rank == size - 1:
        w = comm.all_reduce(x, async_op=True)
        time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGKILL)
        w.wait()
    t = time.monotonic()
    try:
        for _ in range(3):
            comm.all_reduce(x)
        comm.cuda.synchronize("after")           # the proxy's calls return before their transfer
        return ("finished", time.monotonic() - t)
    except PycclError as e:
        return (type(e).__name__, time.monotonic() - t, str(e), (torch.ones(4, device=dev) * 2).sum().item())


@pytest.mark.parametrize("size,per_host", [(2, 1), (4, 2)])
def test_killed_peer_raises(size, per_host):
    out = _run_spawned("scenario_killed", size, per_host)
    for r in range(size - 1):
        assert r in out, out
        kind, val = out[r]
        assert kind == "ok", val
        assert val[0] in ("PeerFailure", "Timeout", "TransportError"), val
        assert val[1] < 20, val
        assert "all_reduce" in val[2], val
        assert val[3] == 8.0, val


def scenario_torch(rank, size, port):
    import torch.distributed as dist
    import pyccl.torch_backend  # noqa: F401 - registers "pyccl"
    dev = _dev(rank)
    dist.init_process_group("pyccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            device_id=dev)
    res = {}
    for dtype in (torch.float32, torch.bfloat16, torch.int32):
        for n in (0, 1, 4099, 1_000_003):
            base = (torch.arange(n, device=dev) % 7).to(dtype)
            x = base * (rank + 1)
            dist.all_reduce(x)
            res[f"all_reduce {dtype} n={n}"] = torch.equal(x, base * sum(range(1, size + 1)))
            x = base * (rank + 1)
            w = dist.all_reduce(x, op=dist.ReduceOp.MAX, async_op=True)
            w.wait()
            res[f"all_reduce async {dtype} n={n}"] = torch.equal(x + 0, base * size)
    x = torch.full((300_000,), float(rank + 1), device=dev)
    dist.all_reduce(x, op=dist.ReduceOp.AVG)
    res["avg"] = bool((x == (size + 1) / 2).all())
    band = torch.tensor([0b1100 | rank, 0b1010], dtype=torch.int32, device=dev)
    dist.all_reduce(band, op=dist.ReduceOp.BAND)
    res["band"] = band.tolist() == [0b1100, 0b1010]
    out = torch.empty(size * 70_001, device=dev)
    w = dist.all_gather_into_tensor(out, torch.full((70_001,), float(rank), device=dev), async_op=True)
    w.wait(timeout=30)
    res["all_gather_into_tensor"] = all(bool((out[r * 70_001:(r + 1) * 70_001] == r).all()) for r in range(size))
    outs = [torch.empty(3, 5, device=dev) for _ in range(size)]
    dist.all_gather(outs, torch.full((3, 5), float(rank + 10), device=dev))
    res["all_gather list"] = all(bool((o == r + 10).all()) for r, o in enumerate(outs))
    rs_in = torch.arange(size * 1000, dtype=torch.float32, device=dev)
    rs_out = torch.empty(1000, device=dev)
    dist.reduce_scatter_tensor(rs_out, rs_in)
    res["reduce_scatter"] = torch.equal(rs_out.cpu(), size * (torch.arange(1000, dtype=torch.float32) + 1000 * rank))
    a = torch.arange(4 * size, dtype=torch.int64, device=dev) + 100 * rank
    b = torch.empty(4 * size, dtype=torch.int64, device=dev)
    dist.all_to_all_single(b, a)
    res["all_to_all"] = torch.equal(b.cpu(), torch.cat([torch.arange(4) + 4 * rank + 100 * s for s in range(size)]))
    in_splits = [(rank + 1) * (d + 2) for d in range(size)]
    out_splits = [(s + 1) * (rank + 2) for s in range(size)]
    a = torch.cat([torch.full((in_splits[d], 3), 100.0 * rank + d) for d in range(size)]).to(dev)
    b = torch.full((sum(out_splits), 3), -1.0, device=dev)
    dist.all_to_all_single(b, a, output_split_sizes=out_splits, input_split_sizes=in_splits)
    res["all_to_all uneven"] = torch.equal(b.cpu(), torch.cat([torch.full((out_splits[s], 3), 100.0 * s + rank)
                                                               for s in range(size)]))
    c = torch.full((77,), float(rank), device=dev)
    dist.broadcast(c, src=size - 1)
    res["broadcast"] = bool((c == size - 1).all())
    r_ = torch.full((1001,), float(rank + 1), device=dev)
    dist.reduce(r_, dst=0)
    res["reduce"] = bool((r_ == (sum(range(1, size + 1)) if rank == 0 else rank + 1)).all())
    gl = [torch.empty(5, device=dev) for _ in range(size)] if rank == 0 else None
    dist.gather(torch.full((5,), float(rank), device=dev), gl, dst=0)
    res["gather"] = rank != 0 or all(bool((g == i).all()) for i, g in enumerate(gl))
    so = torch.empty(6, device=dev)
    dist.scatter(so, [torch.full((6,), float(i * 3), device=dev) for i in range(size)] if rank == 0 else None, src=0)
    res["scatter"] = bool((so == rank * 3).all())
    peer = rank ^ 1
    mine, theirs = torch.full((4096,), float(rank), device=dev), torch.empty(4096, device=dev)
    for q in [dist.isend(mine, dst=peer), dist.irecv(theirs, src=peer)]:
        q.wait()
    res["isend/irecv"] = bool((theirs * 1 == peer).all())
    dist.barrier()
    dist.destroy_process_group()
    return res


def scenario_gather_scatter_layout(rank, size, port):
    """all_gather and reduce_scatter composed on hosts whose ranks are not numbered host by host
    (PYCCL_HOST_ID set per rank by the test)."""
    from pyccl.store import StoreServer, TCPStore
    secret = b"k" * 32
    server = StoreServer("127.0.0.1", port, secret) if rank == 0 else None  # noqa: F841 - kept alive
    comm = pyccl.Communicator(rank, size, store=TCPStore("127.0.0.1", port, secret, timeout=60), secret=secret)
    bad = []
    for dtype in ("float32", "int32"):
        bad += [f"{dtype} {b}" for b in _gather_scatter(comm, dtype, [0, 1, 7, 4099, 300_007])]
    res = {"members": comm.topology.members(), "rank_order": comm.cuda.composed.rank_order, "bad": bad}
    comm.barrier()
    return res


@pytest.mark.parametrize("layout,members,rank_order", [("0101", [[0, 2], [1, 3]], True),
                                                       ("0110", [[0, 3], [1, 2]], False)],
                         ids=["round-robin", "mixed"])
def test_composed_gather_scatter_host_layouts(layout, members, rank_order):
    """Round robin (rank = local index x hosts + host): the rail-major order is the rank order,
    so all_gather gathers straight into the output and reduce_scatter reduces from the input;
    mixed: contiguous and single-block copies into and out of the stage."""
    envs = [{**COMPOSED_ALWAYS, "PYCCL_HOST_ID": f"host{h}"} for h in layout]
    out = run_spawned(__name__, "scenario_gather_scatter_layout", len(layout), envs, 300)
    for r in range(len(layout)):
        assert r in out, out
        kind, val = out[r]
        assert kind == "ok", val
        assert val["members"] == members, val
        assert val["rank_order"] is rank_order, val
        assert not val["bad"], val["bad"]


@pytest.mark.parametrize("size,per_host,env",
                         [(2, 1, {}), (4, 2, {}), (4, 2, {"PYCCL_CUDA_COMPOSED_MIN": "0", **ALL_OPS})],
                         ids=["2x1", "2x2", "2x2-composed"])
def test_torch_distributed_across_hosts(size, per_host, env):
    out = _run_spawned("scenario_torch", size, per_host, timeout=300, env=env)
    assert_every_check_passed(out, size)
