"""The point-to-point engine: Gloo-like send/recv over one communicator's connections, on its
own thread (eager sends, unexpected messages buffered, receives matched by (source, tag) in
order, any-source; CUDA tensors go GPU to GPU through CUDA IPC between the ranks of one host
(p2p_ipc.py), through pinned host memory otherwise). Its Works are pyccl's queue Work
(works._PycclWork wraps one), ended by this thread.

Why not the communicator's queue: the queue runs one call at a time to its end, so posted as
calls, a send and a receive of a ring (batch_isend_irecv) deadlock once the message outgrows the
socket buffers (each rank's queue sits in its own send; measured: 64 MiB on TCP times out, 1 KiB
passes); run as one endless queue call, this loop would hold the queue for good. And the queue
breaks on any error, while here a failure is one peer's or one receive's (a size mismatch
leaves the pair usable), as in Gloo."""
import collections
import itertools
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

from . import p2p_ipc
from .tensors import _nbytes

log = logging.getLogger("pyccl")


_MSG_HDR = struct.Struct("<QqQQQQ")   # magic, tag, nbytes, message id, allocation id, offset
_MSG_MAGIC = int.from_bytes(b"PYCCP2P1", "big")   # header, then the payload
_IPC_MAGIC = int.from_bytes(b"PYCCIPC1", "big")   # the payload waits in the sender's GPU (p2p_ipc.py)
_ACK_MAGIC = int.from_bytes(b"PYCCACK1", "big")   # about IPC message `message id`: nbytes = _ACK_*
_FOR_MAGIC = int.from_bytes(b"PYCCFOR1", "big")   # the payload of IPC message `message id`, asked for
_ACK_DONE = 0                         # copied: the sender may reuse its block
_ACK_SEND_BYTES = 1                   # could not copy over IPC: send the bytes on the connection


# ---- point-to-point engine ---------------------------------------------------------------------
class _SendOp:
    __slots__ = ("peer", "tag", "data", "hdr", "work", "deadline", "req", "failed", "ready", "block", "msgid")


class _RecvOp:
    __slots__ = ("peer", "tag", "view", "nbytes", "work", "deadline", "writeback", "req", "failed", "src",
                 "target")


class _Msg:
    """A message that arrived before a matching receive was posted (or is being drained).
    `ipc`: (message id, allocation id, offset) of an IPC announcement, else None."""
    __slots__ = ("peer", "tag", "nbytes", "buf", "req", "bound", "ipc")


class _Release:
    """The Work of an internal send: the bytes of IPC message `block` a receiver asked for.
    The block goes back to the pool once they are out (on failure it stays lent: never reused)."""

    def __init__(self, ipc, block, what):
        self.ipc, self.block, self.what = ipc, block, what

    def _finish(self, error=None, source=None):
        if error is None:
            self.ipc.give_back(self.block)
        else:
            log.info("pyccl p2p: %s failed: %s", self.what, error)


class _P2PEngine:
    """Gloo-like point-to-point over one communicator's connections, on its own thread.

    Per peer and direction the connection is a FIFO of messages; each user message is a 48-byte
    header (magic, tag, byte count, and for CUDA IPC the message id and where the bytes are)
    then the payload (none for IPC: see p2p_ipc.py). The engine always has a header receive
    posted on every live connection, so incoming data is always drained: a payload goes straight
    into the matching posted receive, or into a buffer until one is posted.

    Messages to one peer leave in the order they were posted, also when some wait for a device
    copy first (a later one waits behind them), so matching order holds across CPU, staged and
    IPC sends."""

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
        self.staged = []                        # _SendOp waiting for a device copy (or behind one)
        # CUDA IPC (p2p_ipc.py) unless PYCCL_P2P_IPC=0; else None: every CUDA tensor goes through host memory
        self.counters = collections.Counter()
        self.ipc = p2p_ipc.P2PIpc(comm, rank, timeout_s, self.counters) if p2p_ipc.enabled() else None
        self._ids = itertools.count(1)
        self.ipc_out = {}                       # message id -> _SendOp announced, block not acknowledged
        self.pulling = {}                       # (peer, message id) -> _RecvOp waiting for the bytes (FOR)
        self.acking = []                        # (peer, message id, event): ack once our copy is done
        self.ctrl = []                          # (peer, header, request) of acks in flight
        self._ipc_warned = set()                # peers whose blocks we could not copy from (warned once)
        for p, conn in self.conns.items():
            self._post_header(p, conn)
        self._thread = threading.Thread(target=self._loop, name=f"pyccl-p2p-{name}-r{rank}", daemon=True)
        self._thread.start()

    # -- API (any thread) --
    def send(self, flat_bytes, peer, tag, work, ready=None, block=None):
        """`ready`: a torch.cuda.Event after which the data is in place (in `flat_bytes`, pinned
        host memory copied from a CUDA tensor, or in `block`); the send starts once it has
        happened. `block`: a p2p_ipc staging Block holding the data (`flat_bytes` is None):
        only where it is goes to the peer, which copies it GPU to GPU and acknowledges."""
        op = _SendOp()
        op.peer, op.tag, op.data, op.work, op.ready, op.block = peer, int(tag), flat_bytes, work, ready, block
        op.deadline = time.monotonic() + self.timeout
        op.req, op.failed = None, False
        if block is not None:
            op.msgid = next(self._ids)
            op.hdr = bytearray(_MSG_HDR.pack(_IPC_MAGIC, op.tag, block.nbytes, op.msgid, block.bufid, block.offset))
        else:
            op.msgid = 0
            op.hdr = bytearray(_MSG_HDR.pack(_MSG_MAGIC, op.tag, _nbytes(flat_bytes), 0, 0, 0))
            if ready is not None and _nbytes(flat_bytes):     # an empty message moves nothing
                self.counters["staged_sent"] += 1
        self._submit(("send", op))

    def recv(self, flat_bytes, peer, tag, work, writeback, target=None):
        """`target`: a p2p_ipc.CudaRecv for a CUDA tensor (`flat_bytes` is None then: it lands
        GPU to GPU, or in the target's pinned buffer, and `writeback` copies it up)."""
        op = _RecvOp()
        op.peer, op.tag, op.view, op.work, op.writeback = peer, int(tag), flat_bytes, work, writeback
        op.target = target
        op.nbytes = target.nbytes if target is not None else _nbytes(flat_bytes)
        op.deadline = time.monotonic() + self.timeout
        op.req, op.failed, op.src = None, False, None
        self._submit(("recv", op))

    def stats(self):
        """Counters of the CUDA paths: ipc_sent / ipc_received (messages that went GPU to GPU),
        ipc_refused / ipc_resent (receives that asked for the bytes instead, on either side),
        staged_sent (CUDA sends through host memory), pool_full (of those, for want of staging
        room), blocks_lent (staging blocks not acknowledged yet); ipc: whether the path is on."""
        out = {k: 0 for k in ("ipc_sent", "ipc_received", "ipc_refused", "ipc_resent", "staged_sent", "pool_full")}
        out.update(self.counters)
        out["ipc"] = self.ipc is not None and self.ipc.off is None
        out["blocks_lent"] = self.ipc.lent() if self.ipc is not None else 0
        return out

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
        for op in self._pending_ops():
            self._fail(op, err)
        for _, op in list(self._incoming):
            self._fail(op, err)
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.ipc is not None:
            self.ipc.close()

    def _pending_ops(self):
        return self.posted + self.inflight_recv + self.sends + self.staged + list(self.pulling.values())

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
                if self.acking and self._send_acks():
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
            for op in self._pending_ops():
                self._fail(op, err)
            with self._lock:
                self._closed = True
                pending = list(self._incoming)
                self._incoming.clear()
            for _, op in pending:
                self._fail(op, err)

    def _busy(self):
        return bool(self.posted or self.inflight_recv or self.sends or self.draining or self._incoming or
                    self.staged or self.acking or self.pulling)

    def _start_staged(self):
        """Start the waiting sends whose device copy has finished and that no earlier send to
        the same peer is still waiting for (messages to a peer keep their order)."""
        ready, still, blocked = [], [], set()
        for op in self.staged:
            if op.failed:
                continue
            if op.peer in blocked or (op.ready is not None and not op.ready.query()):
                blocked.add(op.peer)
                still.append(op)
            else:
                ready.append(op)
        self.staged = still
        for op in ready:
            op.ready = None
            self._post_send(op)
        return bool(ready)

    def _idle_wait(self, idle):
        """Sleep until a socket or the wake-up pipe is ready. Never spin holding the GIL: the
        user's thread needs it to post the next operation. Connections without file handles
        (shared memory) are polled, backing off from 50 us to 2 ms (20 ms when nothing waits)."""
        rd, wr = [self._rfd], []
        poll = bool(self.staged or self.acking)     # device copies are polled
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
        if op.ready is not None or self.staged:
            behind = any(s.peer == op.peer for s in self.staged)
            if behind or (op.ready is not None and not op.ready.query()):
                self.staged.append(op)
                return
            op.ready = None
        self._post_send(op)

    def _post_send(self, op):
        if op.peer == self.rank:                        # to self: deliver locally
            m = _Msg()
            m.peer, m.tag, m.nbytes = self.rank, op.tag, _nbytes(op.data)
            m.buf, m.req, m.bound, m.ipc = op.data.clone(), None, None, None
            op.work._finish()
            self._arrived(m)
            return
        if op.peer in self.dead:
            self._fail(op, PeerFailure(f"{op.work.what}: rank {op.peer} is gone ({self.dead[op.peer]})"))
            return
        conn = self.conns[op.peer]
        req = conn.isend(memoryview(op.hdr))
        if op.data is not None and op.data.numel():
            req = conn.isend(memoryview(torch_numpy(op.data)))
        op.req = req
        if op.block is not None:
            self.ipc_out[op.msgid] = op
            self.counters["ipc_sent"] += 1
        self.sends.append(op)

    def _start_recv(self, op):
        for i, m in enumerate(self.unexpected):
            if m.tag == op.tag and (op.peer is None or m.peer == op.peer):
                del self.unexpected[i]
                if m.ipc is not None:
                    self._match_ipc(m, op)
                elif m.req is None or m.req.done:
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
            self._landing(op).copy_(m.buf)
        self._complete_recv(op, m.peer)

    def _landing(self, op):
        """Where a receive's bytes land from the connection (made on demand for CUDA targets)."""
        if op.view is None:
            op.view = op.target.landing()
        return op.view

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
                if m.ipc is not None:
                    self._match_ipc(m, op)
                    return
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
                op.req = self.conns[m.peer].irecv(memoryview(torch_numpy(self._landing(op))))
                op.src = m.peer
                self.inflight_recv.append(op)
                return
        if m.buf is None and m.ipc is None:
            self._drain(m)
        self.unexpected.append(m)

    # -- CUDA IPC (p2p_ipc.py has the protocol) --
    def _match_ipc(self, m, op):
        """Receive `op` matched IPC announcement `m`: copy GPU to GPU, or ask for the bytes."""
        msgid, bufid, offset = m.ipc
        if m.peer in self.dead:
            self._fail(op, PeerFailure(f"{op.work.what}: rank {m.peer} is gone ({self.dead[m.peer]}) with its "
                                       f"message (tag {op.tag}) still in its GPU memory"))
            return
        if m.nbytes != op.nbytes:
            self._fail(op, self._size_error(op, m.peer, m.nbytes))
            self._ack(m.peer, msgid, _ACK_DONE)                 # dropped, as a drained payload is
            return
        if op.target is not None and self.ipc is not None:
            try:
                ev = self.ipc.pull(op.target, m.peer, bufid, offset, m.nbytes)
            except (PycclError, RuntimeError) as e:            # cupy's CUDA errors are RuntimeErrors
                (log.debug if m.peer in self._ipc_warned else log.warning)(
                    "pyccl p2p %s: %s: GPU-to-GPU copy from rank %d impossible (%s: %s); receiving the "
                    "bytes through the connection", self.name, op.work.what, m.peer, type(e).__name__, e)
                self._ipc_warned.add(m.peer)
            else:
                self.acking.append((m.peer, msgid, ev))
                op.work._finish(source=m.peer)                  # the Work carries the copy's event
                return
        self.counters["ipc_refused"] += 1
        op.src = m.peer
        self.pulling[(m.peer, msgid)] = op
        self._ack(m.peer, msgid, _ACK_SEND_BYTES)

    def _ack(self, peer, msgid, status):
        if peer in self.dead:
            return
        hdr = bytearray(_MSG_HDR.pack(_ACK_MAGIC, 0, status, msgid, 0, 0))
        self.ctrl.append((peer, hdr, self.conns[peer].isend(memoryview(hdr))))

    def _send_acks(self):
        """Acknowledge the IPC copies that have finished on the GPU."""
        still, moved = [], False
        for peer, msgid, ev in self.acking:
            if ev.query():
                self._ack(peer, msgid, _ACK_DONE)
                moved = True
            else:
                still.append((peer, msgid, ev))
        self.acking = still
        return moved

    def _on_ack(self, p, msgid, status):
        """Sender side: rank `p` copied IPC message `msgid` (its block is free again), or asks
        for its bytes."""
        op = self.ipc_out.pop(msgid, None)
        if op is None or op.peer != p or self.ipc is None:
            self._peer_failed(p, f"rank {p} acknowledged IPC message {msgid}, which this rank never sent it")
            return
        if status == _ACK_DONE:
            self.ipc.give_back(op.block)
            return
        self.counters["ipc_resent"] += 1
        try:
            host, ready = self.ipc.to_host(op.block)
        except RuntimeError as e:
            log.error("pyccl p2p %s: cannot copy message %d for rank %d to host memory: %s", self.name, msgid, p, e)
            return
        fb = _SendOp()
        fb.peer, fb.tag, fb.data, fb.ready, fb.block, fb.msgid = p, op.tag, host, ready, None, msgid
        fb.work = _Release(self.ipc, op.block, f"{op.work.what}: the bytes rank {p} asked for")
        fb.deadline = time.monotonic() + self.timeout
        fb.req, fb.failed = None, False
        fb.hdr = bytearray(_MSG_HDR.pack(_FOR_MAGIC, op.tag, op.block.nbytes, msgid, 0, 0))
        self._start_send(fb)

    def _on_bytes_for(self, p, msgid, nbytes):
        """The bytes of IPC message `msgid` that this rank asked `p` for: they follow the header."""
        op = self.pulling.pop((p, msgid), None)
        if op is None or op.failed or nbytes != op.nbytes:
            if op is not None and not op.failed:
                self._fail(op, self._size_error(op, p, nbytes))
            m = _Msg()
            m.peer, m.tag, m.nbytes, m.buf, m.req, m.bound, m.ipc = p, None, nbytes, None, None, None, None
            self._drain(m)                                      # read and drop
            return
        op.req = self.conns[p].irecv(memoryview(torch_numpy(self._landing(op))))
        self.inflight_recv.append(op)

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
            magic, tag, nbytes, msgid, bufid, offset = _MSG_HDR.unpack(bytes(buf))
            if magic == _MSG_MAGIC or magic == _IPC_MAGIC:
                m = _Msg()
                m.peer, m.tag, m.nbytes, m.buf, m.req, m.bound = p, tag, nbytes, None, None, None
                m.ipc = (msgid, bufid, offset) if magic == _IPC_MAGIC else None
                self._arrived(m)
            elif magic == _ACK_MAGIC:
                self._on_ack(p, msgid, nbytes)
            elif magic == _FOR_MAGIC:
                self._on_bytes_for(p, msgid, nbytes)
            else:
                self._peer_failed(p, f"garbage header from rank {p} (magic {magic:#x})")
                continue
            moved = True
            if p not in self.dead:
                self._post_header(p, self.conns[p])
        if self.ctrl:
            self.ctrl = [c for c in self.ctrl if not c[2].done]
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
        if not (self.posted or self.inflight_recv or self.sends or self.staged or self.pulling):
            return
        now = time.monotonic()
        for op in self._pending_ops():
            if not op.failed and now > op.deadline:
                if isinstance(op, _RecvOp):
                    who = op.peer if op.peer is not None else op.src
                    kind, frm = "receive from", "any rank" if who is None else f"rank {who}"
                else:
                    kind, frm = "send to", f"rank {op.peer}"
                self._fail(op, Timeout(f"{op.work.what}: {kind} {frm} (tag {op.tag}) did not complete "
                                       f"within the group timeout of {self.timeout:.0f}s"))
        self.posted = [op for op in self.posted if not op.failed]
        self.staged = [op for op in self.staged if not op.failed]
        if self.pulling:
            self.pulling = {k: op for k, op in self.pulling.items() if not op.failed}

    def _fail(self, op, err):
        if not op.failed:
            op.failed = True
            if isinstance(op, _SendOp) and op.block is not None and op.req is None:
                self.ipc.give_back(op.block)            # never announced: nobody reads it
            op.work._finish(err)

    def _peer_failed(self, p, why):
        """Rank `p` is gone: fail every operation that waits for it, each naming itself. Staging
        blocks it was sent stay lent (its process may not be quite gone yet)."""
        if p in self.dead:
            return
        self.dead[p] = why
        for op in self._pending_ops():
            src = op.peer if isinstance(op, _SendOp) or op.peer is not None else op.src
            if src == p:
                self._fail(op, PeerFailure(f"{op.work.what}: rank {p} is gone ({why})"))
        self.posted = [op for op in self.posted if not op.failed]
        self.inflight_recv = [op for op in self.inflight_recv if not op.failed]
        self.sends = [op for op in self.sends if not op.failed]
        self.staged = [op for op in self.staged if not op.failed]
        self.pulling = {k: op for k, op in self.pulling.items() if not op.failed}
        self.draining = [m for m in self.draining if m.peer != p]
        self.acking = [a for a in self.acking if a[0] != p]
        self.ctrl = [c for c in self.ctrl if c[0] != p]
        self.ipc_out = {k: op for k, op in self.ipc_out.items() if op.peer != p}
