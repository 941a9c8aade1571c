"""The store server: one thread, an event loop over ``selectors``, serving every client.

Split from store.py (the public names and store wrappers) and tcp_store.py (the client): the
server is the one piece that runs on rank 0 or the launcher only; see store.py for why the
store is our own and how it stays safe on a cluster network.
"""
import heapq
import hmac
import selectors
import secrets as _secrets
import socket
import struct
import threading
import time

from .errors import InvalidArgument
from .store_wire import (
    _MAC, _MAX_SERVER_WAIT, _NONCE, _OPS, _REP, _REQ, _U32, _I64, ADD, BAD, CHECK, GET, MAGIC,
    MAX_KEY, MAX_VALUE, MGET, MISSING, OK, SET, WAIT, _family, _mac, _unpack_keys,
)

__all__ = ["StoreServer"]


class _Client:
    """One connection's state in the server's event loop."""

    __slots__ = ("sock", "state", "need", "buf", "out", "deadline", "nonce", "op", "klen", "vlen",
                 "key", "value", "parked", "close_after")

    def __init__(self, sock):
        self.sock = sock
        self.state = "hello"           # hello -> idle -> header -> body -> (parked) -> idle ...
        self.need = _MAC + _NONCE
        self.buf = bytearray()
        self.out = bytearray()
        self.deadline = None
        self.parked = None             # (deadline, keys) while a GET/WAIT waits for keys
        self.close_after = False


class StoreServer:
    """The store itself: listens on (host, port) and serves every client from one thread.

    One event loop (``selectors``) holds every connection as a small state machine, so
    thousands of ranks cost a socket each, not a thread each; a GET or WAIT for a key not
    yet set is parked and answered when the key comes (or its wait runs out), never
    blocking the others. `address` is the (host, port) actually bound (port 0 picks a free
    one). The server lives until `close()` or process exit; it only drops connections that
    misbehave (bad proof, bad frame, silent too long in the handshake or mid-frame).
    """

    def __init__(self, host: str = "0.0.0.0", port: int = 0, secret: bytes = b"", *,
                 handshake_timeout: float = 10.0, frame_timeout: float = 60.0):
        if not isinstance(secret, (bytes, bytearray)) or len(secret) == 0:
            raise InvalidArgument("StoreServer needs a non-empty job secret (bytes)")
        self._secret = bytes(secret)
        self.handshake_timeout = float(handshake_timeout)
        self.frame_timeout = float(frame_timeout)
        self._data = {}
        self._lock = threading.Lock()          # _data and _clients, for peek()/connections
        self._closed = False
        self._clients = {}                     # socket -> _Client
        self._waiters = {}                     # key -> set of parked _Client
        self._timers = []                      # heap of (deadline, seq, client)
        self._seq = 0
        self.requests = 0                      # requests served (bench/startup.py)
        self.handshakes = 0
        try:
            self._sock = socket.create_server((host, int(port)), family=_family(host), backlog=4096)
        except OSError as e:
            raise OSError(e.errno, f"pyccl store: cannot listen on {host}:{port}: {e.strerror}") from None
        self._sock.setblocking(False)
        self.address = tuple(self._sock.getsockname()[:2])
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._sock, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name=f"pyccl-store:{self.address[1]}", daemon=True)
        self._thread.start()

    def __repr__(self):
        return f"<pyccl.StoreServer {self.address[0]}:{self.address[1]}{' closed' if self._closed else ''}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the event loop ------------------------------------------------------------------
    def _loop(self):
        try:
            while not self._closed:
                timeout = None
                if self._timers:
                    timeout = max(0.0, min(self._timers[0][0] - time.monotonic(), 1.0))
                for key, events in self._sel.select(timeout):
                    sock = key.fileobj
                    if sock is self._sock:
                        self._accept()
                    elif sock is self._wake_r:
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                    else:
                        c = self._clients.get(sock)
                        if c is None:
                            continue
                        if events & selectors.EVENT_WRITE:
                            self._flush(c)
                        if events & selectors.EVENT_READ and sock in self._clients:
                            self._readable(c)
                self._expire()
        finally:
            for c in list(self._clients.values()):
                self._drop(c)
            for s in (self._sock, self._wake_r, self._wake_w):
                try:
                    s.close()
                except OSError:
                    pass
            self._sel.close()

    def _accept(self):
        while True:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return                          # e.g. EMFILE: keep serving the connections we have
            sock.setblocking(False)
            c = _Client(sock)
            c.nonce = _secrets.token_bytes(_NONCE)
            c.out += MAGIC + c.nonce
            self._timer(c, self.handshake_timeout)
            with self._lock:
                self._clients[sock] = c
            self._sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, None)
            self._flush(c)

    def _timer(self, c, seconds):
        c.deadline = time.monotonic() + seconds
        self._seq += 1
        heapq.heappush(self._timers, (c.deadline, self._seq, c))

    def _expire(self):
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            deadline, _, c = heapq.heappop(self._timers)
            if c.deadline != deadline or c.sock not in self._clients:
                continue                        # a stale timer: the client moved on
            c.deadline = None
            if c.parked is not None:            # a GET/WAIT ran out: answer 'missing'
                self._answer(c)
            else:                               # silent in the handshake or mid-frame
                self._drop(c)

    def _drop(self, c):
        with self._lock:
            if self._clients.pop(c.sock, None) is None:
                return
        if c.parked is not None:
            for k in c.parked[1]:
                w = self._waiters.get(k)
                if w is not None:
                    w.discard(c)
                    if not w:
                        del self._waiters[k]
            c.parked = None
        try:
            self._sel.unregister(c.sock)
        except (KeyError, ValueError, OSError):
            pass
        try:
            c.sock.close()
        except OSError:
            pass

    def _send(self, c, data):
        c.out += data
        self._flush(c)

    def _flush(self, c):
        if c.out:
            try:
                n = c.sock.send(c.out)
                del c.out[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._drop(c)
                return
        if c.sock not in self._clients:
            return
        if not c.out and c.close_after:
            self._drop(c)
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
        try:
            self._sel.modify(c.sock, want, None)
        except (KeyError, ValueError, OSError):
            self._drop(c)

    def _readable(self, c):
        """Read what the state needs (never more: the next frame stays in the socket)."""
        while c.sock in self._clients and c.parked is None and not c.close_after:
            want = c.need - len(c.buf)
            try:
                data = c.sock.recv(min(want, 1 << 20))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(c)
                return
            if not data:
                self._drop(c)
                return
            c.buf += data
            if len(c.buf) < c.need:
                continue
            try:
                self._advance(c)
            except (ValueError, struct.error, UnicodeDecodeError):
                self._drop(c)                   # hostile or broken: drop this client only
                return

    def _advance(self, c):
        buf, c.buf = bytes(c.buf), bytearray()
        if c.state == "hello":
            if not hmac.compare_digest(buf[:_MAC], _mac(self._secret, b"client", c.nonce)):
                c.close_after = True
                self._send(c, b"\x00")
                return
            self.handshakes += 1
            c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._send(c, b"\x01" + _mac(self._secret, b"server", buf[_MAC:], c.nonce))
            self._idle(c)
        elif c.state == "idle":                 # first byte of a frame: the clock starts
            c.buf += buf
            c.state, c.need = "header", _REQ.size
            self._timer(c, self.frame_timeout)
            if len(c.buf) >= c.need:
                self._advance(c)
        elif c.state == "header":
            c.op, c.klen, c.vlen = _REQ.unpack(buf)
            if c.op not in _OPS or c.klen > MAX_KEY or c.vlen > MAX_VALUE:
                raise ValueError("bad frame")
            if c.klen + c.vlen == 0:
                self._request(c, "", b"")
            else:
                c.state, c.need = "body", c.klen + c.vlen
        else:                                   # body
            self._request(c, buf[:c.klen].decode("utf-8"), buf[c.klen:])

    def _idle(self, c):
        c.state, c.need, c.deadline = "idle", 1, None

    def _request(self, c, key, value):
        self.requests += 1
        c.key, c.value = key, value
        self._idle(c)
        op = c.op
        if op in (GET, WAIT):
            if op == GET:
                ms = _U32.unpack(value)[0] if value else 0
                keys = [key]
            else:
                if len(value) < 4:
                    raise ValueError("short WAIT")
                ms = _U32.unpack_from(value)[0]
                keys = _unpack_keys(value[4:])
            d = self._data
            if ms and not all(k in d for k in keys):
                c.parked = (None, keys)
                for k in keys:
                    self._waiters.setdefault(k, set()).add(c)
                self._timer(c, min(ms / 1000, _MAX_SERVER_WAIT))
                return
            c.parked = (None, keys)
            self._answer(c)
            return
        status, out = self._handle(op, key, value)
        self._send(c, _REP.pack(status, len(out)) + out)

    def _answer(self, c):
        """Reply to a parked (or immediate) GET/WAIT with what is there now."""
        keys = c.parked[1]
        for k in keys:
            w = self._waiters.get(k)
            if w is not None:
                w.discard(c)
                if not w:
                    del self._waiters[k]
        c.parked = None
        c.deadline = None
        d = self._data
        if c.op == GET:
            k = keys[0]
            status, out = (OK, d[k]) if k in d else (MISSING, b"")
        else:
            present = bytes(int(k in d) for k in keys)
            status, out = (OK if all(present) else MISSING), present
        self._send(c, _REP.pack(status, len(out)) + out)

    def _wake(self, key):
        waiters = self._waiters.get(key)
        if not waiters:
            return
        d = self._data
        for c in list(waiters):
            if c.parked is not None and all(k in d for k in c.parked[1]):
                self._answer(c)

    # ---- the key-value operations --------------------------------------------------
    def _handle(self, op, key, value):
        """SET, ADD, CHECK, DELETE (GET and WAIT: _request); ValueError drops the connection."""
        d = self._data
        if op == SET:
            with self._lock:
                d[key] = value
            self._wake(key)
            return OK, b""
        if op == ADD:                            # value: i64 amount; reply: i64 new value
            (amount,) = _I64.unpack(value)
            old = d.get(key, b"0")
            try:
                now = int(old.decode("ascii")) + amount
            except (UnicodeDecodeError, ValueError):
                return BAD, b"value is not an integer counter"
            if not -(1 << 63) <= now < (1 << 63):
                return BAD, b"counter overflow"
            with self._lock:
                d[key] = str(now).encode("ascii")
            self._wake(key)
            return OK, _I64.pack(now)
        if op == CHECK:                          # value: packed keys; reply: one 0/1 byte per key
            keys = _unpack_keys(value)
            return OK, bytes(int(k in d) for k in keys)
        if op == MGET:                           # value: packed keys; reply: u32 length + value each
            keys = _unpack_keys(value)
            if not all(k in d for k in keys):
                return MISSING, bytes(int(k in d) for k in keys)
            out = b"".join(_U32.pack(len(d[k])) + d[k] for k in keys)
            if len(out) > MAX_VALUE:
                return BAD, b"values over the reply limit"
            return OK, out
        # DELETE
        with self._lock:
            existed = d.pop(key, None) is not None
        return OK, bytes([existed])

    @property
    def connections(self) -> int:
        """How many client connections are open right now (ours and other processes')."""
        with self._lock:
            return len(self._clients)

    def peek(self, key: str):
        """The value of `key` read in-process (no connection), or None: for the host's own checks."""
        with self._lock:
            return self._data.get(key)

    def close(self):
        """Stop listening and drop every client (parked waits end with the connection)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
