"""ibverbs RDMA transport: reliable-connected queue pairs, RDMA WRITE with immediate.

What it builds (after NCCL's net-IB design: eager slots for small messages, zero-copy rendezvous
for large ones):

* **Discovery.** Devices and ports come from ``/sys/class/infiniband`` (no library needed to
  look); ``PYCCL_IB_HCA=dev[:port][,dev2...]`` restricts them (like ``NCCL_IB_HCA``).  The
  port is the one whose RoCE GID table holds the IPv4 address this rank uses toward the
  rendezvous store (the address of the NIC that carries the route there, the one the TCP
  transport listens on; ``PYCCL_SOCKET_IFNAME`` moves both), so a host with soft-RoCE on
  ``lo`` and on its NIC, or several NICs, picks the NIC its peers are reached through; without
  such a GID (InfiniBand, IPv6-only) the first ACTIVE port wins.  On RoCE the GID is chosen
  like NCCL does: that address as RoCE v2 (IPv4-mapped), else RoCE v2 IPv4-mapped, then RoCE
  v2 global IPv6, then anything non-zero (``PYCCL_IB_GID_INDEX`` overrides, like
  ``NCCL_IB_GID_INDEX``).  InfiniBand ports are addressed by LID.  ``describe()`` prints what
  was found and why it was (not) usable.
* **Connections.** Per peer: one completion queue (with a completion channel, so an idle
  executor can ``select()`` on it) and ``PYCCL_IB_QPS`` RC queue pairs (4 by default).  QP numbers, PSNs,
  GID/LID, MTU and the address + rkey of the peer's control ring travel through the bootstrap
  store (``ib/<from>-><to>``); both sides reach RTS before either says ``ready``.
* **Small messages: eager slots with credits.** A message of at most ``PYCCL_IB_EAGER_BYTES``
  (64 KiB) is copied into a registered staging slot and RDMA-WRITTEN with an immediate
  (message number, slot) into receive slot ``k % PYCCL_IB_SLOTS`` of the peer, so the send is
  done at once and a sender can run ahead of its receiver like TCP does.  The receiver copies
  the message out when the matching ``irecv`` is posted and returns credits (the count of
  freed slots) with a zero-byte write-with-immediate; without a credit the sender queues.
* **Large messages: receiver-driven rendezvous, zero-copy.** ``isend`` announces the message
  (request-to-send, a zero-byte write-with-immediate); ``irecv(view)`` registers ``view``
  (memory-registration cache) and writes a 32-byte *clear-to-send* entry (address, rkey,
  length, message number) into slot ``seq % PYCCL_IB_DEPTH`` of the sender's control ring,
  with an immediate; the sender checks the sizes agree and RDMA-WRITEs the data straight into
  the receive buffer, cut into one part per QP from ``PYCCL_IB_STRIPE_MIN`` bytes, each part
  with an immediate naming (message, part).  At most ``PYCCL_IB_DEPTH`` CTS are outstanding
  (a slot is reused only once the message that consumed it has landed).  Every immediate
  finds a posted receive (the receive queues are sized for the credit limits: no RNR).
* **Size checks.** Both sides cut and classify a message by their own length; any
  disagreement (eager length, CTS length, RTS against an eager receive, eager data against a
  rendezvous receive) raises ``TransportError`` naming the peer and the sizes.
* **Memory registration cache** (``MRCache``, one per device, shared by all connections):
  a buffer is registered whole (its exporting object's full range) on first use and found
  again by address for any slice of it.  An entry stays valid because it keeps the memory
  alive: a weak reference to a numpy array that owns its data (the entry dies with the array),
  else a strong reference, evicted LRU past ``PYCCL_IB_MR_CACHE_MB``.  In-use entries are
  never evicted.
* **Errors, never a hang.** Any completion with an error status puts the connection in error:
  retry-exceeded (the peer's QP is gone: it died or closed) raises ``PeerFailure`` naming the
  peer, anything else ``TransportError`` with the verbs status.  One-sided writes tell a
  waiting receiver nothing about a dead sender, so a connection that has work outstanding and
  has heard nothing from its peer for ``PYCCL_IB_PING_S`` seconds posts a zero-byte RDMA
  WRITE: against a dead peer it fails within ACK timeout x retries (``PYCCL_IB_TIMEOUT`` 16:
  0.27 s, ``PYCCL_IB_RETRY`` 6; 7 is refused since rxe reads it as "forever"): ~2 s.

The hot path (post a write, post receives, poll the CQ) is ``pyccl._verbs``, a cffi module
built from native/ibverbs.c that opens libibverbs.so.1 with dlopen at run time: pyccl builds
and imports everywhere, and the transport reports itself unavailable with the reason where
rdma-core or an RDMA device is missing.
"""
import json
import logging
import os
import random
import struct
import threading
import time
import weakref
from collections import deque

from .. import settings
from ..errors import InvalidArgument, PeerFailure, TransportError
from .base import Connection, Request, Transport

log = logging.getLogger("pyccl")

SYSFS = "/sys/class/infiniband"

# verbs constants (native/ibverbs.h checks them against <infiniband/verbs.h>)
_ACCESS_FULL = 1 | 2            # LOCAL_WRITE | REMOTE_WRITE
_WC_RECV_RDMA_WITH_IMM = 129
_WC_WR_FLUSH_ERR = 5
_WC_RETRY_EXC_ERR = 12
_WC_RNR_RETRY_EXC_ERR = 13
_WC_REM_ACCESS_ERR = 10
_PORT_ACTIVE = 4
_LINK_ETHERNET = 2
_QP_STATES = {0: "RESET", 1: "INIT", 2: "RTR", 3: "RTS", 4: "SQD", 5: "SQE", 6: "ERROR"}
_MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}

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


# ---- loading the native part --------------------------------------------------------------------
_NATIVE = None


def _native():
    """(ffi, lib) of pyccl._verbs with libibverbs loaded; raises TransportError saying why not."""
    global _NATIVE
    if _NATIVE is None:
        try:
            from .._verbs import ffi, lib
        except ImportError as e:
            _NATIVE = TransportError(f"pyccl._verbs is not built ({e}); reinstall pyccl "
                                     f"(pip install -e .) or run python native/build_verbs.py")
        else:
            err = ffi.new("char[512]")
            if lib.pv_load(err, 512):
                _NATIVE = TransportError(ffi.string(err).decode(errors="replace"))
            else:
                _NATIVE = (ffi, lib)
    if isinstance(_NATIVE, Exception):
        raise _NATIVE
    return _NATIVE


def _errstr(buf) -> str:
    ffi, _ = _native()
    return ffi.string(buf).decode(errors="replace")


# ---- discovery (sysfs) --------------------------------------------------------------------------
def _read(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def _gid_text(raw: bytes) -> str:
    import ipaddress
    return str(ipaddress.IPv6Address(raw))


def _port_gids(dev: str, port: int) -> list:
    """[(index, gid bytes, type, netdev)] of the non-zero GIDs of a port."""
    base = f"{SYSFS}/{dev}/ports/{port}"
    out = []
    try:
        names = os.listdir(f"{base}/gids")
    except OSError:
        return out
    for name in sorted(names, key=lambda s: int(s) if s.isdigit() else 1 << 30):
        if not name.isdigit():
            continue
        text = _read(f"{base}/gids/{name}")
        try:
            raw = bytes.fromhex(text.replace(":", ""))
        except ValueError:
            continue
        if len(raw) != 16 or not any(raw):
            continue
        out.append((int(name), raw, _read(f"{base}/gid_attrs/types/{name}"),
                    _read(f"{base}/gid_attrs/ndevs/{name}")))
    return out


def _gid_rank(raw: bytes, gtype: str) -> int:
    """Lower is better: RoCE v2 IPv4-mapped, RoCE v2 global IPv6, RoCE v1, link-local last."""
    v2 = "v2" in gtype.lower()
    v4 = raw[:10] == bytes(10) and raw[10:12] == b"\xff\xff"
    link_local = raw[:2] == b"\xfe\x80"
    return (0 if v2 else 4) + (0 if v4 else 2 if link_local else 1)


def ports() -> list:
    """Every RDMA port of this host: dicts with device, port, state, link layer, GIDs."""
    out = []
    try:
        devs = sorted(os.listdir(SYSFS))
    except OSError:
        return out
    for dev in devs:
        try:
            pnums = sorted(int(p) for p in os.listdir(f"{SYSFS}/{dev}/ports") if p.isdigit())
        except OSError:
            continue
        for p in pnums:
            base = f"{SYSFS}/{dev}/ports/{p}"
            state = _read(f"{base}/state")          # "4: ACTIVE"
            out.append({"device": dev, "port": p, "state": state,
                        "active": state.split(":")[0].strip() == str(_PORT_ACTIVE),
                        "link_layer": _read(f"{base}/link_layer", "InfiniBand"),
                        "gids": _port_gids(dev, p)})
    return out


def _wanted() -> list:
    """PYCCL_IB_HCA as [(device, port or None)]; empty = any."""
    text = settings.get("PYCCL_IB_HCA") or ""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        dev, _, port = item.partition(":")
        out.append((dev, int(port) if port else None))
    return out


_CHOSEN = {}


def _mapped(ip: str) -> bytes:
    """The IPv4-mapped GID of an IPv4 address (b'' for anything else)."""
    import ipaddress
    try:
        return b"\0" * 10 + b"\xff\xff" + ipaddress.IPv4Address(ip).packed
    except ValueError:
        return b""


def choose_port(local_ip: str = ""):
    """(port dict, gid index or -1 for LID addressing, reason) — port None when unusable.
    `local_ip`: this rank's address toward its peers (the store's route); the port whose GID
    table holds it wins.  Cached for 5 s per (PYCCL_IB_HCA, PYCCL_IB_GID_INDEX, local_ip): a
    GID table is 1,024 sysfs files and set-up asks several times."""
    key = (settings.get("PYCCL_IB_HCA"), settings.get("PYCCL_IB_GID_INDEX"), local_ip or "")
    hit = _CHOSEN.get(key)
    if hit is not None and time.monotonic() - hit[0] < 5.0:
        return hit[1]
    result = _choose_port(local_ip or "")
    _CHOSEN[key] = (time.monotonic(), result)
    return result


def _choose_port(local_ip: str):
    found = ports()
    if not found:
        if not os.path.isdir(SYSFS):
            return None, -1, (f"no RDMA device: {SYSFS} does not exist (this kernel has no RDMA "
                              f"support loaded; modprobe rdma_rxe / ib_core?)")
        return None, -1, f"no RDMA device: {SYSFS} is empty"
    wanted = _wanted()
    cands = [p for p in found if not wanted or any(
        p["device"] == d and (n is None or p["port"] == n) for d, n in wanted)]
    if not cands:
        return None, -1, (f"PYCCL_IB_HCA={settings.get('PYCCL_IB_HCA')} matches none of "
                          + ", ".join(f"{p['device']}:{p['port']}" for p in found))
    active = [p for p in cands if p["active"]]
    if not active:
        return None, -1, "no ACTIVE RDMA port: " + ", ".join(
            f"{p['device']}:{p['port']} is {p['state'] or 'unknown'}" for p in cands)
    mine = _mapped(local_ip)
    routed = [(p, g) for p in active for g in p["gids"] if mine and g[1] == mine]
    if routed:                          # the NIC that carries the route to the peers
        port, best = min(routed, key=lambda pg: (_gid_rank(pg[1][1], pg[1][2]), pg[1][0]))
    else:
        port, best = active[0], None
    forced = settings.get("PYCCL_IB_GID_INDEX")
    if forced is not None:
        return port, forced, ""
    if port["link_layer"].lower() != "ethernet":
        return port, -1, ""
    if best is None:
        if not port["gids"]:
            return None, -1, f"{port['device']}:{port['port']} (RoCE) has no GID: give its netdev an IP address"
        best = min(port["gids"], key=lambda g: (_gid_rank(g[1], g[2]), g[0]))
    return port, best[0], ""


def local_rdma() -> str:
    """A short tag for the bootstrap info: 'device:port/link layer', or '' without RDMA.
    Cheap (sysfs only): ranks exchange it so `can_connect` is the same on both sides."""
    try:
        port, _, _ = choose_port()
    except (OSError, InvalidArgument):
        return ""
    if port is None:
        return ""
    return f"{port['device']}:{port['port']}/{port['link_layer']}"


def _link_layers(rdma) -> set:
    """Link layers of the ACTIVE ports in a rank's bootstrap `rdma` entry (either form)."""
    if not rdma:
        return set()
    if isinstance(rdma, str):
        return {rdma.rsplit("/", 1)[-1].lower()}
    out = set()
    for dev in rdma:
        for p in dev.get("ports", []) if isinstance(dev, dict) else []:
            if str(p.get("state", "")).split(":")[0].strip() == str(_PORT_ACTIVE):
                out.add(str(p.get("link_layer") or "InfiniBand").lower())
    return out


def available() -> tuple:
    """(usable, reason): pyccl._verbs built, libibverbs loadable, an ACTIVE port."""
    try:
        port, _, why = choose_port()       # sysfs first: no dlopen on machines without RDMA
        if port is None:
            return False, why
        ffi, lib = _native()
    except (TransportError, InvalidArgument) as e:
        return False, str(e)
    names = ffi.new("char[4096]")
    err = ffi.new("char[512]")
    if lib.pv_list_devices(names, 4096, err, 512) <= 0:
        return False, f"libibverbs sees no device ({_errstr(err) or 'empty list'})"
    if port["device"] not in ffi.string(names).decode().split(","):
        return False, f"libibverbs does not list {port['device']} (provider library missing?)"
    return True, ""


def describe(local_ip: str = "") -> str:
    """Human-readable summary for `python -m pyccl.topology` / pyccl.doctor; `<-` marks the
    port and GID a rank whose address toward its peers is `local_ip` would use."""
    ok, why = available()
    lines = [f"ibverbs: {'available' if ok else 'unavailable: ' + why}"]
    port, gidx, _ = choose_port(local_ip)
    for p in ports():
        mark = "*" if port is not None and p["device"] == port["device"] and p["port"] == port["port"] else " "
        lines.append(f" {mark} {p['device']}:{p['port']} {p['state']} {p['link_layer']}")
        for idx, raw, gtype, ndev in p["gids"]:
            sel = "<-" if mark == "*" and idx == gidx else "  "
            lines.append(f"      gid[{idx}] {_gid_text(raw)} {gtype or '?'} {ndev} {sel}")
    return "\n".join(lines)


# ---- devices and memory registration -----------------------------------------------------------
class _Entry:
    __slots__ = ("start", "end", "access", "mr", "lkey", "rkey", "keep", "users", "dead", "nbytes")


class MRCache:
    """Registered buffers of one device, found by address range (see the module docstring)."""

    def __init__(self, dev, limit_bytes: int):
        self.dev = dev
        self.limit = limit_bytes
        self.entries = []            # LRU first, MRU last
        self.bytes = 0
        self.lock = threading.Lock()
        self.hits = self.misses = 0
        self._dead = []

    def acquire(self, view: memoryview, access: int) -> _Entry:
        """The entry covering `view` with at least `access`; its user count is raised."""
        ffi, _ = _native()
        addr = int(ffi.cast("uintptr_t", ffi.from_buffer(view)))
        end = addr + view.nbytes
        with self.lock:
            self._reap()
            for i in range(len(self.entries) - 1, -1, -1):
                e = self.entries[i]
                if not e.dead and e.start <= addr and end <= e.end and (e.access & access) == access:
                    if i != len(self.entries) - 1:
                        self.entries.append(self.entries.pop(i))
                    e.users += 1
                    self.hits += 1
                    return e
            e = self._register(view, addr, end, access)
            e.users += 1
            self.misses += 1
            self.entries.append(e)
            self.bytes += e.nbytes
            self._evict()
            return e

    @staticmethod
    def release(e: _Entry) -> None:
        e.users -= 1

    def forget(self, e: _Entry) -> None:
        """Release `e` and deregister it now: its memory is about to be freed (a later buffer
        at the same address must not find the old registration)."""
        _, lib = _native()
        with self.lock:
            e.users -= 1
            e.dead = True
            if e in self.entries and e.users == 0:
                self.entries.remove(e)
                self.bytes -= e.nbytes
                lib.pv_dereg_mr(e.mr)
                e.mr, e.keep = None, None

    def _register(self, view, addr, end, access) -> _Entry:
        ffi, lib = _native()
        region, owner = self._region(view, addr, end)
        ptr = ffi.from_buffer(region)
        start = int(ffi.cast("uintptr_t", ptr))
        n = region.nbytes
        lkey, rkey = ffi.new("uint32_t *"), ffi.new("uint32_t *")
        err = ffi.new("char[512]")
        mr = lib.pv_reg_mr(self.dev.handle, ptr, max(n, 1), access, lkey, rkey, err, 512)
        if mr == ffi.NULL:
            raise TransportError(f"{self.dev.name}: {_errstr(err)}")
        e = _Entry()
        e.start, e.end, e.access, e.mr, e.lkey, e.rkey = start, start + n, access, mr, lkey[0], rkey[0]
        e.users, e.dead, e.nbytes = 0, False, n
        if owner is not None:
            dead = self._dead

            def _gone(_ref, e=e):          # runs in whatever thread freed the array: no lock
                e.dead = True
                dead.append(e)
            e.keep = weakref.ref(owner, _gone)
        else:
            e.keep = region              # holds the memory (and blocks resizing) until evicted
        return e

    @staticmethod
    def _region(view, addr, end):
        """(the largest contiguous buffer around `view` we can keep valid, owner to weak-ref)."""
        obj = view.obj
        owner = None
        try:
            import numpy as np
            if isinstance(obj, np.ndarray):
                o = obj
                while isinstance(o.base, np.ndarray):
                    o = o.base
                if o.base is None and o.flags.owndata:
                    owner = o
        except ImportError:
            pass
        try:
            whole = memoryview(obj)
            if whole.c_contiguous:
                if whole.ndim != 1 or whole.format != "B":
                    whole = whole.cast("B")
                ffi, _ = _native()
                s = int(ffi.cast("uintptr_t", ffi.from_buffer(whole)))
                if s <= addr and end <= s + whole.nbytes:
                    return whole, owner
        except (TypeError, ValueError, BufferError):
            pass
        return view, None

    def _reap(self) -> None:
        _, lib = _native()
        while self._dead:
            e = self._dead.pop()
            if e in self.entries and e.users == 0:
                self.entries.remove(e)
                self.bytes -= e.nbytes
                lib.pv_dereg_mr(e.mr)
                e.mr = None

    def _evict(self) -> None:
        _, lib = _native()
        i = 0
        while self.bytes > self.limit and i < len(self.entries) - 1:
            e = self.entries[i]
            if e.users:
                i += 1
                continue
            self.entries.pop(i)
            self.bytes -= e.nbytes
            lib.pv_dereg_mr(e.mr)
            e.mr, e.keep, e.dead = None, None, True


class _Device:
    """One opened port (+ protection domain) per process, shared by every communicator."""

    _open = {}
    _lock = threading.Lock()

    @classmethod
    def get(cls, local_ip: str = ""):
        port, gidx, why = choose_port(local_ip)
        if port is None:
            raise TransportError(why)
        key = (port["device"], port["port"], gidx)
        with cls._lock:
            dev = cls._open.get(key)
            if dev is None:
                dev = cls._open[key] = cls(port, gidx)
            return dev

    def __init__(self, port: dict, gidx: int):
        ffi, lib = _native()
        self.name = f"{port['device']}:{port['port']}"
        err = ffi.new("char[512]")
        self.handle = lib.pv_dev_open(port["device"].encode(), port["port"], err, 512)
        if self.handle == ffi.NULL:
            raise TransportError(_errstr(err))
        attr = ffi.new("struct pv_port *")
        if lib.pv_dev_port(self.handle, attr, err, 512):
            raise TransportError(f"{self.name}: {_errstr(err)}")
        if attr.state != _PORT_ACTIVE:
            raise TransportError(f"{self.name} is not ACTIVE (state {attr.state})")
        self.lid = attr.lid
        self.mtu = attr.active_mtu
        self.ethernet = attr.link_layer == _LINK_ETHERNET
        self.gid_index = gidx
        gid = ffi.new("uint8_t[16]")
        if gidx >= 0 and lib.pv_dev_gid(self.handle, gidx, gid, err, 512):
            raise TransportError(f"{self.name}: {_errstr(err)}")
        self.gid = bytes(ffi.buffer(gid, 16)) if gidx >= 0 else bytes(16)
        if gidx >= 0 and not any(self.gid):
            raise TransportError(f"{self.name}: GID index {gidx} is empty (PYCCL_IB_GID_INDEX?)")
        self.mrs = MRCache(self, settings.get("PYCCL_IB_MR_CACHE_MB") << 20)
        log.info("ibverbs: %s, %s, GID[%d] %s, MTU %d", self.name,
                 "RoCE" if self.ethernet else "InfiniBand", gidx,
                 _gid_text(self.gid) if gidx >= 0 else f"LID {self.lid}", _MTU_BYTES.get(self.mtu, 0))


# ---- requests and the connection ----------------------------------------------------------------
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


class IbvTransport(Transport):
    """RDMA between hosts; `PYCCL_TRANSPORT=ibverbs` forces it for every pair."""

    name = "ibverbs"

    @staticmethod
    def available() -> tuple:
        return available()

    def can_connect(self, me: dict, peer: dict) -> bool:
        """Between hosts that both have an ACTIVE RDMA port of a common link layer, from the
        bootstrap info's `rdma` entry (topology.detect.rdma_devices()'s list, or the
        `local_rdma()` tag); symmetric as select.py requires."""
        return me.get("host") != peer.get("host") and \
            bool(_link_layers(me.get("rdma")) & _link_layers(peer.get("rdma")))

    def connect(self, ctx, peers: list) -> dict:
        dev = _Device.get(ctx.bind_host)         # the port holding our address toward the peers
        # 4 QPs: across two soft-RoCE VMs a 1-4 MiB message striped over 4 QPs reached 94-98 %
        # of ib_write_bw, over 2 QPs 73-83 %, over 1 QP 60-62 % (bench/JOURNAL.md, 2026-12-06 RDMA runs 2-5).
        # Messages under PYCCL_IB_STRIPE_MIN use one QP whatever the count.
        nqp = settings.get("PYCCL_IB_QPS")
        depth = settings.get("PYCCL_IB_DEPTH")
        # ACK timeout 4.096 us * 2**16 = 0.27 s, 6 retries: a dead peer is known in ~2 s.
        # Retry count 7 is refused: rdma_rxe (and some NICs) read it as "retry forever".
        timeout_code = settings.get("PYCCL_IB_TIMEOUT")
        retry = settings.get("PYCCL_IB_RETRY")
        conns = {}
        try:
            for p in peers:
                conns[p] = IbvConnection(p, dev, nqp, depth, ctx.comm_tag, ctx.rank)
                ctx.store.set(f"ib/{ctx.rank}->{p}", conns[p].card())
            for p in peers:
                card = ctx.store.get(f"ib/{p}->{ctx.rank}", timeout=ctx.timeout)
                conns[p].connect(card, timeout_code, retry)
                ctx.store.set(f"ib/{ctx.rank}->{p}/ready", b"1")
            for p in peers:
                ctx.store.get(f"ib/{p}->{ctx.rank}/ready", timeout=ctx.timeout)
        except BaseException:
            for c in conns.values():
                c.close()
            raise
        log.info("%s rank %d: ibverbs to %d peers over %s (%d QPs each, depth %d)", ctx.comm_tag,
                 ctx.rank, len(peers), dev.name, nqp, depth)
        return conns
