#!/usr/bin/env python3
"""Is the tuner's pick within 10 % of the best forced PYCCL_ALGO? all_reduce, float32, 8 B..64 MiB.

    python -m pyccl.launch -n 4 bench/tuner_check.py                       # one host (shm collectives)
    PYCCL_SHM_COLLECTIVES=0 python -m pyccl.launch -n 4 bench/tuner_check.py   # one host, executor
    python bench/tuner_check.py --hosts 2 --ranks-per-host 2               # namespace hosts (root)

Every rank runs, for each size, `--rounds` interleaved rounds of: the tuner's choice (PYCCL_ALGO
unset) and each algorithm the tuner could pick, forced (twice as many rounds up to 64 KiB). A
round times `iters` back-to-back calls after a barrier and takes the slowest rank's mean; the
order of the variants rotates from round to round; a variant's figure is the least of its
rounds (--stat min: the least disturbed round, as the machine is shared; or the median). The
pick's figure pools its own and the tuner's rounds (the same plan); their ratio before pooling
("twin") shows the noise.
Rank 0 prints which engine ran the call (the shm collectives take every all_reduce on one host
unless PYCCL_SHM_COLLECTIVES=0; then the executor runs the tuner's plan), the tuner's pick, each
variant's time, and tuner / best forced. The costs are rank 0's profile (python -m pyccl.tune).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = [8 << (3 * i) for i in range(8)] + [64 << 20]        # 8 B, 64 B, ... 16 MiB, 64 MiB


def iters_for(nbytes):
    return 30 if nbytes <= 64 << 10 else 10 if nbytes <= 2 << 20 else 3


def time_variant(comm, x, algo, iters):
    """Mean seconds per call of `iters` all_reduces with PYCCL_ALGO=algo ('' = the tuner), slowest rank."""
    os.environ["PYCCL_ALGO"] = algo
    comm.engines.forget()                # plans and choices are cached per shape, not per PYCCL_ALGO
    comm.all_reduce(x)                   # builds (and warms) the plan
    comm.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        comm.all_reduce(x)
    t = np.array([(time.perf_counter() - t0) / iters])
    comm.all_reduce(t, op="max")
    return float(t[0])


def run(args):
    import pyccl
    from pyccl.topology.graph import applicable
    from pyccl.tuner import ALGOS, choose
    forced = os.environ.pop("PYCCL_ALGO", "")
    if forced:
        print(f"# PYCCL_ALGO={forced} ignored: this benchmark sets it per variant", file=sys.stderr)
    comm = pyccl.init()
    topo = comm.topology
    algos = [a for a in ALGOS if applicable("all_reduce", a, topo)]
    rows = []
    if comm.rank == 0:
        costs = {k: (round(v.alpha * 1e6, 2), round(1 / v.beta / 1e9, 3), round(1 / v.gamma / 1e9, 2))
                 for k, v in comm.costs.items() if k in (topo.intra, topo.inter)}
        print(f"# {topo.describe()}; costs (alpha us, GB/s, reduce GB/s): {costs}", flush=True)
        print(f"# {'size':>10} {'engine':>16} {'pick':>17} {'tuner us':>10} " +
              " ".join(f"{a[:10]:>10}" for a in algos) + f" {'best':>10} {'tuner/best':>10}", flush=True)
    for nbytes in [s for s in SIZES if args.min <= s <= args.max]:
        x = np.ones(nbytes // 4, np.float32)
        variants = [""] + algos
        per = {v: [] for v in variants}
        for k in range(args.rounds if nbytes > 64 << 10 else 2 * args.rounds):
            for v in variants[k % len(variants):] + variants[:k % len(variants)]:   # rotate the order
                per[v].append(time_variant(comm, x, v, args.iters or iters_for(nbytes)))
        stat = np.min if args.stat == "min" else np.median
        med = {v: float(stat(t)) for v, t in per.items()}
        os.environ["PYCCL_ALGO"] = ""
        local = comm.local is not None
        c = choose("all_reduce", nbytes, topo, comm.costs,
                   chunk_bytes=comm.chunk_bytes if os.environ.get("PYCCL_CHUNK_BYTES") else None)
        pick = c.algo + (f"/{c.inter}" if c.inter else "")
        # the tuner's plan is the forced plan of its pick (same builder, same chunk choice), so
        # the pick's time is the median over both variants' rounds: half the noise of either
        twin = med[""] / med[c.algo] if c.algo in per and not local else float("nan")
        if c.algo in per and not local:
            med[c.algo] = med[""] = float(stat(per[""] + per[c.algo]))
        best = min(algos, key=lambda a: med[a])
        ratio = med[""] / med[best]
        row = {"bytes": nbytes, "engine": "shm collectives" if local else "executor", "pick": pick,
               "tuner_us": med[""] * 1e6, "forced_us": {a: med[a] * 1e6 for a in algos}, "best": best,
               "ratio": ratio, "twin": twin, "stat": args.stat, "rounds_us": {v or "tuner": [t * 1e6 for t in ts] for v, ts in per.items()}}
        rows.append(row)
        if comm.rank == 0:
            print(f"  {nbytes:>10} {row['engine']:>16} {pick if not local else '(not consulted)':>17} "
                  f"{med[''] * 1e6:>10.1f} " + " ".join(f"{med[a] * 1e6:>10.1f}" for a in algos) +
                  f" {best[:10]:>10} {ratio:>9.2f}{'' if ratio <= 1.10 else ' !'}", flush=True)
    if comm.rank == 0:
        bad = [r for r in rows if r["ratio"] > 1.10]
        print(f"# tuner within 10% of the best forced algorithm at {len(rows) - len(bad)}/{len(rows)} sizes"
              + (": over at " + ", ".join(f"{r['bytes']} B ({r['ratio']:.2f}x)" for r in bad) if bad else ""))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"topology": topo.describe(), "ranks": comm.size, "rows": rows,
                           "costs": {k: [v.alpha, v.beta, v.gamma] for k, v in comm.costs.items()}}, f, indent=1)
    comm.close()
    return 0


def on_hosts(args, argv):
    """Run this script on namespace hosts (tests/multihost/netns.py; root needed)."""
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from multihost.netns import Hosts
    with Hosts(args.hosts, net=91) as hosts:
        res = hosts.run("", args.ranks_per_host, env={"PYCCL_TIMEOUT": "300"}, timeout=1800,
                        argv=[os.path.abspath(__file__)] + argv)
    for rank, rc, out, err in res:
        if rank == 0 or rc != 0:
            print(out, end="")
            if rc:
                print(f"--- rank {rank} rc {rc} ---\n{err[-3000:]}")
    return max(rc for _, rc, _, _ in res)


def summarize(dirs):
    """One markdown table per configuration from several runs' --json files (bench/tuner_check.sh
    writes one_host.json, one_host_exec.json, 2x2.json, 3x2.json into each OUT directory)."""
    names = {"one_host": "4 ranks, one host (shm collectives)",
             "one_host_exec": "4 ranks, one host, PYCCL_SHM_COLLECTIVES=0 (executor)",
             "2x2": "2 namespace hosts x 2 ranks", "3x2": "3 namespace hosts x 2 ranks"}
    for key, title in names.items():
        runs = []
        for d in dirs:
            path = os.path.join(d, key + ".json")
            if os.path.exists(path):
                with open(path) as f:
                    runs.append(json.load(f)["rows"])
        if not runs:
            continue
        print(f"\n{title}, {len(runs)} runs: tuner / best forced per run (pick; best forced)\n")
        print("| size | engine | pick | tuner us (runs) | best forced us (runs) | tuner/best per run | within 10 % "
              "| noise: tuner run / its forced twin |")
        print("|---:|---|---|---|---|---|---|---|")
        for i, row in enumerate(runs[0]):
            rows = [r[i] for r in runs if len(r) > i]
            picks = sorted({r["pick"] for r in rows}) if row["engine"] == "executor" else ["(not consulted)"]
            twins = " / ".join("%.2f" % r.get("twin", float("nan")) for r in rows)
            ok = sum(r["ratio"] <= 1.10 for r in rows)
            tuner = " / ".join("%.0f" % r["tuner_us"] for r in rows)
            best = " / ".join("%.0f (%s)" % (min(r["forced_us"].values()), r["best"]) for r in rows)
            ratios = " / ".join("%.2f" % r["ratio"] for r in rows)
            print(f"| {row['bytes']} | {row['engine']} | {', '.join(picks)} | {tuner} | {best} | {ratios} | "
                  f"{ok}/{len(rows)} | {twins} |")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=0, help="run on this many namespace hosts (root)")
    p.add_argument("--ranks-per-host", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--stat", choices=("min", "median"), default="min",
                   help="a variant's figure from its rounds (min: the least disturbed round; this "
                        "machine is shared)")
    p.add_argument("--iters", type=int, default=0, help="calls per round (default: by size)")
    p.add_argument("--min", type=int, default=8)
    p.add_argument("--max", type=int, default=64 << 20)
    p.add_argument("--json")
    p.add_argument("--summarize", nargs="+", metavar="DIR", help="print tables from bench/tuner_check.sh runs")
    args = p.parse_args(argv)
    if args.summarize:
        return summarize(args.summarize)
    if args.hosts:
        rest, skip = [], False
        for a in argv:                       # the per-rank run gets everything but the host options
            if skip:
                skip = False
            elif a in ("--hosts", "--ranks-per-host"):
                skip = True
            elif not a.startswith(("--hosts=", "--ranks-per-host=")):
                rest.append(a)
        return on_hosts(args, rest)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
