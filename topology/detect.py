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
    if os.environ.get("PYCCL_HOST_ID"):
        return os.environ["PYCCL_HOST_ID"]
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


def main() -> int:
    info = local_info(with_gpus=True)
    info["transports"] = transports()
    print(json.dumps(info, indent=1))
    return 0
