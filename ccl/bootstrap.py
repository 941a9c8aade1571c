"""Bootstrap: how the ranks of a communicator learn about each other in O(1) store requests.

NCCL's shape, in Python:

1. **Rendezvous through the store, two requests per rank.** Each rank publishes the address
   of its process's listener (``boot/<rank>``) and reads one other: its successor's.
2. **All-gather among the ranks themselves** (Bruck's algorithm): in round k rank r receives
   the records of ranks r+2^k, r+2^k+1, ... from rank r+2^k and sends its own first records
   to rank r-2^k; ceil(log2 N) rounds over short-lived authenticated connections. A record
   carries its rank's address *and its successor's*, so the address needed in round k+1 is
   in what round k brought: the store is asked nothing more. A record is the rank's part of
   ``topology.detect.local_info`` plus the host's part, sent once per run of same-host ranks.
3. **Records are remembered per root store**, so a communicator of ranks already known
   (``split``, ``shrink``, ``Communicator(..., _members=, _tag=)``) needs no store request
   and no all-gather at all: only its own tag.

Connections (bootstrap rounds and the TCP transport's lazily opened ones) all arrive at one
listener per process and job secret, shared by every communicator. Both ends prove they
know the secret; the dialer speaks first, so neither side ever waits for the other to be
ready to accept (the handshake moves on whenever either side polls)::

    D->A  hello(magic, kind, from, to, lane, step, tag digest) nonce_d(32)
    A->D  nonce_a(32) HMAC(secret, "acc" hello nonce_d nonce_a)
    D->A  HMAC(secret, "dial" hello nonce_a nonce_d)

An accepted connection is kept under (tag digest, kind, from, to, lane, step) until the
communicator that wants it takes it, so a peer that runs ahead (a later round, a collective
this rank has not reached) is answered and parked, never refused.
"""
import errno
import hashlib
import hmac
import json
import logging
import os
import resource
import secrets
import select
import socket
import struct
import threading
import time
import weakref

from .errors import InvalidArgument, PeerFailure, Timeout, TransportError

log = logging.getLogger("pyccl")

MAGIC = b"PYCCLBS1"
_HELLO = struct.Struct("<8sBIIHI8s")      # magic, kind, from, to, lane, step, tag digest
_NONCE = 32
_MAC = 32
KIND_BOOT, KIND_TCP = 1, 2
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SAME_HOST = 0xFFFFFFFF                   # host part length meaning "as the previous record"
MAX_RECORD = 1 << 20                      # bytes of one part of one record
MAX_PARKED = 4096                         # handshakes in progress at one listener
HANDSHAKE_TIMEOUT = 30.0                  # an accepted socket must finish its hello in this long
_RANK_KEYS = ("rank", "pid", "cpus", "numa_nodes", "addr", "next", "tune")

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
class _Dial:
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
            need = _HELLO.size + _NONCE
            self.buf += _read(self.sock, need - len(self.buf), "peer")
            if len(self.buf) < need:
                return None
            hello, nonce_d = self.buf[:_HELLO.size], self.buf[_HELLO.size:]
            magic, kind, src, dst, lane, step, tag = _HELLO.unpack(hello)
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
            hello = _HELLO.pack(MAGIC, kind, rank, peer, lane, step, d)
            pending.append(((peer, kind, lane, step, "d"),
                            _Dial(addr, hello, listener.secret, deadline - time.monotonic(),
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


def _swap(listener, send_sock, data: bytes, recv_sock, deadline, who, limit) -> bytes:
    """Send `data` on one socket while receiving one u64-framed block on another."""
    out = memoryview(_U64.pack(len(data)) + data)
    head, body, want = b"", bytearray(), None
    while out or want is None or len(body) < want:
        rd = [recv_sock] if want is None or len(body) < want else []
        wr = [send_sock] if out else []
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout(f"{who}: timed out exchanging bootstrap records")
        r, w, _ = select.select(rd, wr, [], min(left, 0.05))
        if send_sock in w:
            try:
                n = send_sock.send(out[:1 << 20])
            except BlockingIOError:
                n = 0
            except OSError as e:
                raise PeerFailure(f"{who}: a peer dropped the bootstrap connection ({e})") from None
            out = out[n:]
            COUNTERS["bytes_sent"] += n
        if recv_sock in r:
            try:
                got = recv_sock.recv(8 - len(head) if want is None else min(want - len(body), 1 << 20))
            except BlockingIOError:
                continue
            except OSError as e:
                raise PeerFailure(f"{who}: a peer dropped the bootstrap connection ({e})") from None
            if not got:
                raise PeerFailure(f"{who}: a peer closed the bootstrap connection mid-exchange")
            COUNTERS["bytes_recv"] += len(got)
            if want is None:
                head += got
                if len(head) == 8:
                    (want,) = _U64.unpack(head)
                    if want > limit:
                        raise PeerFailure(f"{who}: a peer sent a {want}-byte block, over the {limit} bound")
            else:
                body += got
    return bytes(body)


# ---- records -------------------------------------------------------------------------------
def _split_info(info: dict) -> tuple:
    """(rank part, host part) as JSON bytes: the host part is the same for every rank of a host."""
    rank_part = {k: info[k] for k in _RANK_KEYS if k in info}
    host_part = {k: v for k, v in info.items() if k not in _RANK_KEYS}
    return (json.dumps(rank_part, separators=(",", ":")).encode(),
            json.dumps(host_part, separators=(",", ":"), sort_keys=True).encode())


def _pack(records) -> bytes:
    out, prev = [], None
    for rank_part, host_part in records:
        out += [_U32.pack(len(rank_part)), rank_part]
        if host_part == prev:
            out.append(_U32.pack(_SAME_HOST))
        else:
            out += [_U32.pack(len(host_part)), host_part]
            prev = host_part
    return b"".join(out)


def _unpack(data: bytes, count: int, who: str) -> list:
    recs, i, prev = [], 0, None
    try:
        for _ in range(count):
            (n,) = _U32.unpack_from(data, i)
            if n > MAX_RECORD:
                raise ValueError("record too long")
            rank_part = data[i + 4:i + 4 + n]
            i += 4 + n
            (m,) = _U32.unpack_from(data, i)
            i += 4
            if m == _SAME_HOST:
                if prev is None:
                    raise ValueError("host reference without a host")
                host_part = prev
            else:
                if m > MAX_RECORD:
                    raise ValueError("record too long")
                host_part = prev = data[i:i + m]
                i += m
            recs.append((rank_part, host_part))
        if i != len(data):
            raise ValueError("trailing bytes")
    except (struct.error, ValueError) as e:
        raise PeerFailure(f"{who}: malformed bootstrap records from a peer ({e})") from None
    return recs


def _decode(records) -> list:
    hosts = {}
    out = []
    for rank_part, host_part in records:
        h = hosts.get(host_part)
        if h is None:
            h = hosts[host_part] = json.loads(host_part)
        info = dict(h)
        info.update(json.loads(rank_part))
        out.append(info)
    return out


def all_gather(listener, tag, rank, size, mine: tuple, timeout, describe, alive=None) -> list:
    """Bruck all-gather of one record per rank; the records in rank order.

    `mine` is (rank part, host part), the rank part naming this rank's "addr" and its
    successor's ("next"). Round k: dial rank+2^k (its address is the "next" of the last
    record held), accept from rank-2^k, receive its records while sending ours."""
    have = [mine]
    step = 0
    deadline = time.monotonic() + timeout
    who = f"{tag}: rank {rank}"
    while len(have) < size:
        d = len(have)
        n = min(d, size - d)
        dst, src = (rank - d) % size, (rank + d) % size
        src_addr = json.loads(have[d - 1][0])["next"]
        socks = link(listener, tag, rank, [(src, src_addr, KIND_BOOT, 0, step)], [(dst, KIND_BOOT, 0, step)],
                     deadline, describe, alive)
        try:
            got = _swap(listener, socks[(dst, KIND_BOOT, 0, step, "a")], _pack(have[:n]),
                        socks[(src, KIND_BOOT, 0, step, "d")], deadline, who, n * 2 * (MAX_RECORD + 4))
        finally:
            for s in socks.values():
                s.close()
        have += _unpack(got, n, who)
        step += 1
        COUNTERS["rounds"] += 1
    return have[size - rank:] + have[:size - rank]


# ---- the communicator's entry point ----------------------------------------------------------
_KNOWN = weakref.WeakKeyDictionary()      # root store -> {member id: info}


def exchange(store, root_store, rank, size, members, secret, tag, timeout, bind_host, derived: bool,
             alive_check=None) -> tuple:
    """Everything rank `rank` needs to know of its peers: (peer_info list, listener).

    `store` is the communicator's prefixed store, `root_store` the one it was built from (the
    memory of known ranks is kept per root store), `members` the world ranks of the members,
    `derived`: the communicator was made from another (split, shrink, _members=)."""
    listener = listener_for(bind_host, secret)
    try:
        known = _KNOWN.setdefault(root_store, {})
    except TypeError:                      # a store that cannot be weakly referenced
        known = {}
    if derived and all(m in known for m in members) and known[members[rank]].get("addr") == listener.address:
        COUNTERS["reused"] += 1
        return [dict(known[m], rank=r) for r, m in enumerate(members)], listener
    from pyccl.topology.detect import local_info
    me = local_info(rank)
    me["addr"] = listener.address
    if rank == 0:
        from . import tune
        me["tune"] = tune.load()            # rank 0's calibration prices the plans of every rank
    from pyccl.transports.tcp import _lanes
    me["tcp_lanes"] = _lanes()              # both ends of a TCP pair must open as many sockets
    if size == 1:
        infos = [me]
    else:
        store.set(f"boot/{rank}", listener.address.encode())

        def missing(_waiting=None):
            keys = [f"boot/{r}" for r in range(size)]
            try:
                gone = [r for r, ok in enumerate(store.check(keys)) if not ok]
            except Exception:  # noqa: BLE001 - only for the message
                gone = []
            if gone:
                return (f"{tag}: rank {rank} waited {timeout:.0f}s for ranks {gone} to join "
                        f"(of {size}); did they start?")
            return (f"{tag}: rank {rank} waited {timeout:.0f}s in the bootstrap all-gather for ranks "
                    f"{_waiting}; all {size} ranks joined the store")
        try:
            me["next"] = store.get(f"boot/{(rank + 1) % size}", timeout=timeout).decode()
        except Timeout:
            raise Timeout(missing()) from None
        rec = _split_info(me)
        infos = _decode(all_gather(listener, tag, rank, size, rec, timeout, missing, alive_check))
    for info in infos:
        info.pop("next", None)
    for r, m in enumerate(members):
        known[m] = infos[r]
    return infos, listener


def check_secret(secret) -> bytes:
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise InvalidArgument("the bootstrap needs a non-empty job secret (bytes)")
    return bytes(secret)
