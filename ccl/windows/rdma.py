"""Windows between hosts over ibverbs: RDMA WRITE for put, WRITE_WITH_IMM for the signal, READ for get.

One reliable-connected QP per pair and window carries both directions: this rank's puts go
out as RDMA WRITEs straight into the peer's registered window (registered once, at creation);
a signal is a zero-byte WRITE_WITH_IMM whose immediate holds (slot, value), so it lands after
the earlier writes on the QP (RC order) and consumes one posted receive at the target, whose
completion adds the value to the origin's row of the board. Whoever polls the completion
queue applies it under `RdmaPair.lock` (one writer of that row): the origin waiting for its
own write's completion, or the target's `Service` (the completion channel's descriptor is in
its poll set). A put of up to STAGE_MAX bytes is copied into the pair's registered ring and
posted at once, so `put` returns with several writes in flight (as ib_write_bw keeps them);
a larger one is written from the caller's buffer (registered, cached) and waited for; `flush`
(and every signal, read or large put) waits until the writes posted before it completed.
A put from PYCCL_IB_STRIPE_MIN bytes is split over PYCCL_IB_QPS QPs per pair (as send/recv
stripes): the extra QPs carry only such parts, each with its own ring, and a signal, read,
flush or unstriped put first waits for their writes (RC orders a QP, not several). `get` is an RDMA READ of the peer's window (registered for remote reads)
into the caller's buffer, returned once completed; the target's CPU takes no part. The set-up
cards travel over the window's TCP sockets, which also tell of a peer that dies.
"""
import collections
import json
import random
import threading
import time

import numpy as np

from .. import settings
from ..errors import PeerFailure, Timeout, TransportError
from ..transports.ibverbs.device import _Device
from ..transports.ibverbs.verbs import (_ACCESS_FULL, _WC_RECV_RDMA_WITH_IMM, _WC_RETRY_EXC_ERR,
                                        _WC_RNR_RETRY_EXC_ERR, _errstr, _native)
from .base import Link
from .tcp import _recv_into

_K_SEND, _K_RECV = 1, 2
_VALUE_BITS = 20                          # immediate = slot << 20 | value
_VALUE_MAX = (1 << _VALUE_BITS) - 1
MAX_SLOTS = 1 << (32 - _VALUE_BITS)
SQ_DEPTH, RQ_DEPTH = 16, 256
READ_MAX = 1 << 30                        # bytes per RDMA READ (a message's length is 32 bits)
STAGE_MAX = 4 << 20                       # puts up to this are copied into the pair's ring and
RING_BYTES = 2 * STAGE_MAX + (1 << 20)    # posted without waiting (two of the largest fit at once)
_ACCESS_LOCAL_WRITE = 1
_ACCESS_REMOTE_READ = 4                   # the window is registered for it: peers' gets read it
_RNR_FOREVER = 7                          # a signal waits for the target to repost, never fails on it


def device(ctx):
    return _Device.get(ctx.bind_host)


class RdmaPair:
    """The QP to one peer and its completion queue (both directions)."""

    def __init__(self, peer: int, dev, board, who: str):
        ffi, lib = _native()
        self.ffi, self.lib, self.peer, self.dev, self.board, self.who = ffi, lib, peer, dev, board, who
        qpns = ffi.new("uint32_t[]", 1)
        err = ffi.new("char[512]")
        self.c = lib.pv_conn_create(dev.handle, 1, SQ_DEPTH, RQ_DEPTH, qpns, err, 512)
        if self.c == ffi.NULL:
            self.c = None
            raise TransportError(f"{who}: cannot create a QP on {dev.name}: {_errstr(err)}")
        self.qpn, self.psn = qpns[0], random.getrandbits(24)
        self.wcs = ffi.new("struct pv_wc[]", 32)
        self.lock = threading.Lock()          # CQ polls (and the board row they write)
        self.send_lock = threading.Lock()     # one poster at a time
        self.sent = self.done = 0             # work requests posted / completed (in order: RC)
        self.ring = None                      # staging for puts, made on the first staged put
        self.ring_bytes = RING_BYTES
        self.error = None
        self.remote = None

    def card(self, addr: int, rkey: int) -> bytes:
        d = self.dev
        return json.dumps({"qpn": self.qpn, "psn": self.psn, "lid": d.lid, "gid": d.gid.hex(), "mtu": d.mtu,
                           "eth": d.ethernet, "addr": addr, "rkey": rkey, "dev": d.name}).encode()

    def connect(self, card: bytes) -> None:
        r = self.remote = json.loads(card)
        if r["eth"] != self.dev.ethernet:
            raise TransportError(f"{self.who}: {r['dev']} and {self.dev.name} are on different link layers")
        gid = self.ffi.new("uint8_t[16]", bytes.fromhex(r["gid"]))
        err = self.ffi.new("char[512]")
        if self.lib.pv_conn_connect(self.c, 0, r["qpn"], self.psn, r["psn"], gid, r["lid"], self.dev.gid_index,
                                    min(self.dev.mtu, r["mtu"]), settings.get("PYCCL_IB_TIMEOUT"),
                                    settings.get("PYCCL_IB_RETRY"), _RNR_FOREVER, err, 512):
            raise TransportError(f"{self.who}: cannot connect the window's QP: {_errstr(err)}")
        if self.lib.pv_post_recvs(self.c, 0, _K_RECV << 56, RQ_DEPTH):
            raise TransportError(f"{self.who}: posting the window's receives failed")

    def poll(self) -> None:
        """Apply what completed: incoming signals to the board, this rank's writes as done."""
        with self.lock:
            if self.c is None:
                return
            n = self.lib.pv_poll(self.c, self.wcs, 32)
            if n < 0:
                self.error = self.error or f"polling its completion queue failed ({n})"
            for i in range(max(n, 0)):
                w = self.wcs[i]
                if w.status:
                    text = self.ffi.string(self.lib.pv_wc_status_str(w.status)).decode()
                    gone = w.status in (_WC_RETRY_EXC_ERR, _WC_RNR_RETRY_EXC_ERR)
                    self.error = self.error or (f"{'unreachable, ' if gone else ''}completion {text}")
                    self.done += (w.wr_id >> 56) == _K_SEND
                elif (w.wr_id >> 56) == _K_RECV and w.opcode == _WC_RECV_RDMA_WITH_IMM:
                    slot = w.imm >> _VALUE_BITS
                    if slot >= self.board.nslots:
                        self.error = self.error or f"a signal for slot {slot} of {self.board.nslots}"
                        continue
                    self.board.add(self.peer, slot, w.imm & _VALUE_MAX)
                    if self.lib.pv_post_recvs(self.c, 0, _K_RECV << 56, 1):
                        self.error = self.error or "reposting a receive failed"
                else:
                    self.done += 1

    def events(self) -> None:
        """The completion channel's descriptor turned readable: take the events, re-arm, poll."""
        with self.lock:
            if self.c is None:
                return
            self.lib.pv_drain_events(self.c)
        self.arm()

    def arm(self) -> int:
        with self.lock:
            fd = self.lib.pv_arm(self.c) if self.c is not None else -1
        self.poll()                           # what completed before arming raised no event
        return fd

    def write(self, laddr: int, n: int, lkey: int, offset: int, imm, timeout: float) -> None:
        """One RDMA WRITE (with an immediate unless imm is None), returned once acknowledged."""
        self._one("WRITE", lambda: self.lib.pv_post_write(self.c, 0, _K_SEND << 56, laddr, n, lkey,
                                                         self.remote["addr"] + offset, self.remote["rkey"],
                                                         imm is not None, imm or 0), timeout)

    def read(self, laddr: int, n: int, lkey: int, offset: int, timeout: float) -> None:
        """One RDMA READ of n bytes of the peer's window at `offset`, returned once they are here."""
        self._one("READ", lambda: self.lib.pv_post_read(self.c, 0, _K_SEND << 56, laddr, n, lkey,
                                                       self.remote["addr"] + offset, self.remote["rkey"]), timeout)

    def _one(self, what: str, post, timeout: float) -> None:
        """Post one work request from this rank and poll until it (and all before it) completed."""
        with self.send_lock:
            deadline = time.monotonic() + timeout
            self._room(what, deadline)
            self._post(what, post)
            self._until(self.sent, what, deadline)

    def staged_write(self, src, offset: int, imm, timeout: float) -> None:
        """Copy `src` into the ring and post its RDMA WRITE (with imm unless None); returns at
        once: `src` may be reused, `drain` waits for the write (RC completes them in order)."""
        n = src.size
        with self.send_lock:
            deadline = time.monotonic() + timeout
            if self.ring is None:
                self.ring = _Ring(self.dev.mrs, self.ring_bytes)
            ring = self.ring
            while True:
                ring.free(self.done)
                at = ring.place(n)
                if at is not None:
                    break
                self._until(ring.oldest(), "WRITE", deadline)       # room in the ring: the oldest done
            self._room("WRITE", deadline)
            ring.mem[at:at + n] = src
            self._post("WRITE", lambda: self.lib.pv_post_write(
                self.c, 0, _K_SEND << 56, ring.addr + at, n, ring.lkey, self.remote["addr"] + offset,
                self.remote["rkey"], imm is not None, imm or 0))
            ring.taken(self.sent, at, n)

    def drain(self, timeout: float) -> None:
        """Return once every work request posted so far has completed."""
        with self.send_lock:
            self._until(self.sent, "WRITE", time.monotonic() + timeout)

    def _post(self, what, post) -> None:
        if self.error:
            raise PeerFailure(f"{self.who}: {self.error}")
        rc = post()
        if rc:
            raise TransportError(f"{self.who}: posting an RDMA {what} failed ({rc})")
        self.sent += 1

    def _room(self, what, deadline) -> None:
        """At most SQ_DEPTH - 1 work requests in flight before posting one more."""
        self._until(self.sent - SQ_DEPTH + 2, what, deadline)

    def _until(self, seq: int, what: str, deadline: float) -> None:
        """Poll until work request number `seq` has completed; raise if one failed."""
        while self.done < seq:
            self.poll()
            if self.error:
                raise PeerFailure(f"{self.who}: {self.error}")
            if time.monotonic() > deadline:
                raise Timeout(f"{self.who}: an RDMA {what} did not complete within the timeout")
        if self.error:
            raise PeerFailure(f"{self.who}: {self.error}")

    def close(self) -> None:
        with self.lock:
            if self.c is not None:
                self.lib.pv_conn_destroy(self.c)
                self.c = None
        if self.ring is not None:
            self.ring.close()
            self.ring = None


class _Ring:
    """Registered staging memory for puts: byte ranges handed out in order, each given back
    once the work request that reads it has completed (send completions come in order)."""

    def __init__(self, mrs, nbytes: int):
        self.mrs, self.cap = mrs, nbytes
        self.mem = np.empty(nbytes, np.uint8)
        self.entry = mrs.acquire(memoryview(self.mem), _ACCESS_LOCAL_WRITE)
        self.addr, self.lkey = self.mem.ctypes.data, self.entry.lkey
        self.busy = collections.deque()       # (work request number, start, end), oldest first
        self.head = 0

    def free(self, done: int) -> None:
        while self.busy and self.busy[0][0] <= done:
            self.busy.popleft()
        if not self.busy:
            self.head = 0

    def oldest(self) -> int:
        return self.busy[0][0]

    def place(self, n: int):
        """Start of n free bytes, or None (then wait for the oldest). Strict comparisons: the
        head never catches up with the oldest range, so "full" and "empty" never look alike."""
        if not self.busy:
            return 0 if n <= self.cap else None
        tail = self.busy[0][1]
        if self.head > tail:                  # in use: [tail, head)
            if self.cap - self.head >= n:
                return self.head
            return 0 if n < tail else None
        return self.head if tail - self.head > n else None      # in use: [tail, cap) and [0, head)

    def taken(self, seq: int, at: int, n: int) -> None:
        self.busy.append((seq, at, at + n))
        self.head = at + n

    def close(self) -> None:
        self.mrs.release(self.entry)


class RdmaLink(Link):
    """A peer reached over ibverbs: puts and signals by RDMA WRITE, gets by RDMA READ. `pair`
    carries signals, reads and unstriped puts; a put from PYCCL_IB_STRIPE_MIN bytes (up to
    `stripes` x STAGE_MAX) is split over it and the `extra` pairs (one QP each, as send/recv
    stripes over PYCCL_IB_QPS), and whatever must come after it (a signal, a read, flush)
    first waits until the extra pairs' writes completed (no order across QPs)."""

    kind = "rdma"

    def __init__(self, pair: RdmaPair, tcp, timeout: float, extra=()):
        self.peer, self.pair, self.tcp, self.timeout = pair.peer, pair, tcp, timeout
        self.extra = list(extra)
        self.mrs = pair.dev.mrs
        self.reads = 0                        # RDMA READs posted (tests check that gets use them)
        self.striped = 0                      # puts split over several QPs
        self.stripe_min = settings.get("PYCCL_IB_STRIPE_MIN")
        self._step = 0                        # bytes per QP of the latest striped put

    def _after_extra(self):
        for p in self.extra:
            p.drain(self.timeout)

    def put(self, src, offset, slot):
        n = src.size
        if n == 0:
            if slot >= 0:
                self.signal(slot, 1)
            return
        k = 1 + len(self.extra)
        pending = any(p.sent > p.done for p in self.extra)
        if k > 1 and self.stripe_min <= n <= k * STAGE_MAX:
            step = ((n + k - 1) // k + 4095) // 4096 * 4096      # bytes per QP, whole pages
            if pending and step != self._step:
                self._after_extra()           # other cuts: a byte could reach the peer twice out of order
            self._step = step
            pairs = [self.pair, *self.extra]
            for i, at in reversed(list(enumerate(range(0, n, step)))):     # the main pair's part last
                pairs[i].staged_write(src[at:at + step], offset + at, None, self.timeout)
            self.striped += 1
            if slot >= 0:
                self.signal(slot, 1)
            return
        if pending:
            self._after_extra()               # in order after the striped puts before it
        if n <= STAGE_MAX:                    # copied: returns at once, several writes in flight
            self.pair.staged_write(src, offset, None if slot < 0 else slot << _VALUE_BITS | 1, self.timeout)
            return
        e = self.mrs.acquire(memoryview(src), 1)
        try:
            self.pair.write(src.ctypes.data, n, e.lkey, offset, None if slot < 0 else slot << _VALUE_BITS | 1,
                            self.timeout)
        finally:
            self.mrs.release(e)

    def signal(self, slot, value):
        self._after_extra()                   # after every earlier put, on every QP
        while value > 0:
            part = min(value, _VALUE_MAX)
            self.pair.write(0, 0, 0, 0, slot << _VALUE_BITS | part, self.timeout)
            value -= part

    def flush(self):
        self._after_extra()
        self.pair.drain(self.timeout)

    def get(self, dst, offset):
        """RDMA READs (at most READ_MAX bytes each) straight into `dst`, registered for local writes."""
        n = dst.size
        if n == 0:
            return
        self._after_extra()
        e = self.mrs.acquire(memoryview(dst), _ACCESS_LOCAL_WRITE)
        try:
            for at in range(0, n, READ_MAX):
                part = min(READ_MAX, n - at)
                self.pair.read(dst.ctypes.data + at, part, e.lkey, offset + at, self.timeout)
                self.reads += 1
        finally:
            self.mrs.release(e)

    def failure(self):
        return self.pair.error or next((p.error for p in self.extra if p.error), None) or self.tcp.failure()

    def close(self):
        self.pair.close()
        for p in self.extra:
            p.close()
        self.tcp.close()


def release(entry) -> None:
    """The window's registration is no longer used by it (it stays in the device's cache)."""
    entry.users -= 1


def connect_pairs(ctx, board, window, peers: list, socks: dict, names) -> tuple:
    """({peer: [RdmaPair, ...]}, memory region entry, the registered array): the window
    registered once (an 8-byte stand-in for an empty one), PYCCL_IB_QPS QPs per peer (the first
    carries signals and reads; the others only parts of striped puts, with smaller rings), the
    cards swapped over the pair's TCP sockets (mine out on my request socket, theirs in on my
    service socket), then a ready byte each way once all QPs are connected."""
    if not peers:
        return {}, None, None
    dev = device(ctx)
    mem = window if window.size else np.zeros(8, np.uint8)
    entry = dev.mrs.acquire(memoryview(mem), _ACCESS_FULL | _ACCESS_REMOTE_READ)
    addr = mem.ctypes.data
    k = max(1, settings.get("PYCCL_IB_QPS"))
    pairs = {}
    try:
        for p in peers:
            pairs[p] = []
            for i in range(k):
                pairs[p].append(RdmaPair(p, dev, board, names(p)))
                if i:
                    pairs[p][i].ring_bytes = STAGE_MAX + (1 << 20)
                card = pairs[p][i].card(addr, entry.rkey)
                socks[p][0].sendall(len(card).to_bytes(4, "little") + card)
        for p in peers:
            for pair in pairs[p]:
                n = int.from_bytes(_read(socks[p][1], 4, names(p)), "little")
                pair.connect(_read(socks[p][1], n, names(p)))
            socks[p][0].sendall(b"R")
        for p in peers:
            _read(socks[p][1], 1, names(p))
    except BaseException:
        for ps in pairs.values():
            for pair in ps:
                pair.close()
        dev.mrs.release(entry)
        raise
    return pairs, entry, mem



def _read(sock, n: int, who: str) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf), f"{who} (window set-up)")
    return bytes(buf)
