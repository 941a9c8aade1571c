"""Data-parallel training that survives a dead rank: shrink, let the launcher's replacement
join, hand it the model and optimiser state, go on.

    python -m pyccl.launch --elastic -n 4 examples/elastic_train.py --kill-rank 2 --kill-step 5 --check

Every step's global batch is drawn from a generator seeded by the step, and rank r of W
takes rows r, r+W, ...; the gradients are summed with one all_reduce on a "pyccl" group of
pyccl.torch_backend.elastic. At --kill-step, --kill-rank SIGKILLs itself before its
all_reduce. The survivors see the error, `shrink_group`, `grow_group(1)`: the replacement
(`pyccl.launch --elastic` starts it with PYCCL_JOIN=1, so `elastic_group()` joins) becomes
the last rank, and new rank 0 broadcasts the step, the parameters and SGD's momentum. The
failed step runs again on 4 ranks, so the data order is the uninterrupted run's.

--device cuda: the tensors live on GPU LOCAL_RANK % count (two ranks may share one GPU; see
bench/gpu_elastic.sh). Every step waits for its all_reduce (``work.wait(timeout)``) before the
update, on either device: on CUDA a failed collective is otherwise raised by the next call.

--check: before the elastic run every starting rank trains the same model, same data, with
nobody killed (the uninterrupted reference); at the end rank 0 compares the parameters and
prints MATCH or DIFFER with the largest difference.

The end is orderly on every rank: the device synchronised, then a barrier (no rank closes,
freeing device memory a peer maps through CUDA IPC, while a peer's GPU work may still read
it), the group shut down, then the garbage collected while CUDA is still up, so nothing of
pyccl's CUDA state is left for interpreter exit. --trace-exit says on stderr how far each rank got and which threads
were still alive at exit and whether the GPU kernels' background build was still running (the
first GPU run's crash at exit: a build thread inside NVRTC while the process exited,
bench/exit_during_build.py; such a crash, in exit() after Python is done, has no traceback).
"""
import argparse
import atexit
import gc
import os
import signal
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from pyccl.torch_backend.elastic import elastic_group, grow_group, shrink_group

IN, HIDDEN = 8, 32


def args_():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=64, help="global batch (rows over every rank)")
    p.add_argument("--kill-rank", type=int, default=None)
    p.add_argument("--kill-step", type=int, default=5)
    p.add_argument("--check", action="store_true", help="compare with an uninterrupted run: MATCH/DIFFER")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--trace-exit", action="store_true",
                   help="stderr: each stage of the end, and the threads alive at interpreter exit")
    p.add_argument("--plain-exit", action="store_true",
                   help="end with pg.shutdown() alone (the first GPU run's end): a control")
    return p.parse_args()


def model_(seed, device):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN, 1)).to(device=device, dtype=torch.float64)


def batch(step, seed, n, device):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    x = torch.randn(n, IN, generator=g, dtype=torch.float64)
    return x.to(device), torch.sin(x.sum(1, keepdim=True)).to(device)


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vec, tensors):
    i = 0
    for t in tensors:
        t.copy_(vec[i:i + t.numel()].view_as(t))
        i += t.numel()


def train_step(pg, model, opt, step, a, kill=False):
    """One step on this rank's rows; the one all_reduce raises if a peer died."""
    x, y = batch(step, a.seed, a.batch, a.device)
    rows = slice(pg.rank(), None, pg.size())
    opt.zero_grad()
    loss = ((model(x[rows]) - y[rows]) ** 2).sum() / a.batch
    loss.backward()
    grads = flat(p.grad for p in model.parameters())
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)
    # Finished and checked before the update: on CUDA a synchronous all_reduce only queues the
    # kernel, and a dead peer's error would be raised by the *next* call, after this step's
    # update had used a half-summed gradient (the redone step would then not reproduce the run).
    work = dist.all_reduce(grads, group=pg, async_op=True)
    work.wait(timeout=timedelta(seconds=pg.pyccl_communicator.timeout))
    unflat(grads, [p.grad for p in model.parameters()])
    opt.step()


def state(model, opt, step, device):
    """The step, parameters and momentum buffers, as one float64 vector (to broadcast)."""
    params = list(model.parameters())
    bufs = [opt.state[p].get("momentum_buffer") if p in opt.state else None for p in params]
    bufs = [torch.zeros_like(p) if b is None else b for p, b in zip(params, bufs)]
    return torch.cat([torch.tensor([float(step)], dtype=torch.float64, device=device),
                      flat(p.detach() for p in params), flat(bufs)])


def load(model, opt, vec):
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    with torch.no_grad():
        unflat(vec[1:1 + n], params)
    bufs = [torch.empty_like(p) for p in params]
    unflat(vec[1 + n:], bufs)
    for p, b in zip(params, bufs):
        opt.state[p]["momentum_buffer"] = b
    return int(vec[0].item())


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _trace(a, text):
    if a.trace_exit:
        print(f"elastic_train: exit trace pid {os.getpid()} {text}", file=sys.stderr, flush=True)


def _threads_at_exit(a):
    alive = [f"{t.name}{' (daemon)' if t.daemon else ''}" for t in threading.enumerate()
             if t is not threading.main_thread()]
    _trace(a, f"atexit (Python {sys.version.split()[0]}): threads alive {alive or 'none'}; {_kernel_build()}")


def _kernel_build():
    """The GPU kernels' background build (ccl/engines/cuda/build.py): over, or still running."""
    build = sys.modules.get("pyccl.engines.cuda.build")
    if build is None:
        return "no kernel builder"
    bits = []
    for b in list(build._builders.values()):
        alive = sum(w.is_alive() for w in b._workers)
        done = (f"over {b.finished_at - b.started_at:.2f}s after its start" if b.finished_at and b.started_at
                else f"{alive} of {len(b._workers)} workers running")
        bits.append(f"{b.label}: {done}")
    return "kernel build " + ("; ".join(bits) or "not started")


def finish(pg, a):
    """The orderly end (see the module doc)."""
    _trace(a, f"rank {pg.rank()}: training done")
    if a.plain_exit:
        pg.shutdown()
        _trace(a, "shutdown done (--plain-exit)")
        return
    if a.device != "cpu":
        torch.cuda.synchronize()            # this rank's GPU work is over ...
    pg.pyccl_communicator.barrier()         # ... and so is every rank's: nobody reads what is freed next
    _trace(a, f"rank {pg.rank()}: synchronize and barrier done")
    pg.shutdown()
    gc.collect()
    if a.device != "cpu":
        torch.cuda.synchronize()
    _trace(a, f"shutdown and collect done; {_kernel_build()}")


def main():
    a = args_()
    if a.trace_exit:
        atexit.register(_threads_at_exit, a)
        import faulthandler                 # a rank stopped by the launcher (SIGTERM) shows where it hung
        faulthandler.register(signal.SIGTERM, chain=True)
    if a.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        a.device = torch.device("cuda", torch.cuda.current_device())
    pg = elastic_group()                    # a replacement (PYCCL_JOIN=1) joins here
    joined = pg.pyccl_communicator.joined
    dies = a.kill_rank == pg.rank() and not joined   # the starting rank, not whoever holds that number later
    model = model_(a.seed, a.device)
    opt = sgd(model)
    ref = None
    if a.check and not joined:              # the uninterrupted run, same data order
        ref_model = model_(a.seed, a.device)
        ref_opt = sgd(ref_model)
        for step in range(a.steps):
            train_step(pg, ref_model, ref_opt, step, a)
        ref = flat(p.detach() for p in ref_model.parameters())
    step = 0
    if joined:
        vec = state(model, opt, 0, a.device)
        dist.broadcast(vec, group_src=0, group=pg)
        step = load(model, opt, vec)
        print(f"elastic_train: joined as rank {pg.rank()} of {pg.size()} at step {step}", flush=True)
    t0 = time.monotonic()
    while step < a.steps:
        try:
            train_step(pg, model, opt, step, a, kill=dies and step == a.kill_step)
        except Exception as e:              # noqa: BLE001 - pyccl's PeerFailure/Timeout, as torch hands them on
            t = time.monotonic()
            print(f"elastic_train: rank {pg.rank()} step {step}: {type(e).__name__}; shrinking", flush=True)
            small = shrink_group(pg)
            pg.abort()
            pg = grow_group(small, 1)
            small.shutdown()
            dist.broadcast(state(model, opt, step, a.device), group_src=0, group=pg)
            if pg.rank() == 0:
                print(f"elastic_train: back to {pg.size()} ranks in {time.monotonic() - t:.2f}s "
                      f"(shrink + grow + state broadcast); redoing step {step}", flush=True)
            continue
        step += 1
    if pg.rank() == 0:
        gpu = (f" {torch.cuda.get_device_name()}, pyccl GPU state {type(pg.pyccl_communicator.cuda).__name__}"
               if a.device != "cpu" else "")
        print(f"elastic_train: {a.steps} steps on {pg.size()} ranks in {time.monotonic() - t0:.2f}s "
              f"({a.device}{gpu})", flush=True)
        if ref is not None:
            got = flat(p.detach() for p in model.parameters())
            diff = (got - ref).abs().max().item()
            print("MATCH" if torch.equal(got, ref) else f"DIFFER (largest difference {diff:.3g})", flush=True)
    finish(pg, a)


if __name__ == "__main__":
    main()
