"""The CUDA state's memory bookkeeping on a machine without a GPU (ccl/engines/cuda/memory.py,
library.py, state.close): suspend(), suspend(graphs=False), resume and close against a stand-in
CUDA runtime whose "device memory" is host memory (allocations, memset, memcpy both ways), so
what is freed, what is kept, where the device epoch goes and what the peer table holds are
read back. Nothing here says anything about a GPU (tests/test_cuda_memory.py does, on one)."""
import contextlib
import ctypes
import struct
import threading
import types

import numpy as np
import pytest

from pyccl.engines.cuda import library
from pyccl.engines.cuda.engine import CudaCollectives
from pyccl.engines.cuda.kernels import MAXR
from pyccl.errors import InvalidArgument


class FakeRuntime:
    """cudaMalloc / free / memset / memcpy over host buffers; addresses are those buffers'."""

    def __init__(self):
        self.live = {}                   # address -> numpy uint8 buffer
        self.events = 0

    def malloc(self, n):
        buf = np.zeros(max(n, 8), np.uint8)
        self.live[buf.ctypes.data] = buf
        return buf.ctypes.data

    def free(self, p):
        del self.live[p]

    def _owner(self, p, n):
        for base, buf in self.live.items():
            if base <= p and p + n <= base + buf.size:
                return
        raise AssertionError(f"0x{p:x} (+{n}) is no live allocation")

    def memset(self, p, v, n):
        self._owner(p, n)
        ctypes.memset(p, v, n)

    def memcpy(self, dst, src, n, kind):
        self._owner(dst if kind == 1 else src, n)        # 1: host to device, 2: device to host
        ctypes.memmove(dst, src, n)

    def deviceSynchronize(self):
        pass

    def eventDestroy(self, e):
        self.events -= 1


class FakeRegistry:
    def __init__(self):
        self.closed_kinds, self.closed = [], False

    def export(self, p):
        return p, 0

    def peer_ptr(self, peer, bufid, off):
        return bufid + (1 << 40) + off              # "mapped" at another address

    def close_kinds(self, kinds, keys=None):
        self.closed_kinds.append(tuple(kinds))
        return 0

    def mapped(self):
        return {}

    def close(self):
        self.closed = True


class PeerStore:
    """Rank 1 answers every scratch publication with allocations of its own (ids 0x1000 + k)."""

    def __init__(self):
        self.kv = {}

    def set(self, k, v):
        self.kv[k] = v

    def get(self, k, timeout=None):
        mine = self.kv[k.rsplit("/", 1)[0] + "/0"]
        n = len(mine) // 16
        return struct.pack(f"<{2 * n}Q", *[v for j in range(n) for v in (0x1000 + j, 0)])


@pytest.fixture
def lib_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(library, "pause", lambda d: calls.append("pause"))
    monkeypatch.setattr(library, "unpause", lambda d: calls.append("unpause"))
    monkeypatch.setattr(library, "release", lambda d, paused=False: calls.append(("release", paused)))
    return calls


def _state(epoch=41):
    st = CudaCollectives.__new__(CudaCollectives)
    rt = st.rt = FakeRuntime()
    st.rank, st.size, st.dev, st.tag = 0, 2, 0, "t"
    st._device = contextlib.nullcontext()
    st.comm = types.SimpleNamespace(store=PeerStore(), timeout=5)
    st.timeout = 5
    st.registry = FakeRegistry()
    st.status = types.SimpleNamespace(ptr=1, words=[0] * 8, close=lambda: None)
    st._closed = st.suspended = st._big_pinned = st._library_paused = False
    st._tmp_pinned = True                             # a captured reduce named the reduce buffer
    st._gen = st._saved_epoch = 0
    st._prepared, st._lane_caches, st._mods = {"p": 1}, [{"k": 1}], {"kernel": 1}
    st._captured_splits = ["t"]
    st._library = types.SimpleNamespace(loaded_bytes=1000)
    st.tab_host = np.zeros(3 * MAXR, dtype=np.uint64)
    st._alloc_control()
    st.small_cap, st.big_cap = 1 << 16, 1 << 16
    st.small = rt.malloc(4 * st.small_cap)
    st.big = rt.malloc(4 * st.big_cap)
    st._tmp_buf = (rt.malloc(1 << 16), 1 << 16)
    st._share("base", [st.flags, st.small], [0, 1])
    st._big_keys = st._share("big1", [st.big], [2])
    rt.memcpy(st.ectr, np.array([epoch, 0], np.uint64).ctypes.data, 16, 1)
    return st


def _device_words(st, p, n):
    out = np.zeros(n, np.uint64)
    st.rt.memcpy(out.ctypes.data, p, 8 * n, 2)
    return out


def test_suspend_keeps_what_graphs_name(lib_calls):
    st = _state()
    ctrl = st.ctrl
    st.suspend()
    assert st.suspended and st.ctrl == ctrl and st.small == st.big == 0
    assert set(st.rt.live) == {ctrl, st._tmp_buf[0]}                 # the captured reduce's buffer stays
    assert st.registry.closed_kinds == [("scratch", "buffer")]
    tab = _device_words(st, st.tab, 3 * MAXR)
    assert not tab[MAXR:].any() and tab[0] == st.flags                # scratch rows cleared on the device
    assert st._prepared == {} and st._lane_caches == [{}] and st._mods and lib_calls == []
    assert st.memory()["device.control"] > 0 and st.memory()["device.kernels"] == 1000


def test_suspend_graphs_false_frees_everything_and_resume_carries_the_epoch(lib_calls):
    st = _state(epoch=41)
    st.suspend()
    st.suspend(graphs=False)                          # already suspended: lets go of the rest
    assert st.rt.live == {} and st.ctrl == st.flags == st.ectr == st.tab == 0 and st._tmp_buf is None
    assert ("graph",) in st.registry.closed_kinds and st._captured_splits == [] and st._mods == {}
    assert lib_calls == ["pause"] and st._saved_epoch == 41
    assert st.memory()["device.control"] == 0
    st.suspend(graphs=False)                          # again: nothing more, no second pause
    assert lib_calls == ["pause"]
    st.resume()
    assert not st.suspended and lib_calls == ["pause", "unpause"]
    assert set(st.rt.live) == {st.ctrl, st.small, st.big}
    assert list(_device_words(st, st.ectr, 2)) == [41, 0]            # epochs go on from where they were
    flags = _device_words(st, st.flags, 64)
    assert not flags.any()                                           # new flags start at zero
    tab = _device_words(st, st.tab, 3 * MAXR)
    assert tab[0] == st.flags and tab[MAXR] == st.small and tab[2 * MAXR] == st.big
    assert tab[1] == 0x1000 + (1 << 40) and tab[MAXR + 1] == 0x1001 + (1 << 40)   # the peer's, as mapped here
    assert any(k.startswith("cuda/scratch/base.g1/") for k in st.comm.store.kv)


def test_suspend_raises_for_a_captured_ce_two_shot_unless_graphs_false(lib_calls):
    st = _state()
    st._big_pinned = True
    with pytest.raises(InvalidArgument, match="graphs=False"):
        st.suspend()
    assert not st.suspended and st.small
    st.suspend(graphs=False)
    assert st.suspended and st.rt.live == {} and not st._big_pinned


def test_close_frees_and_releases_the_kernels(lib_calls):
    for paused in (False, True):
        lib_calls.clear()
        st = _state()
        if paused:
            st.suspend(graphs=False)
        st._stop = threading.Event()
        st._thread = threading.Thread(target=lambda: None)
        st._thread.start()
        st._last = st._tail = None
        st._abort_reason = None
        st.mailbox = types.SimpleNamespace(close=lambda: None)
        st._ev, st._joins = [1, 2], [3, 4]
        st._ready = st._ready2 = st._fork = 5
        st.rt.events = 7
        st.stream_obj, st.side = object(), [object(), object()]
        st.close()
        assert st.rt.live == {} and st.registry.closed and st._closed and st.rt.events == 0
        assert st.stream_obj is None and st.side == [] and st._library is None
        assert lib_calls[-1] == ("release", paused)
