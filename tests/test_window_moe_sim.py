"""examples/moe_cuda_window.py's exchange (``--window-puts copies | kernel | fused``) on the
stand-in cupy of tests/test_window_cuda_streams_sim.py, whose streams are threads: the three
MoE kernels run as Python twins that read their parameter blocks by the kernels' C signatures
(so the host's packing is checked) and store through the peers' window addresses the exchange
got from ``device_addresses()``. Ranks are threads; torch tensors are CPU tensors seen as CUDA
arrays. The twins are a transcription of the CUDA code, not the GPU: what this checks is the
exchange's host side (windows, slots, offsets, waits, parameter order) and the layout the
kernels are meant to produce; tests/test_cuda_window.py checks the real thing on a GPU.
Waits are followed by a stream synchronisation here (torch runs the CPU tensors' ops at once,
not in stream order), and the device-sync count is not checked (CPU torch has no sync mode).
"""
import ctypes
import os
import sys
import types

import numpy as np
import pytest
import torch

import test_window_cuda_streams_sim as S

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))


class TensorArray:
    """A CPU tensor seen as a "CUDA array" by the stand-in (its memory, no copy)."""

    def __init__(self, t):
        self.t = t
        self.device = types.SimpleNamespace(id=0)

    @property
    def __cuda_array_interface__(self):
        return {"typestr": {torch.float32: "<f4", torch.int64: "<i8"}[self.t.dtype], "shape": (self.t.numel(),),
                "strides": None, "data": (self.t.data_ptr() if self.t.numel() else 0, False), "version": 3}


def _i64(addr, n):
    return np.ctypeslib.as_array((ctypes.c_int64 * n).from_address(addr)) if n else np.zeros(0, np.int64)


class MoeCupy(S.AsyncCupy):
    """AsyncCupy plus twins of moe_put_rows, moe_put_counts and moe_put_all."""
    SIGS = {"moe_put_rows": 11, "moe_put_counts": 7, "moe_put_all": 13}

    def _launch(self, fn, gx, gy, gz, bx, by, bz, shmem, stream, params, extra):
        name = self.fns[fn]
        if name not in self.SIGS:
            return super()._launch(fn, gx, gy, gz, bx, by, bz, shmem, stream, params, extra)
        n = self.SIGS[name]
        ptrs = (ctypes.c_void_p * n).from_address(params)
        args = [ctypes.c_int64.from_address(ptrs[i]).value for i in range(n)]
        self._stream(stream).put(lambda: getattr(self, name)(*args))

    def _signal_all(self, cells, world, slot):
        with self.cell_lock:
            for p in range(world):
                ctypes.c_int64.from_address(int(cells[p]) + 8 * slot).value += 1

    def _rows(self, rows, m, d, dest_of, peers, rank, cap):
        for i in range(m):
            p, start = dest_of(i)
            ctypes.memmove(int(peers[p]) + (rank * cap + (i - int(start))) * d * 4, rows + i * d * 4, d * 4)

    def moe_put_rows(self, rows, m, d, splits, world, peers, cells, rank, cap, slot, finished):
        sp, pe = _i64(splits, world), _i64(peers, world)

        def dest_of(i):
            p, start = 0, 0
            while p < world - 1 and i >= start + sp[p]:
                start += sp[p]
                p += 1
            return p, start
        self._rows(rows, m, d, dest_of, pe, rank, cap)
        self._signal_all(_i64(cells, world), world, slot)

    def moe_put_counts(self, counts, world, per, peers, cells, rank, slot):
        c, pe = _i64(counts, world * per), _i64(peers, world)
        for k in range(world * per):
            ctypes.c_int64.from_address(int(pe[k // per]) + 8 * (rank * per + k % per)).value = int(c[k])
        self._signal_all(_i64(cells, world), world, slot)

    def moe_put_all(self, rows, m, d, counts, world, per, peers, cpeers, cells, rank, cap, slot, finished):
        c, pe, cp = _i64(counts, world * per), _i64(peers, world), _i64(cpeers, world)
        for k in range(world * per):
            ctypes.c_int64.from_address(int(cp[k // per]) + 8 * (rank * per + k % per)).value = int(c[k])

        def dest_of(i):
            p, start = 0, 0
            while True:
                n = int(c[p * per:(p + 1) * per].sum())
                if p == world - 1 or i < start + n:
                    return p, start
                start += n
                p += 1
        self._rows(rows, m, d, dest_of, pe, rank, cap)
        self._signal_all(_i64(cells, world), world, slot)


class SimWindow:
    """The CUDA window with torch CPU tensors wrapped; a wait is followed by a stream sync."""

    def __init__(self, win):
        self.win = win
        self.wait_mode = win.wait_mode

    def put(self, src, peer, offset=0, signal=None):
        S.KEEP.append(src)
        self.win.put(TensorArray(src), peer, offset, signal)

    def wait_signal(self, slot, value, timeout=None):
        self.win.wait_signal(slot, value, timeout)
        self.win.synchronize()

    def device_addresses(self):
        return self.win.device_addresses()

    def close(self):
        self.win.close()


def rank_moe(comm, puts, layers):
    """As tests/test_cuda_window.py rank_moe_exchange: counts, dispatch rows and combine, bitwise."""
    import moe_cuda_window as M
    me, world, per, cap, d = comm.rank, comm.size, 2, 6, 3
    cupy = sys.modules["cupy"]
    rt = types.SimpleNamespace(world=world, rank=me, device=torch.device("cpu"))
    ex = M.CudaWindowExchange(rt, lambda kind: _Null(), cap, d, per, puts,
                              window=lambda b, signals: SimWindow(comm.window(TensorArray(b), signals=signals)))
    ex.stream = lambda: cupy._current().ptr
    bad = []

    def plan(src, layer):
        g = torch.Generator().manual_seed(1000 * layer + src)
        counts = torch.randint(0, 4, (world * per,), generator=g)
        counts.view(world, per)[(src + layer) % world] = 0
        m = int(counts.sum())
        return counts, torch.arange(m * d, dtype=torch.float32).view(m, d) + 1e4 * src + 1e3 * layer

    for layer in range(layers):
        counts, rows = plan(me, layer)
        S.KEEP.extend([counts, rows])
        if puts == "fused":
            rc, gl = ex.dispatch([counts], [rows])
            recv, got = rc[0].clone(), gl[0]
        else:
            recv = ex.counts([counts])[0].clone()
            got = ex.rows("dispatch", [rows], [counts.view(world, per).sum(1)], [recv.sum(1)], [world * cap])[0]
        back2 = got * 2
        S.KEEP.append(back2)
        back = ex.rows("combine", [back2], [recv.sum(1)], [counts.view(world, per).sum(1)], [rows.shape[0]])[0]
        want = [plan(src, layer) for src in range(world)]
        want_rows = torch.cat([r.split(c.view(world, per).sum(1).tolist())[me] for c, r in want])
        want_counts = torch.stack([c.view(world, per)[me] for c, _ in want])
        if not torch.equal(recv, want_counts):
            bad.append(f"{puts} layer {layer}: counts {recv.tolist()} != {want_counts.tolist()}")
        if not torch.equal(got, want_rows):
            bad.append(f"{puts} layer {layer}: rows {got.tolist()} != {want_rows.tolist()}")
        if not torch.equal(back, rows * 2):
            bad.append(f"{puts} layer {layer}: combine {back.tolist()} != {(rows * 2).tolist()}")
    comm.barrier()
    ex.close()
    if len(ex.wait_us) != len(ex.layer_us) or not all(0 < w < u for w, u in zip(ex.wait_us, ex.layer_us)):
        bad.append(f"{puts}: wait parts {ex.wait_us} of layers {ex.layer_us}")
    if "wait_signal part" not in ex.host_summary():
        bad.append(ex.host_summary())
    return bad, len(ex.layer_us)


class _Null:
    count, seen = 0, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("wait", ["kernel", "stream"])
@pytest.mark.parametrize("puts", ["copies", "kernel", "fused"])
@pytest.mark.parametrize("size", [2, 3])
def test_moe_exchange_on_the_stand_in(monkeypatch, size, puts, wait):
    import moe_cuda_window as M
    monkeypatch.setattr(M, "_MODULES", {})
    monkeypatch.setattr(M, "SyncCount", _Null)            # CPU torch has no sync debug mode
    monkeypatch.setattr(M.CudaWindowExchange, "syncs", property(lambda self: 0))
    for bad, layers in S._threads(size, lambda comm: rank_moe(comm, puts, 5), monkeypatch, wait, MoeCupy()):
        assert bad == [] and layers == 5, bad


def test_sync_count_counts_what_it_should(monkeypatch):
    """SyncCount (the MoE exchange's sync counter) counts this thread's calls of the cupy runtime's
    synchronising functions and torch's sync warnings inside, not another thread's calls, nothing
    outside, and puts the runtime back as it was."""
    import threading
    import warnings
    import moe_cuda_window as M
    from test_window_cuda_sim import FakeCupy
    cupy = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    rt = cupy.cuda.runtime
    before = rt.streamSynchronize
    sc = M.SyncCount()
    with sc:
        rt.streamSynchronize(7)
        rt.eventQuery(1)
        t = threading.Thread(target=lambda: rt.deviceSynchronize())   # another thread: not counted
        t.start()
        t.join()
        warnings.warn("called a synchronizing CUDA operation")        # what torch's "warn" mode raises
        warnings.warn("something else")
        # torch warns this once per process at the first set_sync_debug_mode (the H100 run of
        # 2026-12-08 counted it as a sync): a note, not a synchronisation
        warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all "
                      "synchronizing operations")
    rt.streamSynchronize(7)                                           # outside: not counted
    assert sc.count == 3, sc.seen
    assert sc.seen[0] == "cupy.cuda.runtime.streamSynchronize" and "torch: called a synchronizing" in sc.seen[2]
    assert modes == ["warn", 0]
    assert rt.streamSynchronize is before
    with sc:
        pass
    assert sc.count == 3
