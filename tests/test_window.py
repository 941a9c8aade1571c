"""One-sided windows (ccl/windows/) on 2 and 3 real processes: over shared memory (cross-memory
attach), over the TCP emulation (PYCCL_TRANSPORT=tcp) and between ranks posing as two hosts.
Every dtype, offsets at both ends of windows of different sizes, 0-byte puts, many puts then
one signal, puts from every peer at once, large puts and gets, bad input, a peer that dies
while another waits."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pyccl
from pyccl.dtypes import DTYPES, NAMES
from pyccl.errors import InvalidArgument

pytestmark = pytest.mark.timeout(240)

#: name -> (ranks, RankGroup settings, the link expected between two different ranks)
SETUPS = {
    "shm": (3, {}, "cma"),
    "tcp": (3, {"env": {"PYCCL_TRANSPORT": "tcp"}}, "tcp"),
    "hosts": (2, {"ranks_per_host": 1}, "tcp"),
    "no-cma": (2, {"env": {"PYCCL_WINDOW_CMA": "0"}}, "tcp"),
}


def values(src, dst, n, dtype):
    x = (np.arange(n, dtype=np.int64) * 7 + src * 13 + dst * 3 + 1) % 50
    return x.astype(np.float64).astype(DTYPES[dtype])


def same(a, b):
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()


# ---- rank-side checks: each returns a list of failure strings -------------------------------------
def rank_every_dtype(comm, expect):
    """Rank r's window holds 4 * size + 1 + r elements: block q (4 elements) is written by rank q,
    the last element by rank (r + 1) % size; a 0-byte put at the exact end carries slot 1."""
    bad = []
    me, size = comm.rank, comm.size
    kinds = set()
    for dtype in NAMES:
        buf = np.zeros(4 * size + 1 + me, DTYPES[dtype])
        with comm.window(buf) as win:
            kinds |= {win.transport(p) for p in range(size) if p != me}
            for p in range(size):
                end = 4 * size + 1 + p
                win.put(values(me, p, 4, dtype), p, offset=4 * me, signal=0)
                if (me + 1) % size == p:
                    win.put(values(me, p, 1, dtype), p, offset=end - 1)
                win.put(np.zeros(0, DTYPES[dtype]), p, offset=end, signal=1)
            win.wait_signal(0, size)
            win.wait_signal(1, size)
            want = np.zeros_like(buf)
            for q in range(size):
                want[4 * q:4 * q + 4] = values(q, me, 4, dtype)
            want[-1] = values((me - 1) % size, me, 1, dtype)[0]
            if not same(buf, want):
                bad.append(f"{dtype}: window {buf} != {want}")
            comm.barrier()                        # every window final before anyone reads it
            peer = (me + 1) % size
            got = np.zeros(4 * size + 1 + peer, DTYPES[dtype])
            win.get(got, peer)
            tail = np.zeros(1, DTYPES[dtype])
            win.get(tail, peer, offset=got.size - 1)
            win.get(np.zeros(0, DTYPES[dtype]), peer, offset=got.size)
            if not same(got[4 * me:4 * me + 4], values(me, peer, 4, dtype)) or not same(tail, got[-1:]):
                bad.append(f"{dtype}: get from rank {peer} gave {got}")
            comm.barrier()                        # nobody reads a window another closes
    if expect is not None and kinds != {expect}:
        bad.append(f"links {kinds}, expected {expect}")
    return bad


def rank_many_puts_one_signal(comm, k):
    """k single-element puts to every peer, then one signal each: the signal lands after them."""
    me, size = comm.rank, comm.size
    buf = np.full(size * k, -1, np.int64)
    with comm.window(buf, signals=4) as win:
        for i in range(k):
            for p in range(size):
                if p != me:
                    win.put(np.array([me * 1000 + i], np.int64), p, offset=me * k + i)
        for p in range(size):
            if p != me:
                win.signal(p, 3, value=2)
        win.wait_signal(3, 2 * (size - 1))
        want = np.array([q * 1000 + i if q != me else -1 for q in range(size) for i in range(k)], np.int64)
        ok = np.array_equal(buf, want)
        comm.barrier()
    return [] if ok else [f"window {buf} != {want}"]


def rank_large(comm, n):
    """Every rank puts n float32 into every peer at once (signalled), then gets a peer's whole window."""
    me, size = comm.rank, comm.size
    buf = np.zeros(n * size, np.float32)
    with comm.window(buf) as win:
        for d in range(1, size):
            p = (me + d) % size
            win.put(np.full(n, me + 1, np.float32) + np.arange(n, dtype=np.float32), p, offset=me * n, signal=2)
        win.flush()
        win.wait_signal(2, size - 1)
        bad = [f"block of rank {q} wrong" for q in range(size) if q != me and
               not np.array_equal(buf[q * n:(q + 1) * n], np.arange(n, dtype=np.float32) + q + 1)]
        comm.barrier()
        got = np.zeros(n * size, np.float32)
        win.get(got, (me + 1) % size)
        if not np.array_equal(got[me * n:(me + 1) * n], np.arange(n, dtype=np.float32) + me + 1):
            bad.append("get of a large window wrong")
        comm.barrier()
    return bad


def rank_torch_tensors(comm):
    import torch
    me, size = comm.rank, comm.size
    t = torch.zeros(size + 1, dtype=torch.bfloat16)
    with comm.window(t) as win:
        for p in range(size):
            win.put(torch.tensor([me + 1.5], dtype=torch.bfloat16), p, offset=me, signal=0)
        win.wait_signal(0, size)
        ok = t[:size].tolist() == [q + 1.5 for q in range(size)] and t[size].item() == 0
        comm.barrier()
    return [] if ok else [f"tensor {t}"]


def rank_bad_input(comm):
    """Every bad call raises InvalidArgument and moves no byte; the window stays usable."""
    me, size = comm.rank, comm.size
    buf = np.zeros(5 + me, np.float32)
    msgs = {}
    win = comm.window(buf, signals=2)
    peer = (me + 1) % size
    n = 5 + peer
    ones = np.ones(n, np.float32)
    cases = {
        "past the end": lambda: win.put(ones, peer, offset=1, signal=0),
        "negative offset": lambda: win.put(ones[:1], peer, offset=-1),
        "dtype": lambda: win.put(np.ones(1, np.float64), peer),
        "get past the end": lambda: win.get(np.zeros(n + 1, np.float32), peer),
        "slot": lambda: win.put(ones[:1], peer, signal=2),
        "peer": lambda: win.signal(size, 0),
        "value": lambda: win.signal(peer, 0, value=-1),
        "read-only dst": lambda: win.get(np.broadcast_to(np.float32(0), (1,)), peer),
        "wait slot": lambda: win.wait_signal(5, 1),
    }
    for name, fn in cases.items():
        try:
            fn()
            msgs[name] = "no error"
        except InvalidArgument as e:
            msgs[name] = str(e)
    comm.barrier()
    untouched = not buf.any() and win.board.value(0) == 0
    comm.barrier()                            # everybody looked before the next put lands
    win.put(np.ones(1, np.float32), peer, offset=n - 1, signal=1)      # still usable
    win.wait_signal(1, 1)
    win.close()
    try:
        win.put(np.ones(1, np.float32), peer)
        msgs["closed"] = "no error"
    except InvalidArgument as e:
        msgs["closed"] = str(e)
    return untouched, float(buf[-1]), msgs


def rank_two_windows_split_and_resources(comm):
    """Two windows open at once (one on a split communicator), then every fd, thread and
    /dev/shm file they took is given back (measured on the second of two rounds: the first
    opens the communicator's lazy connections)."""
    import threading
    me = comm.rank
    for _ in range(2):
        before = (len(os.listdir("/proc/self/fd")), threading.active_count())
        sub = comm.split(me % 2)
        a, b = np.zeros(comm.size, np.int32), np.zeros(sub.size, np.float64)
        with comm.window(a) as wa, sub.window(b) as wb:
            for p in range(comm.size):
                wa.put(np.array([me + 1], np.int32), p, offset=me, signal=0)
            for p in range(sub.size):
                wb.put(np.array([me + 0.5]), p, offset=sub.rank, signal=5)
            wa.wait_signal(0, comm.size)
            wb.wait_signal(5, sub.size)
            ok = a.tolist() == list(range(1, comm.size + 1)) and \
                b.tolist() == [r + 0.5 for r in range(comm.size) if r % 2 == me % 2]
            comm.barrier()
        sub.close()
        comm.barrier()
        after = (len(os.listdir("/proc/self/fd")), threading.active_count())
    return [] if ok and after == before else [f"a {a} b {b}; fds/threads before {before} after {after}"]


# ---- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("setup", list(SETUPS))
def test_every_dtype_both_ends(groups, setup):
    size, kwargs, link = SETUPS[setup]
    for bad in groups(size, **kwargs).run(rank_every_dtype, link):
        assert bad == []


@pytest.mark.parametrize("setup", ["shm", "tcp"])
def test_many_puts_then_one_signal(groups, setup):
    size, kwargs, _ = SETUPS[setup]
    for bad in groups(size, **kwargs).run(rank_many_puts_one_signal, 200):
        assert bad == []


@pytest.mark.parametrize("setup", ["shm", "tcp"])
def test_large_puts_from_every_peer_at_once(groups, setup):
    size, kwargs, _ = SETUPS[setup]
    for bad in groups(size, **kwargs).run(rank_large, 600_001):
        assert bad == []


@pytest.mark.parametrize("setup", ["shm", "tcp"])
def test_two_windows_at_once_on_a_split_and_nothing_left(groups, setup):
    size, kwargs, _ = SETUPS[setup]
    shm_before = sorted(f for f in os.listdir("/dev/shm") if f.startswith("pyccl-win"))
    for bad in groups(size, **kwargs).run(rank_two_windows_split_and_resources):
        assert bad == []
    assert sorted(f for f in os.listdir("/dev/shm") if f.startswith("pyccl-win")) == shm_before


def test_torch_cpu_tensors(groups):
    pytest.importorskip("torch")
    for bad in groups(3).run(rank_torch_tensors):
        assert bad == []


@pytest.mark.parametrize("setup", ["shm", "tcp"])
def test_bad_input_raises_before_any_byte_moves(groups, setup):
    size, kwargs, _ = SETUPS[setup]
    for rank, (untouched, last, msgs) in enumerate(groups(size, **kwargs).run(rank_bad_input)):
        assert untouched and last == 1.0, msgs
        peer = (rank + 1) % size
        assert f"elements [1, 1 + {5 + peer}) lie outside rank {peer}'s window of {5 + peer}" in msgs["past the end"]
        assert "lie outside" in msgs["negative offset"] and "lie outside" in msgs["get past the end"]
        assert f"rank {peer}'s window holds float32" in msgs["dtype"]
        assert "slot 2 is not one of 0..1" in msgs["slot"] and "slot 5" in msgs["wait slot"]
        assert f"peer {size} is not a rank" in msgs["peer"] and "value=-1" in msgs["value"]
        assert "read-only" in msgs["read-only dst"] and "closed" in msgs["closed"]


def test_one_rank_window_and_its_checks():
    import secrets
    from pyccl.store import StoreServer, TCPStore
    secret = secrets.token_bytes(32)
    server = StoreServer("127.0.0.1", 0, secret)
    try:
        with pyccl.Communicator(0, 1, store=TCPStore(*server.address, secret, timeout=10), secret=secret,
                                timeout=10) as comm:
            with pytest.raises(InvalidArgument, match="positive number of slots"):
                comm.window(np.zeros(1), signals=0)
            with pytest.raises(InvalidArgument, match="read-only"):
                comm.window(np.broadcast_to(np.float32(0), (1,)))
            buf = np.zeros(3)
            with comm.window(buf) as win:
                win.put(np.array([1.0, 2.0]), 0, offset=1, signal=0)
                win.wait_signal(0, 1, timeout=1)
                with pytest.raises(pyccl.Timeout, match="slot 0 to reach 1; it holds 0"):
                    win.wait_signal(0, 1, timeout=0.2)
            assert buf.tolist() == [0.0, 1.0, 2.0]
            with comm.window(np.zeros(0, np.int8), signals=1) as empty:   # a 0-element window
                empty.put(np.zeros(0, np.int8), 0, signal=0)
                empty.get(np.zeros(0, np.int8), 0)
                empty.wait_signal(0, 1, timeout=1)
                with pytest.raises(InvalidArgument, match="lie outside"):
                    empty.put(np.zeros(1, np.int8), 0)
    finally:
        server.close()


@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_dead_peer_fails_the_wait(tmp_path, transport):
    """Rank 1 dies while rank 0 waits on a signal: PeerFailure well within the timeout, naming both."""
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent("""
        import os, signal, time, numpy as np, pyccl
        comm = pyccl.init()
        win = comm.window(np.zeros(4, np.int64))
        win.put(np.ones(1, np.int64), 1 - comm.rank, signal=3)
        win.wait_signal(3, 1)
        comm.barrier()
        if comm.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        t = time.monotonic()
        try:
            win.wait_signal(3, 1, timeout=15)
        except pyccl.PeerFailure as e:
            os.write(1, f"FAILED-AS-EXPECTED after {time.monotonic() - t:.1f}s: {e}\\n".encode())
    """))
    r = subprocess.run([sys.executable, "-m", "pyccl.launch", "-n", "2", "--grace", "20", str(prog)],
                       capture_output=True, text=True, timeout=100,
                       env={**os.environ, "PYCCL_TIMEOUT": "20", "PYCCL_TRANSPORT": transport})
    lines = [line for line in r.stdout.splitlines() if "FAILED-AS-EXPECTED" in line]
    assert len(lines) == 1, r.stdout + r.stderr
    took = float(lines[0].split("after ")[1].split("s:")[0])
    assert took < 5, lines[0]
    assert "signal slot 3" in lines[0] and "rank 1 is gone" in lines[0], lines[0]


def rank_torch_backend_window(ctx):
    import torch
    import pyccl.torch_backend as tb
    t = torch.zeros(ctx.size * 2, dtype=torch.int32)
    with tb.window(t) as win:
        for p in range(ctx.size):
            win.put(torch.full((2,), ctx.rank + 7, dtype=torch.int32), p, offset=2 * ctx.rank, signal=1)
        win.wait_signal(1, ctx.size)
        ok = t.tolist() == [q + 7 for q in range(ctx.size) for _ in range(2)]
        ctx.pyccl.barrier()
    try:
        tb.window(t, group=ctx.gloo)
        wrong = "no error"
    except InvalidArgument as e:
        wrong = str(e)
    return [] if ok and "backend \"pyccl\"" in wrong else [f"tensor {t}, gloo group: {wrong}"]


def test_torch_backend_window():
    pytest.importorskip("torch")
    from torch_ranks import TorchRanks
    ranks = TorchRanks(2, "tcp")
    try:
        for bad in ranks.run(rank_torch_backend_window):
            assert bad == []
    finally:
        ranks.close()
