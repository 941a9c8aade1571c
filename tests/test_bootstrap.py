"""End to end through `python -m pyccl.launch`: ranks rendezvous and reduce; a rank that never
starts is named. (The store and the launcher alone: tests/test_store.py, tests/test_env_launch.py.)"""
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
