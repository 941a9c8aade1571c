"""The CUDA window's host side (ccl/windows/cuda.py) on a machine without a GPU: a stand-in
`cupy` whose "device memory" is host memory, whose copies are memmove and whose kernel launches
run Python twins of the two kernels at once (ccl/windows/cuda_kernels.py). It checks the
Python paths (set-up, argument checks before anything is queued, the queued calls, the status
words a failed wait leaves and the errors raised from them, close) on one rank, and on 2 and 3
ranks as threads of this process that share the stand-in device (the peers' windows and cells
mapped, puts from every peer, many puts then one signal, gets, a ping-pong whose waits spin
until the other thread signals, a wait that times out); nothing here says anything about the
GPU (tests/test_cuda_window.py does, on the GPU machine).
"""
import contextlib
import ctypes
import itertools
import secrets
import sys
import types

import numpy as np
import pytest

import pyccl
from pyccl.errors import InvalidArgument, PeerFailure, Timeout


class FakeArray:
    """A "CUDA array": host memory behind __cuda_array_interface__."""

    def __init__(self, values):
        self.host = np.ascontiguousarray(values)
        self.device = types.SimpleNamespace(id=0)

    @property
    def __cuda_array_interface__(self):
        return {"typestr": self.host.dtype.str, "shape": self.host.shape, "strides": None,
                "data": (self.host.ctypes.data if self.host.size else 0, False), "version": 3}


class FakeCupy(types.ModuleType):
    """Just what pyccl's CUDA window calls, run on the host at once."""

    def __init__(self):
        super().__init__("cupy")
        self.__version__ = "sim"
        self.launches = []
        self.memory = {}
        self.fns = {}
        rt = types.SimpleNamespace(
            malloc=self._malloc, free=lambda p: self.memory.pop(p), memset=self._memset,
            deviceSynchronize=lambda: None, hostAlloc=lambda n, flags: self._malloc(n), freeHost=lambda p: None,
            memcpyAsync=self._copy, eventCreateWithFlags=lambda f: 1, eventRecord=lambda e, s: None,
            eventQuery=lambda e: 0, eventDestroy=lambda e: None, streamSynchronize=lambda s: None,
            ipcCloseMemHandle=lambda p: None)
        stream = types.SimpleNamespace(ptr=7)
        self.cuda = types.SimpleNamespace(
            runtime=rt, Device=lambda d: contextlib.nullcontext(), get_current_stream=lambda d=None: stream,
            driver=types.SimpleNamespace(launchKernel=self._launch))
        self.RawModule = self._module

    def _malloc(self, n):
        a = np.zeros(max(n, 8), np.uint8)
        self.memory[a.ctypes.data] = a
        return a.ctypes.data

    def _memset(self, p, v, n):
        ctypes.memset(p, v, n)

    def _copy(self, dst, src, n, kind, stream):
        self.launches.append(("copy", dst, src, n, stream))
        ctypes.memmove(dst, src, n)

    def _module(self, code, options):
        names = {}

        def get_function(name):
            ptr = names.setdefault(name, 1000 + len(self.fns))
            self.fns[ptr] = name
            return types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=ptr))
        return types.SimpleNamespace(get_function=get_function)

    def _launch(self, fn, gx, gy, gz, bx, by, bz, shmem, stream, params, extra):
        name = self.fns[fn]
        n = 2 if name == "win_signal" else 5
        ptrs = (ctypes.c_void_p * n).from_address(params)
        args = [ctypes.c_int64.from_address(ptrs[i]).value for i in range(n)]
        self.launches.append((name, *args))
        cell = ctypes.c_int64.from_address(args[0])
        if name == "win_signal":
            cell.value += args[1]
            return
        value, status = args[1], (ctypes.c_int64 * 8).from_address(args[2])
        if cell.value >= value:                  # the twin of win_wait, which cannot spin here
            cell.value -= value
        elif status[1] == 0:
            status[2], status[3], status[4], status[1] = args[4], value, cell.value, 2 if status[0] else 1


class FakeRegistry:
    def __init__(self):
        self.ids = itertools.count(1)
        self.opened = {}

    def export(self, ptr):
        return next(self.ids), 0


@pytest.fixture
def sim(monkeypatch):
    cupy = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    from pyccl.transports import cuda_ipc
    from pyccl.windows import cuda, cuda_kernels
    monkeypatch.setattr(cuda_ipc, "_launch", None)
    monkeypatch.setattr(cuda_kernels, "_MODULES", {})
    state = types.SimpleNamespace(cupy=cupy, rt=cupy.cuda.runtime, registry=FakeRegistry(), dev=0)
    monkeypatch.setattr(cuda, "engine_state", lambda comm, device, name: state)
    secret = secrets.token_bytes(32)
    from pyccl.store import StoreServer, TCPStore
    server = StoreServer("127.0.0.1", 0, secret)
    try:
        with pyccl.Communicator(0, 1, store=TCPStore(*server.address, secret, timeout=10), secret=secret,
                                timeout=10) as comm:
            yield comm, cupy
    finally:
        monkeypatch.setattr(cuda_ipc, "_launch", None)
        server.close()


def test_calls_are_queued_copies_and_kernels(sim, monkeypatch):
    from pyccl.windows import cuda
    monkeypatch.setattr(cuda, "WAIT", "kernel")
    comm, cupy = sim
    buf = FakeArray(np.zeros(6, np.int32))
    with comm.window(buf, signals=3) as win:
        assert type(win).__name__ == "CudaWindow" and win.transport(0) == "local"
        win.put(FakeArray(np.array([1, 2], np.int32)), 0, offset=4, signal=2)
        win.put(FakeArray(np.zeros(0, np.int32)), 0, offset=6, signal=2)      # 0 bytes at the very end
        win.signal(0, 1, value=5)
        win.wait_signal(2, 2)
        win.wait_signal(1, 5, timeout=3)
        got = FakeArray(np.zeros(3, np.int32))
        win.get(got, 0, offset=3)
        win.flush()
        win.synchronize()
        kinds = [entry[0] for entry in cupy.launches]
        assert kinds == ["copy", "win_signal", "win_signal", "win_signal", "win_wait", "win_wait", "copy"], kinds
        wait = cupy.launches[5]
        assert wait[2] == 5 and wait[4] == 3 * 10 ** 9 and wait[5] == 1, wait    # value, timeout ns, slot
        assert all(e[-1] == 7 for e in cupy.launches if e[0] == "copy")           # the caller's stream
        windows, cells = win.device_addresses()
        assert windows == (buf.host.ctypes.data,) and cells == (win.cells,)
    assert buf.host.tolist() == [0, 0, 0, 0, 1, 2] and got.host.tolist() == [0, 1, 2]
    assert win.status is None and win.cells == 0          # freed at close


def test_bad_input_queues_nothing(sim):
    comm, cupy = sim
    buf = FakeArray(np.full(4, 9, np.float32))
    with comm.window(buf, signals=2) as win:
        bad = [
            ("lie outside", lambda: win.put(FakeArray(np.ones(2, np.float32)), 0, offset=3)),
            ("lie outside", lambda: win.get(FakeArray(np.ones(5, np.float32)), 0)),
            ("has dtype", lambda: win.put(FakeArray(np.ones(1, np.float64)), 0)),
            ("host memory", lambda: win.put(np.ones(1, np.float32), 0)),
            ("not one of", lambda: win.put(FakeArray(np.ones(1, np.float32)), 0, signal=2)),
            ("not one of", lambda: win.wait_signal(5, 1)),
            ("not a rank", lambda: win.signal(1, 0)),
            ("expected an integer", lambda: win.signal(0, 0, value=-1)),
            ("positive number", lambda: win.wait_signal(0, 1, timeout=-1)),
        ]
        for match, call in bad:
            with pytest.raises(InvalidArgument, match=match):
                call()
        assert cupy.launches == [] and buf.host.tolist() == [9] * 4
    with pytest.raises(InvalidArgument, match="closed"):
        win.put(FakeArray(np.ones(1, np.float32)), 0)
    with pytest.raises(InvalidArgument, match="closed"):
        win.wait_signal(0, 1)
    with pytest.raises(InvalidArgument, match="positive number of slots"):
        comm.window(buf, signals=0)


def test_stream_waits_fall_back_to_the_spinning_kernel(sim, monkeypatch):
    """WAIT "stream" (the default) where the driver has no cuStreamWaitValue64: the window waits
    with win_wait, as with WAIT "kernel"."""
    from pyccl.windows import cuda, cuda_kernels
    monkeypatch.setattr(cuda, "WAIT", "stream")
    monkeypatch.setattr(cuda_kernels.StreamWaits, "__init__", lambda self: setattr(self, "ok", False))
    comm, cupy = sim
    with comm.window(FakeArray(np.zeros(2, np.int32)), signals=1) as win:
        win.put(FakeArray(np.ones(2, np.int32)), 0, signal=0)
        win.wait_signal(0, 1)
        win.synchronize()
        assert win.wait_mode == "kernel"
        assert [e[0] for e in cupy.launches] == ["copy", "win_signal", "win_wait"], cupy.launches


def test_a_wait_that_gives_up_raises_on_the_next_call(sim):
    comm, cupy = sim
    win = comm.window(FakeArray(np.zeros(2, np.int64)), signals=4)
    win.wait_signal(3, 1, timeout=0.5)          # nobody signals: the twin writes "timed out"
    with pytest.raises(Timeout, match="signal slot 3 to reach 1"):
        win.synchronize()
    with pytest.raises(Timeout):
        win.put(FakeArray(np.zeros(1, np.int64)), 0)
    win.close()                                 # already reported: close does not raise it again
    assert win.closed

    win = comm.window(FakeArray(np.zeros(2, np.int64)), signals=4)
    win.gone[1] = "its process 4242 exited"     # what the watcher notes before it sets the abort word
    win.status.abort()
    win.wait_signal(2, 1)
    with pytest.raises(PeerFailure, match="signal slot 2 to reach 1 .*rank 1 is gone: its process 4242 exited"):
        win.synchronize()
    win.close()


def test_host_window_unchanged_and_synchronize(sim):
    comm, _ = sim
    buf = np.zeros(2)
    with comm.window(buf) as win:
        assert type(win).__name__ == "Window"
        win.put(np.ones(1), 0, offset=1, signal=0)
        win.synchronize()
        win.wait_signal(0, 1)
    assert buf.tolist() == [0.0, 1.0]


# ---- several ranks: threads of this process, one stand-in device they all see -------------------
class SharedRegistry:
    """An "IPC registry" where a peer's allocation is the same address (one process)."""
    bases = {}
    ids = itertools.count(1)

    def __init__(self):
        self.opened = {}

    def export(self, ptr):
        bufid = next(self.ids)
        self.bases[bufid] = ptr
        return bufid, 0

    def peer_ptr(self, peer, bufid, offset):
        return self.bases[bufid] + offset


class ThreadedCupy(FakeCupy):
    """Kernels run in the caller's thread, so a wait spins until another rank's thread signals
    (or the abort word / its timeout ends it), as the one-thread kernel does on the GPU."""

    def __init__(self):
        super().__init__()
        import threading
        self.cell_lock = threading.Lock()

    def _copy(self, dst, src, n, kind, stream):
        ctypes.memmove(dst, src, n)

    def _launch(self, fn, gx, gy, gz, bx, by, bz, shmem, stream, params, extra):
        self._kernel(*self._args(fn, params))

    def _args(self, fn, params):
        """(kernel name, its integer arguments), read from the launch's parameter block."""
        name = self.fns[fn]
        n = 2 if name == "win_signal" else 5
        ptrs = (ctypes.c_void_p * n).from_address(params)
        return name, [ctypes.c_int64.from_address(ptrs[i]).value for i in range(n)]

    def _kernel(self, name, args):
        """win_signal's and win_wait's twins."""
        import time
        cell = ctypes.c_int64.from_address(args[0])
        if name == "win_signal":
            with self.cell_lock:
                cell.value += args[1]
            return
        value, status, deadline = args[1], (ctypes.c_int64 * 8).from_address(args[2]), time.monotonic() + args[3] / 1e9
        while True:
            with self.cell_lock:
                if cell.value >= value:
                    cell.value -= value
                    return
            if status[0] or time.monotonic() > deadline:
                if status[1] == 0:
                    status[2], status[3], status[4], status[1] = args[4], value, cell.value, 2 if status[0] else 1
                return
            time.sleep(1e-4)


def _threads(size, fn, monkeypatch, cupy=None, patch=None):
    """fn(comm) on `size` communicators, one thread each, over a stand-in cupy (default
    ThreadedCupy; `patch(cuda, cuda_kernels)` sets more); returns their results (raises theirs)."""
    import threading
    cupy = cupy or ThreadedCupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setenv("PYCCL_TRANSPORT", "tcp")
    from pyccl.transports import cuda_ipc
    from pyccl.windows import cuda, cuda_kernels
    monkeypatch.setattr(cuda_ipc, "_launch", None)
    monkeypatch.setattr(cuda_kernels, "_MODULES", {})
    if patch is not None:
        patch(cuda, cuda_kernels)
    states = {r: types.SimpleNamespace(cupy=cupy, rt=cupy.cuda.runtime, registry=SharedRegistry(), dev=0)
              for r in range(size)}
    monkeypatch.setattr(cuda, "engine_state", lambda comm, device, name: states[comm.rank])
    from pyccl.store import StoreServer, TCPStore
    secret = secrets.token_bytes(32)
    server = StoreServer("127.0.0.1", 0, secret)
    out, errors = {}, {}

    def rank(r):
        try:
            with pyccl.Communicator(r, size, store=TCPStore(*server.address, secret, timeout=30), secret=secret,
                                    timeout=30) as comm:
                out[r] = fn(comm)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors[r] = e
    try:
        ts = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(size)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
    finally:
        server.close()
        monkeypatch.setattr(cuda_ipc, "_launch", None)
    if errors:
        raise next(iter(errors.values()))
    return [out.get(r) for r in range(size)]


def rank_puts_signals_gets(comm):
    """Rank r's window: 4 * size + 1 + r int32; block q written by rank q (signal 0), the last
    element by rank r - 1, a 0-byte put at the end (signal 1); 20 one-element puts into a second
    window then one signal of value 2; gets of the peer's block, its last element, 0 bytes."""
    me, size = comm.rank, comm.size
    buf = FakeArray(np.zeros(4 * size + 1 + me, np.int32))
    bad = []
    with comm.window(buf) as win:
        for p in range(size):
            end = 4 * size + 1 + p
            win.put(FakeArray(np.arange(4, dtype=np.int32) + 10 * me + p), p, offset=4 * me, signal=0)
            if (me + 1) % size == p:
                win.put(FakeArray(np.array([77 + me], np.int32)), p, offset=end - 1)
            win.put(FakeArray(np.zeros(0, np.int32)), p, offset=end, signal=1)
        win.wait_signal(0, size)
        win.wait_signal(1, size)
        win.synchronize()
        want = np.concatenate([np.arange(4, dtype=np.int32) + 10 * q + me for q in range(size)] +
                              [np.zeros(me, np.int32), np.array([77 + (me - 1) % size], np.int32)])
        if buf.host.tolist() != want.tolist():
            bad.append(f"window {buf.host.tolist()} != {want.tolist()}")
        comm.barrier()
        peer = (me + 1) % size
        got, tail = FakeArray(np.zeros(4, np.int32)), FakeArray(np.zeros(1, np.int32))
        win.get(got, peer, offset=4 * me)
        win.get(tail, peer, offset=4 * size + peer)
        win.get(FakeArray(np.zeros(0, np.int32)), peer, offset=4 * size + 1 + peer)
        if got.host.tolist() != (np.arange(4) + 10 * me + peer).tolist() or tail.host[0] != 77 + me:
            bad.append(f"get from rank {peer}: {got.host.tolist()} {tail.host.tolist()}")
        comm.barrier()
    many = FakeArray(np.full(size * 20, -1, np.int64))
    with comm.window(many, signals=4) as win:
        for i in range(20):
            for p in range(size):
                if p != me:
                    win.put(FakeArray(np.array([me * 1000 + i], np.int64)), p, offset=me * 20 + i)
        for p in range(size):
            if p != me:
                win.signal(p, 3, value=2)
        win.wait_signal(3, 2 * (size - 1))
        want = [q * 1000 + i if q != me else -1 for q in range(size) for i in range(20)]
        if many.host.tolist() != want:
            bad.append(f"many puts: {many.host.tolist()}")
        comm.barrier()
    return bad


@pytest.mark.parametrize("size", [2, 3])
def test_several_ranks_put_signal_wait_get(monkeypatch, size):
    for bad in _threads(size, rank_puts_signals_gets, monkeypatch):
        assert bad == []


def rank_ping_pong_and_timeout(comm):
    """A ping-pong of put+signal / wait_signal between ranks 0 and 1 (each wait spins until the
    other's signal), then rank 0 waits on a slot nobody signals: Timeout from synchronize."""
    me, other = comm.rank, 1 - comm.rank
    buf = FakeArray(np.zeros(1, np.float64))
    with comm.window(buf, signals=2) as win:
        for i in range(50):
            if me == 0:
                win.put(FakeArray(np.array([float(i)])), other, signal=0)
                win.wait_signal(0, 1)
            else:
                win.wait_signal(0, 1)
                win.put(FakeArray(np.array([float(i) + 0.5])), other, signal=0)
        last = buf.host[0]
        result = None
        if me == 0:
            win.wait_signal(1, 1, timeout=0.3)
            try:
                win.synchronize()
            except Timeout as e:
                result = str(e)
        comm.barrier()
    return last, result


def test_ping_pong_and_a_wait_that_times_out(monkeypatch):
    (last0, msg), (last1, _) = _threads(2, rank_ping_pong_and_timeout, monkeypatch)
    assert last0 == 49.5 and last1 == 49.0
    assert msg is not None and "signal slot 1 to reach 1" in msg, msg
