"""The proxy engine on a real GPU (ccl/engines/proxy/, PYCCL_PROXY=1): ranks posing as hosts, one rank each,
sharing the GPU(s) there are. Calls return before their transfer ends; CUDA graphs capture
every op and each replay moves the new contents; a peer killed during replays makes the
survivors raise within the timeout (and their stream does not hang). Skips without a GPU."""
import os
import signal
import time

import pytest

from cuda_available import require_gpu

NGPU = require_gpu()

import torch  # noqa: E402  (only on GPU machines)

import pyccl  # noqa: E402
from pyccl.errors import PycclError  # noqa: E402
from spawned import run_spawned  # noqa: E402

pytestmark = pytest.mark.timeout(300)
OPS = ["all_reduce", "reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all"]


def _dev(rank):
    d = rank % torch.cuda.device_count()
    torch.cuda.set_device(d)
    return torch.device("cuda", d)


def _inputs(op, n, size, it, dtype):
    """Every rank's input of replay `it` (each rank can rebuild all of them)."""
    m = n * size if op in ("reduce_scatter", "all_to_all") else n
    return [((torch.arange(m) * (r + 3) + it * 7 + r) % 23 - 11).to(dtype) for r in range(size)]


def _expected(op, xs, rank, size, n):
    s = torch.stack([x.double() for x in xs]).sum(0).to(xs[0].dtype)
    return {"all_reduce": s, "reduce": s if rank == 0 else xs[rank], "broadcast": xs[1 % size],
            "all_gather": torch.cat(xs), "reduce_scatter": s[rank * n:(rank + 1) * n],
            "all_to_all": torch.cat([x[rank * n:(rank + 1) * n] for x in xs])}[op]


def rank_capture(comm, op, dtype_name, n, replays):
    """Capture one `op` in a CUDA graph (after one eager call), replay it with new inputs each
    time; every replay's result against the reference. Returns the problems."""
    dev = _dev(comm.rank)
    dtype = getattr(torch, dtype_name)
    rank, size = comm.rank, comm.size
    xs = _inputs(op, n, size, 0, dtype)
    inp = xs[rank].to(dev)
    out = inp if op in ("all_reduce", "reduce", "broadcast") else \
        torch.empty(n * size if op == "all_gather" else n * (size if op == "all_to_all" else 1), dtype=dtype, device=dev)

    def call():
        if op == "all_reduce":
            comm.all_reduce(inp)
        elif op == "reduce":
            comm.reduce(inp, root=0)
        elif op == "broadcast":
            comm.broadcast(inp, root=1 % size)
        elif op == "all_gather":
            comm.all_gather(out, inp)
        elif op == "reduce_scatter":
            comm.reduce_scatter(out, inp)
        else:
            comm.all_to_all(out, inp)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()                                   # eager: makes the program
    torch.cuda.current_stream().wait_stream(s)
    bad = []
    if not torch.equal(out.cpu(), _expected(op, xs, rank, size, n)):
        bad.append("eager")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        call()
    for it in range(1, replays + 1):
        xs = _inputs(op, n, size, it, dtype)
        inp.copy_(xs[rank])
        g.replay()
        torch.cuda.synchronize()
        if not torch.equal(out.cpu(), _expected(op, xs, rank, size, n)):
            bad.append(f"replay {it}")
    comm.cuda.synchronize("after the replays")
    return bad


def rank_returns_early(comm, n):
    """A synchronous call returns before its transfer ends: host time per call vs wall time,
    and the result is right once the stream is synchronized."""
    dev = _dev(comm.rank)
    x = torch.ones(n, device=dev)
    comm.all_reduce(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        comm.all_reduce(x)
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return host, wall, bool((x == comm.size ** 6).all()), type(comm.cuda).__name__


@pytest.fixture(scope="module")
def two_hosts(groups):
    return groups(2, env={"PYCCL_TIMEOUT": "60", "PYCCL_PROXY": "1"}, ranks_per_host=1)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32"])
def test_captured_replays_move_new_inputs(two_hosts, op, dtype):
    for bad in two_hosts.run(rank_capture, op, dtype, 4099, 100 if dtype == "float32" else 10):
        assert not bad, bad


@pytest.fixture(scope="module")
def two_by_two(groups):
    """2 hosts x 2 ranks on the proxy (PYCCL_ENGINE=proxy: not the default there until run on a GPU),
    every message composed (local phases on the one-host engine, the rail proxied:
    ccl/engines/proxy/composed.py); reduce and all_to_all take the flat program."""
    return groups(4, env={"PYCCL_TIMEOUT": "60", "PYCCL_ENGINE": "proxy", "PYCCL_CUDA_COMPOSED_MIN": "0"},
                  ranks_per_host=2)


@pytest.mark.parametrize("op", OPS)
def test_captured_replays_2x2(two_by_two, op):
    for bad in two_by_two.run(rank_capture, op, "float32", 4099, 20):
        assert not bad, bad


def test_2x2_composed_on_the_stream(two_by_two):
    for host, wall, ok, engine in two_by_two.run(rank_returns_early, 16 << 20):
        assert ok
        assert engine == "ProxyState", engine
        assert host < wall / 2, (host, wall)
    for used in two_by_two.run(rank_composed_used):
        assert used, "the 2 x 2 all_reduce did not take the composition"


def rank_composed_used(comm):
    comp = comm.cuda.composed
    return comp is not None and comp.local._epoch > 0


def test_sync_call_returns_before_the_transfer(two_hosts):
    for host, wall, ok, engine in two_hosts.run(rank_returns_early, 16 << 20):
        assert ok
        assert engine == "ProxyState", engine
        assert host < wall / 2, (host, wall)


def scenario_killed_in_replays(rank, size, port):
    """The last rank SIGKILLs itself between replays; the survivors' stream does not hang and
    their next pyccl call (or synchronize) raises within the timeout."""
    from pyccl.store import StoreServer, TCPStore
    secret = b"r" * 32
    server = StoreServer("127.0.0.1", port, secret) if rank == 0 else None  # noqa: F841 - kept alive
    comm = pyccl.Communicator(rank, size, store=TCPStore("127.0.0.1", port, secret, timeout=60), secret=secret)
    dev = _dev(rank)
    x = torch.ones(1 << 20, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        comm.all_reduce(x)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        comm.all_reduce(x)
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    if rank == size - 1:
        os.kill(os.getpid(), signal.SIGKILL)
    t = time.monotonic()
    try:
        for _ in range(20):
            g.replay()
        torch.cuda.synchronize()                 # must not hang: the kernel's waits end
        synced = time.monotonic() - t
        comm.cuda.synchronize("after the replays")
        comm.all_reduce(x)
        comm.cuda.synchronize("after an eager call")
        return ("finished", synced)
    except PycclError as e:
        return (type(e).__name__, time.monotonic() - t, str(e), (torch.ones(4, device=dev) * 2).sum().item())


def test_peer_killed_during_replays():
    envs = [{"PYCCL_TIMEOUT": "10", "PYCCL_HOST_ID": f"host{r}", "PYCCL_PROXY": "1"} for r in range(2)]
    out = run_spawned(__name__, "scenario_killed_in_replays", 2, envs, 120)
    assert 0 in out, out
    kind, val = out[0]
    assert kind == "ok", val
    assert val[0] in ("PeerFailure", "Timeout", "TransportError", "PycclError"), val
    assert val[1] < 30, val
    assert val[3] == 8.0, val


def scenario_torch_graphs(rank, size, port):
    """Through torch.distributed (backend "pyccl"), every rank its own host: dist.all_reduce
    captured in a CUDA graph and replayed with new inputs, a tensor-parallel layer whose
    output goes through the functional all_reduce, compiled with mode="reduce-overhead" (CUDA
    graphs), equal to eager, and dist.send/recv captured and replayed with new contents."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc
    import pyccl.torch_backend  # noqa: F401 - registers "pyccl"
    dev = _dev(rank)
    dist.init_process_group("pyccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            device_id=dev)
    res = {}
    x = torch.zeros(70_001, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        dist.all_reduce(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        dist.all_reduce(x)
    ok = True
    for it in range(20):
        x.fill_(float(rank + it))
        g.replay()
        torch.cuda.synchronize()
        ok &= bool((x == sum(r + it for r in range(size))).all())
    res["dist.all_reduce captured, 20 replays"] = ok

    torch.manual_seed(0)
    w = torch.randn(64, 256, device=dev)[:, rank * 128:(rank + 1) * 128].contiguous()    # this rank's shard

    def layer(inp):
        return fc.all_reduce(inp[:, rank * 128:(rank + 1) * 128] @ w.t(), "sum", dist.group.WORLD)

    compiled = torch.compile(layer, mode="reduce-overhead")
    same = True
    for it in range(6):
        torch.manual_seed(100 + it)
        inp = torch.randn(8, 256, device=dev)
        want = layer(inp)
        got = compiled(inp).clone()
        torch.cuda.synchronize()
        same &= bool(torch.allclose(got, want, rtol=1e-4, atol=1e-4))
    res["compiled reduce-overhead TP layer == eager"] = same

    buf = torch.zeros(4099, device=dev)          # captured send/recv: the proxy's, ordered, by peer
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        if rank == 0:
            dist.send(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
    ok = True
    for it in range(5):
        if rank == 0:
            buf.fill_(float(it + 7))
        g2.replay()
        torch.cuda.synchronize()
        ok &= rank != 1 or bool((buf == it + 7).all())
    res["dist.send/recv captured, 5 replays"] = ok
    dist.barrier()
    dist.destroy_process_group()
    return res


def test_torch_graphs_across_hosts():
    from spawned import assert_every_check_passed
    envs = [{"PYCCL_TIMEOUT": "30", "PYCCL_HOST_ID": f"host{r}", "PYCCL_PROXY": "1"} for r in range(2)]
    out = run_spawned(__name__, "scenario_torch_graphs", 2, envs, 240)
    assert_every_check_passed(out, 2)
