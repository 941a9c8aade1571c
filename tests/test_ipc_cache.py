"""The peers' CUDA IPC mappings (transports/cuda_ipc.IpcRegistry and its subclass
ccl/engines/cuda/ipc_cache.PeerMappings), on any machine: cupy's open/close of IPC handles
replaced by a fake that records them."""
import struct
import types

import pytest

from pyccl.engines.cuda.ipc_cache import PeerMappings
from pyccl.transports import cuda_ipc


class _Store:
    def __init__(self):
        self.kv = {}

    def set(self, k, v):
        self.kv[k] = v

    def get(self, k, timeout=None):
        return self.kv[k]


@pytest.fixture
def fake(monkeypatch):
    state = types.SimpleNamespace(open=set(), opens=0, closes=[])

    class Err(Exception):
        pass

    def ipc_open(handle):
        state.opens += 1
        base = 0x10000 * (1 + int.from_bytes(handle[:8], "little"))
        assert base not in state.open, "opened twice"
        state.open.add(base)
        return base

    def ipc_close(base):
        state.open.remove(base)
        state.closes.append(base)

    rt = types.SimpleNamespace(ipcOpenMemHandle=ipc_open, ipcCloseMemHandle=ipc_close, CUDARuntimeError=Err)
    monkeypatch.setattr(cuda_ipc, "_cupy", lambda: types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=rt)))
    return state


def _publish(store, peer, bufid, size):
    handle = bufid.to_bytes(8, "little") + bytes(56)
    store.set(f"cuda/ipc/{peer}/{bufid}", handle + struct.pack("<QQ", 0xABC000, size))


def test_registry_opens_once_and_evicts_the_oldest_past_max_open(fake):
    store = _Store()
    for b in range(1, 5):
        _publish(store, 1, b, 100)
    reg = cuda_ipc.IpcRegistry(0, store, 1.0, max_open=2)
    quiesced = []
    reg.before_close = lambda: quiesced.append(1)
    a = reg.peer_ptr(1, 1, 8)
    assert reg.peer_ptr(1, 1, 0) == a - 8 and fake.opens == 1        # cached
    reg.peer_base(1, 2)
    reg.peer_base(1, 1)                                                # 1 is now the newest
    reg.peer_base(1, 3)                                                # over 2: the oldest (2) goes
    assert list(reg.opened) == [(1, 1), (1, 3)] and len(fake.closes) == 1 and quiesced == [1]
    reg.close()
    assert not reg.opened and not fake.open


def test_peer_mappings_bound_bytes_of_buffers_only(fake):
    store = _Store()
    for b, size in ((1, 64), (2, 40), (3, 40), (4, 1000)):
        _publish(store, 1, b, size)
    reg = PeerMappings(0, store, 1.0, max_bytes=100)
    reg.mode = "scratch"
    reg.peer_base(1, 1)                      # scratch: never evicted, not counted
    reg.mode = "buffer"
    reg.peer_base(1, 2)
    reg.peer_base(1, 3)
    assert reg.mapped() == {"scratch": 64, "buffer": 80, "graph": 0, "kept": 0}
    reg.peer_base(1, 4)                      # 1080 > 100: the older buffers go; the newest stays alone
    assert set(reg.opened) == {(1, 1), (1, 4)} and reg.mapped()["buffer"] == 1000
    assert set(reg.sizes) == set(reg.kinds) == set(reg.opened)
    reg.mode = "graph"
    reg.peer_base(1, 4)                      # used by a capture: kept till close
    assert reg.kinds[(1, 4)] == "graph"
    assert reg.close_kinds(("scratch", "buffer")) == 64
    assert set(reg.opened) == {(1, 4)}
    reg.close()
    assert not reg.opened and not reg.sizes and not reg.kinds and not fake.open


def test_published_size():
    assert cuda_ipc.published_size(bytes(64) + struct.pack("<QQ", 1, 77)) == 77
    assert cuda_ipc.published_size(bytes(64)) == 0
