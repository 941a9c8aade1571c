"""Elastic communicators (ccl/elastic.py): grow + join, and the ways a grow can go wrong.

Every scenario is real processes: a store served by this test process, members started with
pyccl.launch's variables, joiners with only the store address and the secret. Each prints
one line per result; the test reads them."""
import os
import secrets
import subprocess
import sys
import textwrap
import time

import pytest

from pyccl.store import StoreServer

pytestmark = pytest.mark.timeout(60)          # each test; the module runs in ~45 s on a quiet machine
# Tests whose processes import torch get more: on the loaded 2-core CI machine 4-5 processes
# importing torch at once took 15-18 s each (measured), and a replacement's import is part of
# the survivors' grow, so its PYCCL_TIMEOUT is longer too.
TORCH_WAIT, TORCH_COMM_TIMEOUT = 170, "60"

HEAD = """
import os, sys, time, numpy as np, pyccl
def say(*a):
    os.write(1, (" ".join(str(x) for x in a) + chr(10)).encode())
"""


def _job(tmp_path, body, members, joiners=(), env=None, secret=None, wait=40):
    """Run `body` in `members` member processes and one process per entry of `joiners` (a dict
    of extra variables each, e.g. a wrong secret); returns {name: stdout+stderr}."""
    prog = tmp_path / "prog.py"
    prog.write_text(HEAD + textwrap.dedent(body))
    key = secrets.token_bytes(32)
    server = StoreServer("127.0.0.1", 0, key)
    base = {**os.environ, "PYCCL_STORE_ADDR": f"127.0.0.1:{server.address[1]}", "PYCCL_JOB_SECRET": key.hex(),
            "PYCCL_TIMEOUT": "10", **(env or {})}
    procs = {}
    try:
        for r in range(members):
            procs[f"m{r}"] = subprocess.Popen(
                [sys.executable, str(prog)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env={**base, "PYCCL_RANK": str(r), "PYCCL_SIZE": str(members), "ROLE": "member"})
        for j, extra in enumerate(joiners):
            procs[f"j{j}"] = subprocess.Popen(
                [sys.executable, str(prog)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env={**base, "ROLE": "joiner", "JOINER": str(j), **extra})
        out = {}
        deadline = time.monotonic() + wait
        for name, p in procs.items():
            try:
                out[name] = p.communicate(timeout=max(1, deadline - time.monotonic()))[0]
            except subprocess.TimeoutExpired:
                p.kill()
                out[name] = p.communicate()[0] + "\n<killed: still running>"
        return out
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        server.close()


def _elastic_launch(tmp_path, body, n, wait=55, comm_timeout="15"):
    prog = tmp_path / "prog.py"
    prog.write_text(HEAD + textwrap.dedent(body))
    return subprocess.run([sys.executable, "-m", "pyccl.launch", "--elastic", "-n", str(n), str(prog)],
                          capture_output=True, text=True, timeout=wait,
                          env={**os.environ, "PYCCL_TIMEOUT": comm_timeout})


def _lines(out, prefix):
    return {name: [ln for ln in text.splitlines() if ln.startswith(prefix)] for name, text in out.items()}


GROW = """
if os.environ["ROLE"] == "member":
    comm = pyccl.init()
    new = comm.grow(2)
else:
    new = pyccl.join()
x = np.full(7, new.rank + 1.0)
new.all_reduce(x)
g = np.empty(new.size, np.int64)
new.all_gather(g, np.array([os.getpid()], np.int64))
say("GREW", new.rank, new.size, x[0], int(g[new.rank]) == os.getpid(), new.joined)
new.close()
"""


@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_grow_two_joiners(tmp_path, transport):
    """3 members + 2 joiners: one communicator of 5, old ranks first, all_reduce 1+..+5 = 15."""
    out = _job(tmp_path, GROW, 3, [{}, {}], env={"PYCCL_TRANSPORT": transport})
    lines = _lines(out, "GREW")
    for r in range(3):
        assert lines[f"m{r}"] == [f"GREW {r} 5 15.0 True False"], out
    assert sorted(lines["j0"] + lines["j1"]) == ["GREW 3 5 15.0 True True", "GREW 4 5 15.0 True True"], out


WRONG_SECRET = """
if os.environ["ROLE"] == "member":
    comm = pyccl.init()
    new = comm.grow(1)
    x = np.ones(3)
    comm.all_reduce(x)                    # the old communicator: untouched
    new.all_reduce(x)
    say("MEMBER", new.size, x[0])
elif os.environ["JOINER"] == "0":
    try:
        pyccl.join(timeout=5)
        say("JOINED-WITH-WRONG-SECRET")
    except pyccl.PycclError as e:
        say("REFUSED", type(e).__name__, str(e)[:200].replace(chr(10), " "))
else:
    time.sleep(2)                         # after the impostor: the members grow with this one
    new = pyccl.join()
    x = np.ones(3)
    new.all_reduce(x)
    say("JOINER", new.rank, x[0])
"""


def test_wrong_secret_is_refused(tmp_path):
    out = _job(tmp_path, WRONG_SECRET, 2, [{"PYCCL_JOB_SECRET": secrets.token_hex(32)}, {}])
    lines = _lines(out, "")
    assert any(ln.startswith("REFUSED") for ln in lines["j0"]), out
    assert "MEMBER 3 5.0" in lines["m0"] and "MEMBER 3 5.0" in lines["m1"], out   # old: 2, new: 2+2+1
    assert "JOINER 2 5.0" in lines["j1"], out


MISSING = """
comm = pyccl.init()
if comm.rank == 2:
    time.sleep(3)                         # never calls grow
else:
    t = time.monotonic()
    try:
        comm.grow(1, timeout=2)
        say("GREW")
    except pyccl.PycclError as e:
        say("ERROR", type(e).__name__, round(time.monotonic() - t), str(e).replace(chr(10), " "))
x = np.ones(2)
comm.all_reduce(x)                        # the old communicator: untouched
say("OLD-OK", x[0])
"""


def test_grow_not_called_by_every_member(tmp_path):
    """Rank 2 of 3 never calls grow: ranks 0 and 1 get a Timeout naming it within the window."""
    out = _job(tmp_path, MISSING, 3, [{}] * 0)
    for r in (0, 1):
        err = [ln for ln in out[f"m{r}"].splitlines() if ln.startswith("ERROR")]
        assert err and "Timeout" in err[0] and "ranks [2]" in err[0], out
        assert int(err[0].split()[2]) <= 4, err
        assert "OLD-OK 3.0" in out[f"m{r}"], out


TWO_GROWS = """
comm = pyccl.init() if os.environ["ROLE"] == "member" else None
if comm is None:
    time.sleep(1.5)                       # both grows are open by now
    new = pyccl.join()
    say("JOINED", new.size)
    new.barrier()
    new.close()
    sys.exit(0)
half = comm.split(comm.rank // 2)         # two communicators of 2 grow at once
try:
    new = half.grow(1, timeout=6)
    new.barrier()
    say("GREW", comm.rank // 2, new.size)
except pyccl.PycclError as e:
    say("ERROR", comm.rank // 2, type(e).__name__, str(e).replace(chr(10), " "))
"""


def test_two_grows_at_once(tmp_path):
    """Two communicators grow at once, one joiner: one grow gets it, the other fails on both ranks."""
    out = _job(tmp_path, TWO_GROWS, 4, [{}])
    res = {r: [ln for ln in out[f"m{r}"].splitlines() if ln.startswith(("GREW", "ERROR"))] for r in range(4)}
    assert all(len(v) == 1 for v in res.values()), out
    kinds = {h: {res[r][0].split()[0] for r in (2 * h, 2 * h + 1)} for h in (0, 1)}
    assert sorted(k for v in kinds.values() for k in v) == ["ERROR", "GREW"], out
    err = next(res[r][0] for r in range(4) if res[r][0].startswith("ERROR"))
    assert "another grow of this job is in progress" in err, out
    assert "JOINED 3" in out["j0"], out


DYING_JOINER = """
if os.environ["ROLE"] == "joiner":
    # die inside the grow: after the members chose this process and the new communicator is made,
    # at the barrier that confirms it (dying on another thread once the answer came raced with
    # that barrier: under load the join finished first and the members' grow succeeded)
    import pyccl.communicator
    pyccl.communicator.Communicator.barrier = lambda self, *a, **k: os._exit(9)
    pyccl.join()
comm = pyccl.init()
t = time.monotonic()
try:
    comm.grow(1)
    say("GREW")
except pyccl.PycclError as e:
    say("ERROR", type(e).__name__, round(time.monotonic() - t))
x = np.ones(5)
comm.all_reduce(x)                        # the old communicator still works
say("OLD-OK", x[0])
"""


def test_joiner_dying_mid_grow_leaves_members_usable(tmp_path):
    out = _job(tmp_path, DYING_JOINER, 2, [{}], env={"PYCCL_TIMEOUT": "4"})
    for r in (0, 1):
        lines = out[f"m{r}"]
        assert "ERROR PeerFailure" in lines and "OLD-OK 2.0" in lines, out
        assert int(lines.split("ERROR PeerFailure ")[1].split()[0]) <= 6, out


ELASTIC = """
import signal
comm = pyccl.init()
if not comm.joined:
    x = np.ones(1 << 12, np.float32)
    comm.all_reduce(x)
    if comm.rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        for i in range(50):
            comm.all_reduce(x)
        raise SystemExit("no error after the peer died")
    except (pyccl.PeerFailure, pyccl.Timeout):
        pass
    small = comm.shrink()
    comm.close()
    comm = small.grow(1)
    small.close()
y = np.full(5, comm.rank + 1.0)
comm.all_reduce(y)
say("ELASTIC", comm.rank, comm.size, y[0], comm.joined)
comm.close()
"""


def test_launcher_elastic_replaces_a_dead_rank(tmp_path):
    """pyccl.launch --elastic: rank 2 of 4 dies, the survivors shrink and grow(1), the
    replacement joins as rank 3; the job exits 0."""
    r = _elastic_launch(tmp_path, ELASTIC, 4)
    lines = sorted(ln for ln in r.stdout.splitlines() if ln.startswith("ELASTIC"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert lines == [f"ELASTIC {i} 4 10.0 {i == 3}" for i in range(4)], r.stdout + r.stderr
    assert "starting a replacement that joins the job (restart 1 of 3)" in r.stderr


def _launch_prog(tmp_path, text, *args, timeout=30):
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent(text))
    return subprocess.run([sys.executable, "-m", "pyccl.launch", *args, str(prog)], capture_output=True, text=True,
                          timeout=timeout)


def test_launcher_elastic_gives_up_after_max_restarts(tmp_path):
    """Rank 0 fails at once, every time (rank 1 runs on): 2 replacements, then the job fails
    with rank 0's code; --log-dir keeps each process's output and the launcher's lines."""
    logs = tmp_path / "logs"
    r = _launch_prog(tmp_path, """
        import os, sys, time
        if os.environ["PYCCL_RANK"] == "0":
            print("rank 0 join", os.environ.get("PYCCL_JOIN"), flush=True)
            sys.exit(3)
        time.sleep(30)
        """, "--elastic", "--max-restarts", "2", "--grace", "0", "--log-dir", str(logs), "-n", "2")
    assert r.returncode == 3, r.stderr
    assert r.stderr.count("starting a replacement") == 2 and "rank 0 failed (exit code 3)" in r.stderr, r.stderr
    assert [(logs / f"rank0.{k}.log").read_text() for k in range(3)] == \
        ["rank 0 join None\n", "rank 0 join 1\n", "rank 0 join 1\n"]
    assert (logs / "rank1.0.log").exists() and not (logs / "rank1.1.log").exists()
    launch_log = (logs / "launch.log").read_text()
    assert "restart 2 of 2" in launch_log and launch_log.rstrip().endswith("exit code 3"), launch_log


def test_launcher_elastic_no_restart_after_a_rank_finished(tmp_path):
    """A rank that fails after another exited 0 (a crash at exit after the work is done) is not
    restarted: the replacement would wait for a grow that never comes. The job fails at once."""
    r = _launch_prog(tmp_path, """
        import os, sys, time
        if os.environ["PYCCL_RANK"] == "1":
            time.sleep(1.0)
            sys.exit(7)
        """, "--elastic", "-n", "2")
    assert r.returncode == 7, r.stderr
    assert "starting a replacement" not in r.stderr and "rank 0 already finished (exit code 0)" in r.stderr, r.stderr


def test_launcher_elastic_no_restart_when_alone(tmp_path):
    r = _launch_prog(tmp_path, "import sys; sys.exit(5)\n", "--elastic", "-n", "1")
    assert r.returncode == 5 and "starting a replacement" not in r.stderr, r.stderr
    assert "no member of the job is running" in r.stderr, r.stderr


def test_launcher_elastic_stops_a_replacement_left_waiting(tmp_path):
    """Rank 1 crashes, its replacement waits for a grow; rank 0 then finishes (exit 0) without
    growing: the replacement is stopped at once and the job fails with rank 1's code."""
    t = time.monotonic()
    r = _launch_prog(tmp_path, """
        import os, sys, time
        if os.environ.get("PYCCL_JOIN") == "1":
            time.sleep(60)
        if os.environ["PYCCL_RANK"] == "1":
            sys.exit(6)
        time.sleep(1.0)
        """, "--elastic", "--grace", "1", "-n", "2")
    assert r.returncode == 6, r.stderr
    assert "rank(s) [1] wait to join, but no member of the job is running" in r.stderr, r.stderr
    assert time.monotonic() - t < 20


def test_launcher_elastic_stops_when_only_replacements_wait(tmp_path):
    """Every rank fails at start-up (one after the other): the first failures are restarted
    while a member still runs; once only replacements waiting for a grow are left, the job
    stops with the failure's code instead of waiting out their PYCCL_TIMEOUT."""
    r = _launch_prog(tmp_path, """
        import os, sys, time
        if os.environ.get("PYCCL_JOIN") == "1":
            time.sleep(60)                    # a replacement waiting for a grow that never comes
        time.sleep(0.5 * int(os.environ["PYCCL_RANK"]))
        sys.exit(4)
        """, "--elastic", "--grace", "1", "-n", "3")
    assert r.returncode == 4, r.stderr
    assert r.stderr.count("starting a replacement") == 2, r.stderr
    assert "no member of the job is running" in r.stderr, r.stderr


TORCH = """
import signal, torch, torch.distributed as dist
from pyccl.torch_backend.elastic import elastic_group, grow_group, shrink_group
if os.environ.get("PYCCL_JOIN") != "1":
    dist.init_process_group("gloo")           # torch's default group: never destroyed below
pg = elastic_group()
if os.environ.get("PYCCL_JOIN") != "1":
    t = torch.ones(8)
    dist.all_reduce(t, group=pg)
    if pg.rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        for i in range(50):
            dist.all_reduce(t, group=pg)
        raise SystemExit("no error after the peer died")
    except Exception:                         # torch hands pyccl's PeerFailure on as it is
        pass
    small = shrink_group(pg)
    pg.abort()
    pg = grow_group(small, 1)
    small.shutdown()
t = torch.full((5,), float(pg.rank() + 1))
dist.all_reduce(t, group=pg)
b = torch.full((3,), float(pg.rank()))
dist.broadcast(b, group_src=2, group=pg)
default = dist.get_world_size() if dist.is_initialized() else None
say("TORCH", pg.rank(), pg.size(), t[0].item(), b[0].item(), default)
pg.shutdown()
"""


@pytest.mark.timeout(TORCH_WAIT + 30)
def test_torch_group_shrinks_and_grows(tmp_path):
    """A "pyccl" group over 3 ranks loses rank 1, shrinks, grows to the replacement; the
    default (gloo) group still stands on the survivors."""
    pytest.importorskip("torch")
    r = _elastic_launch(tmp_path, TORCH, 3, TORCH_WAIT, TORCH_COMM_TIMEOUT)
    lines = sorted(ln for ln in r.stdout.splitlines() if ln.startswith("TORCH"))
    assert lines == ["TORCH 0 3 6.0 2.0 3", "TORCH 1 3 6.0 2.0 3", "TORCH 2 3 6.0 2.0 None"], r.stdout + r.stderr


@pytest.mark.timeout(TORCH_WAIT + 30)
def test_example_elastic_train_matches(tmp_path):
    """examples/elastic_train.py: rank 2 of 4 dies at step 5, the replacement joins, MATCH."""
    pytest.importorskip("torch")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "pyccl.launch", "--elastic", "-n", "4",
                        os.path.join(root, "examples", "elastic_train.py"), "--kill-rank", "2", "--kill-step", "5",
                        "--check", "--steps", "8"], capture_output=True, text=True, timeout=TORCH_WAIT,
                       env={**os.environ, "PYCCL_TIMEOUT": TORCH_COMM_TIMEOUT})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "joined as rank 3 of 4 at step 5" in r.stdout and r.stdout.strip().endswith("MATCH"), r.stdout + r.stderr


DIFFERENT_N = """
comm = pyccl.init()
try:
    comm.grow(1 + comm.rank, timeout=5)
    say("GREW")
except pyccl.InvalidArgument as e:
    say("ERROR", str(e).replace(chr(10), " "))
x = np.ones(2)
comm.all_reduce(x)
say("OLD-OK", x[0])
"""


def test_members_asking_for_different_n(tmp_path):
    out = _job(tmp_path, DIFFERENT_N, 2)
    for r in (0, 1):
        assert "different numbers of new ranks: {0: 1, 1: 2}" in out[f"m{r}"] and "OLD-OK 2.0" in out[f"m{r}"], out


@pytest.mark.timeout(150)
def test_kill_shrink_grow_rounds_leave_nothing_behind():
    """bench/elastic.py --leaks at 4 ranks, 3 rounds (the issue's check is 16 ranks, 10 rounds:
    the same script, see bench/JOURNAL.md): every round's all_reduce right, and the ranks that
    lived through all rounds hold as many fds, threads and shared-memory mappings after as
    before; /dev/shm holds no pyccl name of the job afterwards. The script exits 1 otherwise."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "bench", "elastic.py"), "--sizes", "4", "--rounds", "3",
                        "--leaks", "--timeout", "20"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "True" in r.stdout and "equal before and after on 2 of 2 ranks" in r.stdout, r.stdout
