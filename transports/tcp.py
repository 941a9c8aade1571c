"""TCP transport: non-blocking sockets, several per peer for large messages.

Each peer gets `PYCCL_TCP_SOCKETS` sockets ("lanes"). A message of at least
`PYCCL_TCP_STRIPE_MIN` bytes is cut into one part per lane; smaller ones go on lane 0.
Both ends cut the same way because both know the length they expect; every part
carries a 24-byte header (magic, message number, length, call signature of ccl/callsig.py) so a
peer that makes a different call, sends a different size or falls out of step is caught with
a clear error naming what differs, not silent garbage.

Connection set-up: every rank listens on one socket, publishes host:port in the store,
connects to lower ranks and accepts from higher ones. The acceptor sends a nonce and
the connector answers HMAC-SHA256(secret, nonce + hello): no secret on the wire, no
stranger gets a connection.
"""
import hashlib
import hmac
import os
import secrets
import select
import socket
import struct
import time
from collections import deque

from ..callsig import mismatch_of
from ..errors import PeerFailure, Timeout, TransportError
from .base import Connection, Request, Transport

_MAGIC = 0x50434331            # "PCC1"
_HDR = struct.Struct("<IIQQ")  # magic, message number (mod 2**32), part length, call (callsig)
_HELLO = struct.Struct("<IIII")  # magic, from rank, to rank, lane
_NONCE = 32
_MAC = 32


def _lanes() -> int:
    return max(1, int(os.environ.get("PYCCL_TCP_SOCKETS", "2")))


def _stripe_min() -> int:
    return int(os.environ.get("PYCCL_TCP_STRIPE_MIN", str(1 << 18)))


def _mac(secret: bytes, nonce: bytes, hello: bytes, tag: str) -> bytes:
    return hmac.new(secret, nonce + hello + tag.encode(), hashlib.sha256).digest()


def _size_hint(theirs: int, mine: int) -> str:
    """Why sizes may differ when the calls agree: the plans differ (a setting differs)."""
    if theirs and theirs == mine:
        return "the calls agree, so the plans differ: same PYCCL_ALGO and PYCCL_CHUNK_BYTES on every rank?"
    return "same counts on every rank?"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("closed during handshake")
        buf += part
    return bytes(buf)


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

    def __init__(self, peer: int, socks: list, stripe_min: int):
        self.peer = peer
        self.socks = socks
        for s in socks:
            s.setblocking(False)
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
        rd = [s for lane, s in enumerate(self.socks) if self.recvq[lane]]
        wr = [s for lane, s in enumerate(self.socks) if self.sendq[lane]]
        return rd, wr

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for s in self.socks:
                try:
                    s.close()
                except OSError:
                    pass


class TCPTransport(Transport):
    """Works between any two ranks that can reach each other over IP."""

    name = "tcp"

    def can_connect(self, me: dict, peer: dict) -> bool:
        return True

    def connect(self, ctx, peers: list) -> dict:
        lanes = _lanes()
        listener = socket.create_server((ctx.bind_host, 0), backlog=max(128, len(peers) * lanes * 2))
        try:
            host, port = listener.getsockname()[:2]
            ctx.store.set(f"tcp/{ctx.rank}", f"{host}:{port}:{lanes}".encode())
            socks = {p: [None] * lanes for p in peers}
            deadline = time.monotonic() + ctx.timeout
            for p in peers:
                if p < ctx.rank:
                    addr = ctx.store.get(f"tcp/{p}", timeout=ctx.timeout).decode()
                    phost, pport, plane = addr.rsplit(":", 2)
                    if int(plane) != lanes:
                        raise TransportError(f"rank {p} uses {plane} TCP sockets per peer, rank "
                                             f"{ctx.rank} uses {lanes}: set PYCCL_TCP_SOCKETS alike")
                    for lane in range(lanes):
                        socks[p][lane] = self._dial(ctx, p, phost, int(pport), lane, deadline)
            self._accept_all(ctx, listener, socks, [p for p in peers if p > ctx.rank], lanes, deadline)
        finally:
            listener.close()
        return {p: TCPConnection(p, socks[p], _stripe_min()) for p in peers}

    @staticmethod
    def _tune(sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _dial(self, ctx, peer, host, port, lane, deadline) -> socket.socket:
        last = None
        while time.monotonic() < deadline:
            try:
                sock = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
                break
            except OSError as e:
                last = e
                time.sleep(0.05)
        else:
            raise Timeout(f"{ctx.comm_tag}: rank {ctx.rank} could not connect to rank {peer} at "
                          f"{host}:{port} within {ctx.timeout:.0f}s ({last})")
        try:
            self._tune(sock)
            nonce = _recv_exact(sock, _NONCE)
            hello = _HELLO.pack(_MAGIC, ctx.rank, peer, lane)
            sock.sendall(hello + _mac(ctx.secret, nonce, hello, ctx.comm_tag))
            if _recv_exact(sock, 1) != b"\x01":
                raise TransportError("rejected")
        except (OSError, ConnectionError, TransportError) as e:
            sock.close()
            raise TransportError(f"{ctx.comm_tag}: rank {peer} at {host}:{port} refused rank "
                                 f"{ctx.rank}'s handshake ({e}); same job secret on both?") from None
        return sock

    def _accept_all(self, ctx, listener, socks, higher, lanes, deadline) -> None:
        missing = {(p, lane) for p in higher for lane in range(lanes)}
        listener.setblocking(False)
        while missing:
            left = deadline - time.monotonic()
            if left <= 0:
                ranks = sorted({p for p, _ in missing})
                raise Timeout(f"{ctx.comm_tag}: rank {ctx.rank} waited {ctx.timeout:.0f}s for "
                              f"connections from ranks {ranks} that never came")
            ready, _, _ = select.select([listener], [], [], min(left, 0.5))
            if not ready:
                continue
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                continue
            who = self._greet(ctx, sock)
            if who is None or who not in missing:
                sock.close()
                continue
            missing.discard(who)
            socks[who[0]][who[1]] = sock

    def _greet(self, ctx, sock):
        """Challenge a new connection; (peer, lane) if it proves the secret, else None."""
        try:
            sock.setblocking(True)
            sock.settimeout(5.0)
            self._tune(sock)
            nonce = secrets.token_bytes(_NONCE)
            sock.sendall(nonce)
            data = _recv_exact(sock, _HELLO.size + _MAC)
            hello, mac = data[:_HELLO.size], data[_HELLO.size:]
            magic, src, dst, lane = _HELLO.unpack(hello)
            if magic != _MAGIC or dst != ctx.rank or not hmac.compare_digest(
                    mac, _mac(ctx.secret, nonce, hello, ctx.comm_tag)):
                return None
            sock.sendall(b"\x01")
            sock.settimeout(None)
            return src, lane
        except (OSError, ConnectionError, struct.error):
            return None
