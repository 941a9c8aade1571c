"""The independent reference: RDMA ports as rdma-core's own Python binding reads them.

    /usr/bin/python3 tests/rdma/pyverbs_facts.py     # Debian's python3-pyverbs; no pyccl import

Prints JSON: [{device, port, state, link_layer, active_mtu, max_mtu, gids: [{index, gid (32
hex digits), type, netdev}]}] for every port of every device (non-zero GIDs only), the shape
`python -m pyccl.topology --json` gives under "rdma_ports", written separately on purpose.
"""
import json
import socket

import pyverbs.device as d
import pyverbs.enums as e

STATE = {e.IBV_PORT_NOP: "NOP", e.IBV_PORT_DOWN: "DOWN", e.IBV_PORT_INIT: "INIT", e.IBV_PORT_ARMED: "ARMED",
         e.IBV_PORT_ACTIVE: "ACTIVE", e.IBV_PORT_ACTIVE_DEFER: "ACTIVE_DEFER"}
MTU = {e.IBV_MTU_256: 256, e.IBV_MTU_512: 512, e.IBV_MTU_1024: 1024, e.IBV_MTU_2048: 2048, e.IBV_MTU_4096: 4096}
GID_TYPE = {e.IBV_GID_TYPE_IB: "IB", e.IBV_GID_TYPE_ROCE_V1: "RoCE v1", e.IBV_GID_TYPE_ROCE_V2: "RoCE v2"}

out = []
for dev in d.get_device_list():
    name = dev.name.decode()
    ctx = d.Context(name=name)
    for port in range(1, ctx.query_device().phys_port_cnt + 1):
        a = ctx.query_port(port)
        gids = []
        for i in range(a.gid_tbl_len):
            try:
                g = ctx.query_gid_ex(port, i)
            except d.PyverbsRDMAError:           # an empty entry
                continue
            raw = g.gid_str().replace(":", "")
            if int(raw, 16):
                gids.append({"index": i, "gid": raw.lower(), "type": GID_TYPE[g.gid_type],
                             "netdev": socket.if_indextoname(g.ndev_ifindex) if g.ndev_ifindex else ""})
        out.append({"device": name, "port": port, "state": STATE[a.state],
                    "link_layer": "Ethernet" if a.link_layer == e.IBV_LINK_LAYER_ETHERNET else "InfiniBand",
                    "active_mtu": MTU[a.active_mtu], "max_mtu": MTU[a.max_mtu], "gids": gids})
    ctx.close()
print(json.dumps(sorted(out, key=lambda p: (p["device"], p["port"]))))
