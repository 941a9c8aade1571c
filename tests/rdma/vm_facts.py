"""One VM's RDMA facts three ways, for test_two_vms.py's comparison: `vm_facts.py PEER_IP`.

Prints JSON {"pyverbs": the reference (pyverbs_facts.py under Debian's /usr/bin/python3),
"sysfs": `python -m pyccl.topology --json`'s rdma_ports without pyverbs on the path,
"topo_pyverbs": the same with PYTHONPATH=/usr/lib/python3/dist-packages (pyverbs importable),
"readable": `python -m pyccl.topology --peer PEER_IP`'s text, "chosen": the ibverbs transport's
(device, port, GID index, GID) toward PEER_IP, "local_ip": this VM's address toward it}.
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run(argv, env=None) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=env)
    if r.returncode:
        raise SystemExit(f"{argv} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def main(peer):
    from pyccl.env import socket_interface_address
    from pyccl.transports import ibverbs as ib
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with_pv = dict(plain, PYTHONPATH="/usr/lib/python3/dist-packages")
    mine = socket_interface_address(peer)
    port, gidx, why = ib.choose_port(mine)
    out = {"local_ip": mine,
           "pyverbs": json.loads(run(["/usr/bin/python3", os.path.join(HERE, "pyverbs_facts.py")], plain)),
           "sysfs": json.loads(run([sys.executable, "-m", "pyccl.topology", "--json"], plain))["rdma_ports"],
           "topo_pyverbs": json.loads(run([sys.executable, "-m", "pyccl.topology", "--json"], with_pv))["rdma_ports"],
           "readable": run([sys.executable, "-m", "pyccl.topology", "--peer", peer], with_pv),
           "chosen": None if port is None else {"device": port["device"], "port": port["port"], "gid_index": gidx,
                                                "gid": next((g[1].hex() for g in port["gids"] if g[0] == gidx), None)},
           "why": why}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
