"""What one rank sees of its machine: host, NUMA node and CPUs, GPUs and their links, RDMA
devices and network interfaces. Plain dicts (JSON-able), gathered from every rank through
the bootstrap store so all ranks plan from the same picture.

Everything is read from /proc and /sys (and NVML or the CUDA runtime when present); a
missing source gives an empty field, never an error. Nothing here asks transports/ (which
transports run here, the port ibverbs would pick): `python -m pyccl.topology` does that, in
the command-line layer (topology/__main__.py).
"""
import glob
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
