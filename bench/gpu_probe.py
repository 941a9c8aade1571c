#!/usr/bin/env python3
"""Diagnostics for the GPU path (not part of the table): free-running vs synchronised timing of
pyccl's all-reduce and all-gather at medium sizes, per variant, to tell host-bound from GPU-bound.

    python3 -m torch.distributed.run --standalone --nproc_per_node=2 bench/gpu_probe.py
"""
import os
import time

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import pyccl.torch_backend  # noqa: E402,F401

MB = 1 << 20


def free_running(fn, iters=60):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    t0 = time.perf_counter()
    for s, e in ev:
        s.record()
        fn()
        e.record()
    host = (time.perf_counter() - t0) / iters * 1e6
    torch.cuda.synchronize()
    ts = sorted(s.elapsed_time(e) * 1e3 for s, e in ev)
    return ts[0], ts[len(ts) // 2], ts[int(len(ts) * 0.9)], host


def synced(fn, iters=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e6)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    from datetime import timedelta
    pyg = dist.new_group(backend="pyccl", timeout=timedelta(seconds=60))
    comm = pyg.pyccl_communicator
    rank = dist.get_rank()
    x = torch.ones(1024, device="cuda")
    comm.all_reduce(x)
    cc = comm.cuda
    sms = cc.max_blocks

    def say(*a):
        if rank == 0:
            print(*a, flush=True)
    if os.environ.get("PROBE_MODE") == "bimodal":
        # Same collectives on (a) a plain Communicator (own TCP store, no torch group threads)
        # and (b) the torch group's communicator, free-running, several repetitions.
        import pyccl
        from pyccl.store import StoreServer, TCPStore
        secret = b"p" * 32
        port = int(os.environ.get("MASTER_PORT", "29500")) + 7
        server = StoreServer("127.0.0.1", port, secret) if rank == 0 else None
        plain = pyccl.Communicator(rank, dist.get_world_size(), store=TCPStore("127.0.0.1", port, secret, timeout=60),
                                   secret=secret, transport="tcp")
        for label, c in (("plain", plain), ("torch-group", comm)):
            t1 = torch.ones(MB // 4, device="cuda")
            t2 = torch.ones(2 * MB // 4, device="cuda")
            ri, ro = torch.ones(16 * MB, device="cuda"), torch.empty(8 * MB, device="cuda")
            for name, fn in (("AR 1 MiB one-shot", lambda: c.all_reduce(t1)),
                             ("AR 2 MiB one-shot", lambda: c.all_reduce(t2)),
                             ("RS 64 MiB kernel", lambda: c.reduce_scatter(ro, ri))):
                res = [free_running(fn, 100) for _ in range(3)]
                say(f"{label:12s} {name:18s} " + " | ".join(f"{a:6.1f} {b:6.1f} {c_:6.1f} h{d:6.1f}" for a, b, c_, d in res))
        plain.close()
        dist.barrier()
        dist.destroy_process_group()
        return
    if os.environ.get("PROBE_PROFILE") == "1":
        import cProfile
        import io
        import pstats
        t = torch.ones(16 * MB // 4, device="cuda")
        i, o = torch.ones(16 * MB // 8, device="cuda"), torch.empty(16 * MB // 4, device="cuda")
        for name, fn in (("all_reduce 16 MiB (two-shot)", lambda: comm.all_reduce(t)),
                         ("all_gather 16 MiB", lambda: comm.all_gather(o, i))):
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            dist.barrier()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(300):
                fn()
            prof.disable()
            torch.cuda.synchronize()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
            say(f"== rank {rank} profile of 300 x {name}\n" + buf.getvalue()[-4500:])
        dist.barrier()
        dist.destroy_process_group()
        return
    say("op size variant: free-running min/median/p90 us, host us/call | synced us/call")
    for size in (16 * MB, 64 * MB, 256 * MB):
        t = torch.ones(size // 4, device="cuda")
        for mode, blocks in (("kernel", sms), ("kernel", 64), ("kernel", 32), ("ce", sms)):
            cc.twoshot_mode, cc.max_blocks = mode, blocks
            for rep in range(2):
                fr = free_running(lambda: comm.all_reduce(t))
                sy = synced(lambda: comm.all_reduce(t))
                say(f"all_reduce {size // MB:4d} MiB {mode:6s} {blocks:3d} blocks: {fr[0]:7.1f} {fr[1]:7.1f} "
                    f"{fr[2]:7.1f}  host {fr[3]:6.1f} | synced {sy:7.1f}")
            fr = free_running(lambda: dist.all_reduce(t))
            say(f"   nccl: {fr[0]:7.1f} {fr[1]:7.1f} {fr[2]:7.1f} host {fr[3]:6.1f} | synced "
                f"{synced(lambda: dist.all_reduce(t)):7.1f}")
        cc.twoshot_mode, cc.max_blocks = "kernel", sms
        t = None
        i, o = torch.ones(size // 8, device="cuda"), torch.empty(size // 4, device="cuda")
        for rep in range(2):
            fr = free_running(lambda: comm.all_gather(o, i))
            say(f"all_gather {size // MB:4d} MiB: {fr[0]:7.1f} {fr[1]:7.1f} {fr[2]:7.1f}  host {fr[3]:6.1f} | "
                f"synced {synced(lambda: comm.all_gather(o, i)):7.1f}")
        fr = free_running(lambda: dist.all_gather_into_tensor(o, i))
        say(f"   nccl: {fr[0]:7.1f} {fr[1]:7.1f} {fr[2]:7.1f} host {fr[3]:6.1f}")
        i = o = None
        torch.cuda.empty_cache()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
