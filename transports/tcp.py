"""TCP transport: non-blocking sockets, several per peer for large messages.

Each peer gets up to `PYCCL_TCP_SOCKETS` sockets ("lanes"): lane 0 when the connection opens,
the others when the first message big enough to be striped is posted (so a barrier's or a
small all-reduce's peers cost one fd each). A message of at least
`PYCCL_TCP_STRIPE_MIN` bytes is cut into one part per lane; smaller ones go on lane 0.
Both ends cut the same way because both know the length they expect; every part
carries a 24-byte header (magic, message number, length, call signature of ccl/callsig.py) so a
peer that makes a different call, sends a different size or falls out of step is caught with
a clear error naming what differs, not silent garbage.

Connection set-up (transports/tcp_dial.py): opened the first time a plan or call needs the peer,
through the process's one listener; the lower rank dials, both ends prove they know the job
secret (HMAC-SHA256 over fresh nonces both ways), no store request.
"""
import struct
import time
from collections import deque

from .. import settings
from ..callsig import mismatch_of
from ..errors import PeerFailure, TransportError
from .base import Connection, Request, Transport
from .tcp_dial import HELLO, KIND_TCP, MAGIC, Dial, check_alive, check_fds, digest, link

_MAGIC = 0x50434331            # "PCC1"
_HDR = struct.Struct("<IIQQ")  # magic, message number (mod 2**32), part length, call (callsig)


def _lanes() -> int:
    return max(1, settings.get("PYCCL_TCP_SOCKETS"))


def _stripe_min() -> int:
    return settings.get("PYCCL_TCP_STRIPE_MIN")


def _size_hint(theirs: int, mine: int) -> str:
    """Why sizes may differ when the calls agree: the plans differ (a setting differs)."""
    if theirs and theirs == mine:
        return "the calls agree, so the plans differ: same PYCCL_ALGO and PYCCL_CHUNK_BYTES on every rank?"
    return "same counts on every rank?"


class _Part(Request):
    """One lane's share of a message. Send side: `views` for sendmsg (header, payload).
    Receive side: the header is read into `hdr` first, then the payload into `view`."""

    __slots__ = ("views", "view", "hdr", "hgot", "got", "msg", "seq", "call")

    def __init__(self, view, seq, msg, call):
        super().__init__(len(view))
        self.view = view
        self.msg = msg
        self.seq = seq
        self.call = call
        self.views = None
        self.hdr = None
        self.hgot = 0
        self.got = 0


class _Message(Request):
    __slots__ = ("pending",)

    def __init__(self, nbytes, parts):
        super().__init__(nbytes)
        self.pending = parts


class TCPConnection(Connection):
    """Messages to one peer over `len(socks)` sockets, each a FIFO of parts."""

    def __init__(self, peer: int, socks: list, stripe_min: int, opener=None):
        self.peer = peer
        self.socks = socks                     # None: a lane not opened yet (see _LaneOpener)
        for s in socks:
            if s is not None:
                s.setblocking(False)
        self.opener = opener
        self.stripe_min = stripe_min
        self.sendq = [deque() for _ in socks]
        self.recvq = [deque() for _ in socks]
        self.send_seq = 0
        self.recv_seq = 0
        self.closed = False

    def _split(self, data: memoryview, seq: int, call: int) -> tuple:
        n = len(data)
        k = len(self.socks) if n >= self.stripe_min else 1
        msg = _Message(n, k)
        return msg, [_Part(data[n * i // k:n * (i + 1) // k], seq, msg, call) for i in range(k)]

    def isend(self, data: memoryview, call: int = 0) -> Request:
        msg, parts = self._split(data, self.send_seq, call)
        self.send_seq += 1
        for lane, part in enumerate(parts):
            hdr = _HDR.pack(_MAGIC, part.seq & 0xFFFFFFFF, part.nbytes, call)
            part.views = [memoryview(hdr), part.view] if part.nbytes else [memoryview(hdr)]
            self.sendq[lane].append(part)
        return msg

    def irecv(self, data: memoryview, call: int = 0) -> Request:
        msg, parts = self._split(data, self.recv_seq, call)
        self.recv_seq += 1
        for lane, part in enumerate(parts):
            part.hdr = bytearray(_HDR.size)
            self.recvq[lane].append(part)
        return msg

    def progress(self) -> bool:
        moved = False
        for lane, sock in enumerate(self.socks):
            if sock is None:
                if not (self.sendq[lane] or self.recvq[lane]):
                    continue
                sock = self.socks[lane] = self.opener.poll(lane)
                if sock is None:
                    continue
                moved = True
            if self.sendq[lane] and self._send_some(lane, sock):
                moved = True
            if self.recvq[lane] and self._recv_some(lane, sock):
                moved = True
        return moved

    def _send_some(self, lane, sock) -> bool:
        q = self.sendq[lane]
        moved = False
        while q:
            part = q[0]
            try:
                sent = sock.sendmsg(part.views)
            except BlockingIOError:
                return moved
            except OSError as e:
                raise PeerFailure(f"rank {self.peer} is gone: sending to it failed ({e})") from None
            moved = True
            views = part.views
            while sent and views:
                if sent >= len(views[0]):
                    sent -= len(views.pop(0))
                else:
                    views[0] = views[0][sent:]
                    sent = 0
            if views:
                return moved
            q.popleft()
            self._part_done(part)
        return moved

    def _recv_some(self, lane, sock) -> bool:
        q = self.recvq[lane]
        moved = False
        while q:
            part = q[0]
            if part.hdr is not None:
                view = memoryview(part.hdr)[part.hgot:]
            else:
                view = part.view[part.got:]
            try:
                got = sock.recv_into(view)
            except BlockingIOError:
                return moved
            except OSError as e:
                raise PeerFailure(f"rank {self.peer} is gone: receiving from it failed ({e})") from None
            if got == 0:
                raise PeerFailure(f"rank {self.peer} closed its connection (lane {lane}) while "
                                  f"{part.nbytes} bytes were expected from it")
            moved = True
            if part.hdr is not None:
                part.hgot += got
                if part.hgot < _HDR.size:
                    continue
                self._check_header(part, lane)
            else:
                part.got += got
            if part.got == part.nbytes:
                q.popleft()
                self._part_done(part)
        return moved

    def _check_header(self, part: _Part, lane: int) -> None:
        magic, seq, length, call = _HDR.unpack(part.hdr)
        if magic != _MAGIC:
            raise TransportError(f"garbage from rank {self.peer} on lane {lane} (bad magic {magic:#x})")
        if seq != part.seq & 0xFFFFFFFF:
            raise TransportError(f"rank {self.peer} is out of step: its message #{seq} arrived "
                                 f"where #{part.seq} was expected (ranks called different collectives?)")
        if call and part.call and call != part.call:
            raise TransportError(mismatch_of(self.peer, call, part.call))
        if length != part.nbytes:
            raise TransportError(f"size mismatch with rank {self.peer}: it sent {length} bytes, "
                                 f"this rank expected {part.nbytes} ({_size_hint(call, part.call)})")
        part.hdr = None

    @staticmethod
    def _part_done(part: _Part) -> None:
        part.done = True
        msg = part.msg
        msg.pending -= 1
        if msg.pending == 0:
            msg.done = True

    def wait_handles(self):
        if None in self.socks and any(self.sendq[i] or self.recvq[i] for i, s in enumerate(self.socks) if s is None):
            return None                        # a lane is being opened: poll
        rd = [s for lane, s in enumerate(self.socks) if self.recvq[lane]]
        wr = [s for lane, s in enumerate(self.socks) if self.sendq[lane]]
        return rd, wr

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for s in self.socks:
                try:
                    if s is not None:
                        s.close()
                except OSError:
                    pass
            if self.opener is not None:
                self.opener.close()


class _LaneOpener:
    """Opens a connection's extra lanes (sockets 1..) without blocking, when a striped message
    first needs them: the lower rank dials, the higher takes it from its listener."""

    def __init__(self, ctx, peer):
        self.ctx, self.peer = ctx, peer
        self.dials = {}

    def poll(self, lane):
        ctx = self.ctx
        if self.peer < ctx.rank:
            return ctx.listener.take((digest(ctx.comm_tag), KIND_TCP, self.peer, ctx.rank, lane, 0))
        dial = self.dials.get(lane)
        if dial is None:
            check_fds(1, f"{ctx.comm_tag}: rank {ctx.rank} opening TCP lane {lane} to rank {self.peer}")
            hello = HELLO.pack(MAGIC, KIND_TCP, ctx.rank, self.peer, lane, 0, digest(ctx.comm_tag))
            dial = self.dials[lane] = Dial(ctx.info[self.peer]["addr"], hello, ctx.listener.secret,
                                            ctx.timeout, f"{ctx.comm_tag}: rank {self.peer}")
        if not dial.step():
            return None
        del self.dials[lane]
        return dial.sock

    def close(self):
        for d in self.dials.values():
            d.close()
        self.dials = {}


class TCPTransport(Transport):
    """Works between any two ranks that can reach each other over IP."""

    name = "tcp"

    def can_connect(self, me: dict, peer: dict) -> bool:
        return True

    def connect(self, ctx, peers: list) -> dict:
        """Connections to `peers`, opened now: the lower rank of each pair dials the higher
        one's listener (its address came with the bootstrap records), `lanes` sockets each;
        no store request. Waits answer other peers' dials, so no pair waits on itself."""
        lanes = _lanes()
        for p in peers:
            theirs = ctx.info[p].get("tcp_lanes", lanes)
            if theirs != lanes:
                raise TransportError(f"rank {p} uses {theirs} TCP sockets per peer, rank "
                                     f"{ctx.rank} uses {lanes}: set PYCCL_TCP_SOCKETS alike")
        check_fds(len(peers), f"{ctx.comm_tag}: rank {ctx.rank} opening TCP connections to {len(peers)} peer(s)")
        up = [p for p in peers if p > ctx.rank]
        down = [p for p in peers if p < ctx.rank]
        # lane 0 now; the others when the first message large enough to be striped is posted
        dials = [(p, ctx.info[p]["addr"], KIND_TCP, 0, 0) for p in up]
        accepts = [(p, KIND_TCP, 0, 0) for p in down]

        def describe(waiting):
            return (f"{ctx.comm_tag}: rank {ctx.rank} waited {ctx.timeout:.0f}s for TCP connections "
                    f"with ranks {waiting} that never came")
        socks = link(ctx.listener, ctx.comm_tag, ctx.rank, dials, accepts, time.monotonic() + ctx.timeout,
                     describe, lambda waiting: check_alive(ctx, waiting), ctx.cancelled)
        out = {}
        for p in peers:
            end = "d" if p > ctx.rank else "a"
            out[p] = TCPConnection(p, [socks[(p, KIND_TCP, 0, 0, end)]] + [None] * (lanes - 1), _stripe_min(),
                                   _LaneOpener(ctx, p) if lanes > 1 else None)
        return out
