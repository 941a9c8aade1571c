#!/usr/bin/env python3
"""One markdown table from bench/collectives.py --json files: pyccl beside Gloo and MPI (the
better of MPI's in-place and out-of-place at each size), with issue 3's targets marked.

    python bench/summary.py out/*.json
"""
import json
import sys

# (op, smallest size the target covers) -> (peer, factor): pyccl busbw >= factor x peer's
TARGETS = {
    "all_reduce": [("mpi", 1.5, 1 << 20), ("gloo", 4.0, 1 << 20)],
    "all_gather": [("mpi", 1.0, 1 << 20)],
    "reduce_scatter": [("mpi", 1.0, 1 << 20)],
    "broadcast": [("mpi", 1.0, 1 << 20)],
    "all_to_all": [("mpi", 1.0, 1 << 20)],
}
LATENCY_US = {("all_reduce", 8): 10.0}


def fmt_size(n):
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k} {unit}"
    return f"{n} B"


def table(files):
    lines = ["| op | size | pyccl µs | Gloo µs | MPI µs (best) | pyccl busbw | Gloo busbw | MPI busbw | "
             "vs Gloo | vs MPI | target |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
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
            for peer, factor, least in TARGETS.get(op, []):
                if size >= least and ratio[peer]:
                    marks.append(f"{peer} ×{factor}: {'met' if ratio[peer] >= factor else 'NOT met'}")
            if (op, size) in LATENCY_US:
                lim = LATENCY_US[(op, size)]
                marks.append(f"≤ {lim:g} µs: {'met' if p['time_us'] <= lim else 'NOT met'}")
            cell = lambda r, k: f"{r[k]:.1f}" if r else "–"  # noqa: E731
            bw = lambda r: f"{r['busbw_GBps']:.2f}" if r else "–"  # noqa: E731
            rat = lambda x: f"{x:.2f}×" if x else "–"  # noqa: E731
            lines.append(f"| {op} | {fmt_size(size)} | {cell(p, 'time_us')} | {cell(g, 'time_us')} | "
                         f"{cell(m, 'time_us')} | {bw(p)} | {bw(g)} | {bw(m)} | {rat(ratio['gloo'])} | "
                         f"{rat(ratio['mpi'])} | {'; '.join(marks)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
