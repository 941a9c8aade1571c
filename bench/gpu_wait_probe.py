#!/usr/bin/env python3
"""Probe for the proxy engine's device side (issue 29): on one GPU shared by two processes, what
does a stream that waits for its host cost, (a) spinning in a kernel on a host-mapped word (the
proxy kernel today, and NCCL's net transport) or (b) a stream memory operation
(cuStreamWaitValue64, no kernel resident while it waits)? And can (b) be captured in a CUDA graph?

    python3 bench/gpu_wait_probe.py [--iters 200]

Two spawned processes, each with a pinned, device-mapped word pair (flag: device -> host "my
data is ready", go: host -> device "the network step is done"). One round: the stream posts
flag = i (a 1-thread kernel), the host sees it, exchanges a token with the peer over a socket
pair and sets go = i; the stream waits for go >= i and then runs a tiny kernel. Printed per mode:
the median round time, rank 0. No pyccl involved.
"""
import argparse
import ctypes
import multiprocessing as mp
import statistics
import time

SRC = r"""
typedef unsigned long long u64;
extern "C" __global__ void post(volatile u64* flag, u64 i) { *flag = i; __threadfence_system(); }
extern "C" __global__ void spin(volatile u64* go, u64 i, volatile u64* flag) {
  *flag = i; __threadfence_system();
  u64 t0; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  while (*go < i) { u64 t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); if (t - t0 > 5000000000ULL) break;
                    __nanosleep(200); }
}
extern "C" __global__ void tiny(u64* sink) { sink[0] += 1; }
"""


def child(rank, sock, iters, q):
    import cupy as cp
    import numpy as np
    rt = cp.cuda.runtime
    cp.cuda.Device(0).use()
    lib = ctypes.CDLL("libcuda.so.1")
    wait64 = getattr(lib, "cuStreamWaitValue64_v2", None) or lib.cuStreamWaitValue64   # v1: off by default
    wait64.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint]
    ptr = rt.hostAlloc(64, 1 | 2)
    words = np.frombuffer((ctypes.c_char * 64).from_address(ptr), dtype=np.uint64)
    words[:] = 0
    flag, go = ptr, ptr + 8
    mod = cp.RawModule(code=SRC, options=("-std=c++17",))
    post, spin, tiny = (mod.get_function(n) for n in ("post", "spin", "tiny"))
    sink = cp.zeros(1, dtype=cp.uint64)
    stream = cp.cuda.Stream(non_blocking=True)
    res = {}

    def host_step(i):
        while words[0] < i:
            time.sleep(0)
        sock.send(b"x")
        sock.recv(1)
        words[1] = i

    def round_spin(i):
        spin((1,), (1,), (np.uint64(go), np.uint64(i), np.uint64(flag)), stream=stream)
        tiny((1,), (1,), (sink,), stream=stream)
        host_step(i)
        stream.synchronize()

    def round_wait(i):
        post((1,), (1,), (np.uint64(flag), np.uint64(i)), stream=stream)
        rc = wait64(ctypes.c_void_p(stream.ptr), go, i, 0)      # CU_STREAM_WAIT_VALUE_GEQ
        if rc:
            raise RuntimeError(f"cuStreamWaitValue64: CUresult {rc}")
        tiny((1,), (1,), (sink,), stream=stream)
        host_step(i)
        stream.synchronize()

    k = 0
    for name, fn in (("spin kernel", round_spin), ("stream wait op", round_wait)):
        try:
            ts = []
            for _ in range(iters):
                k += 1
                t0 = time.perf_counter()
                fn(k)
                ts.append(time.perf_counter() - t0)
            res[name] = f"{statistics.median(ts) * 1e6:.0f} us [{min(ts) * 1e6:.0f}-{max(ts) * 1e6:.0f}]"
        except Exception as e:  # noqa: BLE001 - reported
            res[name] = f"failed: {e}"
    # capture: post, wait, tiny in a graph; the host resets the words between replays
    try:
        words[:] = 0
        g = None
        with stream:
            stream.begin_capture()
            post((1,), (1,), (np.uint64(flag), np.uint64(1)), stream=stream)
            rc = wait64(ctypes.c_void_p(stream.ptr), go, 1, 0)
            tiny((1,), (1,), (sink,), stream=stream)
            g = stream.end_capture()
        if rc:
            raise RuntimeError(f"cuStreamWaitValue64 under capture: CUresult {rc}")
        before = int(sink.get()[0])
        ts = []
        for _ in range(20):
            words[:] = 0
            sock.send(b"r")
            sock.recv(1)
            t0 = time.perf_counter()
            g.launch(stream)
            host_step(1)
            stream.synchronize()
            ts.append(time.perf_counter() - t0)
        res["captured wait op, 20 replays"] = f"ok: sink +{int(sink.get()[0]) - before}, " \
            f"{statistics.median(ts) * 1e6:.0f} us per replay round"
    except Exception as e:  # noqa: BLE001 - reported
        res["captured wait op"] = f"failed: {type(e).__name__}: {e}"
    q.put((rank, res))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=200)
    a = p.parse_args()
    ctx = mp.get_context("spawn")
    s0, s1 = __import__("socket").socketpair()
    q = ctx.Queue()
    procs = [ctx.Process(target=child, args=(r, s, a.iters, q)) for r, s in ((0, s0), (1, s1))]
    for pr in procs:
        pr.start()
    out = dict(q.get(timeout=120) for _ in procs)
    for pr in procs:
        pr.join(10)
    for r in sorted(out):
        for k, v in out[r].items():
            print(f"rank {r}: {k}: {v}")


if __name__ == "__main__":
    main()
