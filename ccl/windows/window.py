"""`comm.window(buf)`: one-sided put, get, signal and wait on every rank's exposed buffer.

Like NCCL's put/signal/wait, torchcomms' `new_window` and MPI RMA with notification: a rank
copies into a peer's window without the peer posting a receive, and tells it with a signal
(a counter per slot) that it waits on. Creation and `close` are collective; every other call
is one rank's. Every argument is checked here, against what each rank exposed, before any
byte moves (`InvalidArgument`); then the call goes to the `Link` of the target
(ccl/windows/base.py): this rank, a same-host peer through cross-memory attach
(ccl/windows/cma.py), a peer the communicator reaches over ibverbs through RDMA WRITE
(ccl/windows/rdma.py), any other through the TCP emulation (ccl/windows/tcp.py).

Choices (written down as the design asks where the issue is silent):
- Offsets and counts are in elements of the target's window; a put's dtype must be the
  target's (windows of different ranks may differ in size and dtype).
- `put` returns when `src` may be reused, not when the bytes have landed (same host: they
  have); `flush` waits for that. `get` returns with the data.
- A signal is added after the data of the same call and of the caller's earlier puts to
  that peer; `wait_signal(slot, value)` waits until the slot holds at least `value`, then
  subtracts `value` (so a slot counts arrivals and waits consume them).
- Signal slots per window: `signals=` (default `DEFAULT_SIGNALS`), the same on every rank.
- Host memory here (numpy arrays, torch CPU tensors); a CUDA buffer (torch CUDA tensor, cupy
  array) makes a `CudaWindow` instead (ccl/windows/cuda.py: CUDA IPC, stream-ordered calls).
"""
import os
import struct
import time

import numpy as np

from .. import settings
from ..buffers import as_buffer
from ..cuda_buffers import is_cuda
from ..errors import InvalidArgument, PeerFailure, Timeout
from ..process import pid_namespace
from .base import LocalLink
from .common import DEFAULT_SIGNALS, WindowBase
from .cma import CmaLink, probe
from .signals import Board, PeerBoard
from .rdma import RdmaLink, release
from .tcp import Service, TcpLink, open_links

_REC = struct.Struct("<16sQQQQQII200s")   # dtype, count, address, board address, pid, pidns, slots, cma, board path


class Window(WindowBase):
    """Every rank's `buf`, open to one-sided access by the others (see the module docstring)."""

    def __new__(cls, comm, buf, signals=None):
        if cls is Window and is_cuda(buf):       # device memory: the CUDA IPC window, made whole here
            from .cuda import CudaWindow          # (not a Window: Python then skips Window.__init__)
            return CudaWindow(comm, buf, signals)
        return super().__new__(cls)

    def __init__(self, comm, buf, signals=None):
        b = as_buffer(buf, "window: buf", writable=True)
        if b.device != "cpu":
            raise InvalidArgument(f"window: buf is on {b.device}; expected host memory or a CUDA buffer")
        nslots = DEFAULT_SIGNALS if signals is None else signals
        if not isinstance(nslots, (int, np.integer)) or nslots < 1:
            raise InvalidArgument(f"window: signals={signals!r}; expected a positive number of slots")
        self._base_init(comm, b, int(nslots))
        self.bytes = b.array.view(np.uint8)
        self._spin = settings.get("PYCCL_SPIN_US") * 1e-6   # a wait polls this long before it sleeps
        self.closed = False
        self.service = None
        self._mr = None
        self.board = Board(self.size, self.signals, f"{self.number}")
        self.links = {}
        try:
            self._connect()
        except BaseException:
            self._teardown()
            raise

    # ---- set-up (collective) ------------------------------------------------------------
    def _connect(self):
        """Two all-gathers: what each rank exposes, then which same-host pairs may copy
        straight into each other (both probed it); the rest open TCP links."""
        cma_on = settings.get("PYCCL_WINDOW_CMA")
        mine = _REC.pack(self.dtype.encode(), self.buffer.count, self.bytes.ctypes.data, self.board.address,
                         os.getpid(), pid_namespace(), self.signals, int(cma_on), self.board.path.encode())
        recs = [_REC.unpack(r) for r in self._exchange(mine)]
        self.dtypes = [r[0].rstrip(b"\0").decode() for r in recs]
        self.counts = [r[1] for r in recs]
        slots = {r[6] for r in recs}
        if len(slots) > 1:
            raise InvalidArgument(f"{self.name}: ranks asked for different numbers of signal slots "
                                  f"{[r[6] for r in recs]}; pass the same signals= on every rank")
        me, info = self.rank, self.comm.peer_info
        boards, ok = {}, np.zeros(self.size, np.uint8)
        for p, (_, _, _, board_addr, pid, pidns, _, cma, path) in enumerate(recs):
            if p == me or not (cma_on and cma) or pidns != recs[me][5] or info[p]["host"] != info[me]["host"]:
                continue
            if self.comm.conns.transport_of(p) != "shm":
                continue                     # TCP forced for the pair: the window follows
            try:
                boards[p] = PeerBoard(path.rstrip(b"\0").decode(), self.size, self.signals, me)
            except OSError:
                continue
            ok[p] = probe(pid, board_addr)
        oks = [np.frombuffer(r, np.uint8) for r in self._exchange(ok.tobytes())]
        self.board.unlink()                  # every peer that maps it has by now
        tcp_peers = []
        for p in range(self.size):
            if p == me:
                self.links[p] = LocalLink(me, self.bytes, self.board)
            elif oks[me][p] and oks[p][me]:
                self.links[p] = CmaLink(p, recs[p][4], recs[p][2], boards.pop(p), self._who(p))
            else:
                tcp_peers.append(p)
        for b in boards.values():
            b.close()
        ctx = self.comm.conns.ctx
        socks = open_links(ctx, self.number, tcp_peers, self.timeout, self._who)
        if socks:
            rdma = self._rdma(ctx, [p for p in socks if self.comm.conns.transport_of(p) == "ibverbs"], socks)
            self.service = Service(me, self.bytes, self.board, {p: s[1] for p, s in socks.items()},
                                   self._who, f"window{self.number}")
            for p, (req, _) in socks.items():
                tcp = TcpLink(p, req, self.service, self._who(p))
                self.links[p] = RdmaLink(rdma[p][0], tcp, self.timeout, rdma[p][1:]) if p in rdma else tcp
            for pairs in rdma.values():               # signals come on the first QP only
                self.service.watch(pairs[0].arm(), pairs[0].events)
        self._polls = any(lk.kind == "cma" for lk in self.links.values())

    def _rdma(self, ctx, peers, socks) -> dict:
        """RDMA pairs for the peers the communicator reaches over ibverbs (ccl/windows/rdma.py)."""
        from .rdma import connect_pairs
        pairs, self._mr, self._mr_mem = connect_pairs(ctx, self.board, self.bytes, peers, socks, self._who)
        return pairs

    def _who(self, p) -> str:
        return f"{self.name}: rank {p}"

    # ---- checks: InvalidArgument before any byte moves ----------------------------------
    def _link(self, op, peer):
        if self.closed:
            raise InvalidArgument(f"{self.name} {op}: the window is closed")
        if not isinstance(peer, (int, np.integer)) or not 0 <= peer < self.size:
            raise InvalidArgument(f"{self.name} {op}: peer {peer!r} is not a rank of 0..{self.size - 1}")
        return self.links[int(peer)]

    def _span(self, op, what, buf, peer, offset, writable):
        b = as_buffer(buf, f"{self.name} {op}: {what}", writable)
        if b.device != "cpu":
            raise InvalidArgument(f"{self.name} {op}: {what} is on {b.device}; the window is in host memory")
        at = self._in_window(op, what, b, peer, offset)
        return b.array.view(np.uint8), at

    # ---- one-sided calls -----------------------------------------------------------------
    def put(self, src, peer, offset=0, signal=None):
        """Copy `src` into `peer`'s window at element `offset`; with signal=s, then add 1 to the
        peer's slot s. Returns once `src` may be reused (flush: once it has landed)."""
        link = self._link("put", peer)
        data, at = self._span("put", "src", src, peer, offset, False)
        link.put(data, at, -1 if signal is None else self._slot("put", signal))

    def get(self, dst, peer, offset=0):
        """Copy `peer`'s window from element `offset` into `dst`; returns with the data."""
        link = self._link("get", peer)
        data, at = self._span("get", "dst", dst, peer, offset, True)
        link.get(data, at)

    def signal(self, peer, slot, value=1):
        """Add `value` to `peer`'s slot, after this rank's earlier puts to it have landed."""
        link = self._link("signal", peer)
        link.signal(self._slot("signal", slot), self._count("signal", "value", value, self.name))

    def flush(self, peer=None):
        """Return once this rank's puts and signals (to `peer`, or to all) have landed."""
        links = self.links.values() if peer is None else [self._link("flush", peer)]
        if self.closed:
            raise InvalidArgument(f"{self.name} flush: the window is closed")
        for link in links:
            link.flush()

    def synchronize(self, timeout=None):
        """Host windows: every call is done when it returns; this is `flush()` (the CUDA
        window's synchronize waits for its queued stream work)."""
        self.flush()

    def wait_signal(self, slot, value, timeout=None):
        """Block until this rank's `slot` holds at least `value`, then subtract `value`.
        Raises Timeout after `timeout` s (default: the communicator's), and PeerFailure as
        soon as a peer is known gone while the slot is short, naming the peer and the slot."""
        if self.closed:
            raise InvalidArgument(f"{self.name} wait_signal: the window is closed")
        slot = self._slot("wait_signal", slot)
        value = self._count("wait_signal", "value", value, self.name)
        board = self.board
        if board.value(slot) >= value:
            board.consume(slot, value)
            return
        limit = self.timeout if timeout is None else float(timeout)
        if self.service is None:
            return self._wait(slot, value, limit, None)
        with self.service.serving() as svc:      # read the TCP peers' requests here, no hand-off
            return self._wait(slot, value, limit, svc)

    def _wait(self, slot, value, limit, svc):
        board = self.board
        start = time.monotonic()
        check_at, pause = start + 0.05, 1e-5
        while True:
            if board.value(slot) >= value:
                board.consume(slot, value)
                return
            now = time.monotonic()
            if now >= check_at:
                self._check_peers(slot, value)
                check_at = now + 0.05
            if now - start > limit:
                raise Timeout(f"{self.name} wait_signal: rank {self.rank} waited {limit:g}s for signal slot "
                              f"{slot} to reach {value}; it holds {board.value(slot)}")
            if now - start < self._spin:     # poll without sleeping first, as the executor does
                if svc is not None:
                    svc.poll(0)
                os.sched_yield()
            elif svc is not None:            # TCP requests wake this thread; same-host ones are polled
                svc.poll(pause if self._polls else min(0.05, limit))
                pause = min(pause * 2, 1e-3)
            else:
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)

    def _check_peers(self, slot, value):
        for p, link in self.links.items():
            why = link.failure()
            if why is not None:
                raise PeerFailure(f"{self.name} wait_signal: rank {self.rank} waits for signal slot {slot} "
                                  f"to reach {value} (it holds {self.board.value(slot)}), but rank {p} "
                                  f"is gone: {why}")

    # ---- teardown ------------------------------------------------------------------------
    def close(self):
        """Collective: flush, wait for every rank, then unmap and disconnect."""
        if self.closed:
            return
        try:
            self.flush()
            if self.service is not None:
                self.service.closing = True  # peers' links close from here on: not a failure
            self.comm.barrier()
        finally:
            self._teardown()

    def _teardown(self):
        self.closed = True
        if self.service is not None:
            self.service.close()
        for link in self.links.values():
            link.close()
        self.links = {}
        if self._mr is not None:
            release(self._mr)
            self._mr = None
        self.board.close()

    def transport(self, peer) -> str:
        """How this rank reaches `peer`'s window: "local", "cma" or "tcp"."""
        return self._link("transport", peer).kind

    def __repr__(self):
        return f"<pyccl.Window {self.name} rank {self.rank}/{self.size} {self.buffer.count} {self.dtype}>"
