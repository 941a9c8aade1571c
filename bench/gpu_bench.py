#!/usr/bin/env python3
"""pyccl vs NCCL on the GPUs of one host, both through torch.distributed, in the same run.

    python3 -m torch.distributed.run --nproc_per_node=2 bench/gpu_bench.py [--quick] [--out DIR]

Every rank makes the default group with NCCL and a second group with backend "pyccl" over the
same processes. Each (op, size, backend) is timed the same way: CUDA events recorded on the
caller's stream around every call (the call returns when the work is queued; torch makes the
stream wait for the collective, as pyccl does), warm-up first, then the median of many calls;
the figure is the slowest rank's median. busbw follows nccl-tests: all_reduce size/t x
2(n-1)/n; all_gather (size = output), all_to_all and reduce_scatter (size = input) size/t x
(n-1)/n. Every pyccl result is checked against NCCL's once per size: exactly on 2 ranks (a
float32 sum of two numbers does not depend on the order), with torch.allclose(rtol=1e-5,
atol=1e-6) on more (inputs in [0, 1); NCCL and pyccl add the ranks' values in different orders).
Rank 0 prints one table and writes bench.json / table.md into --out.

--large: only the sizes the targets name (all-reduce 8-256 KiB and >= 16 MiB, the rest >= 16 MiB).
--variants 1: also pyccl's other paths (two-shot kernel/ce/pull; copies ce/push/pull).
"""
import argparse
import json
import os
import time

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import pyccl.torch_backend  # noqa: E402,F401 - registers "pyccl"

KB, MB, GB = 1 << 10, 1 << 20, 1 << 30


def fmt_size(n):
    for unit, div in (("GiB", GB), ("MiB", MB), ("KiB", KB)):
        if n >= div:
            return f"{n // div} {unit}"
    return f"{n} B"


def iters_for(nbytes, quick):
    n = 300 if nbytes <= MB else 60 if nbytes <= 64 * MB else 20 if nbytes <= 256 * MB else 10
    return max(5, n // 4) if quick else n


def timed(fn, iters, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    ts = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))     # microseconds
    med = torch.tensor([ts[len(ts) // 2]], device="cuda", dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)          # the slowest rank's median
    return med.item()


def busbw(op, nbytes, us, n):
    f = 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n
    return nbytes / (us * 1e-6) * f / 1e9


def make_op(op, nbytes, group, dev, n, dtype=torch.float32):
    item = torch.tensor([], dtype=dtype).element_size()
    count = nbytes // item
    if op == "all_reduce":
        t = torch.ones(count, device=dev, dtype=dtype)
        return (lambda: dist.all_reduce(t, group=group)), t
    if op == "all_gather":
        inp = torch.ones(count // n, device=dev, dtype=dtype) * (dist.get_rank() + 1)
        out = torch.empty(count // n * n, device=dev, dtype=dtype)
        return (lambda: dist.all_gather_into_tensor(out, inp, group=group)), out
    if op == "all_to_all":
        inp = torch.arange(count, device=dev, dtype=dtype) + dist.get_rank()
        out = torch.empty(count, device=dev, dtype=dtype)
        return (lambda: dist.all_to_all_single(out, inp, group=group)), out
    if op == "reduce_scatter":
        inp = torch.ones(count, device=dev, dtype=dtype) * (dist.get_rank() + 1)
        out = torch.empty(count // n, device=dev, dtype=dtype)
        return (lambda: dist.reduce_scatter_tensor(out, inp, group=group)), out
    raise ValueError(op)


def direct_op(op, nbytes, comm, dev, n):
    """The same collective on the pyccl Communicator itself (no torch.distributed layer)."""
    count = nbytes // 4
    if op == "all_reduce":
        t = torch.ones(count, device=dev)
        return lambda: comm.all_reduce(t)
    if op == "all_gather":
        i, o = torch.ones(count // n, device=dev), torch.empty(count // n * n, device=dev)
        return lambda: comm.all_gather(o, i)
    if op == "all_to_all":
        i, o = torch.ones(count, device=dev), torch.empty(count, device=dev)
        return lambda: comm.all_to_all(o, i)
    i, o = torch.ones(count, device=dev), torch.empty(count // n, device=dev)
    return lambda: comm.reduce_scatter(o, i)


def probe(pyg, comm, dev, rank):
    """Host time per call of each layer (32 KiB all-reduce), and a profile of the pyccl one."""
    import cProfile
    import io
    import pstats
    t = torch.ones(8192, device=dev)

    def host_us(fn, n=3000):
        for _ in range(100):
            fn()
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return (t1 - t0) / n * 1e6
    out = {}
    out["dist.all_reduce nccl"] = host_us(lambda: dist.all_reduce(t))
    out["dist.all_reduce pyccl"] = host_us(lambda: dist.all_reduce(t, group=pyg))
    out["Communicator.all_reduce"] = host_us(lambda: comm.all_reduce(t))
    cc = comm.cuda
    from pyccl.buffers import as_buffer
    view = as_buffer(t, "x").array
    out["one-shot kernel enqueue (prepared)"] = host_us(lambda: cc._oneshot_body("probe", 1, view, "float32",
                                                                                   pyccl_sum()))
    lane = pyg._lane
    if lane is not None:
        out["torch fast lane (lane() alone)"] = host_us(lambda: lane(t, "SUM", False))
        out["pyg.allreduce([t], opts) (no dist layer)"] = host_us(lambda: pyg.allreduce([t], _opts()))
    out["torch event record"] = host_us(lambda: torch.cuda.Event().record())
    n = dist.get_world_size()

    def synced_us(fn, k=200):
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / k * 1e6
    for op in ("all_reduce", "all_gather", "all_to_all", "reduce_scatter"):
        f_direct = direct_op(op, 16 * MB, comm, dev, n)
        f_torch, _ = make_op(op, 16 * MB, pyg, dev, n)
        out[f"{op} 16MiB host, direct"] = host_us(f_direct, 300)
        out[f"{op} 16MiB host, torch"] = host_us(f_torch, 300)
        out[f"{op} 16MiB synced, direct"] = synced_us(f_direct)
        out[f"{op} 16MiB synced, torch"] = synced_us(f_torch)
    out["describe(tensor)"] = host_us(lambda: describe(t, "x"))
    t16 = torch.ones(4 * MB, device=dev)
    out["16MiB pyg.allreduce([t], opts) (no dist layer)"] = host_us(lambda: pyg.allreduce([t16], _opts()), 300)
    out["16MiB comm.all_reduce"] = host_us(lambda: comm.all_reduce(t16), 300)
    out["_submit_cuda of an empty body"] = host_us(lambda: pyg._submit_cuda("probe", lambda w: None, [t16], False,
                                                                            dev.index), 1000)
    text = ""
    for label, fn, k in (("32 KiB all_reduce through torch (fast lane)", lambda: dist.all_reduce(t, group=pyg), 2000),
                         ("16 MiB all_reduce through torch (general path)",
                          make_op("all_reduce", 16 * MB, pyg, dev, n)[0], 300)):
        prof = cProfile.Profile()
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        dist.barrier()
        if rank == 0:
            prof.enable()
        for _ in range(k):
            fn()
        if rank == 0:
            prof.disable()
        torch.cuda.synchronize()
        if rank == 0:
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
            text += f"--- profile, {label}, {k} calls on rank 0 ---\n" + buf.getvalue()
    return out, text


def _opts():
    o = dist.AllreduceOptions()
    o.reduceOp = dist.ReduceOp.SUM
    if hasattr(o, "asyncOp"):
        o.asyncOp = False
    return o


def pyccl_sum():
    import pyccl
    return pyccl.SUM


def check(op, nbytes, pyg, dev, n):
    """Same inputs through NCCL and pyccl (one call each); True if the outputs match."""
    outs = []
    for g in (None, pyg):
        fn, out = make_op(op, nbytes, g, dev, n)
        if op == "all_reduce":
            out.copy_(torch.rand(out.numel(), device=dev, generator=torch.Generator(dev).manual_seed(dist.get_rank())))
        fn()
        torch.cuda.synchronize()
        outs.append(out.clone())
        del fn, out
    # fp32 sums of two ranks are exact to the bit in both; compare exactly. More ranks: the order
    # of the additions differs between NCCL and pyccl, so compare with a float tolerance.
    if n <= 2 or op not in ("all_reduce", "reduce_scatter"):
        return "exact" if torch.equal(outs[0], outs[1]) else "FAIL"
    return "close" if torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6) else "FAIL"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer sizes and iterations")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--variants", default="1", help="also time pyccl's other all-reduce variants (0/1)")
    ap.add_argument("--large", action="store_true", help="only the sizes the targets name")
    args = ap.parse_args()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=dev)
    from datetime import timedelta
    pyg = dist.new_group(backend="pyccl", timeout=timedelta(seconds=float(os.environ.get("PYCCL_TIMEOUT", "60"))))
    rank, n = dist.get_rank(), dist.get_world_size()
    comm = pyg.pyccl_communicator if hasattr(pyg, "pyccl_communicator") else None
    # first call sets up pyccl's CUDA state (IPC mappings, kernels)
    t0 = time.monotonic()
    x = torch.ones(1024, device=dev)
    dist.all_reduce(x, group=pyg)
    torch.cuda.synchronize()
    setup_s = time.monotonic() - t0
    cc = comm.cuda if comm is not None else None

    if cc is not None and os.environ.get("GPU_BENCH_PROBE", "1") == "1":
        layers, prof = probe(pyg, comm, dev, rank)
        if rank == 0:
            print("host time per call, 32 KiB all-reduce:")
            for k, v in layers.items():
                print(f"  {k:40s} {v:8.1f} us")
            print(prof[:12000])

    ar_sizes = [8 * KB, 32 * KB, 128 * KB, 256 * KB, 1 * MB, 2 * MB, 4 * MB, 8 * MB, 16 * MB, 64 * MB, 256 * MB,
                1 * GB]
    big_sizes = [1 * MB, 16 * MB, 64 * MB, 256 * MB, 1 * GB]
    rs_sizes = [1 * MB, 64 * MB, 1 * GB]
    if args.quick:
        ar_sizes = [32 * KB, 256 * KB, 1 * MB, 4 * MB, 16 * MB, 64 * MB, 256 * MB]
        big_sizes = [16 * MB, 64 * MB, 1 * GB]
        rs_sizes = [16 * MB, 64 * MB]
    if args.large:
        ar_sizes = [8 * KB, 32 * KB, 128 * KB, 256 * KB, 16 * MB, 64 * MB, 256 * MB, 1 * GB]
        big_sizes = [16 * MB, 64 * MB, 256 * MB, 1 * GB]
        rs_sizes = [64 * MB, 1 * GB]
    plan = [("all_reduce", s) for s in ar_sizes] + [("all_gather", s) for s in big_sizes] + \
        [("all_to_all", s) for s in big_sizes] + [("reduce_scatter", s) for s in rs_sizes]

    rows = []
    for op, size in plan:
        iters = iters_for(size, args.quick)
        fn, _ = make_op(op, size, None, dev, n)
        t_nccl = timed(fn, iters)
        del fn
        ok = check(op, size, pyg, dev, n)
        fn, _ = make_op(op, size, pyg, dev, n)
        t_py = timed(fn, iters)
        row = {"op": op, "bytes": size, "iters": iters, "nccl_us": t_nccl, "pyccl_us": t_py, "check": ok,
               "nccl_busbw": busbw(op, size, t_nccl, n), "pyccl_busbw": busbw(op, size, t_py, n)}
        if op == "all_reduce" and cc is not None and args.variants == "1":
            saved = (cc.twoshot_mode, cc.oneshot_max)
            if size > cc.oneshot_max:
                for m in ("kernel", "ce", "pull"):
                    cc.twoshot_mode = m
                    row[f"pyccl_{m}_us"] = timed(fn, iters)
                cc.twoshot_mode = saved[0]
            if size <= cc.small_cap and size > cc.oneshot_max:
                cc.oneshot_max = cc.small_cap
                cc.forget_prepared()
                row["pyccl_1shot_us"] = timed(fn, iters)
                cc.oneshot_max = saved[1]
                cc.forget_prepared()
            if size <= 16 * MB and size > 1024 and size <= cc.oneshot_max:
                cc.oneshot_max = 0
                cc.forget_prepared()
                row["pyccl_2shot_us"] = timed(fn, iters)
                cc.oneshot_max = saved[1]
                cc.forget_prepared()
        if op == "reduce_scatter" and cc is not None and args.variants == "1":
            saved = cc.twoshot_mode
            for m in ("kernel", "ce", "pull"):
                cc.twoshot_mode = m
                row[f"pyccl_{m}_us"] = timed(fn, iters)
            cc.twoshot_mode = saved
        if op in ("all_gather", "all_to_all") and cc is not None and args.variants == "1":
            saved = (cc.copy_mode, cc.copy_blocks)
            for m in ("ce", "push", "pull"):
                cc.copy_mode = m
                row[f"pyccl_{m}_us"] = timed(fn, iters)
            if size >= 256 * MB:
                cc.copy_mode, cc.copy_blocks = "pull", 2 * cc.max_blocks
                row["pyccl_pull2x_us"] = timed(fn, iters)
                cc.copy_mode, cc.copy_blocks = "push", 2 * cc.max_blocks
                row["pyccl_push2x_us"] = timed(fn, iters)
            cc.copy_mode, cc.copy_blocks = saved
        if comm is not None and args.variants == "1" and size <= 64 * MB and not args.large:
            row["pyccl_direct_us"] = timed(direct_op(op, size, comm, dev, n), iters)
        del fn
        torch.cuda.empty_cache()
        rows.append(row)
        if rank == 0:
            print(f"  {op:15s} {fmt_size(size):>8s}  nccl {t_nccl:10.1f} us  pyccl {t_py:10.1f} us  "
                  f"busbw {row['nccl_busbw']:7.1f} / {row['pyccl_busbw']:7.1f} GB/s  check {ok}"
                  + "".join(f"  {k[6:-3]} {v:.1f} us" for k, v in row.items() if k.startswith("pyccl_") and
                            k.endswith("_us") and k != "pyccl_us"), flush=True)

    if rank == 0:
        table = render(rows, n, setup_s)
        paths = f"two-shot {cc._ts()} (reduce-scatter {cc._ts(False)}), copies {cc._cm()}" if cc is not None else ""
        table += f"\npyccl defaults on {n} ranks: {paths}."
        print(table)
        meta = {"device": torch.cuda.get_device_name(dev), "gpus": n, "torch": torch.__version__,
                "nccl": ".".join(map(str, torch.cuda.nccl.version())), "setup_s": setup_s, "paths": paths,
                "env": {k: v for k, v in os.environ.items() if k.startswith(("PYCCL_", "NCCL_"))}}
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table + "\n")
    dist.barrier()
    dist.destroy_process_group()


def target(row, n=2):
    """Issue 7's targets on 2 ranks, issue 10's on more."""
    op, size = row["op"], row["bytes"]
    if op == "all_reduce" and size >= 64 * MB:
        r, want = row["pyccl_busbw"] / row["nccl_busbw"], 1.0 if n <= 2 else 0.95
        return f"busbw x{r:.2f} (>= {want:.2f}) {'MET' if r >= want else 'not met'}"
    if op == "all_reduce" and size <= 256 * KB:
        r = row["pyccl_us"] / row["nccl_us"]
        return f"time x{r:.2f} (<= 1.00) {'MET' if r <= 1.0 else 'not met'}"
    if op in ("all_gather", "all_to_all") and (size >= GB if n <= 2 else size >= 256 * MB):
        r, want = row["pyccl_busbw"] / row["nccl_busbw"], 1.15 if n <= 2 else 1.0
        return f"busbw x{r:.2f} (>= {want:.2f}) {'MET' if r >= want else 'not met'}"
    return ""


def render(rows, n, setup_s):
    lines = ["| op | size | NCCL us | pyccl us | NCCL busbw GB/s | pyccl busbw GB/s | pyccl/NCCL busbw | "
             "check | target | pyccl variants (us) |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        var = ", ".join(f"{k[6:-3]} {v:.1f}" for k, v in r.items()
                        if k.startswith("pyccl_") and k.endswith("_us") and k != "pyccl_us")
        lines.append(f"| {r['op']} | {fmt_size(r['bytes'])} | {r['nccl_us']:.1f} | {r['pyccl_us']:.1f} | "
                     f"{r['nccl_busbw']:.1f} | {r['pyccl_busbw']:.1f} | {r['pyccl_busbw'] / r['nccl_busbw']:.2f} | "
                     f"{r['check']} | {target(r, n)} | {var} |")
    lines.append(f"\n{n} ranks; pyccl CUDA set-up (first call) {setup_s:.1f} s. check: 'exact' = bit-equal to "
                 f"NCCL; 'close' = torch.allclose(rtol=1e-5, atol=1e-6) (sums over more than 2 ranks, whose "
                 f"order differs from NCCL's).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
