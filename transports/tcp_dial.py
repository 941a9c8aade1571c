"""TCP dialing: the authenticated connections of the bootstrap and of the TCP transport.

One listener per process and job secret (a thread answers handshakes, so a peer that dials
this rank never waits for it to call into pyccl); `link` opens dialed and accepted sockets
at once. Both ends prove they know the secret; the dialer speaks first::

    D->A  hello(magic, kind, from, to, lane, step, tag digest) nonce_d(32)
    A->D  nonce_a(32) HMAC(secret, "acc" hello nonce_d nonce_a)
    D->A  HMAC(secret, "dial" hello nonce_a nonce_d)

An accepted connection is parked under (tag digest, kind, from, to, lane, step) until the
communicator that wants it takes it. It lives in transports/ because the TCP transport dials
through it; the bootstrap (ccl/bootstrap.py, a layer up) uses it for its all-gather rounds.
"""
import errno
import hashlib
import hmac
import logging
import os
import resource
import secrets
import select
import socket
import struct
import threading
import time

from ..errors import PeerFailure, Timeout, TransportError
from ..process import pid_alive, pid_namespace

log = logging.getLogger("pyccl")

MAGIC = b"PYCCLBS1"
HELLO = struct.Struct("<8sBIIHI8s")       # magic, kind, from, to, lane, step, tag digest
_NONCE = 32
_MAC = 32
KIND_BOOT, KIND_TCP, KIND_WIN = 1, 2, 3       # bootstrap rounds, TCP transport, one-sided windows (ccl/windows/)
MAX_PARKED = 4096                         # handshakes in progress at one listener
HANDSHAKE_TIMEOUT = 30.0                  # an accepted socket must finish its hello in this long

#: What this process did during set-up: bootstrap rounds, connections, bytes (bench/startup.py).
COUNTERS = {"rounds": 0, "dials": 0, "accepts": 0, "bytes_sent": 0, "bytes_recv": 0, "reused": 0}


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), hashlib.sha256).digest()


def digest(tag: str) -> bytes:
    return hashlib.sha256(tag.encode()).digest()[:8]


def raise_fd_limit() -> tuple:
    """Raise the soft RLIMIT_NOFILE to the hard one (once per process); (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def check_fds(needed: int, what: str) -> None:
    """TransportError before `needed` more descriptors would pass the limit (soft raised first)."""
    soft, hard = raise_fd_limit()
    limit = soft if soft != resource.RLIM_INFINITY else 1 << 30
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        return
    if used + needed + 8 > limit:
        raise TransportError(f"{what}: needs {needed} more file descriptors, {used} are open and the "
                             f"limit (RLIMIT_NOFILE, soft raised to hard) is {limit}: raise it to at least "
                             f"{used + needed + 8} (ulimit -n), or use fewer TCP lanes (PYCCL_TCP_SOCKETS)")


# ---- the handshake, both ends, never blocking ------------------------------------------------
class Dial:
    """The connecting end. `step()` moves it on; True once both sides are proven."""

    def __init__(self, addr: str, hello: bytes, secret: bytes, timeout: float, who: str):
        host, _, port = addr.rpartition(":")
        self.who, self.hello, self.secret = who, hello, secret
        try:
            self.sock = socket.create_connection((host.strip("[]"), int(port)), timeout=max(0.1, min(timeout, 30.0)))
        except OSError as e:
            raise PeerFailure(f"{who} at {addr} cannot be reached ({e}): is it alive?") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.nonce = secrets.token_bytes(_NONCE)
        self.buf = b""
        self.done = False
        COUNTERS["dials"] += 1
        self._send(hello + self.nonce)

    def _send(self, data):
        try:
            self.sock.sendall(data)       # a few dozen bytes into an empty socket buffer: no wait
        except OSError as e:
            raise PeerFailure(f"{self.who} dropped the connection during the handshake ({e})") from None

    def step(self) -> bool:
        if self.done:
            return True
        self.buf += _read(self.sock, _NONCE + _MAC - len(self.buf), self.who)
        if len(self.buf) < _NONCE + _MAC:
            return False
        nonce_a, proof = self.buf[:_NONCE], self.buf[_NONCE:]
        if not hmac.compare_digest(proof, _mac(self.secret, b"acc", self.hello, self.nonce, nonce_a)):
            raise PeerFailure(f"{self.who} could not prove it knows the job secret (same PYCCL_JOB_SECRET?)")
        self._send(_mac(self.secret, b"dial", self.hello, nonce_a, self.nonce))
        self.done = True
        return True

    def close(self):
        self.sock.close()


def _read(sock, n: int, who: str) -> bytes:
    try:
        data = sock.recv(n)
    except BlockingIOError:
        return b""
    except OSError as e:
        raise PeerFailure(f"{who} dropped the connection during the handshake ({e})") from None
    if not data:
        raise PeerFailure(f"{who} closed the connection during the handshake")
    return data


class _Accept:
    """The accepting end: read the hello, answer, then check the dialer's proof."""

    def __init__(self, sock, secret):
        self.sock, self.secret = sock, secret
        self.buf = b""
        self.hello = None
        self.key = None
        self.since = time.monotonic()

    def step(self):
        """The key once proven, None while waiting; raises ValueError/OSError to drop it."""
        if self.hello is None:
            need = HELLO.size + _NONCE
            self.buf += _read(self.sock, need - len(self.buf), "peer")
            if len(self.buf) < need:
                return None
            hello, nonce_d = self.buf[:HELLO.size], self.buf[HELLO.size:]
            magic, kind, src, dst, lane, step, tag = HELLO.unpack(hello)
            if magic != MAGIC:
                raise ValueError("not a pyccl peer")
            self.hello, self.buf = hello, b""
            self.nonce = secrets.token_bytes(_NONCE)
            self.sock.sendall(self.nonce + _mac(self.secret, b"acc", hello, nonce_d, self.nonce))
            self.expect = _mac(self.secret, b"dial", hello, self.nonce, nonce_d)
            self.key = (tag, kind, src, dst, lane, step)
        self.buf += _read(self.sock, _MAC - len(self.buf), "peer")
        if len(self.buf) < _MAC:
            return None
        if not hmac.compare_digest(self.buf, self.expect):
            raise ValueError("bad proof")
        return self.key


class Listener:
    """The one listening socket of this process (per job secret and address family)."""

    def __init__(self, host: str, secret: bytes):
        raise_fd_limit()
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, 0), family=fam, backlog=4096)
        self.sock.setblocking(False)
        port = self.sock.getsockname()[1]
        self.address = f"[{host}]:{port}" if fam == socket.AF_INET6 else f"{host}:{port}"
        self.secret = secret
        self._pending = []            # _Accept still in their handshake
        self._ready = {}              # key -> proven socket, until taken
        self._wakers = set()          # write ends of the pipes link() callers sleep on
        self._lock = threading.Lock()
        # Handshakes are answered by this thread, so a peer opening a connection to this rank
        # never waits for the rank to call into pyccl (it may be computing, or idle).
        self._thread = threading.Thread(target=self._serve, name="pyccl-listener", daemon=True)
        self._thread.start()

    def _serve(self):
        while True:
            try:
                fds = self.fds()
                select.select(fds, [], [], 0.5)
                self.poll(accept=True)
            except (OSError, ValueError):
                if self.sock.fileno() < 0:
                    return
                time.sleep(0.05)          # a socket closed under select: look again

    def fds(self) -> list:
        with self._lock:
            return [self.sock] + [a.sock for a in self._pending]

    def poll(self, accept=False) -> None:
        """Move every handshake on (and accept what has arrived: only the listener's thread
        does, so it watches every pending socket); never blocks."""
        with self._lock:
            while accept and len(self._pending) < MAX_PARKED:
                try:
                    sock, _ = self.sock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE):
                        log.warning("pyccl: listener cannot accept: %s", e)
                    break
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._pending.append(_Accept(sock, self.secret))
                COUNTERS["accepts"] += 1
            if not self._pending:
                return
            now = time.monotonic()
            still = []
            for a in self._pending:
                try:
                    key = a.step()
                except (OSError, ValueError, PeerFailure, struct.error):
                    a.sock.close()          # garbage, a probe, a stranger: this socket only
                    continue
                if key is not None:
                    old = self._ready.pop(key, None)
                    if old is not None:
                        old.close()
                    self._ready[key] = a.sock
                    self._wake()
                elif now - a.since > HANDSHAKE_TIMEOUT:
                    a.sock.close()
                else:
                    still.append(a)
            self._pending = still

    def _wake(self) -> None:
        for w in self._wakers:
            try:
                os.write(w, b"!")
            except OSError:           # full (a wake-up is already waiting) or closed
                pass

    def watch(self) -> tuple:
        """A pipe (read end, write end) that gets a byte whenever a connection is proven, so a
        caller waiting for accepts sleeps in select() instead of polling (with hundreds of ranks
        on a few cores, a 2 ms poll per waiting rank is most of their set-up CPU)."""
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        with self._lock:
            self._wakers.add(w)
        return r, w

    def unwatch(self, pipe: tuple) -> None:
        with self._lock:
            self._wakers.discard(pipe[1])
        for fd in pipe:
            os.close(fd)

    def take(self, key):
        with self._lock:
            return self._ready.pop(key, None)

    def forget(self, tag_digest: bytes) -> None:
        """Close parked connections of a communicator that is going away."""
        with self._lock:
            for key in [k for k in self._ready if k[0] == tag_digest]:
                self._ready.pop(key).close()


_LISTENERS = {}
_LISTENERS_LOCK = threading.Lock()


def listener_for(host: str, secret: bytes) -> Listener:
    with _LISTENERS_LOCK:
        key = (host, bytes(secret))
        lst = _LISTENERS.get(key)
        if lst is None or lst.sock.fileno() < 0 or lst.pid != os.getpid():
            lst = _LISTENERS[key] = Listener(host, secret)
            lst.pid = os.getpid()
        return lst


def link(listener: Listener, tag: str, rank: int, dials: list, accepts: list, deadline: float,
         describe, alive=None, cancelled=None) -> dict:
    """Open authenticated connections: `dials` [(peer, addr, kind, lane, step)] and `accepts`
    [(peer, kind, lane, step)], all at once. Returns {(peer, kind, lane, step, "d"|"a"): socket}
    (non-blocking). `describe(peers)` words a Timeout; `alive(peers)` may raise PeerFailure
    for peers found dead while waiting (checked about once a second); `cancelled()` true
    (the communicator was aborted) ends the wait with PeerFailure."""
    d = digest(tag)
    out, pending = {}, []
    waker = listener.watch() if accepts else None    # before the first take(): no wake-up lost
    try:
        for peer, addr, kind, lane, step in dials:
            hello = HELLO.pack(MAGIC, kind, rank, peer, lane, step, d)
            pending.append(((peer, kind, lane, step, "d"),
                            Dial(addr, hello, listener.secret, deadline - time.monotonic(),
                                  f"{tag}: rank {peer}")))
        want = {(d, kind, peer, rank, lane, step): (peer, kind, lane, step, "a") for peer, kind, lane, step in accepts}
        next_check = time.monotonic() + 1.0
        while True:
            for key in list(want):
                sock = listener.take(key)
                if sock is not None:
                    out[want.pop(key)] = sock
            still = []
            for name, dial in pending:
                if dial.step():
                    out[name] = dial.sock
                else:
                    still.append((name, dial))
            pending = still
            if not pending and not want:
                return out
            now = time.monotonic()
            waiting = sorted({n[0] for n, _ in pending} | {n[0] for n in want.values()})
            if now > deadline:
                raise Timeout(describe(waiting))
            if cancelled is not None and cancelled():
                raise PeerFailure(f"{tag}: rank {rank} stopped waiting for connections with ranks "
                                  f"{waiting}: the communicator was aborted")
            if alive is not None and now > next_check:
                alive(waiting)
                next_check = now + 1.0
            # accepted connections arrive through the listener's thread, which writes to `waker`
            rd = [dial.sock for _, dial in pending] + ([waker[0]] if want else [])
            ready, _, _ = select.select(rd, [], [], min(0.05, max(0.0, deadline - now)))
            if waker is not None and waker[0] in ready:
                os.read(waker[0], 4096)
    except BaseException:
        for _, dial in pending:
            dial.close()
        for sock in out.values():
            sock.close()
        raise
    finally:
        if waker is not None:
            listener.unwatch(waker)


def check_alive(ctx, peers) -> None:
    """PeerFailure for a peer found dead while waiting for it to connect: a process of this
    host (same pid namespace) that has exited, or a remote listener that refuses connections."""
    me = ctx.info.get(ctx.rank, {})
    for p in peers:
        info = ctx.info.get(p, {})
        if info.get("host") == me.get("host") and info.get("pidns") == pid_namespace() and info.get("pid"):
            if not pid_alive(info["pid"]):
                raise PeerFailure(f"{ctx.comm_tag}: rank {p} is gone (its process {info['pid']} exited) "
                                  f"while rank {ctx.rank} waited for it to connect")
        elif info.get("addr"):
            host, _, port = info["addr"].rpartition(":")
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
            except ConnectionRefusedError:
                raise PeerFailure(f"{ctx.comm_tag}: rank {p} is gone (its listener {info['addr']} refuses "
                                  f"connections) while rank {ctx.rank} waited for it to connect") from None
            except OSError:
                pass
