"""`python -m pyccl.launch -n N prog.py args…`: start N local ranks, no MPI needed.

The launcher hosts the rendezvous store, makes a fresh job secret, and gives every child
PYCCL_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE/STORE_ADDR/JOB_SECRET. If a rank fails, the
others get --grace seconds, then SIGTERM, then SIGKILL, and the launcher exits with the
failing rank's code (128+signal for a signal), naming the rank on stderr.
"""
import argparse
import os
import secrets
import signal
import subprocess
import sys
import time

from .store import StoreServer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyccl.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--nproc", type=int, required=True, help="number of ranks")
    p.add_argument("--master-addr", default="127.0.0.1", help="address the store listens on")
    p.add_argument("--port", type=int, default=0, help="store port (0: any free port)")
    p.add_argument("--grace", type=float, default=5.0, help="seconds the others get after a rank fails")
    p.add_argument("-m", dest="module", help="run a module (like python -m)")
    p.add_argument("program", nargs=argparse.REMAINDER, help="script and its arguments")
    args = p.parse_args(argv)
    if args.nproc < 1:
        p.error("-n must be at least 1")
    if not args.module and not args.program:
        p.error("give a script or -m module")
    secret = secrets.token_bytes(32)
    server = StoreServer(args.master_addr, args.port, secret)
    host, port = server.address
    cmd = [sys.executable] + (["-m", args.module] + args.program if args.module else args.program)
    children = []
    for rank in range(args.nproc):
        env = dict(os.environ, PYCCL_RANK=str(rank), PYCCL_SIZE=str(args.nproc), PYCCL_LOCAL_RANK=str(rank),
                   PYCCL_LOCAL_SIZE=str(args.nproc), PYCCL_STORE_ADDR=f"{host}:{port}", PYCCL_JOB_SECRET=secret.hex())
        children.append(subprocess.Popen(cmd, env=env))

    def forward(signum, _frame):
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _supervise(children, args.grace)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        server.close()


def _code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def _supervise(children, grace) -> int:
    failed = None
    while True:
        running = [c for c in children if c.poll() is None]
        if failed is None:
            for rank, c in enumerate(children):
                if c.returncode not in (None, 0):
                    failed = (rank, c.returncode, time.monotonic())
                    how = f"signal {-c.returncode}" if c.returncode < 0 else f"exit code {c.returncode}"
                    print(f"pyccl.launch: rank {rank} failed ({how}); stopping the others", file=sys.stderr)
                    break
        if not running:
            break
        if failed is not None and time.monotonic() - failed[2] > grace:
            for c in running:
                c.terminate()
            deadline = time.monotonic() + 3
            while any(c.poll() is None for c in running) and time.monotonic() < deadline:
                time.sleep(0.05)
            for c in running:
                if c.poll() is None:
                    c.kill()
            for c in running:
                c.wait()
            break
        time.sleep(0.05)
    return _code(failed[1]) if failed else 0


if __name__ == "__main__":
    sys.exit(main())
