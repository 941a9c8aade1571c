"""What one rank sees of its machine: host, NUMA node and CPUs, GPUs and their links, RDMA
devices and network interfaces. Plain dicts (JSON-able), gathered from every rank through
the bootstrap store so all ranks plan from the same picture.

Everything is read from /proc and /sys (and NVML or the CUDA runtime when present); a
missing source gives an empty field, never an error.
"""
import glob
import json
import os
import socket

from pyccl import settings
from pyccl.process import pid_namespace

_SYS_NET = "/sys/class/net"
_SYS_IB = "/sys/class/infiniband"


def _read(path, default=""):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def host_id() -> str:
    """Same string on every rank of one machine; PYCCL_HOST_ID overrides (tests pose as hosts)."""
    forced = settings.get("PYCCL_HOST_ID")
    if forced:
        return forced
    return f"{socket.gethostname()}/{_read('/proc/sys/kernel/random/boot_id')}"


def _cpulist(text):
    cpus = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


def cpus_and_numa() -> dict:
    cpus = sorted(os.sched_getaffinity(0))
    nodes = {}
    for node in glob.glob("/sys/devices/system/node/node[0-9]*"):
        nodes[int(node.rsplit("node", 1)[1])] = _cpulist(_read(f"{node}/cpulist"))
    mine = sorted({n for n, cs in nodes.items() if set(cs) & set(cpus)})
    return {"cpus": cpus, "numa_nodes": mine, "numa_total": len(nodes)}


def net_interfaces() -> list:
    out = []
    for path in sorted(glob.glob(f"{_SYS_NET}/*")):
        name = os.path.basename(path)
        speed = _read(f"{path}/speed", "-1")
        out.append({"name": name, "up": _read(f"{path}/operstate") == "up",
                    "speed_mbps": int(speed) if speed.lstrip("-").isdigit() else -1,
                    "mtu": int(_read(f"{path}/mtu", "0") or 0)})
    return out


def rdma_devices() -> list:
    """RDMA devices from sysfs: name, ports with state, link layer, rate and net device."""
    devs = []
    for dev in sorted(glob.glob(f"{_SYS_IB}/*")):
        ports = []
        for port in sorted(glob.glob(f"{dev}/ports/*")):
            netdevs = sorted({_read(p) for p in glob.glob(f"{port}/gid_attrs/ndevs/*")} - {""})
            ports.append({"port": int(os.path.basename(port)), "state": _read(f"{port}/state"),
                          "link_layer": _read(f"{port}/link_layer"), "rate": _read(f"{port}/rate"),
                          "netdevs": netdevs})
        devs.append({"name": os.path.basename(dev), "ports": ports})
    return devs


def gpus() -> list:
    """GPUs with PCI bus id and which peers they reach by NVLink (and how many links)."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML: try the CUDA runtime through cupy
        return _gpus_cupy()
    out = []
    try:
        n = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        buses = [pynvml.nvmlDeviceGetPciInfo(h).busId for h in handles]
        buses = [b.decode() if isinstance(b, bytes) else b for b in buses]
        for i, h in enumerate(handles):
            links = {}
            for link in range(18 * 2):
                try:
                    if pynvml.nvmlDeviceGetNvLinkState(h, link):
                        remote = pynvml.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId
                        remote = remote.decode() if isinstance(remote, bytes) else remote
                        if remote in buses:
                            links[buses.index(remote)] = links.get(buses.index(remote), 0) + 1
                except pynvml.NVMLError:
                    break
            out.append({"index": i, "bus_id": buses[i], "name": str(pynvml.nvmlDeviceGetName(h)),
                        "nvlinks": {str(k): v for k, v in links.items()}})
    finally:
        pynvml.nvmlShutdown()
    return out


def _gpus_cupy() -> list:
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no cupy or no driver: no GPUs seen
        return []
    out = []
    for i in range(n):
        peers = [j for j in range(n) if j != i and cupy.cuda.runtime.deviceCanAccessPeer(i, j)]
        out.append({"index": i, "bus_id": cupy.cuda.runtime.deviceGetPCIBusId(i),
                    "p2p_peers": peers})
    return out


def transports() -> dict:
    """Which transports can run here, and why not where they can't."""
    from pyccl.transports import select
    select._load_builtin()
    out = {}
    for name, cls in select.TRANSPORTS.items():
        ok, why = cls.available()
        out[name] = "available" if ok else f"unavailable: {why}"
    return out


def local_info(rank: int = 0, with_gpus=None) -> dict:
    """Everything this rank publishes for the communicator's topology. GPUs are probed only
    when asked or when torch/cupy is already loaded (probing imports them, which is slow)."""
    import sys
    if with_gpus is None:
        with_gpus = "cupy" in sys.modules or "torch" in sys.modules
    return {"rank": rank, "host": host_id(), "hostname": socket.gethostname(), "pid": os.getpid(),
            "pidns": pid_namespace(), **cpus_and_numa(), "gpus": gpus() if with_gpus else [], "rdma": rdma_devices(),
            "net": net_interfaces()}


# ---- RDMA ports in full (for `python -m pyccl.topology`): pyverbs when importable, else sysfs --
_STATES = {0: "NOP", 1: "DOWN", 2: "INIT", 3: "ARMED", 4: "ACTIVE", 5: "ACTIVE_DEFER"}
_MTUS = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}
_GID_TYPES = {0: "IB", 1: "RoCE v1", 2: "RoCE v2"}     # struct ibv_gid_entry's gid_type


def _roce_mtu(netdev_mtu: int) -> int:
    """The RoCE path MTU a netdev MTU allows (the kernel's rule: the largest IB MTU that fits
    after the RoCE headers; rdma_rxe and mlx5 alike); 0 when unknown."""
    room = netdev_mtu - 80 if netdev_mtu > 0 else 0
    return max([m for m in _MTUS.values() if m <= room] or [0 if netdev_mtu <= 0 else 256])


def rdma_ports() -> tuple:
    """(source, ports): every RDMA port with state, link layer, active/max MTU and its non-zero
    GIDs [{index, gid (32 hex digits), type, netdev}], read with pyverbs (rdma-core's binding,
    through libibverbs) when it is importable, else from sysfs (MTU then from the netdev's,
    for RoCE; None for InfiniBand)."""
    try:
        return "pyverbs", _ports_pyverbs()
    except ImportError:
        return "sysfs", _ports_sysfs()


def _ports_pyverbs() -> list:
    import pyverbs.device as d
    from pyverbs.pyverbs_error import PyverbsError
    out = []
    try:
        devices = d.get_device_list()
    except PyverbsError:                  # libibverbs found no device
        return out
    for dev in sorted(devices, key=lambda x: x.name):
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        with d.Context(name=name) as ctx:
            nports = ctx.query_device().phys_port_cnt
            attrs = {p: ctx.query_port(p) for p in range(1, nports + 1)}
            entries = ctx.query_gid_table(sum(a.gid_tbl_len for a in attrs.values()))
            for p, a in attrs.items():
                gids = []
                for e in sorted((e for e in entries if e.port_num == p), key=lambda e: e.gid_index):
                    raw = bytes.fromhex(e.gid_str().replace(":", ""))
                    if any(raw):
                        try:
                            ndev = socket.if_indextoname(e.ndev_ifindex) if e.ndev_ifindex else ""
                        except OSError:
                            ndev = ""
                        gids.append({"index": e.gid_index, "gid": raw.hex(), "netdev": ndev,
                                     "type": _GID_TYPES.get(e.gid_type, str(e.gid_type))})
                out.append({"device": name, "port": p, "state": _STATES.get(a.state, str(a.state)),
                            "link_layer": "Ethernet" if a.link_layer == 2 else "InfiniBand",
                            "active_mtu": _MTUS.get(a.active_mtu, 0), "max_mtu": _MTUS.get(a.max_mtu, 0),
                            "gids": gids})
    return out


def _ports_sysfs() -> list:
    out = []
    for dev in sorted(glob.glob(f"{_SYS_IB}/*")):
        for port in sorted(glob.glob(f"{dev}/ports/*"), key=lambda x: int(os.path.basename(x))):
            gids = []
            for path in glob.glob(f"{port}/gids/*"):
                i = os.path.basename(path)
                raw = _read(path).replace(":", "")
                if len(raw) == 32 and int(raw, 16):
                    t = _read(f"{port}/gid_attrs/types/{i}")
                    gids.append({"index": int(i), "gid": raw.lower(), "netdev": _read(f"{port}/gid_attrs/ndevs/{i}"),
                                 "type": "RoCE v1" if t == "IB/RoCE v1" and "Ethernet" in _read(f"{port}/link_layer")
                                 else "IB" if t == "IB/RoCE v1" else t})
            gids.sort(key=lambda g: g["index"])
            ll = _read(f"{port}/link_layer")
            ndevs = sorted({g["netdev"] for g in gids} - {""})
            mtu = _roce_mtu(min(int(_read(f"{_SYS_NET}/{n}/mtu", "0") or 0) for n in ndevs)) \
                if ll == "Ethernet" and ndevs else None
            state = _read(f"{port}/state")                 # "4: ACTIVE"
            out.append({"device": os.path.basename(dev), "port": int(os.path.basename(port)),
                        "state": state.partition(":")[2].strip() or state, "link_layer": ll,
                        "active_mtu": mtu, "max_mtu": 4096 if ll == "Ethernet" else None, "gids": gids})
    return out


def _gid_text(hexgid: str) -> str:
    import ipaddress
    a = ipaddress.IPv6Address(bytes.fromhex(hexgid))
    return f"::ffff:{a.ipv4_mapped}" if a.ipv4_mapped else str(a)


def _ipv4(name: str) -> str:
    from pyccl.env import interface_address
    return interface_address(name) or ""


def _toward(peer: str) -> tuple:
    """(peer, this host's address toward it): --peer, else the job's store host, else the
    default route."""
    from pyccl.env import socket_interface_address
    if not peer:
        if settings.is_set("PYCCL_STORE_ADDR"):
            peer = settings.get("PYCCL_STORE_ADDR").rsplit(":", 1)[0]
        elif os.environ.get("MASTER_ADDR", "").strip():
            peer = os.environ["MASTER_ADDR"]
    return peer, socket_interface_address(peer or None)


def readable(info: dict, ports: tuple, peer: str = "") -> str:
    """`python -m pyccl.topology` without --json: the facts a user checks first."""
    source, plist = ports
    lines = [f"host {info['hostname']}  (host id {info['host']})",
             f"cpus {len(info['cpus'])} ({','.join(map(str, info['cpus'][:16]))}{'...' if len(info['cpus']) > 16 else ''})"
             f"  NUMA nodes {info['numa_nodes']} of {info['numa_total']}",
             "network interfaces:"]
    for n in info["net"]:
        lines.append(f"  {n['name']:<12} {'up' if n['up'] else 'down':<5} mtu {n['mtu']:<6} "
                     f"{_ipv4(n['name']) or '-':<16} {n['speed_mbps'] if n['speed_mbps'] > 0 else '?'} Mb/s")
    lines.append(f"RDMA ports (read with {source}):" if plist else f"RDMA ports (read with {source}): none")
    for p in plist:
        mtu = f"MTU {p['active_mtu']}" if p["active_mtu"] else "MTU ?"
        if p["max_mtu"]:
            mtu += f" (max {p['max_mtu']})"
        lines.append(f"  {p['device']}:{p['port']}  {p['state']}  {p['link_layer']}"
                     f"{' (RoCE)' if p['link_layer'] == 'Ethernet' else ''}  {mtu}")
        for g in p["gids"]:
            lines.append(f"      gid[{g['index']}] {_gid_text(g['gid']):<28} {g['type']:<8} {g['netdev']}")
    try:
        from pyccl.transports import ibverbs as ib
        peer, mine = _toward(peer)
        port, gidx, why = ib.choose_port(mine)
        where = f"toward {peer} (from {mine})" if peer else f"from {mine}"
        if port is None:
            lines.append(f"ibverbs would use: nothing ({why})")
        else:
            gid = next((g for g in port["gids"] if g[0] == gidx), None)
            lines.append(f"ibverbs would use {where}: {port['device']}:{port['port']} "
                         + (f"GID[{gidx}] {_gid_text(gid[1].hex()) if gid else '?'} {gid[2] if gid else ''}"
                            if gidx >= 0 else "LID addressing (InfiniBand)"))
    except Exception as e:  # noqa: BLE001 - a report: say what failed, never crash
        lines.append(f"ibverbs: cannot tell ({type(e).__name__}: {e})")
    lines.append("transports:")
    for name, state in info.get("transports", {}).items():
        lines.append(f"  {name:<9} {state}")
    lines.append("GPUs: " + (", ".join(f"{g['index']} {g.get('name', '')} {g['bus_id']}" for g in info["gpus"])
                             if info["gpus"] else "none"))
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m pyccl.topology",
                                 description="What this machine looks like to pyccl.")
    ap.add_argument("--json", action="store_true", help="everything as JSON (the bootstrap info, "
                    "transports, and rdma_ports: the full port and GID facts)")
    ap.add_argument("--peer", default="", help="show the RDMA port and GID ibverbs would use toward this "
                    "address (default: the job's store host, else the default route)")
    a = ap.parse_args(argv)
    info = local_info(with_gpus=True)
    info["transports"] = transports()
    ports = rdma_ports()
    if a.json:
        info["rdma_ports"] = {"source": ports[0], "ports": ports[1]}
        print(json.dumps(info, indent=1))
    else:
        print(readable(info, ports, a.peer))
    return 0
