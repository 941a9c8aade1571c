#!/usr/bin/env python3
"""Start-up cost of a communicator: set-up time, CPU seconds, fds and store requests per rank.

    PYCCL_TRANSPORT=tcp python bench/startup.py --sizes 8,16,32,64 [--repeat 3] [--json out.json]

For each N it runs ``python -m pyccl.launch -n N bench/startup.py --worker``. Each rank notes
the moment its imports are done, then creates the world communicator (``pyccl.init()``) and
runs its first collective (an 8-byte all_reduce), then a barrier. Measured per rank:

* set-up time: from "all ranks imported" (the last rank's import done) to "first collective
  done" (the last rank's), so imports are not counted;
* CPU seconds spent in set-up + first collective (``resource.getrusage`` deltas, user + sys):
  on a 2-core machine wall time only shows the sharing, CPU time shows the work;
* open fds after the first collective and after the barrier (``/proc/self/fd``);
* store requests (counted by wrapping ``TCPStore._call``, so the same count works on code
  that predates ``pyccl.store.STATS``), and the bootstrap's own counters when present.

`PYCCL_TRANSPORT=tcp` makes the ranks of this host behave like separate hosts. The launcher's
store server runs in the launcher process (not counted per rank).
"""
import argparse
import json
import os
import subprocess
import sys
import time


def worker() -> None:
    t_imported = time.time()
    import resource
    import numpy as np
    import pyccl
    from pyccl import store as _store
    t_imported = time.time()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    calls = [0]
    orig = _store.TCPStore._call

    def counted(self, *a, **k):
        calls[0] += 1
        return orig(self, *a, **k)
    _store.TCPStore._call = counted
    comm = pyccl.init()
    x = np.ones(1, np.float64)
    comm.all_reduce(x)
    t_done = time.time()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    fds_first = len(os.listdir("/proc/self/fd"))
    req_first = calls[0]
    comm.barrier()
    fds_barrier = len(os.listdir("/proc/self/fd"))
    try:
        from pyccl.bootstrap import COUNTERS
        boot = dict(COUNTERS)
    except ImportError:
        boot = {}
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    assert x[0] == comm.size, x
    line = json.dumps({"rank": comm.rank, "size": comm.size, "imported": t_imported, "done": t_done,
                       "cpu": cpu, "fds": fds_first, "fds_barrier": fds_barrier, "requests": req_first,
                       "requests_barrier": calls[0], "boot": boot, "conns": len(comm.conns)})
    comm.close()
    os.write(1, ("STARTUP " + line + "\n").encode())


def run_one(n: int, timeout: float) -> dict:
    env = dict(os.environ)
    env.setdefault("PYCCL_TRANSPORT", "tcp")
    cmd = [sys.executable, "-m", "pyccl.launch", "-n", str(n), os.path.abspath(__file__), "--worker"]
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.time() - t0
    rows = [json.loads(line[8:]) for line in r.stdout.splitlines() if line.startswith("STARTUP ")]
    if r.returncode != 0 or len(rows) != n:
        raise SystemExit(f"N={n}: launch failed (rc {r.returncode}, {len(rows)} of {n} ranks reported)\n"
                         f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return {
        "N": n,
        "setup_s": max(x["done"] for x in rows) - max(x["imported"] for x in rows),
        "cpu_per_rank_s": sum(x["cpu"] for x in rows) / n,
        "cpu_max_s": max(x["cpu"] for x in rows),
        "fds_max": max(x["fds"] for x in rows),
        "fds_barrier_max": max(x["fds_barrier"] for x in rows),
        "requests_max": max(x["requests"] for x in rows),
        "requests_mean": sum(x["requests"] for x in rows) / n,
        "conns_max": max(x["conns"] for x in rows),
        "boot": rows[0]["boot"],
        "launch_wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="8,16,32,64")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", help="append every result as one JSON line to this file")
    ap.add_argument("--label", default="", help="a name for this code version in the output")
    a = ap.parse_args()
    if a.worker:
        worker()
        return
    print(f"# bench/startup.py {a.label} PYCCL_TRANSPORT={os.environ.get('PYCCL_TRANSPORT', 'tcp')} "
          f"cores={len(os.sched_getaffinity(0))}")
    print(f"{'N':>5} {'setup s':>8} {'cpu/rank s':>10} {'cpu max s':>9} {'fds':>4} {'fds+barrier':>11} "
          f"{'store req/rank':>14} {'conns':>5}")
    for n in [int(s) for s in a.sizes.split(",")]:
        for _ in range(a.repeat):
            res = run_one(n, a.timeout)
            res["label"] = a.label
            print(f"{n:>5} {res['setup_s']:>8.2f} {res['cpu_per_rank_s']:>10.3f} {res['cpu_max_s']:>9.3f} "
                  f"{res['fds_max']:>4} {res['fds_barrier_max']:>11} {res['requests_max']:>14} "
                  f"{res['conns_max']:>5}", flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
