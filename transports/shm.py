"""Shared-memory transport: ranks on one host exchange messages through slot rings.

Every rank creates one POSIX shared-memory segment holding one ring per peer for the messages
*to* it (the receiver owns its rings, as in NCCL), publishes its name through the store,
maps its peers' segments, and unlinks its own as soon as every peer has mapped it: from then
on the kernel frees the memory when the last process unmaps it, so a crash leaves nothing in
/dev/shm.  A segment left by a job that died during set-up is removed at the next start
(`clean_leftovers`: names carry the creator's uid and pid).

A ring is `PYCCL_SHM_SLOTS` slots of `PYCCL_SHM_SLOT_BYTES`; the sender copies a message
into free slots (several when it is larger than a slot), the receiver copies it out, in
FIFO order, with head/tail counters in separate cache lines (native/shm.c).  The first slot
of each message carries its length and number, so a receiver that posted a different size
gets a TransportError naming the peer and both sizes instead of garbage.  `irecv_reduce`
reduces straight out of the slots (dst = src op message), saving the executor a pass over a
scratch buffer.  Copies and reductions run in C with the GIL released.

Segment names: ``/pyccl-<uid>-<creator pid>-<tag>-<random>``.

How a new segment gets its memory (``PYCCL_SHM_RESERVE``, `Segment`):

* ``check`` (default): the segment is created at its size without allocating it (pages come
  when first touched), after a ``statvfs`` of /dev/shm shows room for it: the bytes of the
  segments this set-up makes on this host at once (the caller's ``share``: every local rank
  makes one ring segment of the same size) plus the untouched bytes this process may still
  need for its live segments made so. Too little room is a TransportError naming /dev/shm's
  free bytes, the bytes needed and the fix, at creation, as before. Why: allocating every byte
  up front (``posix_fallocate``) was most of a grow's or shrink's time on the loaded 2-core VM
  (1.3 GiB zeroed per grow at 64 ranks, rings of which most pages are never touched; see
  bench/JOURNAL.md#2026-12-07-elastic-2); pages that are touched cost the same either way.
  What the check cannot see: another process (another job, or peers' segments also made
  lazily) taking /dev/shm's room between the check and the first touch of a page; that touch
  is then a SIGBUS in the rank that makes it. The usual case of exhaustion (a container's
  64 MiB /dev/shm, too small for the job) is caught by the check.
* ``full``: every byte allocated at creation (``posix_fallocate``): ENOSPC then, never a
  SIGBUS later, at that cost in set-up time.
"""
import json
import logging
import os
import re
import secrets
import time
from collections import deque

from .. import settings
from ..callsig import mismatch_of
from ..dtypes import as_op
from ..errors import PeerFailure, Timeout, TransportError
from ..process import pid_namespace
from ..reduce import _DTYPE_CODE, _OP_CODE
from .base import Connection, Request, Transport

try:
    from .._native import ffi, lib
    NATIVE_SHM = hasattr(lib, "pyccl_ring_send")
except ImportError:  # the C core is not built
    ffi = lib = None
    NATIVE_SHM = False

log = logging.getLogger("pyccl")

SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^pyccl-(\d+)-(\d+)-")
_HDR_BYTES = 4096                   # segment header page; rings follow
_SIZE_MISMATCH, _OUT_OF_STEP, _CALL_MISMATCH = 4, 5, 8  # native/shm.h codes (negated by the ring calls)


# ---- segments (shared with ccl/engines/shm.py) ---------------------------------------------
def segment_name(tag: str, kind: str) -> str:
    """``/pyccl-<uid>-<pid>-<tag>.<kind>-<random>``, safe characters only, under NAME_MAX."""
    safe = re.sub(r"[^A-Za-z0-9_.]", "_", f"{tag}.{kind}")[:120]
    return f"/pyccl-{os.getuid()}-{os.getpid()}-{safe}-{secrets.token_hex(4)}"


def clean_leftovers() -> list:
    """Unlink our segments whose creator process is gone (a job that crashed during set-up).

    Only names of this uid are touched, and only when ``kill(pid, 0)`` says the creator does
    not exist.  Returns the names removed."""
    if lib is None or not os.path.isdir(SHM_DIR):
        return []
    removed = []
    uid = os.getuid()
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    for name in names:
        m = _NAME_RE.match(name)
        if not m or int(m.group(1)) != uid:
            continue
        pid = int(m.group(2))
        if pid == os.getpid() or lib.pyccl_pid_alive(pid):
            continue
        if lib.pyccl_shm_unlink(("/" + name).encode()) == 0:
            removed.append(name)
    if removed:
        log.info("pyccl: removed %d shared-memory segment(s) left by dead processes: %s",
                 len(removed), ", ".join(removed))
    return removed


_LAZY = {}                          # id of a live Segment made with PYCCL_SHM_RESERVE=check -> its size


def _shm_free() -> int:
    """Bytes /dev/shm can still hand out to this user (statvfs), or -1 when unknown."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


class Segment:
    """One mapped POSIX shared-memory object. The creator unlinks it (`unlink`, `close`).

    `create`: make it, `size` bytes, its memory as PYCCL_SHM_RESERVE says (see the module doc);
    `share`: how many segments of this size this set-up makes on this host at about the same
    time (the room the ``check`` mode asks /dev/shm for)."""

    def __init__(self, name: str, size: int = 0, create: bool = False, share: int = 1):
        if not NATIVE_SHM:
            raise TransportError("shared memory needs the C core pyccl._native (pip install -e .)")
        self.name = name
        self.owner = create
        self.unlinked = not create
        self.base = None
        sz = ffi.new("size_t *", size)
        err = ffi.new("int *")
        lazy = create and settings.get("PYCCL_SHM_RESERVE") == "check"
        if lazy:
            self._create_unallocated(name, size, share)
        base = lib.pyccl_shm_map(name.encode(), sz, 1 if create and not lazy else 0, err)
        if base == ffi.NULL:
            code = err[0]
            if lazy:
                lib.pyccl_shm_unlink(name.encode())
            hint = " (is /dev/shm full? see df /dev/shm)" if code == 28 else ""
            raise TransportError(f"shared memory segment {name} ({size} bytes): "
                                 f"{'create' if create else 'open'} failed: {os.strerror(code)}{hint}")
        self.size = sz[0]
        self.base = ffi.cast("char *", base)
        if lazy:
            _LAZY[id(self)] = self.size

    @staticmethod
    def _create_unallocated(name, size, share):
        """PYCCL_SHM_RESERVE=check: make the object at `size` bytes with no page allocated,
        once statvfs shows room for `share` such segments and this process's other lazy ones."""
        free = _shm_free()
        share, earlier = max(1, int(share)), sum(_LAZY.values())
        need = size * share + earlier
        if 0 <= free < need:
            more = f", and {earlier} bytes of this process's earlier segments" if earlier else ""
            raise TransportError(
                f"shared memory segment {name} ({size} bytes): {SHM_DIR} has {free} bytes free, less than "
                f"the {need} bytes this set-up may use ({share} segment(s) of {size} bytes on this host{more}). "
                f"Free space in {SHM_DIR} (df {SHM_DIR}; a container's default is 64 MiB: docker --shm-size), "
                f"or use fewer ranks per host (PYCCL_SHM_RESERVE=full allocates every byte at creation instead "
                f"of checking)")
        path = SHM_DIR + name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise TransportError(f"shared memory segment {name} ({size} bytes): create failed: "
                                 f"{e.strerror}") from None
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            raise TransportError(f"shared memory segment {name} ({size} bytes): create failed: "
                                 f"{e.strerror}") from None
        os.close(fd)

    def unlink(self) -> None:
        if not self.unlinked:
            self.unlinked = True
            lib.pyccl_shm_unlink(self.name.encode())

    def close(self) -> None:
        self.unlink()
        if self.base is not None:
            lib.pyccl_shm_unmap(self.base, self.size)
            self.base = None
        _LAZY.pop(id(self), None)


# ---- the connection ----------------------------------------------------------------------------
class _Msg(Request):
    """One posted message: `slot` slots of `nslots` moved so far."""

    __slots__ = ("ptr", "red", "slot", "nslots", "no", "dtype", "op", "keep", "call")


class ShmConnection(Connection):
    """Messages to and from one peer on this host, through two rings (one per direction)."""

    def __init__(self, peer: int, send_ring, recv_ring, peer_pid: int, check_pid: bool, tag: str):
        self.peer = peer
        self._sring, self._rring = send_ring, recv_ring
        self._sslot = lib.pyccl_ring_slot_bytes(send_ring)
        self._rslot = lib.pyccl_ring_slot_bytes(recv_ring)
        self._peer_pid = peer_pid if check_pid else 0
        self._tag = tag
        self.sendq, self.recvq = deque(), deque()
        self.send_no = self.recv_no = 0
        self._idle = 0
        self._next_check = 0.0
        self.closed = False
        self.group = [self]     # the transport's connections: they fail together

    @staticmethod
    def _ptr(buf, nbytes):
        return ffi.from_buffer(buf) if nbytes else ffi.NULL

    def isend(self, data, call: int = 0) -> Request:
        n = data.nbytes
        m = _Msg(n)
        m.ptr = self._ptr(data, n)
        m.keep = data
        m.call = call
        m.slot, m.nslots = 0, max(1, -(-n // self._sslot))
        m.no = self.send_no & 0xFFFFFFFF
        self.send_no += 1
        self.sendq.append(m)
        if len(self.sendq) == 1:
            self._send_some()          # start copying at once: lower latency
        return m

    def irecv(self, data, call: int = 0) -> Request:
        return self._post_recv(data, ffi.NULL, data.nbytes, 0, 0, call)

    def irecv_reduce(self, dst, src, op, call: int = 0) -> Request:
        """Receive a message of dst.nbytes and store ``dst = src (op) message`` element-wise.

        dst, src: C-contiguous numpy arrays of one dtype and size (dst may be src); op: a
        pyccl ReduceOp (AVG reduces as SUM).  The reduction runs out of the shared slots, slot
        by slot, as data arrives; the request is done when all of dst is written."""
        if dst.nbytes != src.nbytes or dst.dtype != src.dtype:
            raise TransportError(f"irecv_reduce from rank {self.peer}: dst {dst.dtype}[{dst.size}] and "
                                 f"src {src.dtype}[{src.size}] differ")
        m = self._post_recv(dst, self._ptr(src, src.nbytes), dst.nbytes, _DTYPE_CODE[dst.dtype],
                            _OP_CODE[as_op(op)], call)
        m.keep = (dst, src)
        return m

    def _post_recv(self, buf, red, n, dtype, op, call) -> Request:
        m = _Msg(n)
        m.call = call
        m.ptr = self._ptr(buf, n)
        m.red = red
        m.keep = buf
        m.dtype, m.op = dtype, op
        m.slot, m.nslots = 0, max(1, -(-n // self._rslot))
        m.no = self.recv_no & 0xFFFFFFFF
        self.recv_no += 1
        self.recvq.append(m)
        return m

    def _send_some(self) -> bool:
        return self._advance(self.sendq, self._send_one)

    def _recv_some(self) -> bool:
        return self._advance(self.recvq, self._recv_one)

    def _send_one(self, m) -> int:
        return lib.pyccl_ring_send(self._sring, m.ptr, m.nbytes, m.slot, m.no, m.call)

    def _recv_one(self, m) -> int:
        s = lib.pyccl_ring_recv(self._rring, m.ptr, m.red, m.nbytes, m.slot, m.no, m.call, m.dtype, m.op)
        if s < 0:
            self._bad_message(m, -s)
        return s

    @staticmethod
    def _advance(q, step) -> bool:
        """Move the messages at the head of q on (step(m): the slot m has reached) until one
        stalls; finished ones leave the queue. Whether anything moved."""
        moved = False
        while q:
            m = q[0]
            s = step(m)
            if s == m.slot:
                break
            moved = True
            m.slot = s
            if s < m.nslots:
                break
            m.done = True
            q.popleft()
        return moved

    def _fail_group(self):
        """This rank gives up on the communicator: mark every ring of this transport failed,
        so peers stuck on *this* rank raise PeerFailure promptly instead of timing out."""
        for c in self.group:
            if not c.closed:
                c.closed = True
                lib.pyccl_ring_close(c._sring, 0, 2)
                lib.pyccl_ring_close(c._rring, 1, 2)

    def _bad_message(self, m, code):
        ln, no, call = ffi.new("uint64_t *"), ffi.new("uint32_t *"), ffi.new("uint64_t *")
        lib.pyccl_ring_peek(self._rring, ln, no, call)
        self._fail_group()
        if code == _CALL_MISMATCH:
            raise TransportError(mismatch_of(self.peer, call[0], m.call))
        if code == _SIZE_MISMATCH:
            hint = ("the calls agree, so the plans differ: same PYCCL_ALGO and PYCCL_CHUNK_BYTES on every rank?"
                    if m.call and call[0] == m.call else "same counts on every rank?")
            raise TransportError(f"size mismatch with rank {self.peer}: it sent {ln[0]} bytes, this "
                                 f"rank expected {m.nbytes} ({hint})")
        raise TransportError(f"rank {self.peer} is out of step: its message #{no[0]} arrived where "
                             f"#{m.no} was expected (ranks called different collectives?)")

    def progress(self) -> bool:
        moved = False
        if self.sendq and self._send_some():
            moved = True
        if self.recvq and self._recv_some():
            moved = True
        if not moved and (self.sendq or self.recvq):
            self._idle += 1
            if self._idle >= 1024:
                self._idle = 0
                self._check_peer()
        return moved

    def _check_peer(self) -> None:
        """While stuck: a peer that closed its end or died is a PeerFailure (every ~50 ms)."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + 0.05
        waiting = []
        if self.recvq:
            waiting.append(f"{self.recvq[0].nbytes} bytes expected from it")
        if self.sendq:
            waiting.append(f"{self.sendq[0].nbytes} bytes to send to it")
        what = " and ".join(waiting)
        how = max(lib.pyccl_ring_peer_closed(self._rring, 1) if self.recvq else 0,
                  lib.pyccl_ring_peer_closed(self._sring, 0) if self.sendq else 0)
        if how:
            # data it sent before closing is still read first (only an empty ring gets here)
            self._fail_group()
            why = "gave up after an error of its own" if how == 2 else "closed its shared-memory connection"
            raise PeerFailure(f"rank {self.peer} {why}, with {what}")
        if self._peer_pid and not lib.pyccl_pid_alive(self._peer_pid):
            self._fail_group()
            raise PeerFailure(f"rank {self.peer} (pid {self._peer_pid}) is gone, with {what}")

    def wait_handles(self):
        return None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            lib.pyccl_ring_close(self._sring, 0, 1)
            lib.pyccl_ring_close(self._rring, 1, 1)


# ---- the transport -----------------------------------------------------------------------------
def ring_geometry(npeers: int) -> tuple:
    """(slot bytes, slots) per ring: `PYCCL_SHM_SLOT_BYTES` x `PYCCL_SHM_SLOTS`, slots shrunk
    when there are many peers so a rank's segment stays around 16 MiB."""
    slots = max(2, settings.get("PYCCL_SHM_SLOTS"))
    slot = settings.get("PYCCL_SHM_SLOT_BYTES")
    if slot <= 0:
        slot = 256 << 10
        while slot > (16 << 10) and slot * slots * npeers > (16 << 20):
            slot //= 2
    slot = max(64, slot // 64 * 64)
    return slot, slots


class ShmTransport(Transport):
    """Same host (the communicator's host id: hostname + boot id) -> shared memory."""

    name = "shm"

    def __init__(self):
        self._segments = []

    @staticmethod
    def available() -> tuple:
        if not NATIVE_SHM:
            return False, "the C core pyccl._native is not built with shared memory (pip install -e .)"
        if not os.path.isdir(SHM_DIR):
            return False, f"{SHM_DIR} does not exist"
        return True, ""

    def can_connect(self, me: dict, peer: dict) -> bool:
        return me.get("host") == peer.get("host")

    def connect(self, ctx, peers: list) -> dict:
        peers = sorted(peers)
        if not peers:
            return {}
        clean_leftovers()
        slot, nslots = ring_geometry(len(peers))
        ring_bytes = lib.pyccl_ring_bytes(slot, nslots)
        mine = Segment(segment_name(ctx.comm_tag, f"r{ctx.rank}"), _HDR_BYTES + ring_bytes * len(peers), create=True,
                       share=len(peers) + 1)           # every local rank makes one of this size now
        self._segments.append(mine)
        pidns = pid_namespace()
        try:
            for i in range(len(peers)):
                lib.pyccl_ring_format(mine.base + _HDR_BYTES + i * ring_bytes, slot, nslots)
            ctx.store.set(f"shm/ring/{ctx.rank}", json.dumps(
                {"name": mine.name, "peers": peers, "ring_bytes": ring_bytes, "pid": os.getpid(),
                 "pidns": pidns}).encode())
            conns = {}
            infos = self._peer_infos(ctx, peers)
            for p in peers:
                info = infos[p]
                seg = self._attach(ctx, p, info)
                send_ring = seg.base + _HDR_BYTES + info["peers"].index(ctx.rank) * info["ring_bytes"]
                recv_ring = mine.base + _HDR_BYTES + peers.index(p) * ring_bytes
                conns[p] = ShmConnection(p, send_ring, recv_ring, info["pid"], info["pidns"] == pidns,
                                         ctx.comm_tag)
            group = list(conns.values())
            for c in group:
                c.group = group
            ctx.store.set(f"shm/attached/{ctx.rank}", b"1")
            keys = [f"shm/attached/{p}" for p in peers]
            try:
                ctx.store.wait(keys, timeout=ctx.timeout)
            except Timeout:
                missing = [p for p, ok in zip(peers, ctx.store.check(keys)) if not ok]
                raise Timeout(f"{ctx.comm_tag}: rank {ctx.rank} waited {ctx.timeout:.0f}s for ranks "
                              f"{missing} to map its shared-memory rings") from None
        except BaseException:
            self.close()
            raise
        finally:
            mine.unlink()          # everyone mapped it (or we failed): the name can go
        return conns

    @staticmethod
    def _peer_infos(ctx, peers) -> dict:
        """Every peer's ring description, in two store requests (multi_get) however many peers
        (one get per key on a store without multi_get, such as torch's)."""
        keys = [f"shm/ring/{p}" for p in peers]
        fetch = getattr(ctx.store, "multi_get", None)
        try:
            if fetch is not None:
                raw = fetch(keys, ctx.timeout)
            else:
                raw = [ctx.store.get(k, timeout=ctx.timeout) for k in keys]
        except Timeout:
            missing = [p for p, ok in zip(peers, ctx.store.check(keys)) if not ok]
            raise Timeout(f"{ctx.comm_tag}: rank {ctx.rank} waited {ctx.timeout:.0f}s for ranks {missing} "
                          f"to publish their shared-memory rings") from None
        out = {}
        for p, value in zip(peers, raw):
            info = json.loads(value)
            if ctx.rank not in info["peers"]:
                raise TransportError(f"{ctx.comm_tag}: rank {p} made no shared-memory ring for rank "
                                     f"{ctx.rank} (ranks disagree on which transport joins them)")
            out[p] = info
        return out

    def _attach(self, ctx, p, info) -> Segment:
        try:
            seg = Segment(info["name"])
        except TransportError as e:
            raise TransportError(f"{ctx.comm_tag}: rank {ctx.rank} cannot map rank {p}'s rings: {e} "
                                 f"(not on the same host, or /dev/shm not shared?)") from None
        self._segments.append(seg)
        return seg

    def close(self) -> None:
        for seg in self._segments:
            seg.close()
        self._segments = []
