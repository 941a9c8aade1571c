"""Start some ranks of a pyccl job on this machine and report how each ended.

    python tests/rdma/vm_ranks.py --first 2 --count 2 --size 4 --store 10.78.0.1:4000 \
        --secret HEX --timeout 200 -- prog.py args...

pyccl.launch starts every rank of a job on one host; across the two VMs of two-vm.sh each
VM starts its share (ranks first..first+count-1) against a store that VM a hosts.  Every
rank gets PYCCL_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE/STORE_ADDR/JOB_SECRET.  Prints each rank's
output between `== rank R` lines, then `EXIT R rc` per rank (rc 124: killed at the timeout).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time


def start(first, count, size, store, secret, argv, env=None, outdir=None):
    """[(rank, Popen, output file path)] of ranks first..first+count-1 running argv."""
    outdir = outdir or tempfile.mkdtemp(prefix="ranks-")
    procs = []
    for i in range(count):
        r = first + i
        e = dict(os.environ if env is None else env)
        e.update(PYCCL_RANK=str(r), PYCCL_SIZE=str(size), PYCCL_LOCAL_RANK=str(i), PYCCL_LOCAL_SIZE=str(count),
                 PYCCL_STORE_ADDR=store, PYCCL_JOB_SECRET=secret)
        path = os.path.join(outdir, f"rank{r}.out")
        with open(path, "wb") as out:
            p = subprocess.Popen([sys.executable] + list(argv), env=e, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
        procs.append((r, p, path))
    return procs


def finish(procs, timeout):
    """{rank: (exit code, output)}; ranks still running after `timeout` s are killed (rc 124)."""
    deadline = time.monotonic() + timeout
    out = {}
    for r, p, path in procs:
        try:
            rc = p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = 124
        with open(path, "rb") as f:
            out[r] = (rc, f.read().decode(errors="replace"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--first", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--secret", required=True)
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("argv", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    res = finish(start(a.first, a.count, a.size, a.store, a.secret, argv), a.timeout)
    for r, (rc, text) in sorted(res.items()):
        sys.stdout.write(f"== rank {r}\n{text}\n")
    for r, (rc, _) in sorted(res.items()):
        sys.stdout.write(f"EXIT {r} {rc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
