"""`python -m pyccl.topology`: print what this machine looks like to pyccl.

The facts come from pyccl.topology.detect (pure: /proc, /sys, NVML, pyverbs); which
transports can run here and the RDMA port ibverbs would pick are asked of transports/ here,
in the command-line layer, since topology/ and transports/ never import each other.
"""
import json
import os
import sys

from pyccl import settings
from pyccl.topology.detect import _gid_text, local_info, rdma_ports


def transports() -> dict:
    """Which transports can run here, and why not where they can't."""
    from pyccl.transports import select
    select._load_builtin()
    out = {}
    for name, cls in select.TRANSPORTS.items():
        ok, why = cls.available()
        out[name] = "available" if ok else f"unavailable: {why}"
    return out


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


if __name__ == "__main__":
    sys.exit(main())
