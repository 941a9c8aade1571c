#!/usr/bin/env python3
"""Host time per call of pyccl's CUDA collectives through torch.distributed, on repeated buffers,
and the time of a captured all-reduce replay.

    NCCL_NVLS_ENABLE=0 python -m torch.distributed.run --standalone --nproc-per-node 2 \
        bench/gpu_host_time.py [--sizes 8K,1M,16M,64M] [--calls 20] [--repeats 5]

Host time: the wall time of the `dist.<op>(...)` call itself (it only enqueues GPU work), per
call, median over `calls` consecutive calls on the same tensors (no device sync in between),
repeated `repeats` times after a warm-up; the table gives the median and the spread (min-max of
the repeats' medians), rank 0. Sizes are each rank's input bytes (float32). Works with one GPU
(ranks share it through CUDA IPC) or one GPU per rank. Replay: host time of `g.replay()` of a
graph holding one all_reduce, and the GPU time per replay over 50 back-to-back replays (on a
shared GPU this is the time-slicing of two contexts, not kernel speed).
"""
import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

import pyccl.torch_backend  # noqa: F401 - registers "pyccl"


def parse(s):
    u = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip().upper().rstrip("B")
    return int(float(s[:-1]) * u[s[-1]]) if s[-1] in u else int(s)


def ops(rank, size, n, dev):
    x = torch.ones(n, device=dev)
    big = torch.ones(n * size, device=dev)
    out_big = torch.empty(n * size, device=dev)
    out = torch.empty(n, device=dev)
    return {
        "all_reduce": lambda: dist.all_reduce(x),
        "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(out_big, x),
        "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(out, big),
        "broadcast": lambda: dist.broadcast(x, 0),
        "all_to_all_single": lambda: dist.all_to_all_single(out_big, big),
        "reduce": lambda: dist.reduce(x, 0),
    }


def host_us(fn, calls, repeats):
    meds = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        ts = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        meds.append(statistics.median(ts) * 1e6)
        torch.cuda.synchronize()
    return statistics.median(meds), min(meds), max(meds)


def replay_times(n, dev):
    x = torch.ones(n, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            dist.all_reduce(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        dist.all_reduce(x)
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(50):
        t0 = time.perf_counter()
        g.replay()
        ts.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(50):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return statistics.median(ts) * 1e6, a.elapsed_time(b) * 1e3 / 50


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="8K,1M,16M,64M")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ops", default="")
    a = ap.parse_args()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    dev = torch.device("cuda", local % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    dist.init_process_group("pyccl", device_id=dev)
    size = dist.get_world_size()
    rows = []
    for sz in [parse(s) for s in a.sizes.split(",")]:
        n = sz // 4
        for name, fn in ops(rank, size, n, dev).items():
            if a.ops and name not in a.ops.split(","):
                continue
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            try:
                med, lo, hi = host_us(fn, a.calls, a.repeats)
                rows.append((name, sz, f"{med:8.1f}", f"{lo:.1f}-{hi:.1f}"))
            except Exception as e:  # noqa: BLE001 - reported in the table
                rows.append((name, sz, "failed", f"{type(e).__name__}: {str(e)[:80]}"))
    rep = []
    for sz in (8 << 10, 1 << 20):
        try:
            h, gpu = replay_times(sz // 4, dev)
            rep.append((sz, f"{h:.1f}", f"{gpu:.1f}"))
        except Exception as e:  # noqa: BLE001
            rep.append((sz, "failed", f"{type(e).__name__}: {str(e)[:120]}"))
    if rank == 0:
        print(f"\nhost us per call, {size} ranks on {torch.cuda.get_device_name(dev)} "
              f"({torch.cuda.device_count()} GPU(s)), median of {a.repeats} x {a.calls} calls")
        print("| op | bytes per rank | host us/call (median) | spread of the repeats |\n|---|---:|---:|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2].strip()} | {r[3]} |")
        print("\ncaptured all_reduce replay (float32, SUM)\n| bytes | host us per g.replay() | GPU us per replay (50 back to back) |\n|---:|---:|---:|")
        for r in rep:
            print(f"| {r[0]} | {r[1]} | {r[2]} |")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
