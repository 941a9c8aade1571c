"""The point-to-point engine: Gloo-like send/recv over one communicator's connections, on its
own thread (eager sends, unexpected messages buffered, receives matched by (source, tag) in
order, any-source, CUDA tensors staged through pinned host memory)."""
import collections
import logging
import os
import select
import struct
import threading
import time
import traceback

import torch

from ..buffers import torch_numpy
from ..errors import PeerFailure, PycclError, Timeout, TransportError

from .tensors import _nbytes

log = logging.getLogger("pyccl")


_MSG_HDR = struct.Struct("<QqQ")      # magic, tag, nbytes
_MSG_MAGIC = 0x5059434350325031       # "PYCCP2P1"


# ---- point-to-point engine ---------------------------------------------------------------------
class _SendOp:
    __slots__ = ("peer", "tag", "data", "hdr", "work", "deadline", "req", "failed", "ready")


class _RecvOp:
    __slots__ = ("peer", "tag", "view", "nbytes", "work", "deadline", "writeback", "req", "failed", "src")


class _Msg:
    """A message that arrived before a matching receive was posted (or is being drained)."""
    __slots__ = ("peer", "tag", "nbytes", "buf", "req", "bound")


class _P2PEngine:
    """Gloo-like point-to-point over one communicator's connections, on its own thread.

    Per peer and direction the connection is a FIFO of messages; each user message is a 24-byte
    header (magic, tag, byte count) then the payload. The engine always has a header receive
    posted on every live connection, so incoming data is always drained: a payload goes straight
    into the matching posted receive, or into a buffer until one is posted."""

    def __init__(self, comm, rank, timeout_s, name):
        self.comm, self.rank, self.timeout = comm, rank, timeout_s
        self.name = name
        # peer -> Connection, all opened now (connections are lazy otherwise); only this thread uses them
        self.conns = comm.conns.open_all() if hasattr(comm.conns, "open_all") else dict(comm.conns)
        self.dead = {}                          # peer -> error text
        self._lock = threading.Lock()
        self._incoming = collections.deque()
        self._closed = False
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self.hdr = {}                           # peer -> (bytearray, request)
        self.posted = []                        # _RecvOp not matched yet, in post order
        self.unexpected = []                    # _Msg in arrival order
        self.inflight_recv = []                 # _RecvOp whose payload is landing
        self.draining = []                      # _Msg whose payload is landing
        self.sends = []                         # _SendOp in flight
        self.staged = []                        # _SendOp whose device-to-host copy is not done yet
        for p, conn in self.conns.items():
            self._post_header(p, conn)
        self._thread = threading.Thread(target=self._loop, name=f"pyccl-p2p-{name}-r{rank}", daemon=True)
        self._thread.start()

    # -- API (any thread) --
    def send(self, flat_bytes, peer, tag, work, ready=None):
        """`ready`: a torch.cuda.Event after which `flat_bytes` (pinned host memory, copied from a
        CUDA tensor) holds the data; the send starts once it has happened."""
        op = _SendOp()
        op.peer, op.tag, op.data, op.work, op.ready = peer, int(tag), flat_bytes, work, ready
        op.deadline = time.monotonic() + self.timeout
        op.req, op.failed = None, False
        op.hdr = bytearray(_MSG_HDR.pack(_MSG_MAGIC, op.tag, _nbytes(flat_bytes)))
        self._submit(("send", op))

    def recv(self, flat_bytes, peer, tag, work, writeback):
        op = _RecvOp()
        op.peer, op.tag, op.view, op.work, op.writeback = peer, int(tag), flat_bytes, work, writeback
        op.nbytes = _nbytes(flat_bytes)
        op.deadline = time.monotonic() + self.timeout
        op.req, op.failed, op.src = None, False, None
        self._submit(("recv", op))

    def _submit(self, item):
        with self._lock:
            if self._closed:
                raise PycclError(f"{item[1].work.what}: the process group is shut down")
            self._incoming.append(item)
        self._wake()

    def _wake(self):
        try:
            os.write(self._wfd, b"x")
        except (BlockingIOError, OSError):
            pass

    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        err = PycclError(f"{self.name}: the process group was shut down with this operation pending")
        for op in self.posted + self.inflight_recv + self.sends + self.staged:
            self._fail(op, err)
        for _, op in list(self._incoming):
            self._fail(op, err)
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- engine thread --
    def _post_header(self, peer, conn):
        buf = bytearray(_MSG_HDR.size)
        self.hdr[peer] = (buf, conn.irecv(memoryview(buf)))

    def _loop(self):
        idle = 0
        try:
            while not self._closed:
                moved = self._take()
                if self.staged and self._start_staged():
                    moved = True
                for p, conn in list(self.conns.items()):
                    if p in self.dead:
                        continue
                    try:
                        if conn.progress():
                            moved = True
                    except (PeerFailure, TransportError, OSError) as e:
                        self._peer_failed(p, f"{type(e).__name__}: {e}")
                        moved = True
                if self._advance():
                    moved = True
                self._expire()
                if moved:
                    idle = 0
                    continue
                idle += 1
                self._idle_wait(idle)
        except BaseException:  # noqa: BLE001 - a bug here must not hang users silently
            text = traceback.format_exc()
            log.error("pyccl p2p engine %s died:\n%s", self.name, text)
            err = PycclError(f"{self.name}: point-to-point engine failed:\n{text}")
            for op in self.posted + self.inflight_recv + self.sends + self.staged:
                self._fail(op, err)
            with self._lock:
                self._closed = True
                pending = list(self._incoming)
                self._incoming.clear()
            for _, op in pending:
                self._fail(op, err)

    def _busy(self):
        return bool(self.posted or self.inflight_recv or self.sends or self.draining or self._incoming or
                    self.staged)

    def _start_staged(self):
        """Start the staged sends whose device-to-host copy has finished."""
        ready, still = [], []
        for op in self.staged:
            if op.failed:
                continue
            (ready if op.ready.query() else still).append(op)
        self.staged = still
        for op in ready:
            op.ready = None
            self._start_send(op)
        return bool(ready)

    def _idle_wait(self, idle):
        """Sleep until a socket or the wake-up pipe is ready. Never spin holding the GIL: the
        user's thread needs it to post the next operation. Connections without file handles
        (shared memory) are polled, backing off from 50 us to 2 ms (20 ms when nothing waits)."""
        rd, wr = [self._rfd], []
        poll = bool(self.staged)                # device copies are polled
        for p, conn in self.conns.items():
            if p in self.dead:
                continue
            h = conn.wait_handles()
            if h is None:
                poll = True
                continue
            rd += h[0]
            wr += h[1]
        if poll:
            limit = min(0.00005 * idle, 0.002 if self._busy() else 0.02)
        else:
            limit = 0.05 if self._busy() else 0.5
        try:
            select.select(rd, wr, [], limit)
        except (OSError, ValueError):
            time.sleep(0.001)
        try:
            while os.read(self._rfd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _take(self):
        with self._lock:
            items = list(self._incoming)
            self._incoming.clear()
        for kind, op in items:
            if kind == "send":
                self._start_send(op)
            else:
                self._start_recv(op)
        return bool(items)

    def _start_send(self, op):
        if op.ready is not None:
            if not op.ready.query():
                self.staged.append(op)
                return
            op.ready = None
        if op.peer == self.rank:                        # to self: deliver locally
            m = _Msg()
            m.peer, m.tag, m.nbytes = self.rank, op.tag, _nbytes(op.data)
            m.buf, m.req, m.bound = op.data.clone(), None, None
            op.work._finish()
            self._arrived(m)
            return
        if op.peer in self.dead:
            self._fail(op, PeerFailure(f"{op.work.what}: rank {op.peer} is gone ({self.dead[op.peer]})"))
            return
        conn = self.conns[op.peer]
        req = conn.isend(memoryview(op.hdr))
        if op.data.numel():
            req = conn.isend(memoryview(torch_numpy(op.data)))
        op.req = req
        self.sends.append(op)

    def _start_recv(self, op):
        for i, m in enumerate(self.unexpected):
            if m.tag == op.tag and (op.peer is None or m.peer == op.peer):
                del self.unexpected[i]
                if m.req is None or m.req.done:
                    self._deliver(m, op)
                else:
                    m.bound = op
                return
        if op.peer is not None and op.peer != self.rank and op.peer in self.dead:
            self._fail(op, PeerFailure(f"{op.work.what}: rank {op.peer} is gone ({self.dead[op.peer]})"))
            return
        self.posted.append(op)

    def _deliver(self, m, op):
        """Complete receive `op` with the fully arrived buffered message `m`."""
        if op.failed:
            return
        if m.nbytes != op.nbytes:
            self._fail(op, self._size_error(op, m.peer, m.nbytes))
            return
        if m.nbytes:
            op.view.copy_(m.buf)
        self._complete_recv(op, m.peer)

    def _complete_recv(self, op, src):
        try:
            op.writeback()
        except Exception as e:  # noqa: BLE001 - reported through the work
            self._fail(op, e)
            return
        op.work._finish(source=src)

    def _size_error(self, op, peer, nbytes):
        return TransportError(f"{op.work.what}: size mismatch with rank {peer} (tag {op.tag}): it sent "
                              f"{nbytes} bytes, this receive expects {op.nbytes} bytes")

    def _arrived(self, m):
        """A header (and, for self-sends, the data) arrived: match it or keep it."""
        for i, op in enumerate(self.posted):
            if op.tag == m.tag and (op.peer is None or op.peer == m.peer):
                del self.posted[i]
                if m.req is None and m.buf is not None:      # local message, data in hand
                    self._deliver(m, op)
                    return
                if m.nbytes != op.nbytes:
                    self._fail(op, self._size_error(op, m.peer, m.nbytes))
                    self._drain(m)
                    return
                if m.nbytes == 0:
                    self._complete_recv(op, m.peer)
                    return
                op.req = self.conns[m.peer].irecv(memoryview(torch_numpy(op.view)))
                op.src = m.peer
                self.inflight_recv.append(op)
                return
        if m.buf is None:
            self._drain(m)
        self.unexpected.append(m)

    def _drain(self, m):
        """Receive a message's payload into a fresh buffer."""
        m.buf = torch.empty(m.nbytes, dtype=torch.uint8)
        m.req = self.conns[m.peer].irecv(memoryview(torch_numpy(m.buf))) if m.nbytes else None
        if m.req is not None:
            self.draining.append(m)

    def _advance(self):
        moved = False
        for p, (buf, req) in list(self.hdr.items()):
            if p in self.dead or not req.done:
                continue
            magic, tag, nbytes = _MSG_HDR.unpack(bytes(buf))
            if magic != _MSG_MAGIC:
                self._peer_failed(p, f"garbage header from rank {p} (magic {magic:#x})")
                continue
            m = _Msg()
            m.peer, m.tag, m.nbytes, m.buf, m.req, m.bound = p, tag, nbytes, None, None, None
            self._arrived(m)
            self._post_header(p, self.conns[p])
            moved = True
        if self.inflight_recv:
            still = []
            for op in self.inflight_recv:
                if op.req.done:
                    if not op.failed:
                        self._complete_recv(op, op.src)
                    moved = True
                else:
                    still.append(op)
            self.inflight_recv = still
        if self.draining:
            still = []
            for m in self.draining:
                if m.req.done:
                    moved = True
                    if m.bound is not None:
                        self._deliver(m, m.bound)
                        m.bound = None
                else:
                    still.append(m)
            self.draining = still
        if self.sends:
            still = []
            for op in self.sends:
                if op.req.done:
                    if not op.failed:
                        op.work._finish()
                    moved = True
                else:
                    still.append(op)
            self.sends = still
        return moved

    def _expire(self):
        if not (self.posted or self.inflight_recv or self.sends or self.staged):
            return
        now = time.monotonic()
        for lst in (self.posted, self.inflight_recv, self.sends, self.staged):
            for op in lst:
                if not op.failed and now > op.deadline:
                    frm = "any rank" if isinstance(op, _RecvOp) and op.peer is None else f"rank {op.peer}"
                    kind = "receive from" if isinstance(op, _RecvOp) else "send to"
                    self._fail(op, Timeout(f"{op.work.what}: {kind} {frm} (tag {op.tag}) did not complete "
                                           f"within the group timeout of {self.timeout:.0f}s"))
        self.posted = [op for op in self.posted if not op.failed]
        self.staged = [op for op in self.staged if not op.failed]

    def _fail(self, op, err):
        if not op.failed:
            op.failed = True
            op.work._finish(err)

    def _peer_failed(self, p, why):
        if p in self.dead:
            return
        self.dead[p] = why
        err = PeerFailure(f"{self.name}: rank {p} is gone ({why})")
        for op in self.posted:
            if op.peer == p:
                self._fail(op, err)
        self.posted = [op for op in self.posted if not op.failed]
        for op in self.inflight_recv:
            if op.src == p:
                self._fail(op, err)
        self.inflight_recv = [op for op in self.inflight_recv if not op.failed]
        for op in self.sends:
            if op.peer == p:
                self._fail(op, err)
        self.sends = [op for op in self.sends if not op.failed]
        for op in self.staged:
            if op.peer == p:
                self._fail(op, err)
        self.staged = [op for op in self.staged if not op.failed]
        self.draining = [m for m in self.draining if m.peer != p]
