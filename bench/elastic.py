#!/usr/bin/env python3
"""Elastic jobs: time kill -> shrink -> grow(1), and count what each round leaves behind.

    python bench/elastic.py --sizes 8,32,64 --rounds 3          # times per N
    python bench/elastic.py --sizes 16 --rounds 10 --leaks      # the 10-round leak count
    python bench/elastic.py --sizes 64 --trace --profile 5      # where a grow's span goes

The driver hosts a store (as pyccl.launch does), starts N ranks with pyccl.launch's variables
and one waiting joiner per round (`pyccl.join()`). Each round: a barrier, one rank exits
(`os._exit`, as a crash after a barrier), the others' next all_reduce fails, they `shrink()`
and run an all_reduce on the survivors' communicator, a barrier, then `grow(1)` and an
all_reduce on the grown one (checked: every rank's value summed). The round's number goes to the
joiner by a broadcast after that all_reduce, outside the timing (before 2026-12-08 it came
first, inside the grow's span). Times are spans across
ranks (one host, one clock): from the first rank entering shrink (grow) to the last rank done
with the first all_reduce on the new communicator. Store requests per member during the grow
(pyccl.store.STATS): the grow's own (leader included), and "+ building": those of making the
new communicator (the same for shrink and split: shm set-up). --leaks: fds and threads of the ranks that live through every round,
pyccl shared-memory mappings (/proc/self/maps) and /dev/shm names pyccl*, before the first
round and after the last (old communicators closed, the current one open), and /dev/shm
before and after the whole job. --trace: per round, when the last member (and the joiner) had
the leader's decision, had constructed the new communicator, passed its barrier and the
all_reduce, and the CPU time of a member's grow: on 2 cores a span is bounded below by
the ranks' CPU time over 2, so it tells waiting from work. --profile R: cProfile rank R's grow
(CPU time per function: what a member spends, not what it waits).
"""
import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)


def _counts():
    """(open fds, threads, pyccl shared-memory mappings of this process, /dev/shm pyccl names)."""
    import threading
    with open("/proc/self/maps") as f:
        maps = len({ln.split()[-2 if ln.rstrip().endswith("(deleted)") else -1] for ln in f if "pyccl" in ln})
    return len(os.listdir("/proc/self/fd")), threading.active_count(), maps, len(_shm({os.getpid()}))


def rank_main(rounds: int, victims: list, profile=None) -> None:
    import numpy as np

    import pyccl
    from pyccl import elastic
    from pyccl.store import STATS
    in_build = [0]
    marks = []                                # --trace: decided, constructed, built (barrier done)
    build = elastic._build

    def counted_build(cls, *a, **k):          # requests of building the communicator itself
        before = STATS["requests"]
        marks[:] = [time.time()]

        def make(*a2, **k2):
            c = cls(*a2, **k2)
            marks.append(time.time())
            return c
        try:
            return build(make, *a, **k)
        finally:
            in_build[0] += STATS["requests"] - before
            marks.append(time.time())
    elastic._build = counted_build
    prof = None
    if profile is not None and os.environ.get("ELASTIC_ROLE") != "joiner":
        import cProfile
        prof = cProfile.Profile(time.process_time)     # CPU time: on 2 cores, waiting is not work
    joined = os.environ.get("ELASTIC_ROLE") == "joiner"
    joined_at = [time.time()]
    comm = pyccl.join() if joined else pyccl.init()
    first = 0
    if joined:
        z = np.full(3, comm.rank + 1.0)
        comm.all_reduce(z)                       # the grow's first all_reduce, with the members
        t = time.time()
        r = np.zeros(1, np.int64)
        comm.broadcast(r, root=0)                # which round took us: rank 0 says (after the timing)
        first = int(r[0]) + 1
        out_join = {"k": first - 1, "marks": [joined_at[0]] + marks + [t]}
    x = np.ones(8, np.float32)
    if not joined:
        comm.all_reduce(x)
    before = _counts()
    out = {"pid": os.getpid(), "rounds": [], "join": out_join if joined else None}
    for k in range(first, rounds):
        comm.barrier()
        if comm.rank == victims[k] % comm.size:
            os._exit(0)
        try:
            for _ in range(20):
                comm.all_reduce(x)
            raise SystemExit("no error after a rank exited")
        except (pyccl.PeerFailure, pyccl.Timeout):
            pass
        t0 = time.time()
        small = comm.shrink()
        y = np.ones(5)
        small.all_reduce(y)
        t1 = time.time()
        comm.close()
        small.barrier()
        req, in_build[0] = STATS["requests"], 0
        me = small.rank
        if prof is not None and me == profile:
            prof.enable()
        c2 = time.process_time()
        t2 = time.time()
        new = small.grow(1)
        req = (STATS["requests"] - req - in_build[0], in_build[0])
        tb = time.time()
        z = np.full(3, new.rank + 1.0)
        new.all_reduce(z)
        t3 = time.time()
        cpu = time.process_time() - c2
        new.broadcast(np.array([k], np.int64), root=0)     # the round, for the joiner (not timed)
        if prof is not None and me == profile:
            prof.disable()
            prof.dump_stats(f"{os.environ.get('ELASTIC_PROFILE_OUT', '/tmp/elastic')}.rank{me}.round{k}.prof")
            prof = cProfile.Profile(time.process_time)     # each round's file holds that round only
        n = new.size
        ok = bool(y[0] == small.size and z[0] == n * (n + 1) / 2)
        small.close()
        comm = new
        out["rounds"].append({"k": k, "shrink": [t0, t1], "grow": [t2, t3], "ok": ok, "req": req,
                              "size": n, "marks": [t2] + marks + [tb, t3], "cpu": cpu})
    comm.barrier()
    out["before"], out["after"] = before, _counts()
    out["joined"] = joined
    os.write(1, ("RESULT " + json.dumps(out) + "\n").encode())
    comm.close()


def _shm(pids=None):
    """/dev/shm names of pyccl (``pyccl-<uid>-<creator pid>-...``), of the creators `pids` only
    (other developers' jobs share the machine)."""
    names = [f for f in os.listdir("/dev/shm") if f.startswith("pyccl")]
    if pids is not None:
        names = [f for f in names if f.split("-")[2:3] in ([str(p)] for p in pids)]
    return sorted(names)


def run(n: int, rounds: int, timeout: float, profile=None) -> dict:
    from pyccl.store import StoreServer
    key = secrets.token_bytes(32)
    server = StoreServer("127.0.0.1", 0, key)
    victims = [1 + (k * 5) % (n - 1) for k in range(rounds)]   # never rank 0: its counts span every round
    env = {**os.environ, "PYCCL_STORE_ADDR": f"127.0.0.1:{server.address[1]}", "PYCCL_JOB_SECRET": key.hex(),
           "PYCCL_TIMEOUT": str(timeout)}
    args = [sys.executable, HERE, "--rank", str(rounds), ",".join(map(str, victims))]
    if profile is not None:
        args += ["--profile", str(profile)]
    shm_before = _shm()              # any job's: this one has not started
    procs = [subprocess.Popen(args, env={**env, "PYCCL_RANK": str(r), "PYCCL_SIZE": str(n),
                                         "PYCCL_LOCAL_RANK": str(r), "PYCCL_LOCAL_SIZE": str(n)},
                              stdout=subprocess.PIPE, text=True) for r in range(n)]
    procs += [subprocess.Popen(args, env={**env, "ELASTIC_ROLE": "joiner", "PYCCL_LOCAL_SIZE": str(n)},
                               stdout=subprocess.PIPE, text=True) for _ in range(rounds)]
    results = []
    try:
        for p in procs:
            text = p.communicate(timeout=timeout + 60 * rounds)[0]
            results += [json.loads(ln[7:]) for ln in text.splitlines() if ln.startswith("RESULT ")]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        server.close()
    time.sleep(0.2)
    spans = {"shrink": [], "grow": []}
    oks, reqs, builds = [], [], []
    for k in range(rounds):
        for what in spans:
            marks = [r2[what] for res in results for r2 in res["rounds"] if r2["k"] == k]
            if marks:
                spans[what].append(max(m[1] for m in marks) - min(m[0] for m in marks))
        oks += [r2["ok"] for res in results for r2 in res["rounds"] if r2["k"] == k]
        reqs += [r2["req"][0] for res in results for r2 in res["rounds"] if r2["k"] == k]
        builds += [r2["req"][1] for res in results for r2 in res["rounds"] if r2["k"] == k]
    trace = []
    for k in range(rounds):
        ms = [r2["marks"] for res in results for r2 in res["rounds"] if r2["k"] == k]
        js = [res["join"]["marks"] for res in results if res["join"] and res["join"]["k"] == k]
        if ms and len(ms[0]) == 6:
            base = min(m[0] for m in ms)
            cpus = [r2["cpu"] for res in results for r2 in res["rounds"] if r2["k"] == k]
            trace.append({"members": [max(m[i] for m in ms) - base for i in range(6)],
                          "cpu": (statistics.median(cpus), max(cpus)),
                          "joiner": [v - base for v in js[0][1:]] if js and len(js[0]) == 5 else None})
    lived = [res for res in results if not res["joined"] and len(res["rounds"]) == rounds]
    return {"n": n, "rounds": rounds, "finished": len(results), "spans": spans,
            "all_correct": bool(oks) and all(oks), "checks": len(oks),
            "rounds_checked": len({r2["k"] for res in results for r2 in res["rounds"]}),
            "requests_per_member": (min(reqs), max(reqs)) if reqs else None,
            "build_requests": (min(builds), max(builds)) if builds else None,
            "fds_threads": [(res["before"], res["after"]) for res in lived],
            "shm_before": len(shm_before), "shm_after": len(_shm({p.pid for p in procs})), "trace": trace}


def _fmt(v):
    return f"{statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})" if v else "-"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="8,32,64")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--leaks", action="store_true", help="print fds/threads/segments before and after")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--trace", action="store_true", help="per round: when the last member reached each phase of grow")
    p.add_argument("--profile", type=int, help="cProfile this rank's grow (rank in the shrunk communicator) to "
                   "$ELASTIC_PROFILE_OUT.rank<r>.round<k>.prof")
    p.add_argument("--rank", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rank:
        rank_main(int(a.rank[0]), [int(v) for v in a.rank[1].split(",")], a.profile)
        return
    print(f"# kill -> shrink -> grow(1), one host, {os.cpu_count()} cores; spans in s: median (min-max) "
          f"over rounds; to the first all_reduce on the new communicator; load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    print(f"{'N':>4} {'rounds':>6} {'shrink':>22} {'grow(1)':>22} {'correct':>12} {'store req/member':>17} {'+ building':>11}")
    out = []
    for n in [int(s) for s in a.sizes.split(",")]:
        res = run(n, a.rounds, a.timeout, a.profile)
        out.append(res)
        rq = res["requests_per_member"]
        print(f"{n:>4} {a.rounds:>6} {_fmt(res['spans']['shrink']):>22} {_fmt(res['spans']['grow']):>22} "
              f"{str(res['all_correct']) + ' ' + str(res['checks']):>12} {str(rq[0]) + '-' + str(rq[1]) if rq else '-':>17} "
              f"{'-'.join(map(str, res['build_requests'] or ())):>11}", flush=True)
        if a.trace:
            print("     grow phases, s after the first member entered (the last member; the joiner):"
                  " entered, decided, constructed, barrier, all_reduce; CPU s per member (process time)")
            for t in res["trace"]:
                m, j = t["members"], t["joiner"]
                print("     " + " ".join(f"{v:.3f}" for v in (m[0], m[1], m[2], m[3], m[5]))
                      + ("  joiner " + " ".join(f"{v:.3f}" for v in j) if j else "")
                      + "  cpu/member median %.3f max %.3f" % tuple(t["cpu"]), flush=True)
        if res["finished"] != n:
            print(f"     only {res['finished']} of {n} final ranks reported", flush=True)
        if a.leaks:
            same = sum(1 for b, af in res["fds_threads"] if b == af)
            print(f"     (fds, threads, shm mappings, /dev/shm names) equal before and after on {same} of {len(res['fds_threads'])} ranks that "
                  f"lived through every round {sorted(set(map(str, res['fds_threads'])))[:4]}; "
                  f"/dev/shm pyccl names: {res['shm_before']} (anyone's) before the job, {res['shm_after']} of its processes after",
                  flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    bad = _failures(out, a.leaks)
    for why in bad:
        print(f"FAILED: {why}", flush=True)
    sys.exit(1 if bad else 0)


def _failures(out, leaks) -> list:
    """What makes the run fail (exit status 1): a wrong or missing result, and with --leaks any
    count that differs before and after, or a /dev/shm name left behind by the job."""
    bad = []
    for res in out:
        n = res["n"]
        if not res["all_correct"] or res["rounds_checked"] != res["rounds"]:
            bad.append(f"N={n}: {res['checks']} checks in {res['rounds_checked']} of {res['rounds']} rounds, "
                       f"all correct: {res['all_correct']}")
        if res["finished"] != n:
            bad.append(f"N={n}: {res['finished']} of {n} final ranks reported")
        if leaks:
            if not res["fds_threads"] or any(b != af for b, af in res["fds_threads"]):
                bad.append(f"N={n}: counts before/after differ: {res['fds_threads']}")
            if res["shm_after"]:
                bad.append(f"N={n}: {res['shm_after']} /dev/shm pyccl name(s) of the job's processes left")
    return bad


if __name__ == "__main__":
    main()
