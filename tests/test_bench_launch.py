"""The benchmarks start the ways the README and bench/collectives.py say: `mpirun -n 2 bench/x.py`
(exec bit + shebang), `mpirun -n 2 python bench/x.py`, `torchrun ... bench/x.py` and
`python -m pyccl.launch -n 2 bench/x.py`; each run checks its own results (#wrong 0)."""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = sorted(glob.glob(os.path.join(ROOT, "bench", "*.py")))
OP_SCRIPTS = ["allreduce.py", "allgather.py", "alltoall.py", "broadcast.py", "reduce.py", "reduce_scatter.py"]
ARGS = ["-b", "8", "-e", "4K", "-f", "32", "-n", "2", "-w", "1"]


def _mpiexec():
    """MPICH's/Open MPI's launcher of this Python's installation (pip's `mpich` puts it beside
    python); a pyenv shim would put its own python first on PATH, so prefer the real file."""
    for d in (os.path.dirname(sys.executable), os.path.join(sys.base_prefix, "bin")):
        for name in ("mpiexec", "mpirun"):
            if os.access(os.path.join(d, name), os.X_OK):
                return os.path.join(d, name)
    return shutil.which("mpiexec") or shutil.which("mpirun")


def _env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYCCL_", "MASTER_", "OMPI_", "PMI_", "SLURM_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    # `#!/usr/bin/env python3` must find this interpreter (the one with pyccl installed)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYCCL_TIMEOUT"] = "60"
    return env


def _launch(kind, script):
    path = os.path.join("bench", script)
    if kind in ("mpirun", "mpirun python"):
        mpi = _mpiexec()
        if mpi is None or importlib.util.find_spec("mpi4py") is None:
            pytest.skip("needs mpiexec/mpirun and mpi4py (pip install mpich mpi4py)")
        return [mpi, "-n", "2"] + ([sys.executable] if kind == "mpirun python" else []) + [path]
    if kind == "torchrun":
        if importlib.util.find_spec("torch") is None:
            pytest.skip("torchrun needs torch")
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", path]
    return [sys.executable, "-m", "pyccl.launch", "-n", "2", path]


def test_every_bench_script_has_shebang_and_exec_bit():
    assert BENCH
    for path in BENCH:
        with open(path) as f:
            assert f.readline().rstrip("\n") == "#!/usr/bin/env python3", path
        assert os.access(path, os.X_OK), f"{path} is not executable"
    if shutil.which("git") and os.path.exists(os.path.join(ROOT, ".git")):
        out = subprocess.run(["git", "ls-files", "-s", "bench"], cwd=ROOT, capture_output=True, text=True).stdout
        modes = {line.split("\t")[1]: line.split()[0] for line in out.splitlines() if line.endswith(".py")}
        assert all(m == "100755" for m in modes.values()), f"not executable in git: {modes}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind,script", [("mpirun", s) for s in OP_SCRIPTS] +
                         [("mpirun python", "allreduce.py"), ("torchrun", "allreduce.py"),
                          ("pyccl.launch", "allreduce.py")])
def test_bench_runs_under_launcher(kind, script):
    cmd = _launch(kind, script) + ARGS
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, f"{' '.join(cmd)}: rc {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    rows = [line.split() for line in r.stdout.splitlines() if line.strip().startswith("pyccl ")]
    # sizes 8 and 256 B, one row each (only rank 0 prints), every result right
    assert [int(row[1]) for row in rows] == [8, 256], r.stdout
    assert all(row[9] == "0" for row in rows), r.stdout
    assert "2 ranks" in r.stdout


@pytest.mark.timeout(60)
def test_plot_without_matplotlib_says_so_before_running():
    if importlib.util.find_spec("matplotlib") is not None:
        pytest.skip("matplotlib is installed")
    r = subprocess.run([sys.executable, "bench/allreduce.py", "--plot", "x.png"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=50)
    assert r.returncode != 0 and 'pip install "pyccl[plot]"' in r.stderr, r.stderr
    assert "time(us)" not in r.stdout          # nothing was measured


@pytest.mark.timeout(60)
def test_compare_mpi_under_pyccl_launch_says_why_it_is_left_out():
    r = subprocess.run([sys.executable, "-m", "pyccl.launch", "-n", "2", "bench/allreduce.py", "--compare", "mpi",
                        "-b", "8", "-e", "8", "-n", "1", "-w", "0"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=50)
    assert r.returncode == 0, r.stderr
    assert "# mpi left out: MPI needs its ranks started by mpirun/mpiexec" in r.stdout, r.stdout
