"""RDMA between two kernels: pyccl ranks in two VMs joined by a virtual Ethernet link, each
with soft-RoCE on its own NIC (and a decoy rxe0 on `lo` that sorts first), run by
tests/rdma/two-vm.sh; this file runs in VM a, VM b's ranks start through its agent.

    tests/rdma/two-vm.sh                                   # all of tests/rdma (CI)
    tests/rdma/two-vm.sh python -m pytest -q tests/rdma/test_two_vms.py -k mismatch

Outside that set-up every test skips.  pyverbs (Debian's python3-pyverbs, run by
/usr/bin/python3 without pyccl) is the reference the device facts are checked against.
"""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import twovm  # noqa: E402

pytestmark = [pytest.mark.skipif(not twovm.ACTIVE, reason="needs the two VMs of tests/rdma/two-vm.sh"),
              pytest.mark.timeout(600)]

RANK = [os.path.join(HERE, "two_vm_rank.py")]
IB = {"PYCCL_TRANSPORT": "ibverbs", "PYCCL_TIMEOUT": "120"}
AUTO = {"PYCCL_TIMEOUT": "120"}


def _mapped(ip: str) -> str:
    return "00000000000000000000ffff" + "".join(f"{int(x):02x}" for x in ip.split("."))


def _vm_of(rank: int, per_vm: int) -> str:
    return "a" if rank < per_vm else "b"


def test_facts_across_the_link():
    """Each VM is its own host (boot id, so PYCCL_HOST_ID differs unasked); the transport
    chose, on each side, rxe1 (the NIC toward the peer, not the decoy rxe0 on lo) and the
    RoCE v2 GID that maps the VM's own address; each side learnt the other's."""
    job = twovm.across(RANK + ["facts"], 1, IB)
    assert not job.failed(), job.failed()
    a, b = job.results[0], job.results[1]
    assert a["boot_id"] != b["boot_id"] and a["host"] != b["host"], (a, b)
    for me, peer, ip, peer_ip in ((a, "1", twovm.A_IP, twovm.B_IP), (b, "0", twovm.B_IP, twovm.A_IP)):
        assert me["conns"] == {peer: "IbvConnection"}, me
        assert me["bind"] == ip, me
        assert me["ib"]["dev"] == "rxe1:1" and me["ib"]["gid"] == _mapped(ip), me
        assert me["peer_ib"][peer]["gid"] == _mapped(peer_ip) and me["peer_ib"][peer]["dev"] == "rxe1:1", me
        assert me["ib"]["mtu"] == 3, me            # IBV_MTU_1024: a 1500-byte Ethernet MTU
        assert me["inter"] == "ibverbs", me         # the cost model prices the link as what carries it
        assert not me["bad"], me


def _check_facts(f: dict, ip: str, peer_ip: str, transport_mtu=None):
    ref = f["pyverbs"]
    assert [(p["device"], p["port"]) for p in ref] == [("rxe0", 1), ("rxe1", 1)], ref
    # pyccl's views (sysfs, and pyverbs when importable) agree with the reference
    assert f["topo_pyverbs"]["source"] == "pyverbs" and f["sysfs"]["source"] == "sysfs", f
    assert f["topo_pyverbs"]["ports"] == ref
    assert f["sysfs"]["ports"] == ref, (f["sysfs"]["ports"], ref)
    # the transport's choice: the port whose GID table holds this VM's address toward the peer
    assert f["local_ip"] == ip
    nic = next(p for p in ref if p["device"] == "rxe1")
    assert nic["state"] == "ACTIVE" and nic["link_layer"] == "Ethernet" and nic["active_mtu"] == 1024, nic
    entry = next(g for g in nic["gids"] if g["index"] == f["chosen"]["gid_index"])
    assert f["chosen"]["device"] == "rxe1" and entry["gid"] == _mapped(ip) == f["chosen"]["gid"], (f["chosen"], nic)
    assert entry["type"] == "RoCE v2" and entry["netdev"] != "lo", entry
    # the readable form says the same
    text = f["readable"]
    assert "RDMA ports (read with pyverbs)" in text, text
    assert f"rxe1:1  ACTIVE  Ethernet (RoCE)  MTU 1024" in text, text
    assert f"ibverbs would use toward {peer_ip} (from {ip}): rxe1:1 GID[{entry['index']}] ::ffff:{ip} RoCE v2" in text, text


def test_pyverbs_agrees_in_both_vms():
    """Devices, ports, state, MTU and GID table as pyverbs reads them == what `python -m
    pyccl.topology` reports (from sysfs, and from pyverbs) == what the ibverbs transport
    would choose toward the other VM, in VM a and in VM b."""
    import json
    import subprocess
    r = subprocess.run([sys.executable, os.path.join(HERE, "vm_facts.py"), twovm.B_IP], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    _check_facts(json.loads(r.stdout), twovm.A_IP, twovm.B_IP)
    rc, out = twovm.in_b([sys.executable, os.path.join(HERE, "vm_facts.py"), twovm.A_IP], timeout=300)
    assert rc == 0, out[-4000:]
    _check_facts(json.loads(out.strip().splitlines()[-1]), twovm.B_IP, twovm.A_IP)


def test_knobs_choose_device_and_gid(monkeypatch):
    """PYCCL_IB_HCA / PYCCL_IB_GID_INDEX override the route's choice (like NCCL_IB_HCA /
    NCCL_IB_GID_INDEX); without them the route decides, whatever sorts first."""
    from pyccl.transports import ibverbs as ib
    mapped = bytes.fromhex(_mapped(twovm.A_IP))
    port, gidx, _ = ib.choose_port(twovm.A_IP)
    assert port["device"] == "rxe1" and {g[0]: g[1] for g in port["gids"]}[gidx] == mapped
    port, gidx, _ = ib.choose_port("")                  # no route known: the first ACTIVE port
    assert port["device"] == "rxe0"
    monkeypatch.setenv("PYCCL_IB_GID_INDEX", "0")
    port, gidx, _ = ib.choose_port(twovm.A_IP)
    assert (port["device"], gidx) == ("rxe1", 0)
    monkeypatch.delenv("PYCCL_IB_GID_INDEX")
    monkeypatch.setenv("PYCCL_IB_HCA", "rxe0:1")
    port, gidx, _ = ib.choose_port(twovm.A_IP)
    assert port["device"] == "rxe0" and {g[0]: g[1] for g in port["gids"]}[gidx] == bytes.fromhex(_mapped("127.0.0.1"))
    monkeypatch.setenv("PYCCL_IB_HCA", "mlx5_9")
    port, _, why = ib.choose_port(twovm.A_IP)
    assert port is None and "PYCCL_IB_HCA=mlx5_9 matches none of rxe0:1, rxe1:1" in why


@pytest.mark.parametrize("per_vm", [1, 2])
def test_every_collective_over_ibverbs(per_vm):
    """Every collective x dtype x odd sizes, p2p, uneven all_to_all, async, split and a 16 MiB
    all_reduce with 1 and 2 ranks per VM, every pair over ibverbs (PYCCL_TRANSPORT)."""
    job = twovm.across(RANK + ["every"], per_vm, IB, timeout=420)
    assert not job.failed(), job.failed()
    for r, res in job.results.items():
        assert set(res["conns"].values()) == {"IbvConnection"}, res
        assert not res["bad"], (r, res["bad"][:20])


def test_multihost_plans_shm_inside_ibverbs_between():
    """2 ranks per VM, transports chosen automatically: shm to the rank in the same VM,
    ibverbs to the other VM's; every plan the tuner can pick (ring, tree, hierarchical,
    halving-doubling, its own choice) gives the reference results."""
    job = twovm.across(RANK + ["plans"], 2, AUTO, timeout=420)
    assert not job.failed(), job.failed()
    for r, res in job.results.items():
        want = {str(p): ("ShmConnection" if _vm_of(p, 2) == _vm_of(r, 2) else "IbvConnection")
                for p in range(4) if p != r}
        assert res["conns"] == want, (r, res["conns"])
        assert not res["bad"], (r, res["bad"][:20])
        assert res["picked"]["hierarchical all_reduce 300007"] == "hierarchical", res["picked"]


@pytest.mark.parametrize("per_vm,env", [(1, IB), (2, AUTO)], ids=["1-per-vm-ibverbs", "2-per-vm-auto"])
def test_killed_rank_in_vm_b(per_vm, env):
    """The last rank (in VM b) dies after a warm-up all_reduce: the ranks in VM a get
    PeerFailure (or TransportError) naming the op, within seconds, and one of the survivors
    names the dead rank; the survivors shrink and go on."""
    victim = 2 * per_vm - 1
    job = twovm.across(RANK + ["kill", str(victim)], per_vm, env, timeout=240)
    assert job.rcs[victim] == 17, job.rcs
    alive = {r: res for r, res in job.results.items() if r != victim}
    assert sorted(alive) == [r for r in range(2 * per_vm) if r != victim], job.failed()
    for r, res in alive.items():
        err = res["error"]
        assert err is not None, (r, res)
        assert err["type"] in ("PeerFailure", "TransportError"), (r, err)
        assert "all_reduce" in err["text"] and "rank" in err["text"], (r, err)
        assert err["after_s"] < 60, (r, err)
    texts = [res["error"]["text"] for res in alive.values()]
    assert any(f"rank {victim}" in t for t in texts), texts
    if per_vm == 1:
        assert alive[0]["error"]["type"] == "PeerFailure" and "rank 1" in alive[0]["error"]["text"], alive
    want = sum(r + 1 for r in alive)
    for r, res in alive.items():
        assert res["shrunk"] == {"size": len(alive), "value": want}, (r, res)


@pytest.mark.parametrize("base", [100, 1 << 20], ids=["eager", "rendezvous"])
def test_size_mismatch_across_vms(base):
    """Rank 0 (VM a) sends `base` bytes, rank 1 (VM b) expects 1.5x over ibverbs: an error
    naming the other rank and the sizes, never a hang."""
    job = twovm.across(RANK + ["mismatch", str(base), "1"], 1, IB, timeout=180)
    assert set(job.results) == {0, 1}, job.failed()
    out = [job.results[r]["error"] for r in (0, 1)]
    assert any(f"size mismatch with rank {1 - r}" in o for r, o in enumerate(out)), out
    if base == 100:
        assert "100" in out[1] and "150" in out[1], out
    else:
        assert all(o.startswith(("TransportError", "PeerFailure")) for o in out), out
    assert all(job.results[r].get("after_s", 0) < 60 for r in (0, 1)), job.results
