"""No hangs, clear errors, nothing leaked: checks, timeouts with dumps + doctor, killed peers,
and file descriptors/threads/segments counted after close."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pyccl

from pyccl.doctor import diagnose, load
from pyccl.errors import InvalidArgument

pytestmark = pytest.mark.timeout(120)


def rank_checked_mismatch(comm):
    x = np.ones(8 if comm.rank != 1 else 9, np.float32)
    try:
        comm.all_reduce(x)
    except InvalidArgument as e:
        return str(e)
    return None


def test_pyccl_check_names_the_differing_rank(groups):
    g = groups(3, env={"PYCCL_CHECK": "1"})
    msgs = g.run(rank_checked_mismatch)
    g.broken = True
    assert all(m is not None for m in msgs), msgs
    assert "rank 1 calling with a different count" in msgs[0]
    assert "rank 0 calling with a different count" in msgs[1]


def rank_checked_ok(comm):
    x = np.ones(5, np.float32)
    comm.all_reduce(x)
    comm.broadcast(x, root=1)
    return float(x[0])


def test_pyccl_check_passes_matching_calls(groups):
    assert groups(3, env={"PYCCL_CHECK": "1"}).run(rank_checked_ok) == [3.0] * 3


def _launch(tmp_path, body, n, env=None, grace="30"):
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, "-m", "pyccl.launch", "-n", str(n), "--grace", grace, str(prog)],
                          capture_output=True, text=True, timeout=100, env={**os.environ, **(env or {})})


def test_timeout_dump_and_doctor_find_the_missing_rank(tmp_path):
    dumps = tmp_path / "dumps"
    r = _launch(tmp_path, """
        import os, sys, time, numpy as np, pyccl
        comm = pyccl.init()
        comm.all_reduce(np.ones(4))                        # everyone: collective #1
        if comm.rank == 2:
            time.sleep(8)                                  # rank 2 never calls #2 in time
            sys.exit(0)
        try:
            comm.all_reduce(np.ones(1 << 16, np.float32))
        except pyccl.Timeout as e:
            os.write(1, (f"TIMEOUT {e}" + chr(10)).encode())
    """, 3, env={"PYCCL_TIMEOUT": "3", "PYCCL_DUMP_ON_TIMEOUT": str(dumps), "PYCCL_TRANSPORT": "tcp"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("TIMEOUT") == 2
    assert "all_reduce #2" in r.stdout and "waiting on" in r.stdout
    data = load([str(dumps)])
    assert sorted(d["rank"] for d in data) == [0, 1]
    assert all(d["entries"][-1]["state"] == "failed" for d in data)
    report = "\n".join(diagnose(data))
    assert "no dump from ranks [2]" in report
    assert "most waits point at rank 2" in report or "from rank 2" in report, report
    out = subprocess.run([sys.executable, "-m", "pyccl.doctor", str(dumps)], capture_output=True, text=True)
    assert "no dump from ranks [2]" in out.stdout


def test_doctor_sees_mismatched_order(tmp_path):
    def dump(rank, op):
        return {"comm": "world0", "rank": rank, "size": 2, "entries": [
            {"seq": 1, "op": "all_reduce", "dtype": "float32", "count": 4, "root": -1, "state": "done", "where": ""},
            {"seq": 2, "op": op, "dtype": "float32", "count": 4, "root": 0, "state": "failed", "where": "",
             "error": "Timeout: waiting on RECV from rank 1"}]}
    for r, op in ((0, "all_reduce"), (1, "broadcast")):
        (tmp_path / f"pyccl-world0-rank{r}.json").write_text(json.dumps(dump(r, op)))
    report = "\n".join(diagnose(load([str(tmp_path)])))
    assert "collective #2 differs" in report and "rank 1: broadcast" in report


@pytest.mark.parametrize("transport", ["tcp", "auto"])
def test_killed_peer_gives_peer_failure(tmp_path, transport):
    r = _launch(tmp_path, """
        import os, signal, time, numpy as np, pyccl
        comm = pyccl.init()
        x = np.ones(1 << 20, np.float32)
        for i in range(3):
            comm.all_reduce(x)
        if comm.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)           # dies between collectives
        t = time.monotonic()
        try:
            for i in range(50):
                comm.all_reduce(x)
        except (pyccl.PeerFailure, pyccl.Timeout) as e:
            line = f"FAILED-AS-EXPECTED after {time.monotonic() - t:.1f}s: {type(e).__name__}: {e}"
            os.write(1, (line.replace(chr(10), " ") + chr(10)).encode())   # one write: lines stay whole
    """, 3, env={"PYCCL_TIMEOUT": "20", "PYCCL_TRANSPORT": transport})
    lines = [line for line in r.stdout.splitlines() if "FAILED-AS-EXPECTED" in line]
    assert len(lines) == 2, r.stdout + r.stderr
    for line in lines:
        took = float(line.split("after ")[1].split("s:")[0])
        assert took < 20
        assert "all_reduce #" in line and "rank 1" in line, line


def _fds():
    return len(os.listdir("/proc/self/fd"))


def _shm():
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith("pyccl"))


def rank_resources(comm):
    """Open and close sub-communicators; count fds, threads and /dev/shm segments before/after."""
    import threading
    before = (_fds(), threading.active_count())
    for _ in range(3):
        sub = comm.split(0)
        x = np.ones(1000)
        sub.all_reduce(x, async_op=True).wait()            # starts the progress thread too
        sub.close()
    comm.barrier()
    after = (_fds(), threading.active_count())
    return before, after


def test_close_releases_fds_threads_segments(groups):
    shm_before = _shm()
    for before, after in groups(3).run(rank_resources):
        assert after == before, f"before {before}, after {after} (fds, threads)"
    assert _shm() == shm_before


@pytest.mark.timeout(150)
@pytest.mark.parametrize("transport", ["tcp", "auto"])
def test_shrink_after_killed_peer(tmp_path, transport):
    """Rank 2 of 4 dies; the three survivors get PeerFailure, shrink, and go on computing."""
    r = _launch(tmp_path, """
        import os, signal, numpy as np, pyccl
        comm = pyccl.init()
        x = np.ones(1 << 16, np.float32)
        comm.all_reduce(x)
        if comm.rank == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            for i in range(50):
                comm.all_reduce(x)
            raise SystemExit("no error after the peer died")
        except (pyccl.PeerFailure, pyccl.Timeout):
            pass
        new = comm.shrink()
        comm.close()
        y = np.full(1001, comm.rank + 1, np.float64)
        new.all_reduce(y)
        g = np.empty(new.size, np.int64)
        new.all_gather(g, np.array([comm.rank], np.int64))
        line = f"SHRUNK old {comm.rank} new {new.rank}/{new.size} sum {y[0]:g} {y[-1]:g} members {g.tolist()}"
        os.write(1, (line + chr(10)).encode())
        new.close()
    """, 4, env={"PYCCL_TIMEOUT": "20", "PYCCL_TRANSPORT": transport}, grace="60")
    lines = sorted(line for line in r.stdout.splitlines() if line.startswith("SHRUNK"))
    assert len(lines) == 3, r.stdout + r.stderr
    for old, new, line in zip((0, 1, 3), (0, 1, 2), lines):
        # survivors 0, 1, 3 keep their order; 1 + 2 + 4 = 7
        assert line == f"SHRUNK old {old} new {new}/3 sum 7 7 members [0, 1, 3]", line


def test_shrink_leaves_out_excluded_and_late_ranks(groups):
    g = groups(3, env={"PYCCL_TIMEOUT": "20"})
    results = g.run(rank_shrink_exclude)
    assert results == [("member", 0, 2, 4.0), ("left out", None, None, None), ("member", 1, 2, 4.0)]


def rank_shrink_exclude(comm):
    """Everybody alive, but rank 0 asks to drop rank 1: ranks 0 and 2 form the new one."""
    try:
        new = comm.shrink(exclude=[1] if comm.rank == 0 else [], timeout=10)
    except pyccl.PeerFailure:
        return ("left out", None, None, None)
    x = np.full(3, comm.rank + 1.0)
    new.all_reduce(x)
    out = ("member", new.rank, new.size, float(x[0]))
    new.close()
    return out


def rank_abort_pending(comm):
    """Rank 0 queues an all_reduce rank 1 never joins, then aborts: the work ends at once."""
    import time
    if comm.rank != 0:
        return None
    work = comm.all_reduce(np.ones(1 << 16, np.float32), async_op=True)
    time.sleep(0.5)
    t = time.monotonic()
    comm.abort()
    try:
        work.wait()
    except pyccl.PeerFailure as e:
        return type(e).__name__, time.monotonic() - t, str(e)
    return "no error", time.monotonic() - t, ""


@pytest.mark.parametrize("transport", ["tcp", "auto"])
def test_abort_unblocks_pending_work(groups, transport):
    g = groups(2, env={"PYCCL_TIMEOUT": "30", "PYCCL_TRANSPORT": transport})
    results = g.run(rank_abort_pending)
    g.broken = True                          # rank 0's communicator is aborted by design
    kind, took, text = results[0]
    assert kind == "PeerFailure", results
    assert took < 5, results                 # not the 30 s timeout
    assert "all_reduce #" in text, text
