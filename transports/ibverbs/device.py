"""Finding and opening an RDMA port: sysfs discovery, the port/GID choice, the opened device.

Split from the queue pairs (pair.py) and the memory-region cache (buffer.py): this is the part
that runs without rdma-core (sysfs only, until a device is opened) and that topology/doctor
and the bootstrap ask about; see the package docstring for how the port and GID are chosen.
"""
import logging
import os
import threading
import time

from ... import settings
from ...errors import InvalidArgument, TransportError
from .buffer import MRCache
from .verbs import _LINK_ETHERNET, _MTU_BYTES, _PORT_ACTIVE, SYSFS, _errstr, _native

log = logging.getLogger("pyccl")


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
