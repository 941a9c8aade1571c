#!/usr/bin/env python3
"""nccl-tests style benchmark of pyccl's collectives, optionally beside Gloo and MPI.

    python -m pyccl.launch -n 4 bench/allreduce.py -b 8 -e 128M
    mpirun -n 2 python bench/allreduce.py --compare gloo,mpi --json out.json --plot out.png
    torchrun --nproc-per-node 2 bench/allgather.py

Columns as in nccl-tests: size (B), count, type, redop, root, time (us), algbw and busbw
(GB/s, with nccl-tests' bus factors) and #wrong (every result is checked). Times are the
median over --iters timed calls after --warmup, each call timed alone and the slowest
rank's time taken, so latency and bandwidth come from the same loop.

The memory limit (issue 33): every run also times a plain memcpy (numpy copyto, every rank at
once, as the libraries' calls run) of each size, and each result gets "of limit", the time
the bytes each rank must at least read and write would take at that memcpy's speed, over the
library's time (1.0 = at the limit).  Per rank, with N bytes per rank and P ranks: all_reduce
and reduce read N + (P-1)N/P and write N (reduce its slice from everybody's, gather the other
slices); reduce_scatter reads N and writes N/P; all_gather, broadcast, all_to_all copy their
output once.  A memcpy of M bytes reads M and writes M, so the limit is those bytes / 2M times
the memcpy of M = N.

"memcpy all" is the same copy timed from the first rank's start to the last rank's end
(CLOCK_MONOTONIC, one clock for the host), the time the machine takes to let every rank copy:
where ranks outnumber cores, one rank's own copy often runs alone while the others wait for a
core, so the per-rank time is that of an idle machine; "of limit (all)" uses this one.
"""
import argparse
import json
import sys
import time

import numpy as np

OPS = ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce", "all_to_all"]


def bus_factor(op, n):
    """nccl-tests' factor from algorithm bandwidth to bus bandwidth (docs/PERFORMANCE.md)."""
    if n == 1:
        return 1.0
    return {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
            "all_to_all": (n - 1) / n}.get(op, 1.0)


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def sizes(args):
    if args.sizes:
        yield from (parse_size(x) for x in args.sizes.split(","))
        return
    s = args.minbytes
    while s <= args.maxbytes:
        yield s
        s = s * args.stepfactor if args.stepfactor > 1 else s + args.stepbytes


class Library:
    """One library's way to run each op on numpy buffers. `prepare` returns a callable."""

    name = "?"

    def prepare(self, op, send, recv, root):
        raise NotImplementedError

    def barrier(self):
        raise NotImplementedError

    def max_time(self, t):
        raise NotImplementedError


class Memcpy(Library):
    """A plain copy of the op's per-rank output size (the unit of the memory limit)."""

    name = "memcpy"

    def __init__(self, comm, span=False):
        self.comm = comm
        self.span = span                 # time from the first rank's start to the last one's end

    def prepare(self, op, send, recv, root):
        src = np.ones_like(recv)
        return lambda: np.copyto(recv, src)

    def barrier(self):
        self.comm.barrier()

    def max_time(self, t):
        return Pyccl.max_time(self, t)

    def span_time(self, t0, t1):
        x = np.array([-t0, t1])
        self.comm.all_reduce(x, op="max")
        return float(x[0] + x[1])


def limit_factor(op, n):
    """(bytes each rank must read + write) / (2 x its output bytes): times a memcpy of the
    output, the least time the op can take (module docstring)."""
    if n == 1:
        return 0.5 if op in ("all_reduce", "reduce") else 1.0
    if op in ("all_reduce", "reduce"):
        return (2 + (n - 1) / n) / 2
    if op == "reduce_scatter":
        return (n + 1) / 2          # output N/P: reads N (= n outputs), writes one output
    return 1.0


class Pyccl(Library):
    name = "pyccl"

    def __init__(self, comm, name=None):
        self.comm = comm
        self.name = name or self.name

    def prepare(self, op, send, recv, root):
        c = self.comm
        return {
            "all_reduce": lambda: c.all_reduce(recv),
            "all_gather": lambda: c.all_gather(recv, send),
            "reduce_scatter": lambda: c.reduce_scatter(recv, send),
            "broadcast": lambda: c.broadcast(recv, root=root),
            "reduce": lambda: c.reduce(recv, root=root),
            "all_to_all": lambda: c.all_to_all(recv, send),
        }[op]

    def barrier(self):
        self.comm.barrier()

    def max_time(self, t):
        x = np.array([t])
        self.comm.all_reduce(x, op="max")
        return float(x[0])


class Gloo(Library):
    """torch.distributed's Gloo on the same processes, rendezvous through pyccl's store."""

    name = "gloo"

    def __init__(self, comm):
        import torch
        import torch.distributed as dist
        self.torch, self.dist = torch, dist
        from datetime import timedelta
        if comm.rank == 0:
            host = comm._bind_host()          # reachable by the other ranks (also across hosts)
            tstore = dist.TCPStore(host, 0, comm.size, True, timeout=timedelta(seconds=120),
                                   wait_for_workers=False)
            comm.store.set("bench/gloo_addr", f"{host}:{tstore.port}".encode())
        else:
            host, port = comm.store.get("bench/gloo_addr", timeout=120).decode().rsplit(":", 1)
            tstore = dist.TCPStore(host, int(port), comm.size, False, timeout=timedelta(seconds=120))
        self._store = tstore
        dist.init_process_group("gloo", store=tstore, rank=comm.rank, world_size=comm.size)

    def prepare(self, op, send, recv, root):
        t, dist = self.torch, self.dist
        s, r = t.from_numpy(send), t.from_numpy(recv)
        n = dist.get_world_size()
        if op == "all_reduce":
            return lambda: dist.all_reduce(r)
        if op == "all_gather":
            return lambda: dist.all_gather_into_tensor(r, s)
        if op == "reduce_scatter":
            # Gloo has no reduce_scatter_tensor; the list form is what torch users get
            ins = list(s.chunk(n))
            return lambda: dist.reduce_scatter(r, ins)
        if op == "broadcast":
            return lambda: dist.broadcast(r, src=root)
        if op == "reduce":
            return lambda: dist.reduce(r, dst=root)
        return lambda: dist.all_to_all_single(r, s)

    def barrier(self):
        self.dist.barrier()

    def max_time(self, t):
        x = self.torch.tensor([t], dtype=self.torch.float64)
        self.dist.all_reduce(x, op=self.dist.ReduceOp.MAX)
        return float(x[0])


class Mpi(Library):
    """mpi4py on COMM_WORLD; the better of in-place and out-of-place where both exist."""

    name = "mpi"

    def __init__(self, comm, in_place):
        from mpi4py import MPI
        self.MPI = MPI
        self.w = MPI.COMM_WORLD
        self.in_place = in_place
        if self.w.Get_size() != comm.size:
            raise RuntimeError("not launched by mpirun (MPI world size differs)")
        if in_place:
            self.name = "mpi-inplace"

    def prepare(self, op, send, recv, root):
        w, MPI = self.w, self.MPI
        ip = self.in_place
        if op == "all_reduce":
            return (lambda: w.Allreduce(MPI.IN_PLACE, recv)) if ip else (lambda: w.Allreduce(send, recv))
        if op == "all_gather":
            return lambda: w.Allgather(send, recv)
        if op == "reduce_scatter":
            return lambda: w.Reduce_scatter_block(send, recv)
        if op == "broadcast":
            return lambda: w.Bcast(recv, root=root)
        if op == "reduce":
            return lambda: w.Reduce(MPI.IN_PLACE if w.Get_rank() == root else recv, recv, root=root) \
                if ip else (lambda: w.Reduce(send, recv, root=root))
        return lambda: w.Alltoall(send, recv)

    def barrier(self):
        self.w.Barrier()

    def max_time(self, t):
        return self.w.allreduce(t, op=self.MPI.MAX)


def buffers(op, nbytes, dtype, nranks, rank):
    """send/recv numpy buffers for one op at `nbytes` per rank (nccl-tests' convention)."""
    item = np.dtype(dtype).itemsize
    count = max(0, nbytes // item)
    if op in ("all_gather",):
        count -= count % nranks
        per = count // nranks
        return np.full(per, rank + 1, dtype), np.zeros(count, dtype), count
    if op in ("reduce_scatter", "all_to_all"):
        count -= count % nranks
        send = np.full(count, rank + 1, dtype)
        return send, np.zeros(count // nranks if op == "reduce_scatter" else count, dtype), count
    send = np.full(count, rank + 1, dtype)
    return send, send.copy(), count


def expected(op, recv, nranks, rank, root):
    total = nranks * (nranks + 1) / 2
    if op in ("all_reduce", "reduce_scatter"):
        return recv == total
    if op == "reduce":
        return recv == total if rank == root else np.ones(recv.shape, bool)
    if op == "broadcast":
        return recv == root + 1
    if op == "all_gather":
        return recv == np.repeat(np.arange(1, nranks + 1), recv.size // nranks)
    return recv == np.repeat(np.arange(1, nranks + 1), recv.size // nranks)


def measure(lib, op, nbytes, dtype, rank, nranks, root, iters, warmup):
    send, recv, count = buffers(op, nbytes, dtype, nranks, rank)
    run = lib.prepare(op, send, recv, root)
    reset = op in ("all_reduce", "broadcast", "reduce")
    wrong = 0
    times = []
    for i in range(warmup + iters):
        if reset:
            recv[...] = send
        lib.barrier()
        t0 = time.perf_counter()          # CLOCK_MONOTONIC on Linux: one clock for every rank
        run()
        t1 = time.perf_counter()
        if i == warmup:
            wrong = int(np.count_nonzero(~expected(op, recv, nranks, rank, root)))
        if i >= warmup:
            times.append(lib.span_time(t0, t1) if getattr(lib, "span", False) else lib.max_time(t1 - t0))
    return count, np.array(times) * 1e6, wrong


def main(default_op="all_reduce", argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default=default_op, choices=OPS)
    p.add_argument("-b", "--minbytes", type=parse_size, default=parse_size("8"))
    p.add_argument("-e", "--maxbytes", type=parse_size, default=parse_size("64M"))
    p.add_argument("-f", "--stepfactor", type=int, default=8)
    p.add_argument("-i", "--stepbytes", type=parse_size, default=parse_size("1M"))
    p.add_argument("-n", "--iters", type=int, default=20)
    p.add_argument("-w", "--warmup", type=int, default=3)
    p.add_argument("-d", "--dtype", default="float32")
    p.add_argument("-r", "--root", type=int, default=0)
    p.add_argument("--sizes", help="comma list of sizes instead of -b/-e/-f, e.g. 8,1M,16M,128M")
    p.add_argument("--rounds", type=int, default=3,
                   help="split the iterations of each size into this many rounds, the libraries "
                        "taking turns, so that a slow minute of a noisy machine hits all alike")
    p.add_argument("--compare", default="", help="comma list of gloo,mpi,reproducible to run beside pyccl "
                   "(reproducible: pyccl with PYCCL_REPRODUCIBLE=1 semantics, a second communicator)")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--plot", help="draw busbw against size for each library (PNG)")
    args = p.parse_args(argv)
    if args.plot:
        check_plot()

    import pyccl
    comm = pyccl.init()
    rank, n = comm.rank, comm.size
    libs = [Pyccl(comm)]
    memcpy, memcpy_all = Memcpy(comm), Memcpy(comm, span=True)
    for name in filter(None, args.compare.split(",")):
        try:
            if name == "gloo":
                libs.append(Gloo(comm))
            elif name == "reproducible":      # a second communicator in reproducible mode
                libs.append(Pyccl(pyccl.init(reproducible=True), "pyccl-repro"))
            elif name == "mpi":
                why = mpi_missing()
                if why:
                    if rank == 0:
                        print(f"# mpi left out: {why}", flush=True)
                    continue
                libs += [Mpi(comm, in_place=False), Mpi(comm, in_place=True)]
            else:
                raise RuntimeError(f"unknown library {name}")
        except Exception as e:  # noqa: BLE001 - a missing peer library is reported, not fatal
            if rank == 0:
                print(f"# {name} skipped: {e}", flush=True)
    dtype = np.dtype(args.dtype)
    redop = "sum" if args.op in ("all_reduce", "reduce_scatter", "reduce") else "none"
    root = args.root if args.op in ("broadcast", "reduce") else -1
    if rank == 0:
        print(f"# pyccl {pyccl.__version__} {args.op}: {n} ranks, transport {comm.transport_name}, "
              f"median of {args.iters} iterations in {args.rounds} interleaved rounds after {args.warmup} warm-up", flush=True)
        print(f"# {'library':>11} {'size':>12} {'count':>12} {'type':>8} {'redop':>6} {'root':>5} "
              f"{'time(us)':>10} {'algbw':>8} {'busbw':>8} {'#wrong':>7} {'min-max(us)':>17}", flush=True)
    rows = []
    for nbytes in sizes(args):
        rounds = max(1, min(args.rounds, args.iters))
        per_lib = {lib.name: [] for lib in libs}
        for k in range(rounds):
            iters = args.iters // rounds + (k < args.iters % rounds)
            for lib in libs:
                per_lib[lib.name].append(measure(lib, args.op, nbytes, dtype, rank, n, max(root, 0), iters,
                                                 args.warmup if k == 0 else 1))
            for mlib in (memcpy, memcpy_all):
                per_lib.setdefault(mlib, []).append(measure(mlib, args.op, nbytes, dtype, rank, n, 0, iters,
                                                            args.warmup if k == 0 else 1))
        mc = np.concatenate([t for _, t, _ in per_lib.pop(memcpy)])
        mca = np.concatenate([t for _, t, _ in per_lib.pop(memcpy_all)])
        limit_us = float(np.median(mc)) * limit_factor(args.op, n)
        limit_all_us = float(np.median(mca)) * limit_factor(args.op, n)
        if rank == 0:
            out_bytes = buffers(args.op, nbytes, dtype, n, rank)[1].nbytes
            for name, m, lim in (("memcpy", mc, limit_us), ("memcpy all", mca, limit_all_us)):
                print(f"  {name:>11} {out_bytes:>12} {'':>12} {'':>8} {'':>6} {'':>5} {np.median(m):>10.1f} "
                      f"{out_bytes / np.median(m) / 1e3 if np.median(m) > 0 else 0:>8.3f} {'':>8} {'':>7} "
                      f"{m.min():>8.1f}-{m.max():<8.1f} limit {lim:.1f} us", flush=True)
        for lib in libs:
            runs = per_lib[lib.name]
            count, wrong = runs[0][0], max(w for _, _, w in runs)
            t = np.concatenate([t for _, t, _ in runs])
            med = float(np.median(t))
            size = count * dtype.itemsize
            algbw = size / med / 1e3 if med > 0 else 0.0
            busbw = algbw * bus_factor(args.op, n)
            wrong_x = np.array([wrong], np.int64)
            comm.all_reduce(wrong_x)
            row = {"library": lib.name, "op": args.op, "ranks": n, "bytes": size, "count": count,
                   "dtype": args.dtype, "redop": redop, "root": root, "time_us": med,
                   "time_min_us": float(t.min()), "time_max_us": float(t.max()), "algbw_GBps": algbw,
                   "busbw_GBps": busbw, "wrong": int(wrong_x[0]), "memcpy_us": float(np.median(mc)),
                   "limit_us": limit_us, "of_limit": limit_us / med if med > 0 else 0.0,
                   "memcpy_all_us": float(np.median(mca)), "limit_all_us": limit_all_us,
                   "of_limit_all": limit_all_us / med if med > 0 else 0.0,
                   "times_us": [float(v) for v in t]}
            rows.append(row)
            if rank == 0:
                print(f"  {lib.name:>11} {size:>12} {count:>12} {args.dtype:>8} {redop:>6} {root:>5} "
                      f"{med:>10.1f} {algbw:>8.3f} {busbw:>8.3f} {int(wrong_x[0]):>7} "
                      f"{t.min():>8.1f}-{t.max():<8.1f} {limit_us / med if med > 0 else 0:>5.2f} of limit "
                      f"({limit_all_us / med if med > 0 else 0:.2f} all)",
                      flush=True)
    if rank == 0:
        print_ratios(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"op": args.op, "ranks": n, "transport": comm.transport_name, "rows": rows}, f, indent=1)
        if args.plot:
            plot(rows, args.plot, f"{args.op}, {n} ranks")
    bad = sum(r["wrong"] for r in rows)
    for lib in libs[1:]:
        if isinstance(lib, Pyccl):
            lib.comm.close()
    comm.close()
    if bad and rank == 0:
        print(f"# {bad} wrong elements", file=sys.stderr)
    return 1 if bad else 0


def check_plot():
    """--plot needs matplotlib: say so before the benchmark runs, not after."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit('--plot needs matplotlib, which is not installed: pip install "pyccl[plot]" '
                 '(or pip install matplotlib), or leave out --plot')


def mpi_missing():
    """Why MPI cannot run beside pyccl in this job ('' if it can): MPI's ranks must be started
    by mpirun/mpiexec, one MPI process per pyccl rank."""
    from pyccl.env import detect
    launcher = detect().launcher
    if launcher not in ("openmpi", "mpich"):
        return (f"MPI needs its ranks started by mpirun/mpiexec, this job was started by {launcher}; "
                f"run e.g. mpirun -n 2 python {sys.argv[0]} --compare gloo,mpi")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return 'mpi4py is not installed: pip install "pyccl[mpi]"'
    return ""


def print_ratios(rows):
    libs = sorted({r["library"] for r in rows} - {"pyccl"})
    if not libs:
        return
    print("# pyccl busbw / peer busbw (time ratio peer/pyccl for sizes < 64 KiB)")
    base = {r["bytes"]: r for r in rows if r["library"] == "pyccl"}
    for lib in libs:
        parts = []
        for r in rows:
            if r["library"] != lib or r["bytes"] not in base:
                continue
            mine = base[r["bytes"]]
            ratio = r["time_us"] / mine["time_us"] if mine["time_us"] else float("nan")
            parts.append(f"{r['bytes']}B:{ratio:.2f}x")
        print(f"#   vs {lib}: " + " ".join(parts))


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for lib in sorted({r["library"] for r in rows}):
        pts = [(r["bytes"], r["busbw_GBps"]) for r in rows if r["library"] == lib and r["bytes"] > 0]
        ax.plot(*zip(*pts), marker="o", label=lib)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per rank")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
