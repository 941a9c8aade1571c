"""Composed multi-host collectives (ccl/engines/composed.py): node-local shm engine, rail plans
over TCP, node-local engine, on real processes.

Hosts are emulated two ways: PYCCL_HOST_ID per rank under `python -m pyccl.launch` (TCP
over loopback between "hosts", fast, no root needed), and network namespaces (netns.py,
root). Each run is one multi-rank program (composed_prog.py) that checks every collective,
dtype, op and size against the numpy float64 reference, so a layout costs one spawn."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from multihost.netns import Hosts, available  # noqa: E402

PROG = os.path.join(HERE, "composed_prog.py")


def _launch(n, tmp_path, **env):
    e = dict(os.environ, **{"PYCCL_TIMEOUT": "60", "COMPOSED_OUT": str(tmp_path), **env})
    e.pop("PYCCL_HOST_ID", None)
    p = subprocess.run([sys.executable, "-m", "pyccl.launch", "-n", str(n), PROG], env=e,
                       capture_output=True, text=True, timeout=280)
    return p, _reports(n, tmp_path, p)


def _reports(n, tmp_path, p):
    out = {}
    for r in range(n):
        path = tmp_path / f"rank{r}.json"
        if path.exists():
            out[r] = json.loads(path.read_text())
    return out


def _all_good(n, reports, p, engine):
    detail = f"\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}" if p is not None else ""
    assert sorted(reports) == list(range(n)), f"missing reports: {sorted(reports)}{detail}"
    for r, rep in reports.items():
        assert not rep["bad"] and not rep["error"], f"rank {r}: {rep}{detail}"
        assert rep["engine"] == engine, f"rank {r} ran on {rep['engine']}, expected {engine}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout,hosts,n,env,engine", [
    ("major", 2, 4, {}, ["Hierarchy", "ShmCollectives"]),
    ("roundrobin", 3, 6, {}, ["Hierarchy", "ShmCollectives"]),        # a host's ranks not consecutive
    ("major", 2, 4, {"PYCCL_SHM_COLLECTIVES": "0"}, ["Hierarchy", "PlanEngine"]),   # local phase as plans
    ("uneven", 2, 3, {}, []),                                         # 2 + 1 ranks: flat plans instead
], ids=["2x2", "3x2-roundrobin", "2x2-shm-off", "uneven-falls-back"])
def test_every_collective_emulated_hosts(tmp_path, layout, hosts, n, env, engine):
    p, reports = _launch(n, tmp_path, PYCCL_ALGO="composed", COMPOSED_LAYOUT=layout,
                         COMPOSED_HOSTS=str(hosts), **env)
    _all_good(n, reports, p, engine)


@pytest.mark.timeout(120)
def test_killed_rank_across_hosts(tmp_path):
    """Rank 3 (host 1) dies between collectives: every survivor raises PeerFailure naming
    the op, the phase and the dead rank (its rail peer: the socket; its host peer: the
    shm engine, which names the communicator's ranks, not the host's local numbers)."""
    p, reports = _launch(4, tmp_path, PYCCL_ALGO="composed", COMPOSED_MODE="kill", PYCCL_TIMEOUT="30")
    assert sorted(reports) == [0, 1, 2], f"{reports}\n{p.stdout}\n{p.stderr[-3000:]}"
    for r, rep in reports.items():
        err = rep["error"]
        assert err.startswith("PeerFailure") and "all_reduce #2" in err and "phase" in err, f"rank {r}: {err}"
        assert "rank 3" in err, f"rank {r} does not name the dead peer: {err}"
    # rank 2 shares host 1 with rank 3: its shm engine knows rank 3 as its local rank 1
    assert "rank 3 (pid" in reports[2]["error"] and "rank 1 (pid" not in reports[2]["error"], reports[2]["error"]


@pytest.mark.timeout(120)
def test_size_mismatch_across_hosts(tmp_path):
    """Host 1 calls all_reduce with another count: every rank raises TransportError in the
    rail phase, naming the peer and both sizes, instead of hanging."""
    p, reports = _launch(4, tmp_path, PYCCL_ALGO="composed", COMPOSED_MODE="mismatch", PYCCL_TIMEOUT="30")
    assert sorted(reports) == [0, 1, 2, 3], f"{reports}\n{p.stdout}\n{p.stderr[-3000:]}"
    for r, rep in reports.items():
        err = rep["error"]
        assert "size mismatch" in err and "rail all_reduce" in err, f"rank {r}: {err}"


ok, why = available()


@pytest.mark.timeout(300)
@pytest.mark.skipif(not ok, reason=why)
@pytest.mark.parametrize("nhosts", [2, 3])
def test_every_collective_across_namespaces(tmp_path, nhosts):
    with Hosts(nhosts, net=60 + nhosts) as hosts:
        results = hosts.run("", ranks_per_host=2, argv=[PROG], timeout=280,
                            env={"PYCCL_TIMEOUT": "60", "PYCCL_ALGO": "composed", "COMPOSED_OUT": str(tmp_path)})
    n = 2 * nhosts
    reports = _reports(n, tmp_path, None)
    for rank, rc, out, err in results:
        assert rc == 0, f"rank {rank} rc={rc}\n{out[-2000:]}\n{err[-3000:]}"
    _all_good(n, reports, None, ["Hierarchy", "ShmCollectives"])
