#!/usr/bin/env python3
"""GPU start-up and memory probe (issue 32). Modes:

  nvrtc    one process: NVRTC (ctypes, ccl/engines/cuda/nvrtc.py) compile times of the kernels'
           source: the common kernels, one kernel, one (dtype, op) unit, the whole set in one
           module, and the whole set as units on 4 and 8 threads; module load time and the
           device memory the loaded modules take.
  first    under torchrun (2 ranks): pyccl.init and the first call of every op x dtype, in a
           fresh process (set CUPY_CACHE_DIR / PYCCL_KERNEL_CACHE to an empty folder first).
  memory   under torchrun (2 ranks sharing a GPU): cudaMemGetInfo over the baseline after one
           call of every op at 1 MiB and 64 MiB, after freeing the tensors, after close().
"""
import argparse
import json
import os
import sys
import time

DTYPES = ("float32", "bfloat16", "float16", "int32")


def _free():
    import cupy
    return cupy.cuda.runtime.memGetInfo()[0]


def mode_nvrtc(args):
    import cupy
    from concurrent.futures import ThreadPoolExecutor
    from pyccl.engines.cuda import nvrtc
    from pyccl.engines.cuda.kernel_cache import CTYPE as _CTYPE
    from pyccl.engines.cuda.kernels import cuda_source
    dev = cupy.cuda.Device(0)
    dev.use()
    cc = dev.compute_capability
    arch = int(cc)
    print(f"nvrtc {nvrtc.version()} archs {nvrtc.supported_archs()} device sm_{cc} cpus {os.cpu_count()}",
          flush=True)
    src = cuda_source()
    opts = ["-std=c++17"]

    def unit(dtype, op):
        vec = 16 // {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int8": 1, "uint8": 1,
                     "int32": 4, "int64": 8, "bool": 1}[dtype]
        return [f"{k}<{_CTYPE[dtype]}, {op}, {v}>" for k in ("oneshot", "twoshot", "reduce_n", "twoshot_pull")
                for v in sorted({1, vec})]

    def timed(label, names, common):
        t = time.perf_counter()
        img, low = nvrtc.compile_source(src, names, arch, opts + [f"-DKERNELS_COMMON={common}"])
        dt = time.perf_counter() - t
        print(f"NVRTC {label:40s} {dt:7.2f} s  {len(names):4d} kernels  {len(img) / 1e6:6.2f} MB", flush=True)
        return img, low, dt
    timed("common (5 extern C kernels)", [], 1)
    timed("one kernel oneshot<bf16,sum,8>", unit("bfloat16", 0)[1:2], 0)
    timed("one kernel twoshot<f32,sum,4>", ["twoshot<float, 0, 4>"], 0)
    timed("unit bf16 sum (4 kinds x 2 vec)", unit("bfloat16", 0), 0)
    units = [(d, o) for d in _CTYPE if d != "bool" for o in range(4)] + [("bool", 2), ("bool", 3)]
    every = [n for d, o in units for n in unit(d, o)]
    t_all = time.perf_counter()
    pool_res = {}
    for threads in (8,):
        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            futs = [ex.submit(nvrtc.compile_source, src, unit(d, o), arch, opts + ["-DKERNELS_COMMON=0"])
                    for d, o in units]
            futs.append(ex.submit(nvrtc.compile_source, src, [], arch, opts + ["-DKERNELS_COMMON=1"]))
            imgs = [f.result()[0] for f in futs]
        print(f"NVRTC all {len(units)} units + common on {threads} threads: {time.perf_counter() - t:7.2f} s "
              f"{sum(map(len, imgs)) / 1e6:6.2f} MB", flush=True)
        pool_res[threads] = imgs
    if args.one_module and time.perf_counter() - t_all < 20:
        timed(f"one module: all {len(every)} + common", every, 1)
    # loading: time and device memory of every unit loaded
    from cupy.cuda import function
    cupy.cuda.runtime.deviceSynchronize()
    f0 = _free()
    t = time.perf_counter()
    mods = []
    for img in pool_res[8]:
        m = function.Module()
        m.load(img)
        mods.append(m)
    dt = time.perf_counter() - t
    cupy.cuda.runtime.deviceSynchronize()
    print(f"LOAD {len(mods)} modules {dt * 1e3:.1f} ms, device memory {(f0 - _free()) / 2**20:.1f} MiB", flush=True)


def _comm():
    import torch
    import pyccl
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(0)
    torch.zeros(1, device="cuda")
    import cupy
    cupy.cuda.Device(0).use()
    return rank, pyccl, torch


def _calls(comm, torch, dtype, nbytes, ops=None):
    """One call of every op on `nbytes` per rank; returns {op: seconds} (synchronised)."""
    import pyccl
    size = comm.size
    t = getattr(torch, dtype)
    n = max(size, nbytes // torch.tensor([], dtype=t).element_size()) // size * size
    x = torch.ones(n, dtype=t, device="cuda")
    big = torch.ones(n * size, dtype=t, device="cuda")
    part = torch.ones(n // size, dtype=t, device="cuda")
    todo = {
        "all_reduce_sum": lambda: comm.all_reduce(x),
        "all_reduce_max": lambda: comm.all_reduce(x, op=pyccl.MAX),
        "reduce": lambda: comm.reduce(x, root=0),
        "broadcast": lambda: comm.broadcast(x, root=0),
        "all_gather": lambda: comm.all_gather(big, x),
        "reduce_scatter": lambda: comm.reduce_scatter(part, x),
        "all_to_all": lambda: comm.all_to_all(big, big.clone()),
        "gather": lambda: comm.gather(big, x, root=0),
        "scatter": lambda: comm.scatter(x, big, root=0),
    }
    out = {}
    for name, fn in todo.items():
        if ops and name not in ops:
            continue
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out[name] = time.perf_counter() - t0
    return out


def mode_first(args):
    t0 = time.perf_counter()
    rank, pyccl, torch = _comm()
    t1 = time.perf_counter()
    comm = pyccl.init()
    t2 = time.perf_counter()
    rows = []
    for dtype in DTYPES:
        first = _calls(comm, torch, dtype, 1 << 20)
        second = _calls(comm, torch, dtype, 1 << 20)
        rows.append((dtype, first, second))
    if rank == 0:
        print(f"FIRST torch+cuda init {t1 - t0:.2f} s, pyccl.init {t2 - t1:.2f} s")
        for dtype, first, second in rows:
            print(f"FIRST {dtype:9s} " + " ".join(f"{k}={v:.3f}" for k, v in first.items()))
            print(f"AGAIN {dtype:9s} " + " ".join(f"{k}={v * 1e3:.1f}ms" for k, v in second.items()))
        print(f"FIRST total {time.perf_counter() - t0:.2f} s")
        try:
            from pyccl.engines.cuda import build
            for target, rows in build.report().items():
                hows = {}
                for unit, how, sec in rows:
                    n, s = hows.get(how, (0, 0.0))
                    hows[how] = (n + 1, s + sec)
                print(f"KERNELS {target}: " + "; ".join(f"{how}: {n} units, {s:.2f} s" for how, (n, s) in hows.items()))
                fg = [(u, round(sec, 2)) for u, how, sec in rows if "foreground" in how]
                print(f"KERNELS foreground builds: {fg}")
        except ImportError:
            print("KERNELS (no pyccl.engines.cuda.build: the code before issue 32)")
    comm.close()


def mode_torchfirst(args):
    """The issue's headline: init_process_group("pyccl") + barrier, then the first bfloat16
    all_reduce (torch backend), in a fresh process."""
    t0 = time.perf_counter()
    import torch
    import torch.distributed as dist
    import pyccl.torch_backend  # noqa: F401  (registers the backend)
    rank = int(os.environ["RANK"])
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    x = torch.ones(1 << 19, dtype=torch.bfloat16, device=dev)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    dist.init_process_group("pyccl", device_id=dev)
    dist.barrier()
    t2 = time.perf_counter()
    dist.all_reduce(x)
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    if rank == 0:
        print(f"TORCHFIRST imports+cuda {t1 - t0:.2f} s; init_process_group+barrier {t2 - t1:.2f} s; first bf16 "
              f"all_reduce (1 MiB) {t3 - t2:.3f} s; init+first {t3 - t1:.2f} s", flush=True)
    dist.destroy_process_group()


def _state(comm):
    import cupy
    cc = comm.cuda
    d = {"cupy_pool_used": cupy.get_default_memory_pool().used_bytes(),
         "cupy_pool_total": cupy.get_default_memory_pool().total_bytes(),
         "cupy_pinned_free_blocks": cupy.get_default_pinned_memory_pool().n_free_blocks()}
    if cc is not None:
        d.update(small=2 * cc.size * getattr(cc, "small_cap", 0), big=2 * cc.size * getattr(cc, "big_cap", 0),
                 tmp=(getattr(cc, "_tmp_buf", None) or (0, 0))[1])
        if hasattr(cc, "memory"):
            d["memory()"] = cc.memory()
    if hasattr(comm, "memory"):
        d["comm.memory()"] = comm.memory()
    return d


def mode_memory(args):
    rank, pyccl, torch = _comm()
    import cupy
    comm = pyccl.init()
    comm.barrier()
    time.sleep(0.5)
    base = _free()
    comm.barrier()

    marks = [0]

    def sync():
        """A barrier through the store: comm.barrier() would resume a suspended communicator."""
        marks[0] += 1
        key = f"probe/sync{marks[0]}"
        comm.store.add(key, 1)
        while comm.store.add(key, 0) < comm.size:
            time.sleep(0.01)

    def show(step):
        sync()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        cupy.get_default_memory_pool().free_all_blocks()
        time.sleep(0.3)
        used = (base - _free()) / 2**20
        st = _state(comm)
        sync()
        if rank == 0:
            print(f"MEM {step:34s} GPU used over base (both ranks) {used:8.1f} MiB; torch reserved "
                  f"{torch.cuda.memory_reserved() / 2**20:.0f} MiB; rank0 {json.dumps(st)}", flush=True)
    for nbytes in (1 << 20, 64 << 20):
        _calls(comm, torch, "float32", nbytes)
        show(f"after every op at {nbytes >> 20} MiB")
        torch.cuda.empty_cache()
        show(f"  tensors freed, torch cache emptied")
    if args.suspend and hasattr(comm, "suspend"):
        comm.suspend()
        show("after suspend()")
        comm.resume()
        show("after resume()")
    comm.close()
    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.synchronize()
    time.sleep(0.5)
    if rank == 0:
        print(f"MEM after close() GPU used over base {(base - _free()) / 2**20:8.1f} MiB (rank 1 may still be "
              f"closing)", flush=True)


def mode_parts(args):
    """One process, no peers: what each part of a CUDA communicator's state costs in free device
    memory (cudaMemGetInfo; the driver maps device memory in 2 MiB pages), made and then given
    back, each from a fresh reading. torch's own kernels are loaded first (not pyccl's)."""
    import gc
    import cupy
    import torch
    torch.cuda.set_device(0)
    for t in (torch.float32, torch.bfloat16, torch.float16):
        torch.full((4096,), 3, dtype=t, device="cuda").cpu()
    cupy.cuda.Device(0).use()
    rt = cupy.cuda.runtime
    mib = 2 ** 20

    def free():
        rt.deviceSynchronize()
        gc.collect()
        time.sleep(0.05)
        return rt.memGetInfo()[0]

    def row(label, make, drop):
        f0 = free()
        t = time.perf_counter()
        obj = make()
        dt = time.perf_counter() - t
        f1 = free()
        drop(obj)
        del obj
        f2 = free()
        print(f"PARTS {label:48s} +{(f0 - f1) / mib:5.1f} MiB made ({dt * 1e3:6.1f} ms), "
              f"{(f0 - f2) / mib:+5.1f} MiB left after release", flush=True)

    from pyccl.engines.cuda.kernels import FLAG_WORDS, MAXR
    ctrl = FLAG_WORDS * 8 + 16 + 3 * MAXR * 8
    row(f"control block ({ctrl} B, cudaMalloc)", lambda: rt.malloc(ctrl), rt.free)
    row("control block + 232 KiB more (two small mallocs)", lambda: (rt.malloc(ctrl), rt.malloc(ctrl)),
        lambda ps: [rt.free(p) for p in ps])
    row("scratch 32 + 16 MiB, reduce buffer 8 MiB", lambda: [rt.malloc(n << 20) for n in (32, 16, 8)],
        lambda ps: [rt.free(p) for p in ps])
    for again in ("", " again"):      # run s4-1 (H100): +2 MiB made, +2 MiB left; the second time shows reuse
        row(f"3 streams (cupy, non-blocking){again}", lambda: [cupy.cuda.Stream(non_blocking=True) for _ in range(3)],
            lambda ss: ss.clear())
    row("70 events (disable timing)", lambda: [rt.eventCreateWithFlags(2) for _ in range(70)],
        lambda es: [rt.eventDestroy(e) for e in es])
    row("pinned mapped status words (64 B)", lambda: rt.hostAlloc(64, 3), rt.freeHost)

    def export():
        p = rt.malloc(4 << 20)
        rt.ipcGetMemHandle(p)
        return p
    row("4 MiB allocation exported as an IPC handle", export, rt.free)
    from pyccl.engines.cuda import build, library
    b = build.builder_for(int(cupy.cuda.Device(0).compute_capability))
    units = ["common"] + [f"{d}-{o}" for d in ("float32", "bfloat16", "float16", "int32") for o in (0, 3)]
    t = time.perf_counter()
    imgs = [b.image_for(("oneshot", *u.split("-"), 1) if u != "common" else "staged") for u in units]
    imgs = [b._ready(u) or i for u, i in zip(units, imgs)]
    print(f"PARTS images of {len(imgs)} units: {sum(len(i.image) for i in imgs) / mib:.2f} MiB, "
          f"{sorted({i.how for i in imgs})}, {time.perf_counter() - t:.2f} s; CUDA_MODULE_LOADING="
          f"{os.environ.get('CUDA_MODULE_LOADING')}", flush=True)
    def load(img):                      # loaded and every function looked up (lazy loading loads them then)
        m = library._load(cupy, img.image)
        return m, [m.get_function(n) for n in img.names.values()]
    def lib_cycle():
        lib = library.acquire(cupy, 0)
        for d in ("float32", "bfloat16", "float16", "int32"):
            for o in (0, 3):
                lib.function(("oneshot", d, o, 1))
        lib.function("staged")
        return lib
    # first, in a context that has loaded no module of pyccl's: what pyccl's own loading takes (one
    # kernel looked up per unit); run s4-1 ran it last, after the modules below: +0 (reused)
    row("pyccl Library: acquire, 9 kernels of 9 units, release", lib_cycle, lambda lib: library.release(0))
    row("pyccl Library again", lib_cycle, lambda lib: library.release(0))
    # run s4-1 (H100, lazy loading): 1 module +2 MiB, then 9 modules +12 MiB, none given back on unload
    row("1 kernel module (cuModuleLoadData, cupy Module)", lambda: load(imgs[1]), lambda m: None)
    row(f"{len(imgs)} kernel modules", lambda: [load(i) for i in imgs], lambda ms: ms.clear())
    row(f"{len(imgs)} kernel modules again", lambda: [load(i) for i in imgs], lambda ms: ms.clear())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("nvrtc", "first", "memory", "torchfirst", "parts"))
    p.add_argument("--one-module", type=int, default=1)
    p.add_argument("--suspend", type=int, default=1)
    args = p.parse_args()
    {"nvrtc": mode_nvrtc, "first": mode_first, "memory": mode_memory, "torchfirst": mode_torchfirst,
     "parts": mode_parts}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
