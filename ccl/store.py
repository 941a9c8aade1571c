"""pyccl's rendezvous store: a small TCP key-value server used only while setting up.

Why our own and not torch's TCPStore: pyccl must work without torch, and the store is the
one socket every rank opens before anything is known about its peers, so it has to be safe
to leave listening on a cluster network:

* No pickle, ever: every message is a length-prefixed binary frame (``struct``), and every
  length is checked against a bound before a byte of the body is read (key <= 4 KiB,
  value <= 64 MiB). A frame that is malformed, oversized or of an unknown command makes
  the server drop *that* connection and nothing else.
* Every connection proves it belongs to the job. The server sends a random nonce, the
  client answers ``HMAC-SHA256(secret, nonce)``; the server answers with its own proof over
  the client's nonce, so a client never trusts a store that does not know the secret either.
  A connection that does not finish the handshake within ``handshake_timeout`` is closed.
* One thread serves every client (an event loop over ``selectors``): a rank costs the
  server one socket and a few hundred bytes, so tens of thousands of ranks can rendezvous.
* Nothing waits forever: every client call is bounded by a timeout and says what it waited
  for (the keys still missing, or the host:port it could not reach).

Wire format (all integers little-endian)::

    handshake  S->C  MAGIC(8) nonce_s(32)
               C->S  HMAC(secret, "client" + nonce_s)(32) nonce_c(32)
               S->C  0x01 HMAC(secret, "server" + nonce_c + nonce_s)(32)   | 0x00, close
    request    op(u8) key_len(u32) value_len(u32) key(utf-8) value
               (CHECK, WAIT, MGET carry their keys in value, each as u32 length + utf-8;
               MGET answers u32 length + value for each key, or MISSING)
    reply      status(u8) len(u32) payload

Counters made by ``add`` are stored as ASCII decimal (``b"3"``), like torch's stores, so
``get`` on a counter reads the same whichever store is underneath.
"""
import hashlib
import heapq
import hmac
import selectors
import secrets as _secrets
import socket
import struct
import threading
import time
import weakref

from .errors import InvalidArgument, PeerFailure, PycclError, Timeout

__all__ = ["MAX_KEY", "MAX_VALUE", "PrefixStore", "StoreServer", "TCPStore", "TorchStoreAdapter"]

MAX_KEY = 4 << 10            # bytes of a key, utf-8
MAX_VALUE = 64 << 20         # bytes of a value (and of any request or reply body)
MAGIC = b"PYCCLKV1"
_NONCE = 32
_MAC = 32
_REQ = struct.Struct("<BII")         # op, key length, value length
_REP = struct.Struct("<BI")          # status, payload length
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
SET, GET, ADD, CHECK, WAIT, DELETE, MGET = 1, 2, 3, 4, 5, 6, 7
_OPS = frozenset((SET, GET, ADD, CHECK, WAIT, DELETE, MGET))
OK, MISSING, BAD = 0, 1, 2
_MAX_SERVER_WAIT = 30.0      # one WAIT/GET request is parked at most this long
_REPLY_MARGIN = 30.0         # how much longer than the server's wait a client waits for a reply
_CLIENTS = weakref.WeakSet()  # every live TCPStore of this process (see close_local_clients)
#: Requests and connections made by this process's TCPStore clients (bench/startup.py, tests).
STATS = {"requests": 0, "connections": 0}


def _recv_exact(sock, n: int) -> bytes:
    """Read exactly n bytes or raise ConnectionError (EOF) / socket.timeout."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), hashlib.sha256).digest()


def _pack_keys(keys) -> bytes:
    """Keys as u32 length + utf-8 bytes each: no separator a key could contain."""
    out = []
    for k in keys:
        b = _key_bytes(k)
        out.append(_U32.pack(len(b)))
        out.append(b)
    return b"".join(out)


def _unpack_keys(data: bytes) -> list:
    """Inverse of _pack_keys; raises ValueError on anything malformed (the caller drops the client)."""
    keys, i, n = [], 0, len(data)
    while i < n:
        if n - i < 4:
            raise ValueError("truncated key list")
        (klen,) = _U32.unpack_from(data, i)
        i += 4
        if klen > MAX_KEY or klen > n - i:
            raise ValueError("bad key length in key list")
        keys.append(data[i:i + klen].decode("utf-8"))
        i += klen
    return keys


def _key_bytes(key) -> bytes:
    if not isinstance(key, str):
        raise InvalidArgument(f"store keys are str, got {type(key).__name__} {key!r}")
    b = key.encode("utf-8")
    if len(b) > MAX_KEY:
        raise InvalidArgument(f"store key of {len(b)} bytes is over the {MAX_KEY}-byte limit: {key[:64]!r}...")
    return b


def _family(host: str):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


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


class TCPStore:
    """Client of a StoreServer: set/get/add/check/wait/delete; safe to share between threads.

    Each call borrows the client's authenticated connection; when another thread is using it
    (say, blocked in `get`), the call opens a short-lived extra connection instead of waiting,
    so a blocked `get` never holds up another thread's `set`. Only one connection is kept
    between calls, so a client's file-descriptor count stays constant.
    Connecting retries until `timeout` (the store may start after its clients), then raises
    `Timeout` naming host:port. A wrong secret raises `PeerFailure` at once: retrying
    cannot fix it.
    """

    _MAX_IDLE = 1

    def __init__(self, host: str, port: int, secret: bytes, timeout: float = 300.0):
        if not isinstance(secret, (bytes, bytearray)) or len(secret) == 0:
            raise InvalidArgument("TCPStore needs a non-empty job secret (bytes)")
        self.host, self.port = str(host), int(port)
        self.timeout = float(timeout)
        self._secret = bytes(secret)
        self._lock = threading.Lock()
        self._idle = []
        self._closed = False
        self._idle.append(self._connect(self.timeout))
        _CLIENTS.add(self)

    def __repr__(self):
        return f"<pyccl.TCPStore {self.host}:{self.port}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- connections ---------------------------------------------------------------
    def _connect(self, window: float):
        where = f"{self.host}:{self.port}"
        start = time.monotonic()
        deadline = start + window
        attempts, delay, last = 0, 0.05, None
        while True:
            attempts += 1
            left = deadline - time.monotonic()
            sock = None
            try:
                sock = socket.create_connection((self.host, self.port), timeout=max(0.05, min(left, 10.0)))
                sock.settimeout(max(2.0, min(left, 10.0)))   # the handshake must not fail just for lack of time
                nonce_s = self._read_hello(sock)
            except (OSError, ConnectionError) as e:   # refused, unreachable, DNS, reset before hello
                if sock is not None:
                    sock.close()
                last = e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(
                        f"pyccl store at {where} unreachable: tried to connect {attempts} time(s) for "
                        f"{time.monotonic() - start:.1f}s (timeout {window:g}s), last error: "
                        f"{type(last).__name__}: {last}. Is rank 0 / the launcher running, and are "
                        f"PYCCL_STORE_ADDR or MASTER_ADDR/MASTER_PORT right?") from None
                time.sleep(min(delay, left))
                delay = min(delay * 2, 1.0)
                continue
            try:
                self._finish_handshake(sock, nonce_s)
            except BaseException:
                sock.close()
                raise
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            STATS["connections"] += 1
            return sock

    def _read_hello(self, sock) -> bytes:
        hello = _recv_exact(sock, len(MAGIC) + _NONCE)
        if hello[:len(MAGIC)] != MAGIC:
            sock.close()
            raise PeerFailure(f"{self.host}:{self.port} is not a pyccl store (bad greeting {hello[:8]!r}); "
                              f"is another service on that port?")
        return hello[len(MAGIC):]

    def _finish_handshake(self, sock, nonce_s):
        where = f"{self.host}:{self.port}"
        nonce_c = _secrets.token_bytes(_NONCE)
        try:
            sock.sendall(_mac(self._secret, b"client", nonce_s) + nonce_c)
            status = sock.recv(1)
            proof = _recv_exact(sock, _MAC) if status == b"\x01" else b""
        except (OSError, ConnectionError) as e:
            raise PeerFailure(f"pyccl store at {where} dropped the handshake ({e}); "
                              f"it probably rejected the job secret") from None
        if status != b"\x01":
            raise PeerFailure(f"pyccl store at {where} rejected the job secret: this process's "
                              f"PYCCL_JOB_SECRET (or the secret passed in) is not the store's")
        if not hmac.compare_digest(proof, _mac(self._secret, b"server", nonce_c, nonce_s)):
            raise PeerFailure(f"pyccl store at {where} could not prove it knows the job secret; "
                              f"refusing to use it")

    @property
    def _sock(self):
        """The kept connection (tests use it to send hand-made frames); None while it is busy."""
        with self._lock:
            return self._idle[0] if self._idle else None

    def _checkout(self):
        with self._lock:
            if self._closed:
                raise PycclError(f"pyccl store client for {self.host}:{self.port} is closed")
            if self._idle:
                return self._idle.pop()
        # The store was reachable once; a new connection should not need the full timeout.
        return self._connect(min(self.timeout, 10.0))

    def _checkin(self, sock):
        with self._lock:
            if not self._closed and len(self._idle) < self._MAX_IDLE:
                self._idle.append(sock)
                return
        sock.close()

    def _call(self, op, key: str = "", value: bytes = b"", reply_timeout=None):
        k = _key_bytes(key)
        if len(value) > MAX_VALUE:
            raise InvalidArgument(f"store value for {key!r} is {len(value)} bytes, over the {MAX_VALUE}-byte limit")
        sock = self._checkout()
        STATS["requests"] += 1
        try:
            sock.settimeout(reply_timeout if reply_timeout is not None else _REPLY_MARGIN)
            sock.sendall(_REQ.pack(op, len(k), len(value)) + k + value)
            status, n = _REP.unpack(_recv_exact(sock, _REP.size))
            if n > MAX_VALUE:
                raise ConnectionError(f"reply of {n} bytes is over the limit")
            out = _recv_exact(sock, n) if n else b""
        except TimeoutError:
            sock.close()
            raise Timeout(f"pyccl store at {self.host}:{self.port} did not answer a request "
                          f"for key {key!r} in time") from None
        except (OSError, ConnectionError, struct.error) as e:
            sock.close()
            raise PeerFailure(f"pyccl store at {self.host}:{self.port} went away during a request "
                              f"for key {key!r} ({e}); did rank 0 / the launcher exit?") from None
        self._checkin(sock)
        if status == BAD:
            raise InvalidArgument(f"pyccl store refused the request for key {key!r}: {out.decode(errors='replace')}")
        return status, out

    # ---- the interface -------------------------------------------------------------
    def set(self, key: str, value: bytes) -> None:
        """Store `value` under `key`, waking everyone waiting for it."""
        self._call(SET, key, bytes(value))

    def get(self, key: str, timeout: float | None = None) -> bytes:
        """The value of `key`, waiting up to `timeout` (default: the client's) for it to be set."""
        t = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + t
        while True:
            left = max(0.0, deadline - time.monotonic())
            step = min(left, _MAX_SERVER_WAIT)
            status, out = self._call(GET, key, _U32.pack(int(step * 1000)), reply_timeout=step + _REPLY_MARGIN)
            if status == OK:
                return out
            if time.monotonic() >= deadline:
                raise Timeout(f"pyccl store at {self.host}:{self.port}: key {key!r} was not set "
                              f"within {t:g}s")

    def add(self, key: str, amount: int) -> int:
        """Atomically add `amount` to the counter `key` (missing counts as 0); the new value."""
        _, out = self._call(ADD, key, _I64.pack(int(amount)))
        return _I64.unpack(out)[0]

    def check(self, keys) -> list:
        """Which of `keys` exist now, without waiting."""
        keys = list(keys)
        if not keys:
            return []
        _, out = self._call(CHECK, "", _pack_keys(keys))
        return [bool(b) for b in out]

    def wait(self, keys, timeout: float | None = None) -> None:
        """Return once every key exists; Timeout lists the ones still missing."""
        keys = list(keys)
        if not keys:
            return
        t = self.timeout if timeout is None else float(timeout)
        packed = _pack_keys(keys)
        deadline = time.monotonic() + t
        while True:
            left = max(0.0, deadline - time.monotonic())
            step = min(left, _MAX_SERVER_WAIT)
            status, present = self._call(WAIT, "", _U32.pack(int(step * 1000)) + packed,
                                         reply_timeout=step + _REPLY_MARGIN)
            if status == OK:
                return
            if time.monotonic() >= deadline:
                missing = [k for k, ok in zip(keys, present) if not ok]
                raise Timeout(f"pyccl store at {self.host}:{self.port}: waited {t:g}s; "
                              f"{len(missing)} of {len(keys)} key(s) still missing: {missing}")

    def delete(self, key: str) -> bool:
        """Remove `key`; True if it existed."""
        _, out = self._call(DELETE, key)
        return out == b"\x01"

    def multi_get(self, keys, timeout: float | None = None) -> list:
        """The values of `keys`, once all are set: two requests (WAIT, MGET) whatever their number."""
        keys = list(keys)
        if not keys:
            return []
        self.wait(keys, timeout)
        status, out = self._call(MGET, "", _pack_keys(keys))
        if status != OK:
            raise PycclError(f"pyccl store at {self.host}:{self.port}: keys deleted between WAIT and MGET")
        vals, i = [], 0
        for _ in keys:
            (n,) = _U32.unpack_from(out, i)
            vals.append(out[i + 4:i + 4 + n])
            i += 4 + n
        return vals

    def close(self) -> None:
        """Close this client's connections (the server keeps running)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for s in idle:
            try:
                s.close()
            except OSError:
                pass


def close_local_clients() -> None:
    """Close every TCPStore client of this process (used at exit, before waiting for the others)."""
    for client in list(_CLIENTS):
        client.close()


def multi_get(store, keys, timeout: float | None = None) -> list:
    """Values of `keys` from any store: two requests on pyccl's TCPStore (multi_get), one get
    per key on stores without it (torch's)."""
    fn = getattr(store, "multi_get", None)
    if fn is not None:
        return fn(keys, timeout)
    return [store.get(k, timeout=timeout) for k in keys]


class PrefixStore:
    """Any store with every key put under ``prefix/``, so communicators can share one store.

    `close()` does nothing: the underlying store belongs to whoever made it.
    """

    def __init__(self, store, prefix: str):
        self.store, self.prefix = store, str(prefix)
        self.host = getattr(store, "host", None)
        self.port = getattr(store, "port", None)
        self.timeout = getattr(store, "timeout", None)

    def __repr__(self):
        return f"<pyccl.PrefixStore {self.prefix!r} over {self.store!r}>"

    def _k(self, key):
        return f"{self.prefix}/{key}"

    def set(self, key: str, value: bytes) -> None:
        self.store.set(self._k(key), value)

    def get(self, key: str, timeout: float | None = None) -> bytes:
        try:
            return self.store.get(self._k(key), timeout=timeout)
        except Timeout as e:
            raise Timeout(str(e).replace(repr(self._k(key)), f"{key!r} (under prefix {self.prefix!r})")) from None

    def add(self, key: str, amount: int) -> int:
        return self.store.add(self._k(key), amount)

    def check(self, keys) -> list:
        return self.store.check([self._k(k) for k in keys])

    def wait(self, keys, timeout: float | None = None) -> None:
        keys = list(keys)
        try:
            self.store.wait([self._k(k) for k in keys], timeout=timeout)
        except Timeout as e:
            msg = str(e)
            for k in keys:
                msg = msg.replace(repr(self._k(k)), repr(k))
            raise Timeout(f"{msg} (under prefix {self.prefix!r})") from None

    def delete(self, key: str) -> bool:
        return self.store.delete(self._k(key))

    def multi_get(self, keys, timeout: float | None = None) -> list:
        keys = list(keys)
        try:
            return multi_get(self.store, [self._k(k) for k in keys], timeout)
        except Timeout as e:
            msg = str(e)
            for k in keys:
                msg = msg.replace(repr(self._k(k)), repr(k))
            raise Timeout(f"{msg} (under prefix {self.prefix!r})") from None

    def close(self) -> None:
        pass


class TorchStoreAdapter:
    """pyccl's store interface over a ``torch.distributed.Store`` (torchrun, init_process_group).

    torch is imported only here, and only when needed, so pyccl works without it.

    A torch store client serialises its calls: while one thread is blocked in torch's `get`
    or `wait`, another thread's `set` on the same object waits behind it (and torch logs a
    warning each time a wait runs out). So `get` and `wait` here poll torch's `check` (one
    quick round trip for all keys, backing off from 1 ms to 50 ms) until the keys exist or
    the timeout passes, and only then call torch's `get`, with torch's own timeout set to
    what is left via `set_timeout` (under a lock, since that setting is shared) and
    restored afterwards. torch's errors become pyccl's: a wait that ran out is `Timeout`
    (naming the keys still missing), a lost connection is `PeerFailure`.
    """

    _POLL_MAX = 0.05

    def __init__(self, torch_store, timeout: float | None = None):
        self.ts = torch_store
        if timeout is None:
            t = getattr(torch_store, "timeout", None)
            timeout = t.total_seconds() if t is not None else 300.0
        self.timeout = float(timeout)
        self.host = getattr(torch_store, "host", None)
        self.port = getattr(torch_store, "port", None)
        self._lock = threading.Lock()

    def __repr__(self):
        return f"<pyccl.TorchStoreAdapter over {type(self.ts).__name__}>"

    def _translate(self, e, what):
        name = type(e).__name__
        text = str(e).splitlines()[0] if str(e) else name
        if name == "DistNetworkError":
            return PeerFailure(f"torch store: connection lost during {what} ({text})")
        if name == "DistStoreError" or "timeout" in text.lower() or "timed out" in text.lower():
            return Timeout(f"torch store: {what} timed out ({text})")
        return PeerFailure(f"torch store: {what} failed ({name}: {text})")

    def _await(self, keys, t) -> list:
        """Poll until every key exists or `t` s pass; the keys still missing ([] when all came)."""
        deadline = time.monotonic() + t
        delay = 0.001
        while True:
            try:
                if self.ts.check(keys):
                    return []
            except RuntimeError as e:
                raise self._translate(e, f"check of {keys}") from None
            left = deadline - time.monotonic()
            if left <= 0:
                return [k for k, ok in zip(keys, self.check(keys)) if not ok]
            time.sleep(min(delay, left))
            delay = min(delay * 2, self._POLL_MAX)

    def set(self, key: str, value: bytes) -> None:
        try:
            self.ts.set(key, bytes(value))
        except RuntimeError as e:
            raise self._translate(e, f"set of key {key!r}") from None

    def get(self, key: str, timeout: float | None = None) -> bytes:
        from datetime import timedelta
        t = self.timeout if timeout is None else float(timeout)
        start = time.monotonic()
        if self._await([key], t):
            raise Timeout(f"torch store: key {key!r} was not set within {t:g}s")
        left = max(1.0, t - (time.monotonic() - start))
        with self._lock:
            old = getattr(self.ts, "timeout", None)
            self.ts.set_timeout(timedelta(seconds=left))
            try:
                return bytes(self.ts.get(key))
            except RuntimeError as e:
                raise self._translate(e, f"get of key {key!r}") from None
            finally:
                if old is not None:
                    self.ts.set_timeout(old)

    def add(self, key: str, amount: int) -> int:
        try:
            return int(self.ts.add(key, int(amount)))
        except RuntimeError as e:
            raise self._translate(e, f"add to key {key!r}") from None

    def check(self, keys) -> list:
        # torch's check answers one bool for all keys together; ask key by key.
        try:
            return [bool(self.ts.check([k])) for k in keys]
        except RuntimeError as e:
            raise self._translate(e, "check") from None

    def wait(self, keys, timeout: float | None = None) -> None:
        keys = list(keys)
        if not keys:
            return
        t = self.timeout if timeout is None else float(timeout)
        missing = self._await(keys, t)
        if missing:
            raise Timeout(f"torch store: waited {t:g}s; {len(missing)} of {len(keys)} key(s) "
                          f"still missing: {missing}")

    def delete(self, key: str) -> bool:
        try:
            return bool(self.ts.delete_key(key))
        except RuntimeError as e:
            raise self._translate(e, f"delete of key {key!r}") from None

    def close(self) -> None:
        """torch stores have no close; dropping our reference is all we can do."""
