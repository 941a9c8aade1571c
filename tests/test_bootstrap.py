"""End to end through `python -m pyccl.launch`: ranks rendezvous and reduce; a rank that never
starts is named. (The store and the launcher alone: tests/test_store.py, tests/test_env_launch.py.)"""
import json
import subprocess
import sys
import textwrap
import time

import pytest


pytestmark = pytest.mark.timeout(60)
SECRET = b"s" * 32


def _launch(tmp_path, body, n, *extra, timeout=60):
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, "-m", "pyccl.launch", "-n", str(n), *extra, str(prog)],
                          capture_output=True, text=True, timeout=timeout)


def test_launch_runs_ranks_that_rendezvous(tmp_path):
    r = _launch(tmp_path, """
        import sys, numpy as np, pyccl
        comm = pyccl.init()
        x = np.array([comm.rank], np.int64)
        comm.all_reduce(x)
        sys.stdout.write(f"rank {comm.rank}/{comm.size} sum {x[0]}" + chr(10))   # one write: lines stay whole
        comm.close()
    """, 3)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split("\n")[:3]) == [f"rank {i}/3 sum 3" for i in range(3)]


def test_launch_fails_fast_when_a_rank_fails(tmp_path):
    t = time.monotonic()
    r = _launch(tmp_path, """
        import os, sys, time
        if os.environ["PYCCL_RANK"] == "1":
            sys.exit(3)
        time.sleep(60)
    """, 3, "--grace", "1")
    assert r.returncode == 3
    assert "rank 1 failed (exit code 3)" in r.stderr
    assert time.monotonic() - t < 20


def test_missing_rank_is_named(tmp_path):
    """A rank that never starts: the others get a Timeout naming it, not a hang."""
    r = _launch(tmp_path, """
        import os, sys, pyccl
        if os.environ["PYCCL_RANK"] == "2":
            sys.exit(0)                      # never joins
        os.environ["PYCCL_TIMEOUT"] = "3"
        try:
            pyccl.init()
        except pyccl.Timeout as e:
            print("TIMEOUT", e, flush=True)
            sys.exit(7)
    """, 3)
    assert r.returncode == 7
    assert "ranks [2] to join" in r.stdout


# ---- O(1) store requests, lazy connections (issue 15) -----------------------------------------
def test_store_requests_and_connections_stay_small(tmp_path):
    """8 ranks over TCP: set-up + a ring all_reduce cost each rank <= 8 store requests and
    open connections only to its two ring neighbours; a split's sub-communicator asks the
    store nothing; send/recv to a far rank opens that one connection on first use."""
    r = _launch(tmp_path, """
        import json, os, numpy as np, pyccl
        from pyccl import store
        os.environ.update(PYCCL_TRANSPORT="tcp", PYCCL_ALGO="ring")
        comm = pyccl.init()
        x = np.full(1001, comm.rank + 1.0)
        comm.all_reduce(x)
        assert np.all(x == 36.0), x[:3]
        req, peers = store.STATS["requests"], sorted(comm.conns)
        sub = comm.split(comm.rank % 2)
        y = np.full(5, float(comm.rank))
        sub.all_reduce(y)
        assert y[0] == sum(range(comm.rank % 2, 8, 2)), y
        sub_req = store.STATS["requests"] - req
        if comm.rank == 0:
            comm.send(np.arange(3.0), 4)
        if comm.rank == 4:
            z = np.empty(3)
            comm.recv(z, 0)
            assert z.tolist() == [0.0, 1.0, 2.0]
        row = [comm.rank, req, sub_req, peers, sorted(comm.conns)]
        os.write(1, ("R " + json.dumps(row) + chr(10)).encode())
        sub.close()
        comm.close()
    """, 8, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line[2:]) for line in r.stdout.splitlines() if line.startswith("R ")]
    assert len(rows) == 8, r.stdout + r.stderr
    for rank, req, sub_req, peers, after in rows:
        assert req <= 8, (rank, req)
        assert sub_req == 0, (rank, sub_req)
        assert peers == sorted({(rank + 1) % 8, (rank - 1) % 8}), (rank, peers)
        if rank in (0, 4):
            assert rank ^ 4 in after and len(after) == 3, (rank, after)


def test_fd_limit_gives_a_clear_transport_error(tmp_path):
    """A rank whose hard fd limit cannot hold the connections it must open gets a
    TransportError saying how many are needed (the soft limit is raised to the hard first)."""
    r = _launch(tmp_path, """
        import os, resource, pyccl
        os.environ["PYCCL_TRANSPORT"] = "tcp"
        comm = pyccl.init()
        used = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 4, used + 4))
        try:
            comm.conns.open_all()
            os.write(1, b"NO ERROR\\n")
        except pyccl.TransportError as e:
            os.write(1, f"TE {e}\\n".encode())
    """, 4, "--grace", "1", timeout=120)
    lines = [line for line in r.stdout.splitlines() if line.startswith("TE ")]
    assert lines, r.stdout + r.stderr
    assert "needs 3 more file descriptors" in lines[0] and "ulimit -n" in lines[0], lines[0]
