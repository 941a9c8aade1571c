"""PYCCL_SHM_RESERVE (transports/shm.py, `Segment`): segments made unallocated after a statvfs
check (`check`, the default: what made grow and shrink fast, issue 31) or allocated up front
(`full`), and a /dev/shm too small for the job: a clear pyccl error on the ranks, never a
SIGBUS. The end-to-end tests run a real job in a mount namespace whose /dev/shm is a small
tmpfs (root and unshare(1) needed; skipped otherwise)."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from pyccl.errors import TransportError

shm = pytest.importorskip("pyccl.transports.shm")
if not shm.NATIVE_SHM:
    pytest.skip("the C core with shared memory is not built", allow_module_level=True)

pytestmark = pytest.mark.timeout(120)
MIB = 1 << 20


def _allocated(seg) -> int:
    return os.stat(shm.SHM_DIR + seg.name).st_blocks * 512


@pytest.mark.parametrize("mode", ["check", "full"])
def test_segment_memory_by_mode(monkeypatch, mode):
    monkeypatch.setenv("PYCCL_SHM_RESERVE", mode)
    seg = shm.Segment(shm.segment_name("test", "reserve"), 8 * MIB, create=True)
    try:
        assert seg.size == 8 * MIB
        if mode == "check":
            assert _allocated(seg) == 0 and shm._LAZY                   # nothing allocated yet
            seg.base[0] = b"x"
            seg.base[5 * MIB] = b"y"                                    # two pages touched: two allocated
            assert _allocated(seg) == 2 * 4096
        else:
            assert _allocated(seg) >= 8 * MIB and id(seg) not in shm._LAZY
        peer = shm.Segment(seg.name)                                    # a peer maps it by name
        assert peer.size == 8 * MIB and peer.base[0] == seg.base[0]
        peer.close()
    finally:
        seg.close()
    assert id(seg) not in shm._LAZY and not os.path.exists(shm.SHM_DIR + seg.name)


def test_check_refuses_what_does_not_fit(monkeypatch):
    """Room for one segment but not for the 4 this set-up makes on the host: refused, nothing left."""
    monkeypatch.setenv("PYCCL_SHM_RESERVE", "check")
    monkeypatch.setattr(shm, "_shm_free", lambda: 10 * MIB)
    name = shm.segment_name("test", "toobig")
    with pytest.raises(TransportError) as e:
        shm.Segment(name, 4 * MIB, create=True, share=4)
    msg = str(e.value)
    assert f"{10 * MIB} bytes free, less than the {16 * MIB} bytes" in msg and "4 segment(s)" in msg, msg
    assert "docker --shm-size" in msg and "PYCCL_SHM_RESERVE=full" in msg, msg
    assert not os.path.exists(shm.SHM_DIR + name)
    ok = shm.Segment(name, 4 * MIB, create=True, share=2)              # 8 MiB fits
    ok.close()


def test_check_counts_this_process_earlier_segments(monkeypatch):
    monkeypatch.setenv("PYCCL_SHM_RESERVE", "check")
    first = shm.Segment(shm.segment_name("test", "first"), 6 * MIB, create=True)
    try:
        monkeypatch.setattr(shm, "_shm_free", lambda: 10 * MIB)
        with pytest.raises(TransportError, match="6291456 bytes of this process's earlier segments"):
            shm.Segment(shm.segment_name("test", "second"), 6 * MIB, create=True)
    finally:
        first.close()


# ---- a real job with a small /dev/shm ------------------------------------------------------
PROG = """
import os, sys, numpy as np, pyccl
def say(*a):
    os.write(1, (" ".join(str(v) for v in a) + chr(10)).encode())   # one write: lines do not interleave
try:
    comm = pyccl.init()
    x = np.ones(1 << 20)                      # 8 MiB: through the collectives segment
    comm.all_reduce(x)
    say("RAN", comm.rank, x[0])
    comm.close()
except pyccl.PycclError as e:
    say("PYCCL-ERROR", os.environ["PYCCL_RANK"], type(e).__name__, str(e).replace(chr(10), " ")[:400])
    sys.exit(3)
"""


def _small_shm_job(tmp_path, shm_mib, mode, n=4):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private /dev/shm")
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent(PROG))
    cmd = (f"mount -t tmpfs -o size={shm_mib}m tmpfs /dev/shm && exec {sys.executable} -m pyccl.launch "
           f"--grace 20 -n {n} {prog}")
    return subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=100,
                          env={**os.environ, "PYCCL_SHM_RESERVE": mode, "PYCCL_TIMEOUT": "30"})


@pytest.mark.parametrize("mode", ["check", "full"])
def test_small_dev_shm_is_a_clear_error_not_a_sigbus(tmp_path, mode):
    """4 ranks need ~40 MiB of /dev/shm (rings 4 x 6 MiB, collectives 16 MiB); with 8 MiB every
    rank that fails says why in a pyccl error, and none dies of a signal."""
    r = _small_shm_job(tmp_path, 8, mode)
    out = r.stdout + r.stderr
    assert "SIGBUS" not in out and "killed by" not in out, out
    errors = [ln for ln in r.stdout.splitlines() if ln.startswith("PYCCL-ERROR")]
    assert r.returncode == 3 and errors, out
    want = "bytes free, less than" if mode == "check" else "No space left on device"
    assert any(want in ln and "/dev/shm" in ln for ln in errors), out


def test_enough_dev_shm_runs_in_check_mode(tmp_path):
    """The same job with 64 MiB: runs, and an 8 MiB all_reduce through the unallocated segment."""
    r = _small_shm_job(tmp_path, 64, "check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(ln for ln in r.stdout.splitlines() if ln.startswith("RAN")) == \
        [f"RAN {i} 4.0" for i in range(4)], r.stdout + r.stderr
