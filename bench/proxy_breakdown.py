#!/usr/bin/env python3
"""Where the host time of a proxied CUDA call goes (issue 29's target: <= 20 us per eager call).

    PYCCL_PROXY=1 python -m torch.distributed.run --standalone --nproc-per-node 2 --no-python \
        bash -c 'PYCCL_HOST_ID=host$RANK exec python3 bench/proxy_breakdown.py'

Every rank poses as its own host (one GPU is enough). After a warm-up that makes each op's
program, rank 0 times `calls` calls of each torch op on 8 KiB float32 and splits the host time
into the proxy's launch (kernels, stream waits, end event: ProxyState.launch), the queueing of
its host part (CallQueue.post on the lane, CallQueue.run on the general path) and the rest (torch backend, lane lookup), by wrapping those two methods with
perf_counter; then the bare CUDA runtime calls a launch is made of, 1000 times each. Whether
each op took its lane is printed too (the lane skips validation and the engine choice).
"""
import os
import statistics
import time

import torch
import torch.distributed as dist

import pyccl.torch_backend  # noqa: F401 - registers "pyccl"


def timed(obj, name, acc):
    """Wrap obj.name (an instance attribute shadows the method) to add its time to acc[name]."""
    inner = getattr(obj, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            acc[name] += time.perf_counter() - t0
            acc[name + " calls"] += 1
    setattr(obj, name, wrapper)


def idle_us(fn, q, calls):
    """Median host us of one call made when the device and the proxy are idle (no earlier
    call's network phase competes for the GIL): the bare cost of the call path."""
    ts = []
    for _ in range(calls):
        torch.cuda.synchronize()
        q.wait_idle(30)
        dist.barrier()                      # both ranks idle (a barrier runs on the CPU path)
        q.wait_idle(30)
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(ts) * 1e6


def main():
    rank = int(os.environ["RANK"])
    size = int(os.environ["WORLD_SIZE"])
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    dist.init_process_group("pyccl", device_id=dev)
    n, calls = 2048, 200
    x = torch.ones(n, device=dev)
    big = torch.ones(n * size, device=dev)
    out_big, out = torch.empty(n * size, device=dev), torch.empty(n, device=dev)
    ops = {"all_reduce": lambda: dist.all_reduce(x),
           "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(out_big, x),
           "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(out, big),
           "broadcast": lambda: dist.broadcast(x, 0),
           "all_to_all_single": lambda: dist.all_to_all_single(out_big, big),
           "reduce": lambda: dist.reduce(x, 0)}
    for fn in ops.values():                 # programs and lanes
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    pg = dist.distributed_c10d._get_default_group()
    comm = getattr(pg._get_backend(dev), "pyccl_communicator", None)
    st, q = comm.cuda, comm.queue
    acc = {"launch": 0.0, "run": 0.0, "post": 0.0, "launch calls": 0, "run calls": 0, "post calls": 0}
    timed(st, "launch", acc)
    timed(q, "run", acc)
    timed(q, "post", acc)
    rows = []
    for name, fn in ops.items():
        for k in acc:
            acc[k] = 0.0
        ts = []
        torch.cuda.synchronize()
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        total = statistics.median(ts) * 1e6
        rows.append((name, total, acc["launch"] / calls * 1e6, (acc["run"] + acc["post"]) / calls * 1e6,
                     type(st).__name__, acc["run calls"] / calls, idle_us(fn, q, 30)))
    rt = st.rt
    caller = torch.cuda.current_stream(dev).cuda_stream
    bare = {}
    ev, drv = st.ends[0], st.drv
    for what, fn in (("eventRecord", lambda: rt.eventRecord(ev, caller)),
                     ("streamWaitEvent", lambda: rt.streamWaitEvent(caller, ev, 0)),
                     ("streamIsCapturing", lambda: rt.streamIsCapturing(caller)),
                     ("driver record (ctypes)", lambda: drv.record(ev, caller)),
                     ("driver capturing (ctypes)", lambda: drv.capturing(caller)),
                     ("driver stream wait, met (ctypes)", lambda: drv.wait_value(caller, st.words_ptr, 0)),
                     ("torch current stream", lambda: torch._C._cuda_getCurrentRawStream(0))):
        t0 = time.perf_counter()
        for _ in range(1000):
            fn()
        bare[what] = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    if rank == 0:
        print(f"{'op (8 KiB, rank 0)':<24} {'host us':>8} {'launch':>8} {'queue':>8} {'rest':>8} {'idle':>8}  state, "
              f"CallQueue.run per call (1: the lane, 2: the general path); idle: one call alone, proxy idle")
        for name, total, launch, run, kind, entries, idle in rows:
            print(f"{name:<24} {total:8.1f} {launch:8.1f} {run:8.1f} {total - launch - run:8.1f} {idle:8.1f}  "
                  f"{kind}, {entries:.2f}")
        print("bare CUDA runtime calls, us each: " + ", ".join(f"{k} {v:.2f}" for k, v in bare.items()))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
