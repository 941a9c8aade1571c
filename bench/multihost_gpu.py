#!/usr/bin/env python3
"""all_reduce of CUDA tensors across (emulated) hosts: pyccl (the proxy engine with PYCCL_PROXY=1,
else the staged engine; the staged engine also forced on a second group) vs NCCL socket vs Gloo vs pyccl on CPU tensors, in
the same processes, interleaved.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
      torchrun --standalone --nproc-per-node 2 bench/multihost_gpu.py [--reps 5] [--sizes 1M,16M,64M,256M]
    # 2 hosts x 2 ranks: pyccl composed (local CUDA phases + staged rail, ccl/engines/cuda_composed.py)
    # against the flat staged path (PYCCL_CUDA_COMPOSED=0) in the same processes
      torchrun --standalone --nproc-per-node 4 bench/multihost_gpu.py --ranks-per-host 2

Every rank poses as its own host (PYCCL_HOST_ID, NCCL_HOSTID = host<rank>; NCCL_IB_DISABLE=1),
so all of them run over TCP loopback: NCCL its socket transport, pyccl its TCP transport with
CUDA tensors staged through pinned memory (ccl/engines/staged.py). Several ranks may share one GPU
(ranks use cuda:<local_rank % GPUs>). Time per call is the slowest rank's mean over a timed
loop (host-synchronised: torch.cuda.synchronize() after the loop); busbw as nccl-tests
(2(n-1)/n x bytes / time). Each cell: median of --reps runs [min-max]. --chunks also runs the
staged path with other PYCCL_STAGING_CHUNK values. Rank 0 prints a markdown table.
"""
import argparse
import os
import statistics
import sys
import time

RANK = int(os.environ.get("RANK", "0"))
PER_HOST = int(os.environ.get("PER_HOST", "1"))       # pyccl ranks per emulated host (--ranks-per-host)
for _i, _arg in enumerate(sys.argv):
    if _arg == "--ranks-per-host":
        PER_HOST = int(sys.argv[_i + 1])
os.environ["PYCCL_HOST_ID"] = f"host{RANK // PER_HOST}"
# NCCL refuses two ranks of one host on one GPU ("Duplicate GPU"): it always sees one rank per host
os.environ["NCCL_HOSTID"] = f"host{RANK}"
os.environ.setdefault("NCCL_IB_DISABLE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pyccl  # noqa: E402,F401  (registers the "pyccl" backend)
import pyccl.torch_backend  # noqa: E402,F401


def _size(text):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * mult[text[-1]]) if text[-1] in mult else int(text)


def _time(fn, x, iters, cpu_group):
    dist.barrier(group=cpu_group)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn(x)
    torch.cuda.synchronize()
    mine = torch.tensor([(time.perf_counter() - t) / iters], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=cpu_group)
    return mine.item()


def _communicator(group, dev):
    """The pyccl Communicator behind a torch group (to set the staging chunk between runs)."""
    for g in (group, getattr(group, "_get_backend", lambda d: None)(dev)):
        comm = getattr(g, "pyccl_communicator", None)
        if comm is not None:
            return comm
    return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1M,16M,64M,256M")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--chunks", default="", help="extra PYCCL_STAGING_CHUNK values for the staged path, e.g. 4M")
    p.add_argument("--skip", default="", help="comma list of columns to leave out")
    p.add_argument("--proxy-ctas", type=int, default=0,
                   help="also the proxy with this many thread blocks per copy launch (PYCCL_PROXY_CTAS)")
    p.add_argument("--ranks-per-host", type=int, default=PER_HOST,
                   help="pyccl ranks per emulated host (NCCL still sees every rank as its own host)")
    a = p.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", RANK))
    dev = torch.device("cuda", local % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    dist.init_process_group("cpu:gloo,cuda:nccl", device_id=dev)
    gloo = dist.new_group(backend="gloo")
    pyc = dist.new_group(backend="pyccl")
    sizes = [_size(s) for s in a.sizes.split(",")]
    skip = set(filter(None, a.skip.split(",")))

    def on(group):
        return lambda t: dist.all_reduce(t, group=group)

    def flat(t):                      # the one-phase staged path, even with several ranks per host
        os.environ["PYCCL_CUDA_COMPOSED"] = "0"
        try:
            dist.all_reduce(t, group=pyc)
        finally:
            del os.environ["PYCCL_CUDA_COMPOSED"]
    pyc_staged = dist.new_group(backend="pyccl")       # the same, forced onto the staged engine (with PYCCL_PROXY=1)
    staged_comm = _communicator(pyc_staged, dev)
    if staged_comm is not None:
        staged_comm.engines.forced = "staged"
        staged_comm.engines.forget()
    cols = {"pyccl CUDA (proxy)": (on(pyc), "cuda"), "pyccl CUDA (staged)": (on(pyc_staged), "cuda"),
            "NCCL socket": (on(None), "cuda"), "Gloo CUDA": (on(gloo), "cuda"), "pyccl CPU tensors": (on(pyc), "cpu")}
    if PER_HOST > 1:       # the proxy composes its local phases too (ccl/engines/proxy/composed.py), when asked
        proxy = getattr(_communicator(pyc, dev), "engines", None)
        if proxy is not None and "proxy" in proxy.by_name and os.environ.get("PYCCL_PROXY", "1") != "0":
            proxy.by_name["proxy"]._forced = True     # as PYCCL_ENGINE=proxy, for this group only
            proxy.forget()
        cols = {"pyccl CUDA (proxy)": (on(pyc), "cuda"), "pyccl CUDA (staged)": (on(pyc_staged), "cuda"),
                "pyccl CUDA flat staged": (flat, "cuda"), "NCCL socket": (on(None), "cuda"),
                "Gloo CUDA": (on(gloo), "cuda"), "pyccl CPU tensors": (on(pyc), "cpu")}
    if a.proxy_ctas:
        pyc_wide = dist.new_group(backend="pyccl")
        cols[f"pyccl CUDA (proxy, {a.proxy_ctas} CTAs)"] = (on(pyc_wide), "cuda")
    chunks = [_size(c) for c in a.chunks.split(",") if c]
    comm = _communicator(pyc, dev)
    for c in chunks:
        cols[f"pyccl CUDA chunk {c >> 20}M"] = (on(pyc), "cuda", c)
    cols = {k: v for k, v in cols.items() if k not in skip}
    # correctness once per column, and the staging state created
    for name, col in cols.items():
        x = torch.full((1 << 18,), float(RANK + 1), device=col[1])
        col[0](x)
        if col[1] == "cuda":
            torch.cuda.synchronize()
        assert bool((x == world * (world + 1) / 2).all()), f"{name}: wrong result"
    if a.proxy_ctas:
        wide = getattr(_communicator(pyc_wide, dev), "cuda", None)
        if type(wide).__name__ == "ProxyState":
            wide.ctas = a.proxy_ctas          # the programs made from now on (the next sizes' all of them)
            wide.programs.clear()
    st = getattr(comm, "cuda", None)
    base_chunk = getattr(st, "chunk_cap", None)
    if chunks and base_chunk is None:
        print("rank", RANK, ": no staging state found on the pyccl group; the chunk columns use the default")
    res = {(n, s): [] for n in cols for s in sizes}
    for rep in range(a.reps):
        for s in sizes:
            iters = max(3, min(50, (64 << 20) // s))
            for name, col in cols.items():
                x = torch.ones(s // 4, dtype=torch.float32, device=col[1])
                if st is not None:
                    st.chunk_cap = col[2] if len(col) > 2 else base_chunk
                col[0](x)                                   # warm-up (plan, arena, connections)
                res[(name, s)].append(_time(col[0], x, iters, gloo))
    if RANK == 0:
        factor = 2 * (world - 1) / world
        layout = "each its own host" if PER_HOST == 1 else f"{PER_HOST} per host (pyccl, Gloo)"
        print(f"\nall_reduce float32, {world} ranks, {layout}, TCP loopback between hosts; "
              f"{torch.cuda.get_device_name(dev)} x {torch.cuda.device_count()}; torch {torch.__version__}, "
              f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}; {a.reps} reps (median [min-max])\n")
        print("| size | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * len(cols))
        for s in sizes:
            cells = []
            for name in cols:
                ts = res[(name, s)]
                if s < (4 << 20):
                    cells.append(f"{statistics.median(ts) * 1e3:.2f} ms [{min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f}]")
                else:
                    bw = [factor * s / t / 1e9 for t in ts]
                    cells.append(f"{statistics.median(bw):.2f} GB/s [{min(bw):.2f}-{max(bw):.2f}]")
            print(f"| {s >> 20} MiB | " + " | ".join(cells) + " |")
        ref = "NCCL socket"
        for mine in ("pyccl CUDA (proxy)", "pyccl CUDA (staged)"):
            if ref not in cols or mine not in cols:
                continue
            print(f"\nratios (median time): {mine} / NCCL, / pyccl CPU")
            for s in sizes:
                m = {n: statistics.median(res[(n, s)]) for n in cols}
                cpu = m.get("pyccl CPU tensors")
                print(f"  {s >> 20} MiB: busbw x{m[ref] / m[mine]:.2f} vs NCCL"
                      + (f", x{cpu / m[mine]:.2f} vs pyccl CPU" if cpu else ""))
        if "pyccl CUDA composed" in cols:
            print("\nratios (median time): composed / flat staged, composed / pyccl CPU tensors")
            for s in sizes:
                m = {n: statistics.median(res[(n, s)]) for n in cols}
                print(f"  {s >> 20} MiB: x{m['pyccl CUDA flat staged'] / m['pyccl CUDA composed']:.2f} vs flat, "
                      f"x{m['pyccl CPU tensors'] / m['pyccl CUDA composed']:.2f} vs CPU tensors")
        _reduce_probe(dev)
    dist.barrier(group=gloo)
    dist.destroy_process_group()


def _reduce_probe(dev):
    """Where should staged chunks be reduced? One 4 MiB float32 chunk: the CPU path's reduce
    (pyccl.reduce.reduce_into, C core or numpy twin) against the GPU route (H2D of the received
    chunk, an add kernel, D2H of the result to send it on)."""
    import numpy as np
    from pyccl.dtypes import SUM
    from pyccl.reduce import USE_NATIVE, reduce_into
    n = 1 << 20
    a, b = np.ones(n, np.float32), np.ones(n, np.float32)
    reduce_into(a, a, b, SUM)
    t = time.perf_counter()
    for _ in range(20):
        reduce_into(a, a, b, SUM)
    cpu = (time.perf_counter() - t) / 20
    ha = torch.ones(n, pin_memory=True)
    da, db = torch.ones(n, device=dev), torch.ones(n, device=dev)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        db.copy_(ha, non_blocking=True)
        da.add_(db)
        ha.copy_(da, non_blocking=True)
    torch.cuda.synchronize()
    gpu = (time.perf_counter() - t) / 20
    print(f"\nreduce of a 4 MiB float32 chunk: CPU ({'C core' if USE_NATIVE else 'numpy twin'}) "
          f"{cpu * 1e6:.0f} us ({4 * n / cpu / 1e9:.1f} GB/s); GPU route H2D + add + D2H {gpu * 1e6:.0f} us "
          f"({4 * n / gpu / 1e9:.1f} GB/s)")


if __name__ == "__main__":
    main()
