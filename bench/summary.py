#!/usr/bin/env python3
"""One markdown table from bench/collectives.py --json files: pyccl beside Gloo and MPI (the
better of MPI's in-place and out-of-place at each size), pyccl's fraction of the memory limit
(the same run's memcpy, see bench/collectives.py; "all": the memcpy timed from the first rank's
start to the last one's end, the reference where ranks outnumber cores), with issue 33's
targets marked (on the per-rank limit, as the issue states it).

    python bench/summary.py out/*.json
"""
import json
import sys

# issue 33: (peer, factor, smallest size the target covers): pyccl busbw >= factor x peer's;
# all_reduce 8 B: pyccl's time <= MPI's (factor 1.0 from 0 B); 16 MiB all_reduce >= 70 % of the limit
TARGETS = {
    "all_reduce": [("mpi", 1.0, 0), ("mpi", 1.5, 1 << 20), ("gloo", 4.0, 0)],
    "all_gather": [("mpi", 1.0, 1 << 20), ("gloo", 4.0, 0)],
    "reduce_scatter": [("mpi", 1.0, 1 << 20), ("gloo", 4.0, 0)],
    "broadcast": [("mpi", 1.0, 1 << 20), ("gloo", 4.0, 0)],
    "all_to_all": [("mpi", 1.0, 1 << 20)],
}
LIMIT = {("all_reduce", 16 << 20): 0.70}


def fmt_size(n):
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k} {unit}"
    return f"{n} B"


def table(files):
    lines = ["| op | ranks | size | pyccl µs | Gloo µs | MPI µs (best) | pyccl busbw | Gloo busbw | MPI busbw | "
             "vs Gloo | vs MPI | memcpy µs | pyccl of limit | of limit (all) | target |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for path in files:
        data = json.load(open(path))
        op = data["op"]
        by = {}
        for r in data["rows"]:
            by.setdefault(r["bytes"], {})[r["library"]] = r
        for size in sorted(by):
            libs = by[size]
            p, g = libs["pyccl"], libs.get("gloo")
            mpis = [libs[k] for k in ("mpi", "mpi-inplace") if k in libs]
            m = min(mpis, key=lambda r: r["time_us"]) if mpis else None
            ratio = {"gloo": g and g["time_us"] / p["time_us"], "mpi": m and m["time_us"] / p["time_us"]}
            marks = []
            goals = {}
            for peer, factor, least in TARGETS.get(op, []):
                if size >= least:
                    goals[peer] = factor      # listed by size: the last that covers this size
            for peer, factor in goals.items():
                if ratio[peer]:
                    marks.append(f"{peer} ×{factor}: {'met' if ratio[peer] >= factor else 'NOT met'}")
            of_limit = p.get("of_limit")
            if (op, size) in LIMIT and of_limit is not None:
                marks.append(f"≥ {LIMIT[(op, size)]:.0%} of limit: {'met' if of_limit >= LIMIT[(op, size)] else 'NOT met'}")
            cell = lambda r, k: f"{r[k]:.1f}" if r else "–"  # noqa: E731
            bw = lambda r: f"{r['busbw_GBps']:.2f}" if r else "–"  # noqa: E731
            rat = lambda x: f"{x:.2f}×" if x else "–"  # noqa: E731
            lim = f"{of_limit:.2f}" if of_limit is not None and size >= (1 << 20) else "–"
            lim_all = f"{p['of_limit_all']:.2f}" if p.get("of_limit_all") is not None and size >= (1 << 20) else "–"
            lines.append(f"| {op} | {data['ranks']} | {fmt_size(size)} | {cell(p, 'time_us')} | {cell(g, 'time_us')} | "
                         f"{cell(m, 'time_us')} | {bw(p)} | {bw(g)} | {bw(m)} | {rat(ratio['gloo'])} | "
                         f"{rat(ratio['mpi'])} | {cell(p, 'memcpy_us')} | {lim} | {lim_all} | {'; '.join(marks)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
