"""The CUDA window's stream semantics on a machine without a GPU: a stand-in cupy whose streams
are worker threads. Every queued operation (a copy, a memset, a kernel, a stream wait on a
cell, an event record) runs later, in order, in its stream's thread; the host only queues, and
``eventQuery`` / ``streamSynchronize`` see how far a stream got. So what the host side of
ccl/windows/cuda.py promises can be checked here for both wait modes (``WAIT = "kernel"``: a
spinning one-thread kernel bounded by its timeout and the abort word; ``"stream"``:
``cuStreamWaitValue64``, ended by the watcher thread when it gives a wait up): the calls return
before the work is done, it lands in stream order, waits hold their stream until the peers
signal, a wait past its timeout and a dead peer raise (``Timeout`` / ``PeerFailure`` naming
the slot) from ``synchronize`` and the next call, close ends whatever is still queued. Ranks are
threads of this process sharing the stand-in device (tests/test_window_cuda_sim.py has the
synchronous stand-in). Nothing here says anything about a GPU (tests/test_cuda_window.py does).
"""
import ctypes
import itertools
import queue
import threading
import time
import types

import numpy as np
import pytest

from pyccl.errors import PeerFailure, Timeout
from test_window_cuda_sim import FakeArray, ThreadedCupy, _threads as sim_threads

KEEP = []                      # every array a queued copy may still read (the caching allocator's job on a GPU)


def arr(values):
    a = FakeArray(values)
    KEEP.append(a)
    return a


class Stream:
    """One stand-in CUDA stream: a thread running queued operations in order."""

    def __init__(self, ptr):
        self.ptr, self.q, self.done = ptr, queue.Queue(), threading.Condition()
        self.queued = self.ran = 0
        threading.Thread(target=self._run, daemon=True, name=f"stream-{ptr}").start()

    def put(self, op):
        with self.done:
            self.queued += 1
        self.q.put(op)

    def _run(self):
        while True:
            op = self.q.get()
            op()
            with self.done:
                self.ran += 1
                self.done.notify_all()

    def synchronize(self):
        with self.done:
            want = self.queued
            self.done.wait_for(lambda: self.ran >= want)


class AsyncCupy(ThreadedCupy):
    """Streams are threads (see the module docstring); each host thread has its own current stream."""

    def __init__(self):
        super().__init__()
        self.streams, self.local, self.events = {}, threading.local(), {}
        self.ids = itertools.count(100)
        rt = self.cuda.runtime
        rt.memcpyAsync = self._copy
        rt.memsetAsync = lambda p, v, n, s: self._stream(s).put(lambda: ctypes.memset(p, v, n))
        rt.streamCreateWithFlags = lambda flags: self._new_stream().ptr
        rt.streamDestroy = lambda s: None
        rt.streamSynchronize = lambda s: self._stream(s).synchronize()
        rt.deviceSynchronize = lambda: [s.synchronize() for s in list(self.streams.values())]
        rt.eventCreateWithFlags = self._event_create
        rt.eventRecord = self._event_record
        rt.eventQuery = lambda e: 0 if self.events[e] else 600          # cudaErrorNotReady
        rt.eventDestroy = lambda e: self.events.pop(e)
        self.cuda.get_current_stream = self._current

    def _new_stream(self):
        s = Stream(next(self.ids))
        self.streams[s.ptr] = s
        return s

    def _current(self, device=None):
        s = getattr(self.local, "stream", None)
        if s is None:
            s = self.local.stream = self._new_stream()
        return s

    def _stream(self, ptr):
        return self.streams[ptr]

    def _event_create(self, flags):
        e = next(self.ids)
        self.events[e] = True                  # never recorded: complete, as in CUDA
        return e

    def _event_record(self, e, s):
        self.events[e] = False

        def mark():
            self.events[e] = True
        self._stream(s).put(mark)

    def _copy(self, dst, src, n, kind, stream):
        self._stream(stream).put(lambda: ctypes.memmove(dst, src, n))

    def _launch(self, fn, gx, gy, gz, bx, by, bz, shmem, stream, params, extra):
        name, args = self._args(fn, params)          # copied at launch, as the driver does
        self._stream(stream).put(lambda: self._kernel(name, args))     # run in the stream's thread


class StreamWaits:
    """cuStreamWaitValue64 (GEQ) on the stand-in: the stream's thread waits for the cell."""
    ok = True

    def __init__(self, cupy):
        self.cupy = cupy

    def works(self, stream, address):
        return True

    def wait(self, stream, address, value):
        cell = ctypes.c_int64.from_address(address)

        def op():
            while ((cell.value - value) & (2 ** 64 - 1)) >= 2 ** 63:      # (int64)(*addr - value) < 0
                time.sleep(1e-4)
        self.cupy._stream(stream).put(op)


def _threads(size, fn, monkeypatch, wait, cupy=None):
    """fn(comm) on `size` communicators, one thread each, windows of wait mode `wait`."""
    cupy = cupy or AsyncCupy()

    def patch(cuda, cuda_kernels):
        monkeypatch.setattr(cuda_kernels, "StreamWaits", lambda: StreamWaits(cupy))
        monkeypatch.setattr(cuda, "WAIT", wait)
    return sim_threads(size, fn, monkeypatch, cupy, patch)


def rank_queued_not_waited(comm):
    """The calls return before the work is done: rank 0's stream waits for a signal that rank 1
    sends 0.3 s later, and the put queued behind that wait lands only after it; then many puts
    and one signal, and puts from every peer at once, in stream order."""
    me, size = comm.rank, comm.size
    buf = arr(np.zeros(4 * size, np.float64))
    bad = []
    with comm.window(buf, signals=4) as win:
        comm.barrier()
        if me == 0:
            t = time.monotonic()
            win.wait_signal(2, 1)                                  # held until rank 1 signals
            win.put(arr(np.array([5.0])), 1, offset=0, signal=3)   # queued behind the wait
            queued = time.monotonic() - t
            if queued > 0.1:
                bad.append(f"wait_signal + put took {queued:.3f} s on the host")
        elif me == 1:
            time.sleep(0.3)
            if buf.host[0] != 0.0:
                bad.append("rank 0's put landed before the wait it was queued behind had passed")
            win.signal(0, 2)
            win.wait_signal(3, 1)
            win.synchronize()
            if buf.host[0] != 5.0:
                bad.append(f"rank 1 window {buf.host.tolist()}")
        win.synchronize()
        comm.barrier()
        for i in range(30):                                       # many puts, then one signal
            for p in range(size):
                if p != me:
                    win.put(arr(np.array([me * 100.0 + i])), p, offset=me * 4 + i % 4)
        for p in range(size):
            if p != me:
                win.signal(p, 1, value=3)
        win.wait_signal(1, 3 * (size - 1))
        win.synchronize()
        last = [28, 29, 26, 27]                                  # the last i of 0..29 with i % 4 == j
        want = [q * 100.0 + last[j] if q != me else 0.0 for q in range(size) for j in range(4)]
        if buf.host.tolist() != want:
            bad.append(f"after many puts {buf.host.tolist()} != {want}")
        comm.barrier()
    return bad


@pytest.mark.parametrize("wait", ["kernel", "stream"])
@pytest.mark.parametrize("size", [2, 3])
def test_calls_queue_and_land_in_stream_order(monkeypatch, size, wait):
    for bad in _threads(size, rank_queued_not_waited, monkeypatch, wait):
        assert bad == []


def rank_ping_pong_then_timeout(comm):
    """50 round trips queued at once on each side (the host never waits), then rank 0 waits on
    a slot nobody signals: Timeout from synchronize and from the window's next call; close."""
    me, other = comm.rank, 1 - comm.rank
    buf = arr(np.zeros(1, np.float64))
    with comm.window(buf, signals=2) as win:
        t = time.monotonic()
        for i in range(50):
            if me == 0:
                win.put(arr(np.array([float(i)])), other, signal=0)
                win.wait_signal(0, 1)
            else:
                win.wait_signal(0, 1)
                win.put(arr(np.array([float(i) + 0.5])), other, signal=0)
        queued = time.monotonic() - t
        win.synchronize()
        last, result = buf.host[0], None
        if me == 0:
            win.wait_signal(1, 1, timeout=0.3)
            t = time.monotonic()
            try:
                win.synchronize(timeout=10)
            except Timeout as e:
                result = (str(e), time.monotonic() - t)
            try:
                win.put(arr(np.array([1.0])), other)
                result += ("no error",)
            except Timeout as e:
                result += (type(e).__name__,)
        comm.barrier()
    return last, queued, result


@pytest.mark.parametrize("wait", ["kernel", "stream"])
def test_ping_pong_queued_then_a_timeout(monkeypatch, wait):
    (last0, q0, res), (last1, q1, _) = _threads(2, rank_ping_pong_then_timeout, monkeypatch, wait)
    assert last0 == 49.5 and last1 == 49.0
    assert q0 < 0.5 and q1 < 0.5, (q0, q1)                 # 100 calls queued, not waited for
    msg, took, later = res
    assert "signal slot 1 to reach 1" in msg and "past the timeout" in msg, msg
    assert took < 3, took
    assert later == "Timeout", later


def rank_peer_dies(comm):
    """Rank 0's stream waits on slot 3; rank 1 "dies" (its watcher entry says so) without
    signalling: PeerFailure naming rank 1 and slot 3 from synchronize, and from the next call."""
    me = comm.rank
    buf = arr(np.zeros(2, np.float64))
    win = comm.window(buf, signals=4)
    out = None
    comm.barrier()
    if me == 0:
        dead = []
        win.watch = types.SimpleNamespace(dead=lambda: list(dead))
        win.wait_signal(3, 1, timeout=20)
        time.sleep(0.1)
        dead.append((1, 4242))
        t = time.monotonic()
        try:
            win.synchronize(timeout=10)
            out = ("no error",)
        except PeerFailure as e:
            out = (str(e), time.monotonic() - t)
        try:
            win.wait_signal(0, 1)
            out += ("no error",)
        except PeerFailure as e:
            out += (type(e).__name__,)
    comm.barrier()
    win._teardown()                          # no collective close: a peer is "gone"
    return out


@pytest.mark.parametrize("wait", ["kernel", "stream"])
def test_a_dead_peer_ends_the_wait(monkeypatch, wait):
    res, _ = _threads(2, rank_peer_dies, monkeypatch, wait)
    msg, took, later = res
    assert "signal slot 3" in msg and "rank 1 is gone" in msg, msg
    assert took < 2, took
    assert later == "PeerFailure", later


def rank_close_ends_queued_waits(comm):
    """A wait nobody will satisfy is still queued (long timeout) when the window closes: close
    returns (it ends the wait) and the stream is free afterwards."""
    buf = arr(np.zeros(1, np.float64))
    win = comm.window(buf, signals=2)
    t = time.monotonic()
    win.wait_signal(1, 1, timeout=60)
    comm.barrier()
    win._teardown()
    return time.monotonic() - t


@pytest.mark.parametrize("wait", ["kernel", "stream"])
def test_teardown_ends_a_queued_wait(monkeypatch, wait):
    for took in _threads(2, rank_close_ends_queued_waits, monkeypatch, wait):
        assert took < 5, took
