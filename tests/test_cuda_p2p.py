"""Point-to-point on CUDA tensors through the torch backend, on real GPUs: CUDA IPC between the
ranks of one host (ccl/torch_backend/p2p_ipc.py) and, with PYCCL_P2P_IPC=0, the path through
pinned host memory. 2 and 3 ranks, GPU rank % device count (one GPU works: the processes still
go through CUDA IPC). Payloads are integers in -100..99 (exact in bfloat16, float32, int64) that
depend on the sender, the message and the index; every result is compared exactly.

Skips, with the reason, without cupy or without a CUDA GPU (every CI machine).
"""
import os
import signal
import time
from datetime import timedelta

import pytest

from cuda_available import require_gpu

require_gpu()

import torch  # noqa: E402  (only on GPU machines)

from pyccl.errors import PycclError  # noqa: E402
from spawned import run_spawned  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int64": torch.int64}
BIG = 64 << 20                        # bytes


def _counts(dtype):
    """Element counts: 0, 1, a prime, 64 MiB."""
    return [0, 1, 1_000_003, BIG // torch.empty(0, dtype=dtype).element_size()]


def _init(rank, size, port, timeout=60):
    import torch.distributed as dist
    import pyccl.torch_backend  # noqa: F401 - registers "pyccl"
    d = rank % torch.cuda.device_count()
    torch.cuda.set_device(d)
    dev = torch.device("cuda", d)
    dist.init_process_group("pyccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            device_id=dev, timeout=timedelta(seconds=timeout))
    return dist, dev, dist.distributed_c10d._get_default_group()


def _payload(src, n, dtype, salt, dev="cuda"):
    v = (torch.arange(n, device=dev, dtype=torch.int64) * 7 + 13 * src + 31 * salt) % 200 - 100
    return v.to(dtype)


def _settle(pg, limit=10.0):
    """The counters once every staging block came back (the acks arrive after the copies)."""
    deadline = time.monotonic() + limit
    st = pg.p2p_stats()
    while st["blocks_lent"] and time.monotonic() < deadline:
        time.sleep(0.05)
        st = pg.p2p_stats()
    return st


# ---- rank functions (module level: they travel to the spawned ranks by name) -------------------
def scenario_p2p(rank, size, port):
    dist, dev, pg = _init(rank, size, port)
    nxt, prv = (rank + 1) % size, (rank - 1) % size
    res = {}
    # expected counters: CUDA messages of > 0 bytes this rank sends to another rank (announced
    # over IPC), receives from one into a CUDA tensor of the right size (copied GPU to GPU),
    # and into a CPU tensor (asked for the bytes)
    sends = gpu_recvs = cpu_recvs = 0
    salt = 0
    # isend/irecv ring and batch_isend_irecv ring: every dtype, sizes 0, 1, prime, 64 MiB
    for name, dtype in DTYPES.items():
        for n in _counts(dtype):
            salt += 1
            x = _payload(rank, n, dtype, salt)
            y = torch.full((n,), -7, dtype=dtype, device=dev)
            for w in [dist.isend(x, nxt, tag=salt), dist.irecv(y, prv, tag=salt)]:
                w.wait()
            res[f"isend/irecv ring {name} n={n}"] = torch.equal(y, _payload(prv, n, dtype, salt))
            y2 = torch.full((n,), -7, dtype=dtype, device=dev)
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, nxt, tag=salt + 1000),
                                           dist.P2POp(dist.irecv, y2, prv, tag=salt + 1000)])
            for w in reqs:
                w.wait()
            res[f"batch_isend_irecv ring {name} n={n}"] = torch.equal(y2, _payload(prv, n, dtype, salt))
            sends += 2 if n else 0
            gpu_recvs += 2 if n else 0
    # blocking sends complete before any receive is posted (eager), several tags, received in
    # the reverse order; 64 MiB among them
    tags = [(21, 5, torch.float32), (22, 1_000_003, torch.bfloat16), (23, BIG // 4, torch.float32),
            (24, 1, torch.int64)]
    for tag, n, dtype in tags:
        dist.send(_payload(rank, n, dtype, tag), nxt, tag=tag)
    for tag, n, dtype in reversed(tags):
        y = torch.empty(n, dtype=dtype, device=dev)
        dist.recv(y, prv, tag=tag)
        res[f"blocking ring, tag {tag} received out of order"] = torch.equal(y, _payload(prv, n, dtype, tag))
    sends += len(tags)
    gpu_recvs += len(tags)
    # same tag twice: matched in send order
    ws = [dist.isend(_payload(rank, 1000, torch.float32, s), nxt, tag=25) for s in (251, 252)]
    ys = [torch.empty(1000, device=dev) for _ in range(2)]
    for y in ys:
        dist.recv(y, prv, tag=25)
    for w in ws:
        w.wait()
    res["same tag keeps send order"] = all(torch.equal(y, _payload(prv, 1000, torch.float32, s))
                                           for y, s in zip(ys, (251, 252)))
    sends += 2
    gpu_recvs += 2
    # receive from any source (rank 0), returns the sender
    if rank == 0:
        got = {}
        for _ in range(size - 1):
            y = torch.empty(777, dtype=torch.int64, device=dev)
            src = dist.recv(y, tag=31)
            got[src] = torch.equal(y, _payload(src, 777, torch.int64, 31))
        res["any-source"] = sorted(got) == list(range(1, size)) and all(got.values())
        gpu_recvs += size - 1
    else:
        dist.send(_payload(rank, 777, torch.int64, 31), 0, tag=31)
        sends += 1
    # the sender may change its tensor as soon as isend returns (stream order)
    x = _payload(rank, 4099, torch.float32, 41)
    w = dist.isend(x, nxt, tag=41)
    x.fill_(-1000)
    y = torch.empty(4099, device=dev)
    dist.recv(y, prv, tag=41)
    w.wait()
    res["sender reuses its tensor at once"] = torch.equal(y, _payload(prv, 4099, torch.float32, 41))
    sends += 1
    gpu_recvs += 1
    # a slow producer: the data is written by work still queued when send is called
    x = torch.zeros(1 << 20, device=dev)
    torch.cuda._sleep(50_000_000)
    x.copy_(_payload(rank, 1 << 20, torch.float32, 42))
    w = dist.isend(x, nxt, tag=42)
    # ...and a receive target still being written by queued work when recv is called
    y = torch.empty(1 << 20, device=dev)
    torch.cuda._sleep(50_000_000)
    y.fill_(-5)
    dist.recv(y, prv, tag=42)
    w.wait()
    res["stream order on both sides"] = torch.equal(y, _payload(prv, 1 << 20, torch.float32, 42))
    sends += 1
    gpu_recvs += 1
    # non-contiguous source and target
    src = _payload(rank, 64 * 33, torch.float32, 43).view(64, 33)[:, 2:18]
    base = torch.full((64, 33), -1.0, device=dev)
    w = dist.isend(src, nxt, tag=43)
    dist.recv(base[:, 1:17], prv, tag=43)
    w.wait()
    want = torch.full((64, 33), -1.0, device=dev)
    want[:, 1:17] = _payload(prv, 64 * 33, torch.float32, 43).view(64, 33)[:, 2:18]
    res["non-contiguous source and target"] = torch.equal(base, want)
    sends += 1
    gpu_recvs += 1
    # a CUDA tensor received into a CPU tensor (the receiver asks for the bytes)
    w = dist.isend(_payload(rank, 3001, torch.int64, 44), nxt, tag=44)
    y = torch.empty(3001, dtype=torch.int64)
    dist.recv(y, prv, tag=44)
    w.wait()
    res["CUDA to CPU tensor"] = torch.equal(y, _payload(prv, 3001, torch.int64, 44, dev="cpu"))
    sends += 1
    cpu_recvs += 1
    # to itself (not IPC)
    y = torch.empty(100, device=dev)
    reqs = [dist.irecv(y, rank, tag=45), dist.isend(_payload(rank, 100, torch.float32, 45), rank, tag=45)]
    for w in reqs:
        w.wait()
    res["to itself"] = torch.equal(y, _payload(rank, 100, torch.float32, 45))
    # a wrong-size receive fails alone; the pair stays usable and the block comes back
    w = dist.isend(_payload(rank, 50, torch.float32, 46), nxt, tag=46)
    try:
        dist.recv(torch.empty(40, device=dev), prv, tag=46)
        res["size mismatch raises"] = False
    except PycclError as e:
        res["size mismatch raises"] = "size mismatch" in str(e)
    w.wait()
    y = torch.empty(50, device=dev)
    w = dist.isend(_payload(rank, 50, torch.float32, 47), nxt, tag=47)
    dist.recv(y, prv, tag=47)
    w.wait()
    res["usable after a size mismatch"] = torch.equal(y, _payload(prv, 50, torch.float32, 47))
    sends += 2
    gpu_recvs += 1
    torch.cuda.synchronize()
    dist.barrier()
    return res, _settle(pg), (sends, gpu_recvs, cpu_recvs)


def scenario_p2p_peer_killed(rank, size, port):
    """Rank 1 is SIGKILLed after an IPC exchange; rank 0's receive from it and send to it must
    fail (PeerFailure or Timeout, naming the op and rank 1) within the group timeout."""
    timeout = 30
    dist, dev, pg = _init(rank, size, port, timeout=timeout)
    nxt, prv = (rank + 1) % size, (rank - 1) % size
    x = _payload(rank, 1 << 16, torch.float32, 1)
    y = torch.empty(1 << 16, device=dev)
    for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, x, nxt), dist.P2POp(dist.irecv, y, prv)]):
        w.wait()
    ok = torch.equal(y, _payload(prv, 1 << 16, torch.float32, 1))
    torch.cuda.synchronize()
    dist.barrier()
    if rank == 1:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    out = {"warm-up exact": ok, "stats": _settle(pg), "timeout": timeout}
    if rank != 0:
        time.sleep(5)
        return out
    out["recv"] = _outcome(lambda: dist.recv(y, 1, tag=5))
    out["send"] = _outcome(lambda: dist.send(x, 1, tag=6))
    out["cuda still works"] = (torch.ones(4, device=dev) * 2).sum().item()
    return out


def _outcome(call):
    """(how it ended: "finished" or the PycclError's class name, seconds, message)."""
    t = time.monotonic()
    try:
        call()
        return "finished", time.monotonic() - t, ""
    except PycclError as e:
        return type(e).__name__, time.monotonic() - t, str(e)


def scenario_p2p_timeout(rank, size, port):
    """A CUDA receive nobody answers ends with Timeout ("Timed out") after the group timeout."""
    dist, dev, pg = _init(rank, size, port)
    g = dist.new_group(backend="pyccl", timeout=timedelta(seconds=2))
    out = None
    if rank == 0:
        out = _outcome(lambda: dist.recv(torch.empty(1000, device=dev), 1, group=g, tag=3))
    dist.barrier()
    return out


# ---- tests ------------------------------------------------------------------------------------------
def _spawn(scenario, size, ipc="1", timeout=240):
    env = {"PYCCL_TIMEOUT": "60", "PYCCL_TRANSPORT": "tcp", "PYCCL_P2P_IPC": ipc}
    return run_spawned(__name__, scenario, size, [env] * size, timeout)


@pytest.mark.parametrize("size,ipc", [(2, "1"), (3, "1"), (2, "0"), (3, "0")],
                         ids=["2ranks-ipc", "3ranks-ipc", "2ranks-PYCCL_P2P_IPC=0", "3ranks-PYCCL_P2P_IPC=0"])
def test_p2p_cuda(size, ipc):
    out = _spawn("scenario_p2p", size, ipc)
    for r in range(size):
        assert r in out, out
        kind, val = out[r]
        assert kind == "ok", val
        res, st, (sends, gpu_recvs, cpu_recvs) = val
        bad = {k: v for k, v in res.items() if v is not True}
        assert not bad, (r, bad)
        assert st["blocks_lent"] == 0, (r, st)
        if ipc == "1":
            # every CUDA message to another rank of this host was announced over IPC, none staged
            # through host memory (the one to itself is); every one received into a CUDA tensor
            # was copied GPU to GPU, the one into a CPU tensor was asked for
            assert st["ipc"] is True, (r, st)
            assert st["ipc_sent"] == sends, (r, sends, st)
            assert st["staged_sent"] == 1 and st["pool_full"] == 0, (r, st)
            assert st["ipc_refused"] == cpu_recvs and st["ipc_resent"] == cpu_recvs, (r, st)
            assert st["ipc_received"] == gpu_recvs, (r, gpu_recvs, st)
        else:
            assert st["ipc"] is False, (r, st)
            assert st["ipc_sent"] == 0 and st["ipc_received"] == 0, (r, st)
            assert st["staged_sent"] == sends + 1, (r, sends, st)


def test_p2p_cuda_peer_killed():
    out = _spawn("scenario_p2p_peer_killed", 2)
    assert 0 in out, out
    kind, val = out[0]
    assert kind == "ok", val
    assert val["warm-up exact"] is True, val
    assert val["stats"]["ipc_sent"] >= 1 and val["stats"]["ipc_received"] >= 1, val
    for op in ("recv", "send"):
        name, took, msg = val[op]
        assert name in ("PeerFailure", "Timeout"), (op, val)
        assert took < val["timeout"], (op, val)
        assert "rank 1" in msg and op in msg, (op, val)
    assert val["cuda still works"] == 8.0, val


def test_p2p_cuda_timeout():
    out = _spawn("scenario_p2p_timeout", 2)
    assert 0 in out and 1 in out, out
    kind, val = out[0]
    assert kind == "ok", val
    name, took, msg = val
    assert name == "Timeout" and "Timed out" in msg, val
    assert 1.5 < took < 8, val
