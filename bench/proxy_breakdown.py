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


def quiet(q):
    """Return once the device, this rank's proxy and the other ranks are idle (the barrier
    runs on the CPU path)."""
    torch.cuda.synchronize()
    q.wait_idle(30)
    dist.barrier()
    q.wait_idle(30)


def idle_us(fn, q, calls):
    """Median host us of one call made when the device and the proxy are idle (no earlier
    call's network phase competes for the GIL): the bare cost of the call path."""
    ts = []
    for _ in range(calls):
        quiet(q)
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(ts) * 1e6


def large_calls(st, q, dev, sizes, calls):
    """Where a large proxied all_reduce's wall time goes, from the host's side: the proxy's
    network phase and, inside it, the waits for the device-to-host copies; the wait for the
    device to post the call; the tail after the network phase (copies back, the end event)."""
    host, acc = st.host, dict(net=0.0, d2h=0.0, post=0.0, net_end=0.0)
    net, wait = host.network, host._wait

    def timed_network(*a, **k):
        t0 = time.perf_counter()
        try:
            return net(*a, **k)
        finally:
            acc["net_end"] = time.perf_counter()
            acc["net"] += acc["net_end"] - t0

    def timed_wait(ready, what, doing):
        t0 = time.perf_counter()
        try:
            return wait(ready, what, doing)
        finally:
            acc["d2h" if "copies" in doing else "post"] += time.perf_counter() - t0
    host.network, host._wait = timed_network, timed_wait
    out = []
    try:
        for s in sizes:
            x = torch.ones(s // 4, device=dev)
            dist.all_reduce(x)
            cols = {"wall": [], "net": [], "d2h": [], "post": [], "tail": []}
            for _ in range(calls):
                quiet(q)
                acc.update(net=0.0, d2h=0.0, post=0.0, net_end=0.0)
                t0 = time.perf_counter()
                dist.all_reduce(x)
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                q.wait_idle(30)
                for k, v in (("wall", t1 - t0), ("net", acc["net"]), ("d2h", acc["d2h"]), ("post", acc["post"]),
                             ("tail", t1 - acc["net_end"] if acc["net_end"] else float("nan"))):
                    cols[k].append(v * 1e3)
            out.append((s, cols))
    finally:
        host.network, host._wait = net, wait
    return out


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
    phases = large_calls(st, q, dev, (1 << 20, 16 << 20, 64 << 20), 5)
    if rank == 0:
        print(f"{'op (8 KiB, rank 0)':<24} {'host us':>8} {'launch':>8} {'queue':>8} {'rest':>8} {'idle':>8}  state, "
              f"CallQueue.run per call (1: the lane, 2: the general path); idle: one call alone, proxy idle")
        for name, total, launch, run, kind, entries, idle in rows:
            print(f"{name:<24} {total:8.1f} {launch:8.1f} {run:8.1f} {total - launch - run:8.1f} {idle:8.1f}  "
                  f"{kind}, {entries:.2f}")
        print("bare CUDA runtime calls, us each: " + ", ".join(f"{k} {v:.2f}" for k, v in bare.items()))
        print("\nall_reduce float32 alone (synchronized), rank 0, ms, median [min-max] of 5: wall = call to "
              "synchronize; net = the proxy's network phase, of which d2h = waiting for the device's copies; "
              "post = from the host job's start until the device posted the call; tail = network end to synchronize")
        for s, cols in phases:
            print(f"  {s >> 20:3d} MiB " + "  ".join(f"{k} {statistics.median(v):.2f} [{min(v):.2f}-{max(v):.2f}]"
                                                    for k, v in cols.items()))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
