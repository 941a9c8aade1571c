"""CUDA windows: every rank's device buffer mapped into its same-host peers through CUDA IPC.

`comm.window(buf)` with a torch CUDA tensor or a cupy array gives a `CudaWindow` (the same
calls as the host `Window`, ccl/windows/window.py, and the same checks: ccl/windows/common.py). At creation
each rank exports its window and a small array of signal cells (int64, one per slot, device
memory) through the CUDA engine's `IpcRegistry` (transports/cuda_ipc.py: a handle exported
once per allocation, opened once per peer, the one the GPU collectives use: an allocation
must not be opened twice in one process), and maps its peers' once. Then, on the caller's
current stream (torch's for torch tensors, cupy's for cupy arrays), every call is queued and
returns without waiting for the GPU:

- ``put``: ``cudaMemcpyAsync`` from src into the mapped peer window; ``signal=s`` then
  launches ``win_signal`` (ccl/windows/cuda_kernels.py): an atomic add into the peer's cell
  s, after the copy in stream order;
- ``signal``: ``win_signal`` alone; ``get``: a copy out of the mapped peer window;
- ``wait_signal``: ``win_wait``, one thread that holds the stream until the cell reaches the
  value, then subtracts it; bounded by the timeout and by an abort word in host-mapped
  memory that this window's watcher thread sets when a peer process dies;
- ``flush``: nothing to queue (a put is complete at the target for all work queued after it
  on the stream); ``synchronize(timeout)``: the host waits until the window's work queued so
  far is done, bounded, and raises what failed.

``WAIT`` (this module's attribute when the window is made), "stream" by default: a wait is
``cuStreamWaitValue64`` on the cell (no kernel resident: on a GPU shared by processes a
spinning kernel holds its context's time slice while the peer needs it) and then an add of
``-value``; the watcher thread gives up a wait past its timeout (counted from when it was queued)
or when a peer dies by noting why in the status words and setting every cell of this rank to a
huge value, so the queued waits pass and the window raises. Where the driver or the memory has
no stream waits (probed at creation) the window waits as with "kernel": the spinning ``win_wait``.
On an H100 shared by 2 ranks (bench/JOURNAL.md #2026-12-08-windows-4) an 8 B put+signal
ping-pong took 151 µs one way with stream waits and 2258 µs with the spinning kernel, the MoE
example 905 against 358 tokens/s; the spinning kernel's host time per wait is ~5 µs less.

A wait that gave up (dead peer: ``PeerFailure`` naming the peer and the slot; timeout:
``Timeout``) is raised by ``synchronize`` and by every later call on the window (as the GPU
collectives raise on the next call). Bad input raises ``InvalidArgument`` before anything is
queued. Ranks on several hosts: not built yet (device windows staged through pinned host
memory), ``InvalidArgument`` at creation.
"""
import struct
import threading
import time

import numpy as np

from ..buffers import as_buffer
from ..errors import InvalidArgument, PeerFailure, Timeout
from .common import DEFAULT_SIGNALS, WindowBase

WAIT = "stream"                        # how a window made now waits: "stream" or "kernel" (spins) (docstring)

_REC = struct.Struct("<16sQQQQQQqq")   # dtype, count, window id, offset, cells id, offset, pid, device, slots
_DEFAULT = 4                           # cudaMemcpyDefault: unified addressing tells the direction


def engine_state(comm, device: int, name: str):
    """The CUDA engine's state of this one-host communicator on `device`. When no CUDA
    collective ran yet it is made here, on every rank at once (window creation is collective),
    as the engine's first call would make it (no kernel is built for that); where the engine
    is not there to make it, by a 1-element all_reduce."""
    from ..engines.cuda.state import CudaState
    st = comm.cuda
    if st is None:
        eng = comm.engines.by_name.get("cuda")
        if eng is not None and getattr(eng, "state", False) is None and getattr(eng.res, "hosts", 0) == 1:
            from ..engines.cuda.engine import CudaCollectives
            eng.state = CudaCollectives(eng.res, device)
        else:
            from ..transports.cuda_ipc import _cupy
            cupy = _cupy()
            with cupy.cuda.Device(device):
                comm.all_reduce(cupy.zeros(1, cupy.float32))
        st = comm.cuda
    if not isinstance(st, CudaState):
        raise InvalidArgument(f"{name}: the communicator's GPU engine is {type(st).__name__}, not the CUDA IPC "
                              f"engine of one host; CUDA windows across hosts are not built yet")
    if st.dev != device:
        raise InvalidArgument(f"{name}: buf is on cuda:{device}, but this rank's CUDA collectives run on "
                              f"cuda:{st.dev}; expose a buffer of that device")
    return st


class CudaWindow(WindowBase):
    """Every rank's CUDA `buf`, open to stream-ordered put/get/signal/wait (module docstring)."""

    def __init__(self, comm, buf, signals=None):
        b = as_buffer(buf, "window: buf", writable=True)
        nslots = DEFAULT_SIGNALS if signals is None else signals
        if not isinstance(nslots, (int, np.integer)) or nslots < 1:
            raise InvalidArgument(f"window: signals={signals!r}; expected a positive number of slots")
        hosts = {i.get("host") for i in comm.peer_info}
        if len(hosts) > 1:
            raise InvalidArgument(f"window: buf is on {b.device} and the ranks of {comm.tag} are on {len(hosts)} "
                                  f"hosts; CUDA windows across hosts (staged through pinned host memory) are not "
                                  f"built yet: expose a host buffer")
        self._base_init(comm, b, int(nslots))
        self.view = b.array
        self.device = self.view.device
        self.closed = True                       # until set up
        self.streams = {}                        # raw streams this window queued work on
        self.gone = {}                           # rank -> why it is known dead
        self.cells = 0
        self._stop = threading.Event()
        self._watcher = None
        self.status = None
        self.wait_mode, self.pending, self.side = WAIT, [], 0   # pending: stream waits (event, deadline, slot, value)
        self._plock = threading.Lock()
        st = engine_state(comm, self.device, self.name)
        from ..transports import cuda_ipc
        from .cuda_kernels import Launches
        self.cupy, self.rt, self.registry = st.cupy, st.rt, st.registry
        try:
            with self.cupy.cuda.Device(self.device):
                self.kernels = Launches(self.cupy, self.device)
                self.status = cuda_ipc.HostStatus()
                self.cells = self.rt.malloc(8 * self.signals)
                self.rt.memset(self.cells, 0, 8 * self.signals)
                self.rt.deviceSynchronize()      # the cells are zero before any peer may add to them
                if self.wait_mode == "stream":
                    from .cuda_kernels import StreamWaits
                    self.waits = StreamWaits()
                    if self.waits.ok:
                        self.side = self.rt.streamCreateWithFlags(1)     # cudaStreamNonBlocking
                    if not self.waits.ok or not self.waits.works(self.side, self.cells):
                        self.wait_mode = "kernel"            # this driver or memory has no stream waits
                self._connect()
            self.watch = cuda_ipc.PeerWatch({r: self.pids[r] for r in range(self.size) if r != self.rank})
            self.closed = False
            self._watcher = threading.Thread(target=self._watch, daemon=True, name=f"pyccl-{self.name}")
            self._watcher.start()
        except BaseException:
            self._teardown()
            raise

    def _connect(self):
        """One all-gather: each rank's window and cells as (allocation id, offset) pairs."""
        reg, me = self.registry, self.rank
        wid, woff = reg.export(self.view.ptr) if self.view.ptr and self.view.nbytes else (0, 0)
        cid, coff = reg.export(self.cells)
        mine = _REC.pack(self.dtype.encode(), self.buffer.count, wid, woff, cid, coff,
                         self.comm.peer_info[me].get("pid") or 0, self.device, self.signals)
        recs = [_REC.unpack(r) for r in self._exchange(mine)]
        if len({r[8] for r in recs}) > 1:
            raise InvalidArgument(f"{self.name}: ranks asked for different numbers of signal slots "
                                  f"{[r[8] for r in recs]}; pass the same signals= on every rank")
        self.dtypes = [r[0].rstrip(b"\0").decode() for r in recs]
        self.counts = [r[1] for r in recs]
        self.pids = [r[6] for r in recs]
        self.ptrs, self.peer_cells, self._opened = [], [], []
        for p, (_, count, wid, woff, cid, coff, _, _, _) in enumerate(recs):
            if p == me:
                self.ptrs.append(self.view.ptr)
                self.peer_cells.append(self.cells)
                continue
            self.ptrs.append(reg.peer_ptr(p, wid, woff) if wid else 0)
            self.peer_cells.append(reg.peer_ptr(p, cid, coff))
            self._opened.append((p, cid))

    # ---- checks: InvalidArgument before anything is queued --------------------------------
    def _target(self, op, peer):
        if self.closed:
            raise InvalidArgument(f"{self.name} {op}: the window is closed")
        if not isinstance(peer, (int, np.integer)) or not 0 <= peer < self.size:
            raise InvalidArgument(f"{self.name} {op}: peer {peer!r} is not a rank of 0..{self.size - 1}")
        self._raise_if_failed(op)
        peer = int(peer)
        if peer in self.gone:
            raise PeerFailure(f"{self.name} {op}: rank {peer} is gone: {self.gone[peer]}")
        return peer

    def _dspan(self, op, what, buf, peer, offset, writable):
        b = as_buffer(buf, f"{self.name} {op}: {what}", writable)
        if b.device == "cpu":
            raise InvalidArgument(f"{self.name} {op}: {what} is in host memory; the window is on cuda:{self.device} "
                                  f"(pass a CUDA tensor or cupy array of that device)")
        if b.array.device != self.device:
            raise InvalidArgument(f"{self.name} {op}: {what} is on {b.device}; the window is on cuda:{self.device}")
        return b.array, self._in_window(op, what, b, peer, offset)

    def _stream(self, view=None) -> int:
        s = (view or self.view).caller_stream()
        if s not in self.streams:
            self.streams[s] = True
        return s

    # ---- one-sided calls, queued on the caller's stream -------------------------------------
    def put(self, src, peer, offset=0, signal=None):
        """Queue a copy of `src` into `peer`'s window at element `offset`, then (signal=s) an
        add of 1 to the peer's slot s; returns once queued."""
        peer = self._target("put", peer)
        v, at = self._dspan("put", "src", src, peer, offset, False)
        slot = -1 if signal is None else self._slot("put", signal)
        stream = self._stream(v)
        if v.nbytes:
            self.rt.memcpyAsync(self.ptrs[peer] + at, v.ptr, v.nbytes, _DEFAULT, stream)
        if slot >= 0:
            self.kernels.signal(stream, self.peer_cells[peer] + 8 * slot, 1)

    def get(self, dst, peer, offset=0):
        """Queue a copy of `peer`'s window from element `offset` into `dst`."""
        peer = self._target("get", peer)
        v, at = self._dspan("get", "dst", dst, peer, offset, True)
        if v.nbytes:
            self.rt.memcpyAsync(v.ptr, self.ptrs[peer] + at, v.nbytes, _DEFAULT, self._stream(v))

    def signal(self, peer, slot, value=1):
        """Queue an add of `value` to `peer`'s slot, after the stream's earlier puts."""
        peer = self._target("signal", peer)
        slot = self._slot("signal", slot)
        value = self._count("signal", "value", value, self.name)
        if value:
            self.kernels.signal(self._stream(), self.peer_cells[peer] + 8 * slot, value)

    def wait_signal(self, slot, value, timeout=None):
        """The caller's stream waits until this rank's `slot` holds `value`, then subtracts it;
        returns once queued. A wait that gives up (`timeout` s, default the communicator's, or
        a peer died) raises on `synchronize` and on the window's next call."""
        if self.closed:
            raise InvalidArgument(f"{self.name} wait_signal: the window is closed")
        slot = self._slot("wait_signal", slot)
        value = self._count("wait_signal", "value", value, self.name)
        limit = self.timeout if timeout is None else float(timeout)
        if limit <= 0:
            raise InvalidArgument(f"{self.name} wait_signal: timeout={timeout!r}; expected a positive number")
        self._raise_if_failed("wait_signal")
        if value:
            stream = self._stream()
            if self.wait_mode == "stream":
                cell = self.cells + 8 * slot
                self.waits.wait(stream, cell, value)
                self.kernels.signal(stream, cell, -value)
                ev = self.rt.eventCreateWithFlags(2)              # cudaEventDisableTiming
                self.rt.eventRecord(ev, stream)
                with self._plock:
                    self.pending.append((ev, time.monotonic() + limit, slot, value))
            else:
                self.kernels.wait(stream, self.cells + 8 * slot, value, self.status.ptr, int(limit * 1e9), slot)
            self._limit = max(getattr(self, "_limit", 0.0), limit)

    def flush(self, peer=None):
        """Stream-ordered: work queued after this on the stream sees every earlier put landed;
        nothing to queue. Raises what failed so far."""
        if self.closed:
            raise InvalidArgument(f"{self.name} flush: the window is closed")
        if peer is not None:
            self._target("flush", peer)
        self._raise_if_failed("flush")

    def synchronize(self, timeout=None):
        """Block the host until the work this window queued so far is done (at most `timeout` s,
        default the communicator's timeout plus the longest wait's); raise what failed."""
        if self.closed:
            raise InvalidArgument(f"{self.name} synchronize: the window is closed")
        self._drain("synchronize", timeout)

    def _drain(self, op, timeout=None, report=True):
        limit = (self.timeout + getattr(self, "_limit", 0.0)) if timeout is None else float(timeout)
        deadline = time.monotonic() + limit
        with self.cupy.cuda.Device(self.device):
            events = []
            for s in list(self.streams):
                ev = self.rt.eventCreateWithFlags(2)          # cudaEventDisableTiming
                self.rt.eventRecord(ev, s)
                events.append(ev)
            try:
                pause = 2e-5
                for ev in events:
                    while self.rt.eventQuery(ev) != 0:
                        if self.status.words[1] and report:
                            break
                        if time.monotonic() > deadline:
                            if report:
                                self._raise_if_failed(op)
                            raise Timeout(f"{self.name} {op}: rank {self.rank}'s queued window work on "
                                          f"cuda:{self.device} did not finish within {limit:g}s")
                        time.sleep(pause)
                        pause = min(pause * 2, 2e-3)
            finally:
                for ev in events:
                    self.rt.eventDestroy(ev)
        if report:
            self._raise_if_failed(op)

    def _raise_if_failed(self, op):
        words = self.status.words if self.status is not None else None
        if words is None or not words[1]:
            return
        code, slot, value, held = words[1], words[2], words[3], words[4]
        if code == 2:
            why = "; ".join(f"rank {p} is gone: {w}" for p, w in sorted(self.gone.items())) or "the window was aborted"
            if slot < 0:
                raise PeerFailure(f"{self.name} {op}: {why}")
            raise PeerFailure(f"{self.name} {op}: rank {self.rank}'s stream waited for signal slot {slot} to reach "
                              f"{value} (it held {held}), but {why}")
        raise Timeout(f"{self.name} {op}: rank {self.rank}'s stream waited for signal slot {slot} to reach {value} "
                      f"past the timeout (it held {held})")

    def _watch(self):
        """A peer process that exits sets the abort word: spinning waits end, the host raises.
        Stream waits: this thread also gives up the waits past their timeout (_release)."""
        while not self._stop.wait(0.02):
            dead = self.watch.dead()
            if dead:
                for r, pid in dead:
                    self.gone.setdefault(r, f"its process {pid} exited")
                if self.wait_mode == "stream":
                    self._release(2)
                self.status.abort()
                return
            if self.wait_mode == "stream" and self.pending and self._release(1, late=True):
                return

    def _release(self, code, late=False) -> bool:
        """Stream waits: note the first wait that gives up (code 1: past its timeout, only if
        one is, with `late`; 2: a peer died) in the status words, then set this rank's cells
        to a huge value so every queued wait passes. Returns whether it gave up."""
        now = time.monotonic()
        with self.cupy.cuda.Device(self.device):
            with self._plock:
                waiting = []
                for p in self.pending:
                    if self.rt.eventQuery(p[0]) == 0:
                        self.rt.eventDestroy(p[0])
                    else:
                        waiting.append(p)
                self.pending = waiting
            first = next((p for p in waiting if now > p[1]), None) if late else (waiting[0] if waiting else None)
            if late and first is None:
                return False
            w = self.status.words
            if not w[1]:
                slot, value, held = -1, 0, 0
                if first is not None:
                    slot, value = first[2], first[3]
                    self.rt.memcpyAsync(self.status.ptr + 48, self.cells + 8 * slot, 8, _DEFAULT, self.side)
                    self.rt.streamSynchronize(self.side)
                    held = w[6]
                w[2], w[3], w[4] = slot, value, held
                w[1] = code
            self.status.abort()
            self.rt.memsetAsync(self.cells, 0x3F, 8 * self.signals, self.side)
            self.rt.streamSynchronize(self.side)
        return True

    # ---- teardown ------------------------------------------------------------------------
    def close(self):
        """Collective: wait for this rank's queued window work, then for every rank, then unmap.
        A failure already raised by an earlier call (a wait that timed out) is not raised again."""
        if self.closed:
            return
        try:
            self._drain("close", report=False)
            self.comm.barrier()
        finally:
            self._teardown()

    def _teardown(self):
        self.closed = True
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        if self.status is None:
            return
        self.status.abort()                      # any wait still queued ends at once
        done = True
        try:
            with self.cupy.cuda.Device(self.device):
                if self.side:                    # stream waits: let them pass
                    self.rt.memsetAsync(self.cells, 0x3F, 8 * self.signals, self.side)
                    self.rt.streamSynchronize(self.side)
                for s in list(self.streams):
                    self.rt.streamSynchronize(s)
                for p in self.pending:
                    self.rt.eventDestroy(p[0])
                self.pending = []
                if self.side:
                    self.rt.streamDestroy(self.side)
                    self.side = 0
        except Exception:  # noqa: BLE001 - best effort at teardown: then keep the memory
            done = False
        for key in getattr(self, "_opened", []):     # the peers' cells, mapped for this window only
            base = self.registry.opened.pop(key, None)
            if base is not None:
                try:
                    self.rt.ipcCloseMemHandle(base)
                except Exception:  # noqa: BLE001 - best effort at teardown
                    pass
        self._opened = []
        if done:
            if self.cells:
                self.rt.free(self.cells)
            self.status.close()
        self.cells = 0
        self.status = None

    def device_addresses(self) -> tuple:
        """(windows, cells): every rank's window and signal cells as mapped into this process
        (this rank's own: its buffer), for kernels that put from the device: store into
        ``windows[p] + byte offset``, then ``__threadfence_system()`` and an atomic add of 1 to
        the 8-byte cell ``cells[p] + 8 * slot``; ordered with the window's calls by the stream."""
        if self.closed:
            raise InvalidArgument(f"{self.name} device_addresses: the window is closed")
        return tuple(self.ptrs), tuple(self.peer_cells)

    def transport(self, peer) -> str:
        """How this rank reaches `peer`'s window: "local" or "cuda_ipc"."""
        peer = self._target("transport", peer)
        return "local" if peer == self.rank else "cuda_ipc"

    def __repr__(self):
        return f"<pyccl.CudaWindow {self.name} rank {self.rank}/{self.size} {self.buffer.count} {self.dtype} " \
               f"cuda:{self.device}>"

