"""One peer's connection (IbvConnection): RC queue pairs, eager slots, rendezvous, completions.

Split from the device (device.py) and the transport (context.py): this is the per-peer
protocol, whose wire numbers (work-request ids, immediates, the clear-to-send entry) are
used nowhere else; see the package docstring for the protocol.
"""
import json
import os
import random
import struct
import time
from collections import deque

from ... import settings
from ...errors import InvalidArgument, PeerFailure, TransportError
from ..base import Connection, Request
from .buffer import MRCache
from .device import _Device, _gid_text
from .verbs import (
    _ACCESS_FULL, _QP_STATES, _WC_RECV_RDMA_WITH_IMM, _WC_RETRY_EXC_ERR, _WC_RNR_RETRY_EXC_ERR,
    _WC_WR_FLUSH_ERR, _errstr, _native,
)

# wr_id = kind << 56 | message number << 8 | part
_K_DATA, _K_CTS, _K_PING, _K_RECV, _K_EAGER, _K_CTRL = 1, 2, 3, 4, 5, 6
# immediate = kind << 30 | (message number mod 2**22) << 8 | part, CTS slot or eager slot;
# control immediates carry a credit count or an RTS's message number, and the sub-kind below
_IMM_DATA, _IMM_CTS, _IMM_EAGER, _IMM_CTRL = 0, 1, 2, 3
_CTRL_CREDIT, _CTRL_RTS = 0, 1
_SEQ_MASK = (1 << 22) - 1

_CTS = struct.Struct("<QQIIII")   # addr, nbytes, rkey, seq, magic, seq again
_CTS_BYTES = 32
_MAGIC = 0x50434942               # "PCIB"
_MAX_PART = 1 << 30


class _Msg(Request):
    __slots__ = ("seq", "view", "mr", "pending", "eager", "rts")

    def __init__(self, seq, view, eager):
        super().__init__(view.nbytes)
        self.seq, self.view, self.eager = seq, view, eager
        self.mr = None
        self.pending = 0
        self.rts = False


def _cut(n: int, nqp: int, stripe_min: int) -> list:
    """[(offset, length)] of a message's parts: one per QP when large, each under 1 GiB."""
    k = nqp if n >= stripe_min and nqp > 1 else 1
    k = max(k, -(-n // _MAX_PART))
    return [(n * i // k, n * (i + 1) // k - n * i // k) for i in range(k)]


def _near(low: int, base: int, bits: int) -> int:
    """The full number closest to `base` whose low `bits` bits are `low`."""
    mask = (1 << bits) - 1
    d = (low - base) & mask
    if d >= 1 << (bits - 1):
        d -= 1 << bits
    return base + d


class IbvConnection(Connection):
    """Messages to and from one peer over `nqp` RC QPs sharing one completion queue.

    Eager (n <= PYCCL_IB_EAGER_BYTES): copied into a registered staging slot and written with
    an immediate into the peer's receive slot `k % PYCCL_IB_SLOTS` while credits last; the send
    is done once posted; the receiver copies out when the matching irecv is posted and returns
    credits with a zero-byte write-with-immediate.  Rendezvous (larger): a request-to-send
    announces it, the receiver's clear-to-send carries address/rkey/length of the registered
    destination, the data goes straight there, striped over the QPs."""

    def __init__(self, peer: int, dev: _Device, nqp: int, depth: int, tag: str, rank: int):
        import numpy as np
        ffi, lib = _native()
        self.ffi, self.lib = ffi, lib
        self.peer, self.dev, self.nqp, self.depth = peer, dev, nqp, depth
        self.tag, self.rank = tag, rank
        self.stripe_min = settings.get("PYCCL_IB_STRIPE_MIN")
        self.ping_s = settings.get("PYCCL_IB_PING_S")
        self.slots = settings.get("PYCCL_IB_SLOTS")
        self.eager_max = settings.get("PYCCL_IB_EAGER_BYTES")
        s = self.slots
        self.sq_depth = 3 * depth + 2 * s + 8
        self.rq_depth = 3 * depth + 2 * s + 16
        qpns = ffi.new("uint32_t[]", nqp)
        err = ffi.new("char[512]")
        self.c = lib.pv_conn_create(dev.handle, nqp, self.sq_depth, self.rq_depth, qpns, err, 512)
        if self.c == ffi.NULL:
            self.c = None
            raise TransportError(f"{tag}: rank {rank} cannot create QPs for rank {peer} on "
                                 f"{dev.name}: {_errstr(err)}")
        self.qpns = list(qpns)
        self.qp_index = {q: i for i, q in enumerate(self.qpns)}
        self.psns = [random.getrandbits(24) for _ in range(nqp)]
        # one registered block: [CTS ring | CTS staging | eager ring | eager staging]
        self.cts_off, self.stage_off = 0, depth * _CTS_BYTES
        self.ring_off = 2 * depth * _CTS_BYTES
        self.estage_off = self.ring_off + s * self.eager_max
        self.mem = np.zeros(self.estage_off + s * self.eager_max, np.uint8)
        self.mem_mv = memoryview(self.mem)
        self.mem_mr = dev.mrs.acquire(self.mem_mv, _ACCESS_FULL)
        self.mem_addr = int(ffi.cast("uintptr_t", ffi.from_buffer(self.mem_mv)))
        self.wcs = ffi.new("struct pv_wc[]", 64)
        self.remote = None
        # sending
        self.send_seq = 0
        self.eagerq = deque()         # eager messages waiting for a credit
        self.rndv = {}                # seq -> rendezvous message waiting for its CTS
        self.rtsq = deque()           # rendezvous messages whose RTS is not sent yet
        self.rts_out = 0
        self.cts = {}                 # seq -> (addr, rkey, nbytes) from the peer
        self.sending = {}             # seq -> rendezvous message whose parts are posted
        self.eager_sent = 0           # eager writes posted / completed here / freed there
        self.eager_done = 0
        self.credit = 0
        # receiving
        self.recv_seq = 0
        self.recvq = deque()          # rendezvous receives whose CTS is not sent yet
        self.receiving = {}           # seq -> posted receive (eager waiting, or CTS sent)
        self.arrived = {}             # seq -> (slot, nbytes) of eager data not yet taken
        self.rts_seen = set()
        self.recv_done = set()
        self.recv_low = 0             # every receive below this has landed
        self.eager_in = 0             # eager arrivals; eager messages taken (freed slots)
        self.freed = 0
        self.credit_sent = 0
        self.cts_posted = 0           # CTS writes posted / completed (in order on QP 0)
        self.cts_acked = 0
        self.ping_out = False
        self.heard = time.monotonic()
        self.error = None
        self.closed = False
        self.buffered = []            # completions polled while arming the channel

    # ---- set-up --------------------------------------------------------------------------
    def card(self) -> bytes:
        """What the peer needs to connect to us, for the store."""
        d = self.dev
        return json.dumps({"qpn": self.qpns, "psn": self.psns, "lid": d.lid, "gid": d.gid.hex(),
                           "gidx": d.gid_index, "mtu": d.mtu, "eth": d.ethernet,
                           "mem": self.mem_addr, "rkey": self.mem_mr.rkey, "depth": self.depth,
                           "slots": self.slots, "eager": self.eager_max, "dev": d.name}).encode()

    def connect(self, card: bytes, timeout_code: int, retry: int) -> None:
        r = json.loads(card)
        mine = (self.nqp, self.depth, self.slots, self.eager_max)
        theirs = (len(r["qpn"]), r["depth"], r["slots"], r["eager"])
        if mine != theirs:
            raise TransportError(
                f"{self.tag}: rank {self.peer} uses QPs/depth/slots/eager bytes {theirs}, rank "
                f"{self.rank} uses {mine}: set PYCCL_IB_QPS, PYCCL_IB_DEPTH, PYCCL_IB_SLOTS and "
                f"PYCCL_IB_EAGER_BYTES alike on every rank")
        if r["eth"] != self.dev.ethernet:
            raise TransportError(f"{self.tag}: rank {self.peer}'s {r['dev']} and rank {self.rank}'s "
                                 f"{self.dev.name} are on different link layers (RoCE vs InfiniBand)")
        self.remote = r
        gid = self.ffi.new("uint8_t[16]", bytes.fromhex(r["gid"]))
        mtu = min(self.dev.mtu, r["mtu"])
        err = self.ffi.new("char[512]")
        for q in range(self.nqp):
            # sgid -1 (InfiniBand): addressed by LID, no GRH
            if self.lib.pv_conn_connect(self.c, q, r["qpn"][q], self.psns[q], r["psn"][q], gid,
                                        r["lid"], self.dev.gid_index, mtu, timeout_code, retry, 6,
                                        err, 512):
                raise TransportError(f"{self.tag}: rank {self.rank} cannot connect QP {q} to rank "
                                     f"{self.peer} ({r['dev']}, GID {_gid_text(bytes.fromhex(r['gid']))}): "
                                     f"{_errstr(err)}")
            if self.lib.pv_post_recvs(self.c, q, (_K_RECV << 56) | q, self.rq_depth):
                raise TransportError(f"{self.tag}: posting receives on QP {q} to rank {self.peer} failed")
        self.heard = time.monotonic()

    # ---- the interface -------------------------------------------------------------------
    def isend(self, data: memoryview, call: int = 0) -> Request:   # call: not carried here (yet)
        self._check()
        m = _Msg(self.send_seq, data, data.nbytes <= self.eager_max)
        self.send_seq += 1
        if m.seq in self.cts and m.eager:
            self._fail(TransportError(
                f"size mismatch with rank {self.peer}: rank {self.rank} sends {m.nbytes} bytes as message "
                f"#{m.seq}, rank {self.peer} expects {self.cts[m.seq][2]} (same counts on every rank?)"))
        if m.eager:
            self.eagerq.append(m)
            if len(self.eagerq) == 1:
                self._post_eager()
        else:
            m.mr = self.dev.mrs.acquire(data, 0 if data.readonly else _ACCESS_FULL)
            self.rndv[m.seq] = m
            self.rtsq.append(m)
            self._post_rts()
            self._post_sends()
        return m

    def irecv(self, data: memoryview, call: int = 0) -> Request:
        self._check()
        if data.readonly:
            raise InvalidArgument(f"{self.tag}: receive buffer from rank {self.peer} is read-only")
        m = _Msg(self.recv_seq, data, data.nbytes <= self.eager_max)
        self.recv_seq += 1
        if m.seq in self.rts_seen:
            self.rts_seen.discard(m.seq)
            if m.eager:
                self._mismatch(m, f"more than {self.eager_max}")
        if m.eager:
            got = self.arrived.pop(m.seq, None)
            if got is not None:
                self._take(m, *got)
            else:
                self.receiving[m.seq] = m
        else:
            if m.seq in self.arrived:
                self._mismatch(m, f"{self.arrived[m.seq][1]}")
            m.mr = self.dev.mrs.acquire(data, _ACCESS_FULL)
            m.pending = len(_cut(m.nbytes, self.nqp, self.stripe_min))
            self.recvq.append(m)
            self._post_cts()
        return m

    def progress(self) -> bool:
        self._check()
        moved = False
        if self.buffered:
            wcs, self.buffered = self.buffered, []
            for wc in wcs:
                self._complete(*wc)
            moved = True
        n = self.lib.pv_poll(self.c, self.wcs, 64)
        if n < 0:
            self._fail(TransportError(f"polling the completion queue for rank {self.peer} failed ({n})"))
        if n:
            moved = True
            self.heard = time.monotonic()
            for i in range(n):
                w = self.wcs[i]
                self._complete(w.wr_id, w.status, w.opcode, w.imm, w.byte_len, w.qp_num, w.vendor_err)
        if self.eagerq and self._post_eager():
            moved = True
        if self.rtsq and self._post_rts():
            moved = True
        if self.rndv and self._post_sends():
            moved = True
        if self.recvq and self._post_cts():
            moved = True
        if self.freed != self.credit_sent and (self.freed - self.credit_sent >= max(1, self.slots // 4)
                                               or not self.arrived):
            self._post_credit()
        if not moved and not self.ping_out and self.ping_s > 0 and (
                self.eagerq or self.rndv or self.sending or self.receiving or self.recvq) \
                and time.monotonic() - self.heard > self.ping_s:
            self._ping()
        return moved

    def wait_handles(self):
        """The completion channel's fd, armed: it turns readable on the next completion."""
        if self.error is not None or self.closed:
            return None
        self.lib.pv_drain_events(self.c)
        fd = self.lib.pv_arm(self.c)
        if fd < 0:
            return None
        # A completion that landed before arming raises no event: look once more.
        n = self.lib.pv_poll(self.c, self.wcs, 64)
        if n > 0:
            self.heard = time.monotonic()
            for i in range(n):
                w = self.wcs[i]
                self.buffered.append((w.wr_id, w.status, w.opcode, w.imm, w.byte_len, w.qp_num, w.vendor_err))
            return None              # no sleeping in select(): progress() takes them next
        return [fd], []

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.c is not None:
            self.lib.pv_conn_destroy(self.c)   # QPs first: nothing reads our memory after this
            self.c = None
        for m in list(self.rndv.values()) + list(self.sending.values()) + list(self.recvq) + \
                list(self.receiving.values()):
            if m.mr is not None:
                MRCache.release(m.mr)
                m.mr = None
        for q in (self.eagerq, self.rndv, self.rtsq, self.sending, self.recvq, self.receiving, self.arrived):
            q.clear()
        if getattr(self, "mem_mr", None) is not None:
            MRCache.release(self.mem_mr)
            self.mem_mr = None

    # ---- posting -------------------------------------------------------------------------
    def _check(self):
        if self.error is not None:
            raise self.error
        if self.closed:
            raise TransportError(f"{self.tag}: connection of rank {self.rank} to rank {self.peer} is closed")

    def _fail(self, e):
        if self.error is None:
            self.error = e
        raise self.error

    def _posted(self, rc, what):
        if rc:
            self._fail(TransportError(f"posting {what} to rank {self.peer} failed "
                                      f"({os.strerror(rc) if rc > 0 else rc}); {self._qp_states()}"))

    def _post_eager(self) -> bool:
        moved = False
        s, e_max = self.slots, self.eager_max
        while self.eagerq and self.eager_sent < self.credit + s and self.eager_sent < self.eager_done + s:
            m = self.eagerq.popleft()
            slot = self.eager_sent % s
            off = self.estage_off + slot * e_max
            if m.nbytes:
                self.mem_mv[off:off + m.nbytes] = m.view.cast("B") if m.view.format != "B" else m.view
            imm = (_IMM_EAGER << 30) | ((m.seq & _SEQ_MASK) << 8) | slot
            self._posted(self.lib.pv_post_write(
                self.c, 0, (_K_EAGER << 56) | (m.seq << 8), self.mem_addr + off, m.nbytes, self.mem_mr.lkey,
                self.remote["mem"] + self.ring_off + slot * e_max, self.remote["rkey"], 1, imm),
                "an eager write")
            self.eager_sent += 1
            m.view = None
            m.done = True                   # copied out: the caller's buffer is free again
            moved = True
        return moved

    def _post_rts(self) -> bool:
        """Announce rendezvous messages (so a receiver expecting a small one fails fast)."""
        moved = False
        while self.rtsq and self.rts_out < self.depth:
            m = self.rtsq.popleft()
            if m.seq not in self.rndv:       # already sent (its CTS came first)
                continue
            imm = (_IMM_CTRL << 30) | ((m.seq & _SEQ_MASK) << 8) | _CTRL_RTS
            self._posted(self.lib.pv_post_write(self.c, 0, _K_CTRL << 56, 0, 0, 0, self.remote["mem"],
                                                self.remote["rkey"], 1, imm), "a request-to-send")
            m.rts = True
            self.rts_out += 1
            moved = True
        return moved

    def _post_sends(self) -> bool:
        moved = False
        for seq in [s for s in self.cts if s in self.rndv]:
            m = self.rndv.pop(seq)
            addr, rkey, nbytes = self.cts.pop(seq)
            if m.rts:
                self.rts_out -= 1
            if nbytes != m.nbytes:
                self._fail(TransportError(
                    f"size mismatch with rank {self.peer}: rank {self.rank} sends {m.nbytes} bytes as "
                    f"message #{m.seq}, rank {self.peer} expects {nbytes} (same counts on every rank?)"))
            parts = _cut(m.nbytes, self.nqp, self.stripe_min)
            m.pending = len(parts)
            base = int(self.ffi.cast("uintptr_t", self.ffi.from_buffer(m.view)))
            self.sending[m.seq] = m
            for i, (off, length) in enumerate(parts):
                imm = (_IMM_DATA << 30) | ((m.seq & _SEQ_MASK) << 8) | i
                self._posted(self.lib.pv_post_write(
                    self.c, i % self.nqp, (_K_DATA << 56) | (m.seq << 8) | i, base + off, length, m.mr.lkey,
                    addr + off, rkey, 1, imm), "an RDMA write")
            moved = True
        return moved

    def _post_cts(self) -> bool:
        """Send clear-to-send for queued rendezvous receives while credits allow."""
        moved = False
        ffi = self.ffi
        while self.recvq:
            m = self.recvq[0]
            if m.seq >= self.recv_low + self.depth or self.cts_posted >= self.cts_acked + self.depth:
                break
            slot = m.seq % self.depth
            off = self.stage_off + slot * _CTS_BYTES
            addr = int(ffi.cast("uintptr_t", ffi.from_buffer(m.view)))
            _CTS.pack_into(self.mem, off, addr, m.nbytes, m.mr.rkey, m.seq & 0xFFFFFFFF, _MAGIC,
                           m.seq & 0xFFFFFFFF)
            imm = (_IMM_CTS << 30) | ((m.seq & _SEQ_MASK) << 8) | slot
            self._posted(self.lib.pv_post_write(
                self.c, 0, (_K_CTS << 56) | (m.seq << 8), self.mem_addr + off, _CTS_BYTES, self.mem_mr.lkey,
                self.remote["mem"] + self.cts_off + slot * _CTS_BYTES, self.remote["rkey"], 1, imm),
                "a clear-to-send")
            self.recvq.popleft()
            self.receiving[m.seq] = m
            self.cts_posted += 1
            moved = True
        return moved

    def _post_credit(self) -> None:
        imm = (_IMM_CTRL << 30) | ((self.freed & _SEQ_MASK) << 8) | _CTRL_CREDIT
        self._posted(self.lib.pv_post_write(self.c, 0, _K_CTRL << 56, 0, 0, 0, self.remote["mem"],
                                            self.remote["rkey"], 1, imm), "returned credits")
        self.credit_sent = self.freed

    def _ping(self) -> None:
        """A zero-byte RDMA WRITE: succeeds while the peer's QP lives, fails once it is gone."""
        self._posted(self.lib.pv_post_write(self.c, 0, _K_PING << 56, 0, 0, 0, self.remote["mem"],
                                            self.remote["rkey"], 0, 0), "a liveness probe")
        self.ping_out = True

    # ---- completions ---------------------------------------------------------------------
    def _complete(self, wr_id, status, opcode, imm, byte_len, qp_num, vendor_err) -> None:
        kind = wr_id >> 56
        if status != 0:
            self._wc_error(kind, wr_id, status, qp_num, vendor_err)
        if kind == _K_RECV:
            q = wr_id & 0xFF
            if self.lib.pv_post_recvs(self.c, q, wr_id, 1):
                self._fail(TransportError(f"re-posting a receive on QP {q} to rank {self.peer} failed"))
            if opcode != _WC_RECV_RDMA_WITH_IMM:
                self._fail(TransportError(f"unexpected completion opcode {opcode} from rank {self.peer}"))
            ikind, low, part = imm >> 30, (imm >> 8) & _SEQ_MASK, imm & 0xFF
            if ikind == _IMM_EAGER:
                self._got_eager(low, part, byte_len)
            elif ikind == _IMM_DATA:
                self._got_data(low, part, byte_len)
            elif ikind == _IMM_CTS:
                self._got_cts(part)
            elif part == _CTRL_CREDIT:
                self.credit = _near(low, self.credit, 22)
            elif part == _CTRL_RTS:
                self._got_rts(_near(low, self.recv_low, 22))
        elif kind == _K_EAGER:
            self.eager_done += 1
        elif kind == _K_DATA:
            m = self.sending.get((wr_id >> 8) & ((1 << 48) - 1))
            if m is not None:
                m.pending -= 1
                if m.pending == 0:
                    del self.sending[m.seq]
                    self._finish(m)
        elif kind == _K_CTS:
            self.cts_acked += 1
        elif kind == _K_PING:
            self.ping_out = False

    def _got_eager(self, low: int, slot: int, nbytes: int) -> None:
        seq = _near(low, self.recv_low, 22)
        if slot != self.eager_in % self.slots:
            self._fail(TransportError(f"rank {self.peer} wrote eager slot {slot} where slot "
                                      f"{self.eager_in % self.slots} was next (protocol error)"))
        self.eager_in += 1
        m = self.receiving.get(seq) or next((x for x in self.recvq if x.seq == seq), None)
        if m is not None:
            if not m.eager:                  # posted as a rendezvous receive: sizes differ
                self._mismatch(m, str(nbytes))
            del self.receiving[seq]
            self._take(m, slot, nbytes)
        elif seq < self.recv_seq:
            self._fail(TransportError(f"rank {self.peer} sent message #{seq} twice (protocol error)"))
        else:
            self.arrived[seq] = (slot, nbytes)

    def _take(self, m: _Msg, slot: int, nbytes: int) -> None:
        """Copy an eager message out of its slot into the receive buffer; free the slot."""
        if nbytes != m.nbytes:
            self._mismatch(m, str(nbytes))
        if nbytes:
            off = self.ring_off + slot * self.eager_max
            v = m.view if m.view.format == "B" and m.view.ndim == 1 else m.view.cast("B")
            v[:] = self.mem_mv[off:off + nbytes]
        self.freed += 1
        self._recv_finished(m)

    def _got_rts(self, seq: int) -> None:
        m = self.receiving.get(seq)
        if m is not None and m.eager:
            self._mismatch(m, f"more than {self.eager_max}")
        if seq >= self.recv_seq:
            self.rts_seen.add(seq)

    def _got_cts(self, slot: int) -> None:
        addr, nbytes, rkey, s1, magic, s2 = _CTS.unpack_from(self.mem, self.cts_off + slot * _CTS_BYTES)
        seq = _near(s1, self.send_seq, 32)
        if magic != _MAGIC or s1 != s2 or seq % self.depth != slot:
            self._fail(TransportError(f"garbled clear-to-send from rank {self.peer} in slot {slot} "
                                      f"(magic {magic:#x}, #{s1}/#{s2})"))
        if seq < self.send_seq and seq not in self.rndv:
            self._fail(TransportError(
                f"size mismatch with rank {self.peer}: it expects {nbytes} bytes as message #{seq}, rank "
                f"{self.rank} sent at most {self.eager_max} (same counts on every rank?)"))
        self.cts[seq] = (addr, rkey, nbytes)

    def _got_data(self, low: int, part: int, byte_len: int) -> None:
        seq = _near(low, self.recv_low, 22)
        m = self.receiving.get(seq)
        if m is None or m.eager:
            self._fail(TransportError(f"rank {self.peer} wrote message #{seq} that rank {self.rank} "
                                      f"did not ask for (protocol error)"))
        off, length = _cut(m.nbytes, self.nqp, self.stripe_min)[part]
        if byte_len != length:
            self._fail(TransportError(f"size mismatch with rank {self.peer}: part {part} of message "
                                      f"#{m.seq} carried {byte_len} bytes, {length} expected"))
        m.pending -= 1
        if m.pending == 0:
            del self.receiving[m.seq]
            self._recv_finished(m)

    def _recv_finished(self, m: _Msg) -> None:
        self._finish(m)
        self.recv_done.add(m.seq)
        while self.recv_low in self.recv_done:
            self.recv_done.discard(self.recv_low)
            self.recv_low += 1

    def _mismatch(self, m: _Msg, theirs: str) -> None:
        self._fail(TransportError(
            f"size mismatch with rank {self.peer}: it sends {theirs} bytes as message #{m.seq}, rank "
            f"{self.rank} expects {m.nbytes} (same counts on every rank?)"))

    @staticmethod
    def _finish(m: _Msg) -> None:
        if m.mr is not None:
            MRCache.release(m.mr)
            m.mr = None
        m.view = None
        m.done = True

    def _qp_states(self) -> str:
        if self.c is None:
            return "QPs destroyed"
        states = [_QP_STATES.get(self.lib.pv_qp_state(self.c, q), "?") for q in range(self.nqp)]
        return "QP states " + "/".join(states)

    def _wc_error(self, kind, wr_id, status, qp_num, vendor_err) -> None:
        if status == _WC_WR_FLUSH_ERR and self.error is not None:
            raise self.error
        what = {_K_DATA: f"RDMA write of message #{(wr_id >> 8) & ((1 << 48) - 1)}",
                _K_EAGER: f"eager write of message #{(wr_id >> 8) & ((1 << 48) - 1)}",
                _K_CTS: "clear-to-send write", _K_PING: "liveness probe", _K_CTRL: "control write",
                _K_RECV: "receive"}.get(kind, "work request")
        text = self.ffi.string(self.lib.pv_wc_status_str(status)).decode()
        q = self.qp_index.get(qp_num, "?")
        where = f"{what} to rank {self.peer} on QP {q} ({self.dev.name})"
        if status in (_WC_RETRY_EXC_ERR, _WC_RNR_RETRY_EXC_ERR):
            self._fail(PeerFailure(f"rank {self.peer} does not answer: {where} failed with '{text}' "
                                   f"(it died, closed its communicator, or the link is down)"))
        if status == _WC_WR_FLUSH_ERR:
            self._fail(PeerFailure(f"the queue pair to rank {self.peer} is in the error state: {where} "
                                   f"was flushed ({text})"))
        self._fail(TransportError(f"{where} failed: {text} (status {status}, vendor error {vendor_err:#x})"))

