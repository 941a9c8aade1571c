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

The wire format (length-prefixed frames, the handshake) is written down in store_wire.py.

Counters made by ``add`` are stored as ASCII decimal (``b"3"``), like torch's stores, so
``get`` on a counter reads the same whichever store is underneath.

The store is split by concept: store_wire.py (the frames), store_server.py (StoreServer),
tcp_store.py (TCPStore); this module keeps the public names (re-exported from there) and the
wrappers any store can sit under (PrefixStore, TorchStoreAdapter, multi_get).
"""
import threading
import time

from .errors import InvalidArgument, PeerFailure, PycclError, Timeout  # noqa: F401  (some re-exported)
from .store_server import StoreServer, _Client  # noqa: F401  (re-exported)
from .store_wire import (  # noqa: F401  (re-exported: tests and tools import them from here)
    _MAC, _MAX_SERVER_WAIT, _NONCE, _OPS, _REP, _REPLY_MARGIN, _REQ, _U32, _I64, ADD, BAD, CHECK,
    DELETE, GET, MAGIC, MAX_KEY, MAX_VALUE, MGET, MISSING, OK, SET, WAIT, _family, _key_bytes,
    _mac, _pack_keys, _recv_exact, _unpack_keys,
)
from .tcp_store import _CLIENTS, STATS, TCPStore, close_local_clients  # noqa: F401  (re-exported)

__all__ = ["MAX_KEY", "MAX_VALUE", "PrefixStore", "StoreServer", "TCPStore", "TorchStoreAdapter"]


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
