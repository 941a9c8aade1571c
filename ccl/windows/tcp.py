"""Windows between hosts, emulated over TCP: the target's service thread applies each request.

Each pair of ranks gets two sockets per window, opened through the process's listener
(transports/tcp_dial.py, kind KIND_WIN, lane 0: the lower rank's requests, lane 1: the
higher's; the lower rank dials both). On its request socket the origin writes requests and
reads only the replies to its own get and flush, which it waits for at once; the target's
service thread reads the requests in order and applies them to the window and the signal
board. So a signal lands after the earlier puts to that peer, a flush reply means every
earlier request was applied, the target's user thread never has to call in, and neither end
waits on a socket whose reader is waiting on it (no deadlock between two ranks that put large
buffers to each other at once).

Request header (`HDR`): op, signal slot (-1: none), byte offset or signal value, byte count;
a put's payload follows its header.
"""
import logging
import os
import select
import socket
import struct
import threading
import time
from contextlib import contextmanager

from ..errors import PeerFailure, Timeout, TransportError
from ..transports.tcp_dial import KIND_WIN, check_alive, link
from .base import Link

log = logging.getLogger("pyccl")

HDR = struct.Struct("<BxxxiqQ")      # op, slot, offset or value, nbytes
PUT, SIGNAL, GET, GET_REPLY, FLUSH, FLUSH_REPLY = 1, 2, 3, 4, 5, 6
LINGER_S = 2e-3                      # after a waiter leaves, the thread waits this long to take over
_INLINE = 16384                      # payloads up to this go out with their header in one send


def open_links(ctx, number: int, peers: list, timeout: float, names) -> dict:
    """{peer: (request socket, service socket)} for this window's TCP peers, opened at once."""
    if not peers:
        return {}
    tag = f"{ctx.comm_tag}/window{number}"
    dials, accepts = [], []
    for p in peers:
        for lane in (0, 1):
            if p > ctx.rank:
                dials.append((p, ctx.info[p]["addr"], KIND_WIN, lane, number))
            else:
                accepts.append((p, KIND_WIN, lane, number))

    def describe(waiting):
        return (f"{tag}: rank {ctx.rank} waited {timeout:.0f}s for window connections with "
                f"{', '.join(names(w) for w in waiting)}")
    socks = link(ctx.listener, tag, ctx.rank, dials, accepts, time.monotonic() + timeout, describe,
                 lambda waiting: check_alive(ctx, waiting), ctx.cancelled)
    out = {}
    for p in peers:
        end = "d" if p > ctx.rank else "a"
        mine, theirs = (0, 1) if ctx.rank < p else (1, 0)
        pair = (socks[(p, KIND_WIN, mine, number, end)], socks[(p, KIND_WIN, theirs, number, end)])
        for s in pair:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(timeout)
        out[p] = pair
    return out


def _recv_into(sock, view, who: str) -> None:
    got = 0
    while got < len(view):
        try:
            n = sock.recv_into(view[got:])
        except socket.timeout:
            raise Timeout(f"{who}: no reply within the timeout") from None
        except OSError as e:
            raise PeerFailure(f"{who}: connection lost ({e})") from None
        if n == 0:
            raise PeerFailure(f"{who}: connection closed")
        got += n


def _send(sock, data, who: str) -> None:
    try:
        sock.sendall(data)
    except socket.timeout:
        raise Timeout(f"{who}: its window took nothing within the timeout") from None
    except OSError as e:
        raise PeerFailure(f"{who}: connection lost ({e})") from None


class TcpLink(Link):
    """The origin's end: requests out, replies to get and flush back, one caller at a time."""

    kind = "tcp"

    def __init__(self, peer: int, sock, service, who: str):
        self.peer, self.sock, self.service, self.who = peer, sock, service, who
        self.lock = threading.Lock()
        self.hdr = bytearray(HDR.size)

    def put(self, src, offset, slot):
        n = src.size
        with self.lock:
            if n <= _INLINE:
                _send(self.sock, HDR.pack(PUT, slot, offset, n) + src.tobytes(), self.who)
            else:
                _send(self.sock, HDR.pack(PUT, slot, offset, n), self.who)
                _send(self.sock, memoryview(src), self.who)

    def _reply(self, op: int, n: int) -> None:
        _recv_into(self.sock, memoryview(self.hdr), self.who)
        got, _, _, count = HDR.unpack(self.hdr)
        if got != op or count != n:
            raise TransportError(f"{self.who}: expected reply {op} of {n} bytes, got {got} of {count}")

    def get(self, dst, offset):
        with self.lock:
            _send(self.sock, HDR.pack(GET, -1, offset, dst.size), self.who)
            self._reply(GET_REPLY, dst.size)
            if dst.size:
                _recv_into(self.sock, memoryview(dst), self.who)

    def signal(self, slot, value):
        with self.lock:
            _send(self.sock, HDR.pack(SIGNAL, slot, value, 0), self.who)

    def flush(self):
        with self.lock:
            _send(self.sock, HDR.pack(FLUSH, -1, 0, 0), self.who)
            self._reply(FLUSH_REPLY, 0)

    def failure(self):
        return self.service.dead.get(self.peer)

    def close(self):
        self.sock.close()


class Service:
    """Applies this rank's TCP peers' requests to the window and the board, in their order.

    A thread does it while nobody waits here, so a target that computes never delays a put.
    A rank waiting in `wait_signal` takes the sockets over (`serving`): the thread steps
    aside and the waiter reads the requests itself, so a signal wakes the thread that waits
    for it directly (one wake-up per message instead of two: 8-byte put+signal latency on
    par with send/recv). `mutex` is held by whoever reads the sockets."""

    def __init__(self, rank: int, window, board, socks: dict, names, tag: str):
        self.rank, self.window, self.board, self.names = rank, window, board, names
        self.socks = socks                       # peer -> service socket
        self.dead = {}                           # peer -> why it is gone
        self.closing = False                     # set before the close's barrier: EOFs are expected
        self.stop = False
        self.mutex = threading.Lock()
        self.idle = threading.Condition()        # the thread waits here while guests > 0
        self.guests = 0
        self.left_at = 0.0
        self.hdr = bytearray(HDR.size)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.poller = select.poll()              # not select(): descriptors may pass 1023
        self.poller.register(self.wake_r, select.POLLIN)
        self.by_fd = {}
        self.watches = {}                        # other descriptors: fd -> what to call when readable
        for p, sock in socks.items():
            self.by_fd[sock.fileno()] = p
            self.poller.register(sock, select.POLLIN)
        self.thread = threading.Thread(target=self._serve, name=f"pyccl-{tag}", daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            with self.idle:
                while not self.stop:             # looked at every LINGER_S: a waiter that
                    quiet = time.monotonic() - self.left_at      # leaves wakes nobody
                    if not self.guests and quiet >= LINGER_S:
                        break
                    self.idle.wait(LINGER_S if self.guests else LINGER_S - quiet)
            with self.mutex:
                if self.stop or not self.socks:
                    return
                self.poll(0.5)

    def poll(self, timeout: float) -> None:
        """Apply what has arrived, waiting up to `timeout` for it; the caller holds `mutex`."""
        for fd, _ in self.poller.poll(timeout * 1000):
            if fd == self.wake_r:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            if fd in self.watches:
                self.watches[fd]()
                continue
            p = self.by_fd.get(fd)
            if p is None or p not in self.socks:
                continue
            try:
                self._one(p, self.socks[p])
            except (PeerFailure, Timeout, TransportError) as e:
                self._drop(p, str(e))

    def watch(self, fd: int, callback) -> None:
        """Call `callback` whenever `fd` turns readable (an RDMA completion channel), in poll."""
        with self.mutex:
            self.watches[fd] = callback
            self.poller.register(fd, select.POLLIN)

    @contextmanager
    def serving(self):
        """The caller reads the sockets (with `poll`) until it leaves; the thread steps aside."""
        with self.idle:
            self.guests += 1
        try:
            if not self.mutex.acquire(blocking=False):
                try:
                    os.write(self.wake_w, b"!")  # the thread leaves its poll
                except BlockingIOError:
                    pass
                self.mutex.acquire()
            try:
                yield self
            finally:
                self.mutex.release()
        finally:
            with self.idle:
                self.guests -= 1
                self.left_at = time.monotonic()  # the thread takes over after LINGER_S

    def _one(self, p, sock):
        who = f"window service of rank {self.rank}, requests of {self.names(p)}"
        hdr = self.hdr
        _recv_into(sock, memoryview(hdr), who)
        op, slot, a, n = HDR.unpack(hdr)
        if not -1 <= slot < self.board.nslots:
            raise TransportError(f"{who}: signal slot {slot} of {self.board.nslots}")
        if op == PUT:
            if a < 0 or a + n > self.window.size:
                raise TransportError(f"{who}: put of bytes [{a}, {a + n}) outside a window of {self.window.size}")
            if n:
                _recv_into(sock, memoryview(self.window[a:a + n]), who)
            if slot >= 0:
                self.board.add(p, slot, 1)
        elif op == SIGNAL:
            self.board.add(p, slot, a)
        elif op == GET:
            if a < 0 or a + n > self.window.size:
                raise TransportError(f"{who}: get of bytes [{a}, {a + n}) outside a window of {self.window.size}")
            _send(sock, HDR.pack(GET_REPLY, -1, 0, n), who)
            if n:
                _send(sock, memoryview(self.window[a:a + n]), who)
        elif op == FLUSH:
            _send(sock, HDR.pack(FLUSH_REPLY, -1, 0, 0), who)
        else:
            raise TransportError(f"{who}: unknown request {op}")

    def _drop(self, p, why):
        sock = self.socks.pop(p)
        self.poller.unregister(sock)
        sock.close()
        if not self.closing:
            self.dead[p] = why
            log.warning("pyccl: %s", why)

    def close(self):
        self.closing = self.stop = True
        with self.idle:
            self.idle.notify_all()
        try:
            os.write(self.wake_w, b"!")
        except BlockingIOError:
            pass
        self.thread.join(timeout=5)
        for s in self.socks.values():
            s.close()
        self.socks = {}
        os.close(self.wake_r)
        os.close(self.wake_w)
