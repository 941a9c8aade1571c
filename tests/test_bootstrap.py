"""The rendezvous store, launch-environment detection and `python -m pyccl.launch`,
with real sockets and real processes."""
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pyccl.env import detect
from pyccl.errors import PeerFailure, Timeout
from pyccl.store import PrefixStore, StoreServer, TCPStore

pytestmark = pytest.mark.timeout(60)
SECRET = b"s" * 32


@pytest.fixture
def server():
    s = StoreServer("127.0.0.1", 0, SECRET)
    yield s
    s.close()


def test_set_get_add_check_wait_delete(server):
    a = TCPStore(*server.address, SECRET, timeout=5)
    b = TCPStore(*server.address, SECRET, timeout=5)
    a.set("k", b"v\x00\xff")
    assert b.get("k") == b"v\x00\xff"
    assert [a.add("n", 2), b.add("n", 3), a.add("n", -1)] == [2, 5, 4]
    assert a.check(["k", "nope"]) == [True, False]
    threading.Timer(0.3, lambda: b.set("late", b"x")).start()
    t = time.monotonic()
    assert a.get("late", timeout=5) == b"x" and time.monotonic() - t >= 0.25
    a.delete("k")
    assert a.check(["k"]) == [False]
    p = PrefixStore(a, "job")
    p.set("x", b"1")
    assert b.get("job/x") == b"1" and p.check(["x", "y"]) == [True, False]


def test_timeout_names_missing_keys(server):
    a = TCPStore(*server.address, SECRET, timeout=5)
    a.set("here", b"")
    with pytest.raises(Timeout, match=r"\['gone'\]"):
        a.wait(["here", "gone"], timeout=0.5)


def test_wrong_secret_rejected(server):
    with pytest.raises(PeerFailure, match="rejected the job secret"):
        TCPStore(*server.address, b"x" * 32, timeout=5)


def test_unreachable_store_times_out_naming_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # nothing listens here once closed
    t = time.monotonic()
    with pytest.raises(Timeout, match=f"127.0.0.1:{port} unreachable"):
        TCPStore("127.0.0.1", port, SECRET, timeout=1.0)
    assert time.monotonic() - t < 10


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 5, b"\xff" * 64, os.urandom(300)])
def test_hostile_clients_do_not_wedge_the_server(server, garbage):
    silent = socket.create_connection(server.address)          # says nothing at all
    bad = socket.create_connection(server.address)
    bad.recv(32)
    bad.sendall(garbage)
    bad.close()
    # an authenticated client sending an oversized frame is dropped, not served
    from pyccl.store import _REQ
    big = TCPStore(*server.address, SECRET, timeout=5)
    big._sock.sendall(_REQ.pack(1, 1 << 30, 0))
    assert big._sock.recv(1) == b""
    good = TCPStore(*server.address, SECRET, timeout=5)
    good.set("still", b"serving")
    assert good.get("still") == b"serving"
    silent.close()


def test_detect_each_launcher():
    assert detect({"PYCCL_RANK": "2", "PYCCL_SIZE": "4", "PYCCL_LOCAL_RANK": "0", "PYCCL_LOCAL_SIZE": "2",
                   "PYCCL_STORE_ADDR": "h:5", "PYCCL_JOB_SECRET": "ab"}).__dict__ == dict(
        rank=2, size=4, local_rank=0, local_size=2, launcher="pyccl.launch", store_host="h", store_port=5,
        secret=b"\xab")
    t = detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "m", "MASTER_PORT": "29500"})
    assert (t.launcher, t.rank, t.size, t.store_host, t.store_port) == ("torchrun", 1, 2, "m", 29500)
    o = detect({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "4"})
    assert (o.launcher, o.rank, o.size, o.local_rank, o.local_size) == ("openmpi", 3, 8, 1, 4)
    m = detect({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"})
    assert (m.launcher, m.size, m.local_size) == ("mpich", 2, 2)
    s = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "3(x2)",
                "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.1", "SLURM_JOB_ID": "1234"})
    assert (s.launcher, s.rank, s.local_size, s.store_host, s.store_port) == ("slurm", 5, 3, "10.0.0.1", 21234)
    assert detect({}).launcher == "none"


def _launch(tmp_path, body, n, *extra, timeout=60):
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, "-m", "pyccl.launch", "-n", str(n), *extra, str(prog)],
                          capture_output=True, text=True, timeout=timeout)


def test_launch_runs_ranks_that_rendezvous(tmp_path):
    r = _launch(tmp_path, """
        import numpy as np, pyccl
        comm = pyccl.init()
        x = np.array([comm.rank], np.int64)
        comm.all_reduce(x)
        print(f"rank {comm.rank}/{comm.size} sum {x[0]}", flush=True)
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
