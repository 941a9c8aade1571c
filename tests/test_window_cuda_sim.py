"""The CUDA window's host side (ccl/windows/cuda.py) on a machine without a GPU: a stand-in
`cupy` whose "device memory" is host memory, whose copies are memmove and whose kernel launches
run Python twins of the two kernels at once (ccl/windows/cuda_kernels.py). It checks the
Python paths (set-up, argument checks before anything is queued, the queued calls, the status
words a failed wait leaves and the errors raised from them, close) on one rank; nothing here
says anything about the GPU (tests/test_cuda_window.py does, on the GPU machine).
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


def test_calls_are_queued_copies_and_kernels(sim):
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
