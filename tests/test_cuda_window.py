"""CUDA windows (ccl/windows/cuda.py: CUDA IPC, stream-ordered put/get/signal/wait) on real GPUs.

Skips, with the reason, without cupy or a CUDA GPU (every CI machine); bench/gpu_window.sh runs
it on the GPU machine. Ranks use GPU rank % device count, so 2 and 3 ranks share one GPU there
(still CUDA IPC between processes). Every dtype, offsets at both ends of windows of different
sizes, 0-byte puts, many puts then one signal, puts from every peer at once, torch tensors and
cupy arrays, bad input (nothing queued, nothing moved), a wait that times out, a peer killed
while another's stream waits on its signal.
"""
import os
import signal
import sys
import time

import numpy as np
import pytest

from cuda_available import require_gpu

NGPU = require_gpu()

import cupy  # noqa: E402  (only on GPU machines)

import torch  # noqa: E402  (only on GPU machines)

import pyccl  # noqa: E402
from pyccl.dtypes import NAMES  # noqa: E402
from pyccl.errors import InvalidArgument, PycclError, Timeout  # noqa: E402
from spawned import run_spawned  # noqa: E402

pytestmark = pytest.mark.timeout(200)
# a rank's answer to group.run: within this (each rank polled in turn), so a hung test marks the
# group broken and the next test gets a fresh one (bench/gpu_window.sh: pytest --timeout=70 > 3 x RUN_S)
RUN_S = 20

TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
         "float64": torch.float64, "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32,
         "int64": torch.int64, "bool": torch.bool}


def _dev(comm):
    d = comm.rank % cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(d).use()
    torch.cuda.set_device(d)
    return d


def _wait_mode(mode):
    """How the windows made from now on wait (ccl/windows/cuda.py WAIT); returns the old mode."""
    import pyccl.windows.cuda as cw
    old, cw.WAIT = cw.WAIT, mode
    return old


def values(src, dst, n, dtype, device="cuda"):
    x = (torch.arange(n, dtype=torch.int64) * 7 + src * 13 + dst * 3 + 1) % 50
    return x.to(TORCH[dtype]).to(device)


# ---- first (a cut run still shows them): a killed peer, a wait that times out, torch -----------------
def _comm(rank, size, port):
    from pyccl.store import StoreServer, TCPStore
    secret = b"w" * 32
    server = StoreServer("127.0.0.1", port, secret) if rank == 0 else None
    store = TCPStore("127.0.0.1", port, secret, timeout=60)
    return pyccl.Communicator(rank, size, store=store, secret=secret), server


def scenario_peer_killed(rank, size, port):
    comm, server = _comm(rank, size, port)
    _dev(comm)
    _wait_mode(os.environ["WINDOW_WAIT"])
    win = comm.window(torch.zeros(16, device="cuda"), signals=4)
    if win.wait_mode != os.environ["WINDOW_WAIT"]:
        return ("wait mode", win.wait_mode)
    win.put(torch.ones(16, device="cuda"), 1 - rank, signal=3)    # warm: a full round works
    win.wait_signal(3, 1)
    win.synchronize()
    comm.barrier()
    if rank == 1:
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
    t = time.monotonic()
    win.wait_signal(3, 1, timeout=40)                  # rank 1 never signals: it dies
    queued = time.monotonic() - t
    try:
        win.synchronize(timeout=60)
        return ("finished", time.monotonic() - t)
    except PycclError as e:
        took = time.monotonic() - t
        try:
            win.put(torch.ones(1, device="cuda"), 1)
            later = "no error"
        except PycclError as e2:
            later = type(e2).__name__
        after = (torch.ones(4, device="cuda") * 2).sum().item()    # the CUDA context still works
        return (type(e).__name__, took, str(e), queued, later, after)


@pytest.mark.parametrize("wait", ["stream", "kernel"])
def test_peer_killed_while_the_stream_waits(wait):
    env = {"PYCCL_TIMEOUT": "60", "PYCCL_TRANSPORT": "tcp", "WINDOW_WAIT": wait}
    out = run_spawned(__name__, "scenario_peer_killed", 2, [env] * 2,
                      60)                           # below pytest's --timeout: the processes are killed
    assert 0 in out, out
    kind, val = out[0]
    assert kind == "ok", val
    assert val[0] == "PeerFailure", val
    assert val[1] < 10, val                            # well within the 40 s wait
    assert "rank 1" in val[2] and "signal slot 3" in val[2], val
    assert val[3] < 1, val                             # wait_signal itself only queued
    assert val[4] in ("PeerFailure",), val
    assert val[5] == 8.0, val


def scenario_torch_backend(rank, size, port):
    """pyccl.torch_backend.window on a "pyccl" process group, torch's current stream."""
    import torch.distributed as dist
    import pyccl.torch_backend as tb
    dev = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    dist.init_process_group("pyccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            device_id=dev)
    t = torch.zeros(size * 2, dtype=torch.int32, device=dev)
    with tb.window(t) as win:
        for p in range(size):
            win.put(torch.full((2,), rank + 7, dtype=torch.int32, device=dev), p, offset=2 * rank, signal=1)
        win.wait_signal(1, size)
        ok = t.tolist() == [q + 7 for q in range(size) for _ in range(2)]
        dist.barrier()
    dist.destroy_process_group()
    return ok


def test_torch_backend_window_on_cuda():
    out = run_spawned(__name__, "scenario_torch_backend", 2, [{"PYCCL_TIMEOUT": "60", "PYCCL_TRANSPORT": "tcp"}] * 2,
                      60)                           # below pytest's --timeout: the processes are killed
    assert [out.get(r) for r in range(2)] == [("ok", True)] * 2, out


@pytest.mark.parametrize("wait", ["kernel", "stream"])
def test_wait_times_out(groups, wait):
    g = groups(2, env={"PYCCL_TIMEOUT": "60", "PYCCL_TRANSPORT": "tcp"})
    res = g.run(rank_wait_times_out, wait, timeout=RUN_S)[0]
    assert isinstance(res, tuple), res
    took, msg = res
    assert took < 10, (took, msg)
    assert "signal slot 1" in msg, msg


# ---- rank-side checks: each returns a list of failure strings -------------------------------------
def rank_every_dtype(comm):
    """Rank r's window holds 4 * size + 1 + r elements: block q is written by rank q, the last
    element by rank (r - 1) % size; a 0-byte put at the exact end carries slot 1. Then gets."""
    _dev(comm)
    bad, me, size = [], comm.rank, comm.size
    for dtype in NAMES:
        buf = torch.zeros(4 * size + 1 + me, dtype=TORCH[dtype], device="cuda")
        with comm.window(buf) as win:
            kinds = {win.transport(p) for p in range(size) if p != me}
            for p in range(size):
                end = 4 * size + 1 + p
                win.put(values(me, p, 4, dtype), p, offset=4 * me, signal=0)
                if (me + 1) % size == p:
                    win.put(values(me, p, 1, dtype), p, offset=end - 1)
                win.put(torch.zeros(0, dtype=TORCH[dtype], device="cuda"), p, offset=end, signal=1)
            win.wait_signal(0, size)
            win.wait_signal(1, size)
            win.synchronize()
            want = torch.zeros(buf.numel(), dtype=TORCH[dtype])
            for q in range(size):
                want[4 * q:4 * q + 4] = values(q, me, 4, dtype, "cpu")
            want[-1] = values((me - 1) % size, me, 1, dtype, "cpu")[0]
            if not torch.equal(buf.cpu(), want):
                bad.append(f"{dtype}: window {buf.cpu().tolist()} != {want.tolist()}")
            comm.barrier()                        # every window final before anyone reads it
            peer = (me + 1) % size
            got = torch.zeros(4 * size + 1 + peer, dtype=TORCH[dtype], device="cuda")
            tail = torch.zeros(1, dtype=TORCH[dtype], device="cuda")
            win.get(got, peer)
            win.get(tail, peer, offset=got.numel() - 1)
            win.get(torch.zeros(0, dtype=TORCH[dtype], device="cuda"), peer, offset=got.numel())
            torch.cuda.current_stream().synchronize()
            if not torch.equal(got[4 * me:4 * me + 4].cpu(), values(me, peer, 4, dtype, "cpu")) or \
                    not torch.equal(tail.cpu(), got[-1:].cpu()):
                bad.append(f"{dtype}: get from rank {peer} gave {got.cpu().tolist()}")
            if kinds != {"cuda_ipc"}:
                bad.append(f"links {kinds}")
            comm.barrier()                        # nobody reads a window another closes
    return bad


def rank_cupy_window(comm):
    """cupy arrays on cupy's current stream; the host never blocks until the check."""
    _dev(comm)
    me, size = comm.rank, comm.size
    buf = cupy.full(3 * size, -1, dtype=cupy.int32)
    with comm.window(buf, signals=2) as win:
        for p in range(size):
            win.put(cupy.arange(3, dtype=cupy.int32) + 10 * me, p, offset=3 * me, signal=1)
        win.wait_signal(1, size)
        got = cupy.asnumpy(buf)                  # ordered after the wait on the same stream
        comm.barrier()
    want = np.concatenate([np.arange(3, dtype=np.int32) + 10 * q for q in range(size)])
    return [] if np.array_equal(got, want) else [f"cupy window {got} != {want}"]


def rank_many_puts_one_signal(comm, k, wait="kernel"):
    """k single-element puts to every peer, then one signal each (value 2): it lands after them."""
    _dev(comm)
    old = _wait_mode(wait)
    me, size = comm.rank, comm.size
    buf = torch.full((size * k,), -1, dtype=torch.int64, device="cuda")
    with comm.window(buf, signals=4) as win:
        for i in range(k):
            for p in range(size):
                if p != me:
                    win.put(torch.tensor([me * 1000 + i], dtype=torch.int64, device="cuda"), p, offset=me * k + i)
        for p in range(size):
            if p != me:
                win.signal(p, 3, value=2)
        win.wait_signal(3, 2 * (size - 1))
        win.synchronize()
        want = torch.tensor([q * 1000 + i if q != me else -1 for q in range(size) for i in range(k)])
        ok = torch.equal(buf.cpu(), want) and win.wait_mode == wait
        comm.barrier()
    _wait_mode(old)
    return [] if ok else [f"{win.wait_mode} waits: window {buf.cpu().tolist()} != {want.tolist()}"]


def rank_concurrent(comm, n, rounds, wait="kernel"):
    """Every rank puts n float32 into every peer at once, `rounds` times (a signal per round;
    a round's region is rewritten only after the target answered the previous one)."""
    _dev(comm)
    old = _wait_mode(wait)
    me, size = comm.rank, comm.size
    buf = torch.zeros(size * n, device="cuda")
    bad = []
    with comm.window(buf, signals=2) as win:
        for r in range(rounds):
            src = torch.arange(n, dtype=torch.float32, device="cuda") + 1e6 * me + r
            for k in range(1, size):
                p = (me + k) % size
                win.put(src, p, offset=me * n, signal=0)
            win.wait_signal(0, size - 1)
            view = buf.view(size, n)
            for q in range(size):
                if q != me and not torch.equal(view[q], torch.arange(n, dtype=torch.float32, device="cuda") + 1e6 * q + r):
                    bad.append(f"round {r}: block of rank {q} wrong")
            for k in range(1, size):             # answer: the peers may write the next round
                win.signal((me + k) % size, 1)
            win.wait_signal(1, size - 1)
        win.synchronize()
        comm.barrier()
    _wait_mode(old)
    return bad


def rank_no_sync(comm):
    """put, signal, wait_signal, get under torch's sync debug mode "error": none of them makes the
    host wait for the device (torch raises on any synchronising call inside)."""
    _dev(comm)
    me, size = comm.rank, comm.size
    buf = torch.zeros(2 * size, device="cuda")
    src = torch.full((2,), float(me + 1), device="cuda")
    got = torch.zeros(2, device="cuda")
    win = comm.window(buf, signals=2)
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p in range(size):
            win.put(src, p, offset=2 * me, signal=0)
        win.wait_signal(0, size)
        win.get(got, (me + 1) % size, offset=2 * me)
        win.signal((me + 1) % size, 1)
        win.wait_signal(1, 1)
    finally:
        torch.cuda.set_sync_debug_mode(old)
    win.synchronize()
    ok = buf.tolist() == [float(q + 1) for q in range(size) for _ in range(2)] and got.tolist() == [me + 1.0] * 2
    comm.barrier()
    win.close()
    return [] if ok else [f"window {buf.tolist()}, got {got.tolist()}"]


def rank_bad_input(comm):
    """Each bad call raises InvalidArgument and leaves the peer's window untouched."""
    _dev(comm)
    me, size = comm.rank, comm.size
    peer = (me + 1) % size
    buf = torch.full((8,), 5, dtype=torch.int32, device="cuda")
    errors = []
    win = comm.window(buf, signals=2)
    calls = [
        ("outside", lambda: win.put(torch.ones(2, dtype=torch.int32, device="cuda"), peer, offset=7)),
        ("outside", lambda: win.get(torch.ones(9, dtype=torch.int32, device="cuda"), peer)),
        ("outside", lambda: win.put(torch.ones(1, dtype=torch.int32, device="cuda"), peer, offset=-1)),
        ("dtype", lambda: win.put(torch.ones(2, dtype=torch.float32, device="cuda"), peer)),
        ("host memory", lambda: win.put(torch.ones(2, dtype=torch.int32), peer)),
        ("host memory", lambda: win.get(np.ones(2, np.int32), peer)),
        ("slot", lambda: win.put(torch.ones(2, dtype=torch.int32, device="cuda"), peer, signal=2)),
        ("slot", lambda: win.signal(peer, -1)),
        ("peer", lambda: win.put(torch.ones(2, dtype=torch.int32, device="cuda"), size)),
        ("value", lambda: win.wait_signal(0, -3)),
        ("timeout", lambda: win.wait_signal(0, 1, timeout=0)),
    ]
    for what, call in calls:
        try:
            call()
            errors.append(f"{what}: no error")
        except InvalidArgument:
            pass
    win.synchronize()
    comm.barrier()
    if not torch.equal(buf.cpu(), torch.full((8,), 5, dtype=torch.int32)):
        errors.append(f"bytes moved: {buf.cpu().tolist()}")
    win.close()
    for what, call in (("closed put", calls[0][1]), ("closed wait", lambda: win.wait_signal(0, 1))):
        try:
            call()
            errors.append(f"{what}: no error")
        except InvalidArgument as e:
            if "closed" not in str(e):
                errors.append(f"{what}: {e}")
    return errors


def rank_wait_times_out(comm, wait="kernel"):
    """Rank 0's stream waits on a slot nobody signals, 1 s: synchronize raises Timeout, then close."""
    _dev(comm)
    old = _wait_mode(wait)
    win = comm.window(torch.zeros(4, device="cuda"), signals=2)
    _wait_mode(old)
    out = None
    if comm.rank == 0:
        t = time.monotonic()
        win.wait_signal(1, 1, timeout=1.0)
        try:
            win.synchronize(timeout=30)
            out = "no error"
        except Timeout as e:
            out = (time.monotonic() - t, str(e))
    comm.barrier()
    win.close()
    return out


def rank_moe_exchange(comm, puts, layers, wait="kernel"):
    """examples/moe_cuda_window.py's exchange on this group's windows: per layer, per-expert counts
    (random, so some destinations get 0 rows), the dispatch of rows tagged with (source, layer,
    row), the combine sending each row back doubled. Every row must arrive where all_to_all would
    put it and come back in place, and queuing all of it must synchronise with the device 0 times
    (SyncCount: torch's sync debug mode and the cupy runtime's synchronising calls)."""
    import contextlib
    import types
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    from moe_cuda_window import CudaWindowExchange
    dev = torch.device("cuda", _dev(comm))
    me, world, per, cap, d = comm.rank, comm.size, 2, 6, 3
    rt = types.SimpleNamespace(world=world, rank=me, device=dev)
    old = _wait_mode(wait)
    try:
        ex = CudaWindowExchange(rt, lambda kind: contextlib.nullcontext(), cap, d, per, puts,
                                window=lambda b, signals: comm.window(b, signals=signals))
    finally:
        _wait_mode(old)
    bad = []

    def plan(src, layer):
        g = torch.Generator().manual_seed(1000 * layer + src)
        counts = torch.randint(0, 4, (world * per,), generator=g)       # rows per (destination, expert)
        counts.view(world, per)[(src + layer) % world] = 0               # a destination that gets nothing
        m = int(counts.sum())
        rows = torch.arange(m * d, dtype=torch.float32).view(m, d) + 1e4 * src + 1e3 * layer
        return counts, rows

    try:
        for layer in range(layers):
            counts, rows = plan(me, layer)
            cs = counts.to(dev)
            if puts == "fused":                      # counts and rows in one kernel, one wait
                rc, gl = ex.dispatch([cs], [rows.to(dev)])
                recv, got = rc[0].clone(), gl[0]
                in_splits, out_splits = cs.view(world, per).sum(1), recv.sum(1)
            else:
                recv = ex.counts([cs])[0].clone()   # a view of the window: read before the combine
                in_splits, out_splits = cs.view(world, per).sum(1), recv.sum(1)
                got = ex.rows("dispatch", [rows.to(dev)], [in_splits], [out_splits], [world * cap])[0]
            back = ex.rows("combine", [got * 2], [out_splits], [in_splits], [rows.shape[0]])[0]
            want, want_counts = [], []
            for src in range(world):
                c, r = plan(src, layer)
                split = c.view(world, per).sum(1).tolist()
                want.append(r.split(split)[me])
                want_counts.append(c.view(world, per)[me])
            if not torch.equal(recv.cpu(), torch.stack(want_counts)):
                bad.append(f"{puts} layer {layer}: counts {recv.cpu().tolist()} != {torch.stack(want_counts).tolist()}")
            if not torch.equal(got.cpu(), torch.cat(want)):
                bad.append(f"{puts} layer {layer}: dispatch rows {got.cpu().tolist()} != {torch.cat(want).tolist()}")
            if not torch.equal(back.cpu(), rows * 2):
                bad.append(f"{puts} layer {layer}: combine {back.cpu().tolist()} != {(rows * 2).tolist()}")
        if ex.syncs:
            bad.append(f"{puts}: {ex.syncs} device syncs while queuing: {ex.watch.seen}")
        if len(ex.layer_us) != layers:
            bad.append(f"{puts}: {len(ex.layer_us)} layers timed of {layers}")
        torch.cuda.synchronize()
        comm.barrier()
    finally:
        ex.close()
    return bad, ex.host_summary()


# ---- tests ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[2, 3])
def group(groups, request):
    return groups(request.param, env={"PYCCL_TIMEOUT": "60", "PYCCL_TRANSPORT": "tcp"})


@pytest.mark.parametrize("puts,wait", [("kernel", "kernel"), ("fused", "kernel"), ("copies", "kernel"),
                                       ("fused", "stream")])
def test_moe_exchange_rows_in_place_and_no_sync(group, puts, wait):
    for bad, summary in group.run(rank_moe_exchange, puts, 6, wait, timeout=RUN_S):
        print(f"{group.size} ranks, {wait} waits: {summary}")
        assert not bad, bad


def test_every_dtype_both_ends_and_gets(group):
    for bad in group.run(rank_every_dtype, timeout=RUN_S):
        assert not bad, bad


def test_cupy_arrays(group):
    for bad in group.run(rank_cupy_window, timeout=RUN_S):
        assert not bad, bad


@pytest.mark.parametrize("wait", ["kernel", "stream"])
def test_many_puts_then_one_signal(group, wait):
    for bad in group.run(rank_many_puts_one_signal, 50, wait, timeout=RUN_S):
        assert not bad, bad


@pytest.mark.parametrize("n,wait", [(1, "kernel"), (4097, "kernel"), (1 << 20, "kernel"), (4097, "stream")])
def test_puts_from_every_peer_at_once(group, n, wait):
    for bad in group.run(rank_concurrent, n, 5, wait, timeout=RUN_S):
        assert not bad, bad


def test_calls_never_synchronise(group):
    for bad in group.run(rank_no_sync, timeout=RUN_S):
        assert not bad, bad


def test_bad_input_raises_before_anything_is_queued(group):
    for bad in group.run(rank_bad_input, timeout=RUN_S):
        assert not bad, bad


