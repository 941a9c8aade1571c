#!/usr/bin/env python3
"""Small-call latency of dist.all_reduce on CPU tensors through the "pyccl" backend.

    python bench/torch_small.py [--ranks 2] [--bytes 8] [--iters 20000]

Spawns the ranks itself (env:// rendezvous on loopback); prints the median over 5 blocks of
µs per call (rank 0). Used to check that describing a tensor (ccl/buffers.py) stays cheap.
"""
import argparse
import os
import socket
import statistics
import time

import torch.multiprocessing as mp


def _rank(rank, size, port, nbytes, iters, backend, old_view, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist
    import pyccl.torch_backend  # noqa: F401
    if old_view:                    # the view before the DLPack fix, for comparison
        import pyccl.buffers
        pyccl.buffers.torch_numpy = lambda t: t.numpy()
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=size)
    t = torch.ones(max(1, nbytes // 4))
    for _ in range(2000):
        dist.all_reduce(t)
    blocks = []
    for _ in range(5):
        dist.barrier()
        s = time.perf_counter()
        for _ in range(iters // 5):
            dist.all_reduce(t)
        blocks.append((time.perf_counter() - s) / (iters // 5) * 1e6)
    if rank == 0:
        q.put(blocks)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--bytes", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--backend", default="pyccl")
    ap.add_argument("--numpy-view", action="store_true", help="describe tensors with Tensor.numpy() (old)")
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_rank, args=(r, a.ranks, port, a.bytes, a.iters, a.backend, a.numpy_view, q))
          for r in range(a.ranks)]
    for p in ps:
        p.start()
    blocks = q.get(timeout=300)
    for p in ps:
        p.join(60)
    print(f"{a.backend}{' (numpy view)' if a.numpy_view else ''} all_reduce {a.bytes} B, {a.ranks} ranks: median {statistics.median(blocks):.2f} us/call "
          f"(blocks {', '.join(f'{b:.2f}' for b in blocks)})")


if __name__ == "__main__":
    main()
