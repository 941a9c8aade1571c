"""pyccl's rendezvous store: a small TCP key-value server used only while setting up.

Like torch's TCPStore, but safer: binary frames (never pickle), every size bounded,
and every connection must prove it knows the job secret (the server sends a nonce, the
client answers HMAC-SHA256(secret, nonce)) before it may read or write a key.

Frames: request = op (1 byte) + key length (u32) + key + value length (u64) + value;
reply = status (1 byte) + value length (u64) + value.
"""
import hashlib
import hmac
import secrets as _secrets
import socket
import struct
import threading
import time

from .errors import PeerFailure, PycclError, Timeout

MAX_KEY = 4096
MAX_VALUE = 64 << 20
_REQ = struct.Struct("<BIQ")
_REP = struct.Struct("<BQ")
_NONCE = 32
SET, GET, ADD, CHECK, DELETE, WAIT = 1, 2, 3, 4, 5, 6
OK, MISSING, BAD = 0, 1, 2


def _recv_exact(sock, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("connection closed")
        got += k
    return bytes(buf)


def _proof(secret: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, b"pyccl-store" + nonce, hashlib.sha256).digest()


class StoreServer:
    """The store, served from a daemon thread per client. `address` is (host, port)."""

    def __init__(self, host="127.0.0.1", port=0, secret: bytes = b""):
        if not secret:
            raise PycclError("StoreServer needs a job secret")
        self.secret = secret
        self._data = {}
        self._cond = threading.Condition()
        self._sock = socket.create_server((host, port), backlog=1024, reuse_port=False)
        self.address = self._sock.getsockname()[:2]
        self._closed = False
        self._clients = set()
        threading.Thread(target=self._accept, name="pyccl-store", daemon=True).start()

    def _accept(self):
        while not self._closed:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            self._clients.add(sock)
            threading.Thread(target=self._serve, args=(sock,), name="pyccl-store-client", daemon=True).start()

    def _serve(self, sock):
        try:
            sock.settimeout(10.0)                     # the handshake must be quick
            nonce = _secrets.token_bytes(_NONCE)
            sock.sendall(nonce)
            if not hmac.compare_digest(_recv_exact(sock, 32), _proof(self.secret, nonce)):
                sock.sendall(b"\x00")
                return
            sock.sendall(b"\x01")
            sock.settimeout(None)
            while True:
                op, klen, vlen = _REQ.unpack(_recv_exact(sock, _REQ.size))
                if klen > MAX_KEY or vlen > MAX_VALUE or op not in (SET, GET, ADD, CHECK, DELETE, WAIT):
                    return                              # hostile or broken: drop the client
                key = _recv_exact(sock, klen).decode("utf-8", "replace")
                value = _recv_exact(sock, vlen) if vlen else b""
                status, out = self._handle(op, key, value)
                sock.sendall(_REP.pack(status, len(out)) + out)
        except (OSError, ConnectionError, struct.error, ValueError):
            pass
        finally:
            self._clients.discard(sock)
            sock.close()

    def _handle(self, op, key, value):
        with self._cond:
            if op == SET:
                self._data[key] = value
                self._cond.notify_all()
                return OK, b""
            if op == GET:
                return (OK, self._data[key]) if key in self._data else (MISSING, b"")
            if op == ADD:
                if len(value) != 8:
                    return BAD, b""
                old = self._data.get(key, bytes(8))
                if len(old) != 8:
                    return BAD, b""
                now = int.from_bytes(old, "little", signed=True) + int.from_bytes(value, "little", signed=True)
                self._data[key] = now.to_bytes(8, "little", signed=True)
                self._cond.notify_all()
                return OK, self._data[key]
            if op == CHECK:
                keys = value.decode("utf-8", "replace").split("\n") if value else []
                return OK, bytes(int(k in self._data) for k in keys)
            if op == WAIT:                              # wait up to `value` ms for the key
                ms = int.from_bytes(value[:8], "little") if len(value) >= 8 else 0
                self._cond.wait_for(lambda: key in self._data, timeout=min(ms, 60000) / 1000)
                return (OK, b"") if key in self._data else (MISSING, b"")
            self._data.pop(key, None)
            return OK, b""

    def close(self):
        self._closed = True
        try:
            self._sock.close()
        except OSError:
            pass
        for c in list(self._clients):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class TCPStore:
    """Client of a StoreServer: set/get/add/check/wait/delete, thread-safe."""

    def __init__(self, host, port, secret: bytes, timeout: float = 300.0):
        self.host, self.port, self.timeout = host, int(port), float(timeout)
        self._lock = threading.Lock()
        self._sock = self._connect(secret)

    def _connect(self, secret):
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=min(10.0, self.timeout))
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise Timeout(f"store at {self.host}:{self.port} unreachable for {self.timeout:.0f}s "
                                  f"(last error: {e}); is rank 0 / the launcher running, and is "
                                  f"PYCCL_STORE_ADDR or MASTER_ADDR/MASTER_PORT right?") from None
                time.sleep(0.1)
        try:
            nonce = _recv_exact(sock, _NONCE)
            sock.sendall(_proof(secret, nonce))
            ok = _recv_exact(sock, 1)
        except (OSError, ConnectionError) as e:
            sock.close()
            raise PeerFailure(f"store at {self.host}:{self.port} dropped the handshake ({e})") from None
        if ok != b"\x01":
            sock.close()
            raise PeerFailure(f"store at {self.host}:{self.port} rejected the job secret "
                              f"(PYCCL_JOB_SECRET differs from the store's?)")
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _call(self, op, key, value=b""):
        k = key.encode()
        if len(k) > MAX_KEY or len(value) > MAX_VALUE:
            raise PycclError(f"store: key or value too large for {key!r}")
        with self._lock:
            try:
                self._sock.sendall(_REQ.pack(op, len(k), len(value)) + k + value)
                status, n = _REP.unpack(_recv_exact(self._sock, _REP.size))
                out = _recv_exact(self._sock, n) if n else b""
            except (OSError, ConnectionError) as e:
                raise PeerFailure(f"store at {self.host}:{self.port} is gone ({e})") from None
        if status == BAD:
            raise PycclError(f"store refused request for {key!r}")
        return status, out

    def set(self, key: str, value: bytes) -> None:
        self._call(SET, key, bytes(value))

    def get(self, key: str, timeout=None) -> bytes:
        self.wait([key], timeout)
        status, out = self._call(GET, key)
        if status != OK:
            raise Timeout(f"store key {key!r} vanished")
        return out

    def add(self, key: str, amount: int) -> int:
        _, out = self._call(ADD, key, int(amount).to_bytes(8, "little", signed=True))
        return int.from_bytes(out, "little", signed=True)

    def check(self, keys) -> list:
        _, out = self._call(CHECK, "", "\n".join(keys).encode())
        return [bool(b) for b in out]

    def wait(self, keys, timeout=None) -> None:
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        for key in keys:
            while True:
                left = deadline - time.monotonic()
                status, _ = self._call(WAIT, key, int(max(0, min(left, 1.0)) * 1000).to_bytes(8, "little"))
                if status == OK:
                    break
                if time.monotonic() >= deadline:
                    missing = [k for k, ok in zip(keys, self.check(keys)) if not ok]
                    raise Timeout(f"store: waited {timeout:.0f}s for keys {missing}")

    def delete(self, key: str) -> None:
        self._call(DELETE, key)

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass


class PrefixStore:
    """Any store with every key put under `prefix/`: communicators share one store safely."""

    def __init__(self, store, prefix: str):
        self.store, self.prefix = store, prefix
        self.host = getattr(store, "host", None)

    def _k(self, key):
        return f"{self.prefix}/{key}"

    def set(self, key, value):
        self.store.set(self._k(key), value)

    def get(self, key, timeout=None):
        return self.store.get(self._k(key), timeout=timeout)

    def add(self, key, amount):
        return self.store.add(self._k(key), amount)

    def check(self, keys):
        return self.store.check([self._k(k) for k in keys])

    def wait(self, keys, timeout=None):
        try:
            self.store.wait([self._k(k) for k in keys], timeout=timeout)
        except Timeout as e:
            raise Timeout(str(e).replace(self.prefix + "/", "")) from None

    def delete(self, key):
        self.store.delete(self._k(key))


class TorchStoreAdapter:
    """pyccl's store interface over a torch.distributed.Store (torchrun, init_process_group)."""

    def __init__(self, torch_store, timeout: float = 300.0):
        self.ts = torch_store
        self.timeout = timeout
        self.host = getattr(torch_store, "host", None)

    def set(self, key, value):
        self.ts.set(key, bytes(value))

    def get(self, key, timeout=None):
        self.wait([key], timeout)
        return bytes(self.ts.get(key))

    def add(self, key, amount):
        return int(self.ts.add(key, int(amount)))

    def check(self, keys):
        return [bool(self.ts.check([k])) for k in keys]

    def wait(self, keys, timeout=None):
        from datetime import timedelta
        t = self.timeout if timeout is None else timeout
        try:
            self.ts.wait(list(keys), timedelta(seconds=t))
        except Exception as e:  # noqa: BLE001 - torch raises several types (DistStoreError, RuntimeError)
            missing = [k for k in keys if not self.ts.check([k])]
            if not missing:
                return
            raise Timeout(f"store: waited {t:.0f}s for keys {missing} ({type(e).__name__})") from None

    def delete(self, key):
        self.ts.delete_key(key)
