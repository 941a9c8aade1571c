#!/usr/bin/env python3
"""Which host calls wait for a kernel that is spinning on the host (issue 29's hang)?

    python3 bench/gpu_block_probe.py

The proxy engine's kernel waits on the GPU for its host thread, which is Python. A call on the
user's thread that waits for the device while holding the GIL stops that thread, and both wait
(until the kernel's timeout). For each candidate call: a kernel spins on a pinned word; a
helper thread sets the word after HOLD s; the kernel gives up by itself after LIMIT s. The call's
time says: ~0 it does not wait for the kernel, ~HOLD it waits but lets other threads run, ~LIMIT
it waits holding the GIL (the deadlock). Also tries cuStreamWaitValue64_v2 (a stream that waits
without a resident kernel). No pyccl involved.
"""
import ctypes
import threading
import time

import cupy as cp
import numpy as np
import torch

HOLD, LIMIT = 1.0, 3.0
SRC = r"""
typedef unsigned long long u64;
extern "C" __global__ void spin(volatile u64* go, u64 limit_ns) {
  u64 t0; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  while (*go == 0) { u64 t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); if (t - t0 > limit_ns) break;
                     __nanosleep(200); }
}
extern "C" __global__ void other(float* x) { x[threadIdx.x] += 1.0f; }
"""


def main():
    torch.cuda.set_device(0)
    torch.ones(1, device="cuda")                    # torch's context first
    rt = cp.cuda.runtime
    ptr = rt.hostAlloc(64, 1 | 2)
    words = np.frombuffer((ctypes.c_char * 64).from_address(ptr), dtype=np.uint64)
    mod = cp.RawModule(code=SRC, options=("-std=c++17",))
    spin = mod.get_function("spin")
    stream = cp.cuda.Stream(non_blocking=True)
    keep = []

    def new_module():
        m = cp.RawModule(code=SRC.replace("other", f"other{len(keep)}"), options=("-std=c++17",))
        keep.append(m.get_function(f"other{len(keep)}"))

    def free_and_empty():
        keep.append(None)
        t = torch.empty(64 << 20, device="cuda")
        del t
        torch.cuda.empty_cache()

    candidates = [
        ("torch.cuda.Stream() first", lambda: keep.append(torch.cuda.Stream())),
        ("torch.cuda.Stream() again", lambda: keep.append(torch.cuda.Stream())),
        ("torch.cuda.Event()", lambda: keep.append(torch.cuda.Event())),
        ("torch.empty 512 MiB (cudaMalloc)", lambda: keep.append(torch.empty(512 << 20, dtype=torch.uint8,
                                                                             device="cuda"))),
        ("torch.cuda.empty_cache (cudaFree)", free_and_empty),
        ("torch new kernel (cumsum int16)", lambda: keep.append(torch.arange(10, device="cuda",
                                                                            dtype=torch.int16).cumsum(0))),
        ("cupy RawModule new (compile + load)", new_module),
        ("cupy hostAlloc 64 MiB", lambda: keep.append(rt.hostAlloc(64 << 20, 3))),
        ("cupy freeHost", lambda: rt.freeHost(keep.pop(keep.index(next(k for k in keep if isinstance(k, int)))))),
        ("torch pin_memory 16 MiB", lambda: keep.append(torch.empty(16 << 20, dtype=torch.uint8).pin_memory())),
        ("torch.cuda.current_stream().query()", lambda: torch.cuda.current_stream().query()),
    ]
    for name, fn in candidates:
        words[0] = 0
        spin((1,), (32,), (np.uint64(ptr), np.uint64(int(LIMIT * 1e9))), stream=stream)
        time.sleep(0.05)
        setter = threading.Timer(HOLD, lambda: words.__setitem__(0, 1))
        setter.start()
        t0 = time.perf_counter()
        try:
            fn()
            took = time.perf_counter() - t0
            verdict = "waits holding the GIL" if took > (HOLD + LIMIT) / 2 else \
                "waits (GIL released)" if took > HOLD / 2 else "does not wait"
            print(f"{name:<40} {took:6.3f} s  {verdict}", flush=True)
        except Exception as e:  # noqa: BLE001 - reported
            print(f"{name:<40} failed: {type(e).__name__}: {e}", flush=True)
        setter.join()
        stream.synchronize()
    lib = ctypes.CDLL("libcuda.so.1")
    for sym in ("cuStreamWaitValue64_v2", "cuStreamWaitValue32_v2", "cuStreamWaitValue64"):
        fn = getattr(lib, sym, None)
        if fn is None:
            print(f"{sym}: missing")
            continue
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64 if "64" in sym else ctypes.c_uint32,
                       ctypes.c_uint]
        words[1] = 5
        rc = fn(ctypes.c_void_p(stream.ptr), ptr + 8, 5, 0)
        stream.synchronize()
        print(f"{sym}: CUresult {rc}")


if __name__ == "__main__":
    main()
