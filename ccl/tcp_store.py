"""The store client, TCPStore: the authenticated connection every rank opens to StoreServer.

Split from store.py (the public names and store wrappers) and store_server.py (the server):
every rank runs this, only one process runs the server.
"""
import hmac
import secrets as _secrets
import socket
import struct
import threading
import time
import weakref

from .errors import InvalidArgument, PeerFailure, PycclError, Timeout
from .store_wire import (
    _MAC, _MAX_SERVER_WAIT, _NONCE, _REP, _REPLY_MARGIN, _REQ, _U32, _I64, ADD, BAD, CHECK, DELETE,
    GET, MAGIC, MAX_VALUE, MGET, OK, SET, WAIT, _key_bytes, _mac, _pack_keys, _recv_exact,
)

__all__ = ["STATS", "TCPStore", "close_local_clients"]

_CLIENTS = weakref.WeakSet()  # every live TCPStore of this process (see close_local_clients)
#: Requests and connections made by this process's TCPStore clients (bench/startup.py, tests).
STATS = {"requests": 0, "connections": 0}


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

