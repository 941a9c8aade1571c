"""Launcher detection (pure: dicts in, LaunchInfo out), store opening, and `python -m pyccl.launch`
with real child processes: rendezvous, failure propagation, signals."""
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from pyccl import env
from pyccl.env import LaunchInfo, detect, open_store
from pyccl.errors import InvalidArgument
from pyccl.launch import main as launch_main

pytestmark = pytest.mark.timeout(30)

SECRET = "ab" * 32


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- detect() --------------------------------------------------------------------------------------
def test_detect_pyccl_launch():
    info = detect({"PYCCL_RANK": "2", "PYCCL_SIZE": "4", "PYCCL_LOCAL_RANK": "0", "PYCCL_LOCAL_SIZE": "2",
                   "PYCCL_STORE_ADDR": "10.0.0.5:4567", "PYCCL_JOB_SECRET": SECRET,
                   "RANK": "9", "WORLD_SIZE": "10"})         # pyccl.launch wins over torchrun's variables
    assert info == LaunchInfo(2, 4, 0, 2, "pyccl.launch", "10.0.0.5", 4567, bytes.fromhex(SECRET))


def test_detect_pyccl_launch_needs_store_addr():
    with pytest.raises(InvalidArgument, match="PYCCL_STORE_ADDR"):
        detect({"PYCCL_RANK": "0", "PYCCL_SIZE": "2"})


def test_detect_torchrun():
    info = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "node1", "MASTER_PORT": "29500", "OMPI_COMM_WORLD_RANK": "0",
                   "OMPI_COMM_WORLD_SIZE": "1"})
    assert info == LaunchInfo(3, 8, 1, 4, "torchrun", "node1", 29500, None)


def test_detect_openmpi():
    info = detect({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
                   "OMPI_COMM_WORLD_LOCAL_SIZE": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert info == LaunchInfo(5, 6, 2, 3, "openmpi", None, None, None)
    info = detect({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "PYCCL_STORE_ADDR": "[::1]:7000",
                   "PYCCL_JOB_SECRET": SECRET})
    assert (info.store_host, info.store_port, info.secret) == ("::1", 7000, bytes.fromhex(SECRET))


def test_detect_mpich():
    info = detect({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
                   "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert info == LaunchInfo(1, 2, 1, 2, "mpich", "h0", 1234, None)


def test_detect_slurm():
    e = {"SLURM_PROCID": "6", "SLURM_NTASKS": "7", "SLURM_LOCALID": "0", "SLURM_NODEID": "3",
         "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "2",
         "SLURM_STEP_NODELIST": "gpu[003-005,9],cpu1", "SLURM_LAUNCH_NODE_IPADDR": "10.1.1.1"}
    info = detect(e)
    assert (info.rank, info.size, info.local_rank, info.local_size, info.launcher) == (6, 7, 0, 1, "slurm")
    assert info.store_host == "gpu003"                        # rank 0's node, not the launch node
    assert 20000 <= info.store_port < 32000
    assert detect(dict(e, SLURM_STEP_ID="0")).store_port == 20000 + 123456 % 12000
    assert detect(dict(e)).store_port == info.store_port      # every rank derives the same port
    assert detect(dict(e, SLURM_STEP_ID="3")).store_port != info.store_port
    assert detect(dict(e, SLURM_NODEID="1", SLURM_LOCALID="1")).local_size == 2
    assert detect(dict(e, SLURM_NTASKS_PER_NODE="4", SLURM_LOCALID="3")).local_size == 4
    e2 = {k: v for k, v in e.items() if "NODELIST" not in k}
    assert detect(e2).store_host == "10.1.1.1"
    assert detect(dict(e, MASTER_ADDR="m", MASTER_PORT="99")).store_port == 99


def test_slurm_helpers():
    assert env.slurm_first_host("node17") == "node17"
    assert env.slurm_first_host("a,b") == "a"
    assert env.slurm_first_host("rack[1-2]-n[07-09]") == "rack1-n07"
    assert env.slurm_tasks_on_node("4", 2) == 4
    assert [env.slurm_tasks_on_node("2(x2),3", i) for i in range(3)] == [2, 2, 3]


def test_detect_single_process():
    assert detect({}) == LaunchInfo(0, 1, 0, 1, "none", None, None, None)


@pytest.mark.parametrize("bad, match", [
    ({"RANK": "4", "WORLD_SIZE": "4"}, "rank 4 of size 4"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x'"),
    ({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "2"}, "local rank 2"),
    ({"PYCCL_RANK": "0", "PYCCL_SIZE": "1", "PYCCL_STORE_ADDR": "nohost"}, "host:port"),
    ({"PYCCL_JOB_SECRET": "not-hex"}, "hex"),
])
def test_detect_rejects_nonsense(bad, match):
    with pytest.raises(InvalidArgument, match=match):
        detect(bad)


def test_env_helpers():
    assert env.env_float("PYCCL_X", 1.5, {}) == 1.5
    assert env.env_float("PYCCL_X", 1.5, {"PYCCL_X": " 2.5 "}) == 2.5
    assert env.env_int("PYCCL_X", 3, {"PYCCL_X": "0x10"}) == 16
    assert env.env_int("PYCCL_X", 3, {"PYCCL_X": ""}) == 3
    with pytest.raises(InvalidArgument, match="PYCCL_X"):
        env.env_int("PYCCL_X", 3, {"PYCCL_X": "many"})
    assert env.default_timeout({}) == 300.0
    assert env.default_timeout({"PYCCL_TIMEOUT": "12"}) == 12.0
    with pytest.raises(InvalidArgument, match="PYCCL_TIMEOUT"):
        env.default_timeout({"PYCCL_TIMEOUT": "-1"})


def test_socket_interface_address():
    assert env.socket_interface_address("127.0.0.1", {}) == "127.0.0.1"
    assert env.socket_interface_address("localhost", {}) == "127.0.0.1"
    assert env.socket_interface_address("127.0.0.1", {"PYCCL_SOCKET_IFNAME": "nosuchif0,lo"}) == "127.0.0.1"
    assert env.socket_interface_address(None, {"PYCCL_SOCKET_IFNAME": "=lo"}) == "127.0.0.1"
    with pytest.raises(InvalidArgument, match="nosuchif0"):
        env.socket_interface_address(None, {"PYCCL_SOCKET_IFNAME": "=nosuchif0"})
    addr = env.socket_interface_address(None, {})
    socket.inet_aton(addr)                                    # some IPv4 address, whatever the routes


# ---- open_store() ------------------------------------------------------------------------------
def test_open_store_single_process():
    info = detect({})
    store = open_store(info, timeout=5, environ={})
    store.set("k", b"v")
    assert store.get("k") == b"v" and info.secret and info.store_host == "127.0.0.1"
    store.close()


@pytest.mark.parametrize("launcher_env", [
    {"OMPI_COMM_WORLD_SIZE": "2"},
    {"SLURM_NTASKS": "2"},
], ids=["openmpi", "slurm"])
def test_open_store_rank0_hosts(launcher_env, monkeypatch):
    # Both "ranks" live in this process: keep rank 0's wait-at-exit bookkeeping out of pytest's exit.
    monkeypatch.setattr(env, "_HOSTED", {})
    monkeypatch.setattr(env, "_JOINED", set())
    port = _free_port()
    rank_var = "OMPI_COMM_WORLD_RANK" if "OMPI_COMM_WORLD_SIZE" in launcher_env else "SLURM_PROCID"
    base = dict(launcher_env, PYCCL_STORE_ADDR=f"127.0.0.1:{port}", PYCCL_JOB_SECRET=SECRET)
    stores = {}

    def rank(r):
        e = dict(base, **{rank_var: str(r)})
        stores[r] = open_store(detect(e), timeout=10, environ=e)
    t = threading.Thread(target=rank, args=(1,))
    t.start()                                   # rank 1 may start first: it retries until rank 0 serves
    time.sleep(0.2)
    rank(0)
    t.join(10)
    stores[1].set("from1", b"hi")
    assert stores[0].get("from1", timeout=5) == b"hi"
    again = open_store(detect(dict(base, **{rank_var: "0"})), timeout=5, environ=base)   # reuses the server
    assert again.get("from1") == b"hi"


def test_open_store_weak_secret_warns(caplog):
    port = _free_port()
    e = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "42", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(port)}
    info = detect(e)
    with caplog.at_level(logging.WARNING, logger="pyccl"):
        store = open_store(info, timeout=5, environ=e)
    assert "weak" in caplog.text and info.secret
    store.set("a", b"b")


def test_open_store_mpi_without_address_explains(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)          # as if mpi4py were not installed
    e = {"PMI_RANK": "1", "PMI_SIZE": "2"}
    with pytest.raises(InvalidArgument, match="PYCCL_STORE_ADDR.*MASTER_ADDR.*mpi4py"):
        open_store(detect(e), timeout=1, environ=e)


EARLY_EXIT = textwrap.dedent("""
    import os, sys, time
    from pyccl import env
    info = env.detect()
    if info.rank != 0:
        time.sleep(1.0)                         # rank 0 is long gone from user code by now
    store = env.open_store(info, timeout=20)
    store.set(f"r{info.rank}", b"1")
    if info.rank != 0:
        store.wait([f"r{r}" for r in range(info.size)])
        os.write(1, f"rank {info.rank} ok {info.launcher}\\n".encode())
""")


def test_store_host_waits_for_the_others_at_exit(tmp_path):
    """Rank 0 hosts the store under Slurm/MPI and finishes first: the others must still rendezvous."""
    script = tmp_path / "early.py"
    script.write_text(EARLY_EXIT)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PYCCL_", "SLURM_", "OMPI_", "PMI_"))}
    base.update(SLURM_NTASKS="3", SLURM_TASKS_PER_NODE="3", SLURM_JOB_ID="4242", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                PYCCL_JOB_SECRET=SECRET)
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=dict(base, SLURM_PROCID=str(r), SLURM_LOCALID=str(r))) for r in range(3)]
    outs = [p.communicate(timeout=25)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert outs[1:] == ["rank 1 ok slurm\n", "rank 2 ok slurm\n"]


@pytest.mark.skipif(shutil.which("mpirun") is None or importlib.util.find_spec("mpi4py") is None,
                    reason="needs mpirun and mpi4py")
def test_mpi_broadcasts_store_address_and_secret(tmp_path):
    script = tmp_path / "early.py"
    script.write_text(EARLY_EXIT)
    env_ = {k: v for k, v in os.environ.items() if not k.startswith(("PYCCL_", "MASTER_", "SLURM_"))}
    r = subprocess.run(["mpirun", "-n", "3", sys.executable, str(script)], capture_output=True, text=True,
                       timeout=25, env=env_, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(r.stdout.splitlines()) in (["rank 1 ok mpich", "rank 2 ok mpich"],
                                             ["rank 1 ok openmpi", "rank 2 ok openmpi"])
    assert "weak" not in r.stderr                            # the secret came from rank 0 over MPI


def test_open_store_torchrun():
    pytest.importorskip("torch.distributed", reason="torch is not installed")
    e = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    store = open_store(detect(e), timeout=10, environ=e)
    store.set("x", b"1")
    assert store.get("x") == b"1" and store.add("c", 2) == 2


# ---- python -m pyccl.launch ----------------------------------------------------------------------
RENDEZVOUS = textwrap.dedent("""
    import os, sys
    from pyccl import env
    info = env.detect()
    assert info.launcher == "pyccl.launch", info
    assert info.size == 3 and info.local_size == 3 and info.local_rank == info.rank, info
    # torchrun's variables too (an outer RANK=5/WORLD_SIZE=9 is replaced), for init_process_group
    assert os.environ["RANK"] == str(info.rank) and os.environ["WORLD_SIZE"] == str(info.size)
    assert os.environ["LOCAL_RANK"] == str(info.rank) and int(os.environ["MASTER_PORT"]) > 0
    store = env.open_store(info, timeout=20)
    store.set(f"hello/{info.rank}", str(os.getpid()).encode())
    store.wait([f"hello/{r}" for r in range(info.size)])
    n = store.add("arrived", 1)
    pids = [store.get(f"hello/{r}").decode() for r in range(info.size)]
    # one write() per line: the ranks share the launcher's stdout, and short writes are atomic
    os.write(1, f"rank {info.rank} of {info.size} sees {len(set(pids))} pids args={sys.argv[1:]}\\n".encode())
""")


def _run_launcher(args, timeout=25, **kw):
    return subprocess.run([sys.executable, "-m", "pyccl.launch", *args], capture_output=True, text=True, check=False,
                          timeout=timeout, **kw)


def test_launch_three_ranks_rendezvous(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(RENDEZVOUS)
    r = _run_launcher(["-n", "3", str(script), "-n", "7", "--flag"],
                      env=dict(os.environ, RANK="5", WORLD_SIZE="9"))
    assert r.returncode == 0, r.stderr
    lines = sorted(line for line in r.stdout.splitlines() if line.startswith("rank"))
    assert lines == [f"rank {i} of 3 sees 3 pids args=['-n', '7', '--flag']" for i in range(3)]


def test_launch_runs_torch_init_process_group_without_arguments(tmp_path):
    pytest.importorskip("torch")
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent("""
        import os, torch, torch.distributed as dist, pyccl
        dist.init_process_group("pyccl")
        t = torch.full((5,), float(dist.get_rank() + 1))
        dist.all_reduce(t)
        os.write(1, f"rank {dist.get_rank()}/{dist.get_world_size()} sum {t[0].item():g}\\n".encode())
        dist.destroy_process_group()
    """))
    r = _run_launcher(["-n", "2", str(script)], timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(line for line in r.stdout.splitlines() if line.startswith("rank")) == \
        ["rank 0/2 sum 3", "rank 1/2 sum 3"]


def test_launch_module(tmp_path):
    (tmp_path / "rdv_mod.py").write_text(RENDEZVOUS)
    r = _run_launcher(["-n", "3", "-m", "rdv_mod", "--x", "-n", "1"],
                      env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("sees 3 pids args=['--x', '-n', '1']") == 3


FAILING = textwrap.dedent("""
    import os, sys, time
    rank = int(os.environ["PYCCL_RANK"])
    open(os.path.join(sys.argv[1], f"pid{rank}"), "w").write(str(os.getpid()))
    if rank == 1 and sys.argv[2] != "kill":
        time.sleep(0.5)
        sys.exit(int(sys.argv[2]))
    if sys.argv[2] == "kill" and rank == 2:
        time.sleep(0.5)
        os.kill(os.getpid(), 9)
    time.sleep(60)
""")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_launch_failure_stops_the_others(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(FAILING)
    t0 = time.monotonic()
    r = _run_launcher(["-n", "3", str(script), str(tmp_path), "3"])
    elapsed = time.monotonic() - t0
    assert r.returncode == 3, r.stderr
    assert elapsed < 20
    assert "rank 1" in r.stderr and "exit code 3" in r.stderr
    pids = [int((tmp_path / f"pid{i}").read_text()) for i in range(3)]
    assert not any(_alive(p) for p in pids)


def test_launch_signal_death_exit_code(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(FAILING)
    r = _run_launcher(["-n", "3", "--grace", "0.5", str(script), str(tmp_path), "kill"])
    assert r.returncode == 128 + 9, r.stderr
    assert "rank 2" in r.stderr and "SIGKILL" in r.stderr


def test_launch_forwards_sigterm(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        open(os.path.join(sys.argv[1], "ready" + os.environ["PYCCL_RANK"]), "w").close()
        time.sleep(60)
    """))
    p = subprocess.Popen([sys.executable, "-m", "pyccl.launch", "-n", "2", str(script), str(tmp_path)],
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 15
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=15)
    assert rc == 128 + signal.SIGTERM, p.stderr.read()


def test_launch_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        launch_main(["-n", "2"])
    assert e.value.code == 2
    assert "script" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch_main(["-n", "0", "x.py"])


def test_launch_main_in_process(tmp_path):
    script = tmp_path / "ok.py"
    script.write_text("import os; assert os.environ['PYCCL_SIZE'] == '2'\n")
    assert launch_main(["-n", "2", str(script)]) == 0
