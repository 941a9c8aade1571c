"""Pieces shared by the examples: start-up, deterministic weights, a collective timer,
Megatron-style tensor-parallel layers and a 1F1B pipeline schedule. Plain torch only.

Every collective the examples make goes through ``timed(kind)`` so that ``--profile`` can
say where the time went; nothing here knows which backend (pyccl, gloo, nccl) runs it.
"""
from __future__ import annotations

import argparse
import os
import time
import zlib
from collections import defaultdict, deque
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

try:                                   # registers the "pyccl" backend with torch.distributed
    import pyccl
except ImportError:                    # gloo/nccl still work without pyccl installed
    pyccl = None


# ---- start-up -------------------------------------------------------------------------------
def common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--backend", choices=("pyccl", "gloo", "nccl"), default="pyccl",
                   help="torch.distributed backend (default pyccl)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--profile", action="store_true",
                   help="time every collective and print count / total ms / share of step time per kind")
    p.add_argument("--warmup", type=int, default=2,
                   help="steps (or runs) left out of the timings (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank (default 1)")
    p.add_argument("--out", help="write the results (parameters / outputs) to this .pt file (rank 0)")
    p.add_argument("--quiet", action="store_true", help="no per-step log lines")
    return p


class Runtime:
    """Where this process is: rank, world size, device; ``dist`` is initialised when world > 1."""

    def __init__(self, rank=0, world=1, local_rank=0, device=None, backend=None):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device, self.backend = device or torch.device("cpu"), backend

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def init(backend: str, device: str, threads: int = 1, timeout_s: float = 300.0) -> Runtime:
    """Join the job, whichever launcher started this process.

    * torchrun (RANK/WORLD_SIZE/MASTER_*): ``init_process_group`` reads them (env://).
    * ``python -m pyccl.launch`` (and mpirun/srun): pyccl's launcher sets PYCCL_RANK/SIZE and the
      address of *its* store, not torchrun's variables, so we ask ``pyccl.env`` who we are, let
      rank 0 host a torch TCPStore and pass its address to the others through pyccl's store.
    * no launcher: a single process, no process group (the reference runs).
    """
    if device == "cpu":
        torch.set_num_threads(max(1, threads))
    env = os.environ
    store = None
    if env.get("RANK", "").strip() and env.get("WORLD_SIZE", "").strip() and not env.get("PYCCL_RANK"):
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", "0"))
    elif pyccl is not None and (env.get("PYCCL_RANK") or env.get("OMPI_COMM_WORLD_RANK")
                                or env.get("PMI_RANK") or env.get("SLURM_PROCID")):
        from pyccl.env import detect, open_store
        info = detect()
        rank, world, local = info.rank, info.size, info.local_rank
        if world > 1:
            store = _torch_store_via_pyccl(open_store(info), info, timeout_s)
    else:
        rank, world, local = 0, 1, 0
    # several ranks may share a GPU (ranks posing as hosts on a 1-GPU machine)
    dev = torch.device("cuda", local % torch.cuda.device_count()) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    rt = Runtime(rank, world, local, dev, backend)
    if world == 1:
        return rt
    kw = dict(backend=backend, timeout=timedelta(seconds=timeout_s))
    if dev.type == "cuda":
        kw["device_id"] = dev
    if store is not None:
        kw.update(store=store, rank=rank, world_size=world)
    dist.init_process_group(**kw)
    dist.barrier()       # every rank is up (and NCCL's communicator exists) before the first p2p batch
    return rt


def _torch_store_via_pyccl(pstore, info, timeout_s):
    key = "examples/torch_store_addr"
    if info.rank == 0:
        host = info.store_host if info.store_host not in (None, "0.0.0.0", "::") else "127.0.0.1"
        ts = dist.TCPStore(host, 0, info.size, True, timeout=timedelta(seconds=timeout_s),
                           wait_for_workers=False)
        pstore.set(key, f"{host}:{ts.port}".encode())
    else:
        host, port = pstore.get(key, timeout=timeout_s).decode().rsplit(":", 1)
        ts = dist.TCPStore(host, int(port), info.size, False, timeout=timedelta(seconds=timeout_s))
    return ts


def gather_objects(rt: Runtime, obj) -> list:
    """Every rank's `obj`, in rank order (all_gather_object; just [obj] in one process)."""
    if rt.world == 1:
        return [obj]
    everyone = [None] * rt.world
    dist.all_gather_object(everyone, obj)
    return everyone


def finish(rt: Runtime):
    if dist.is_initialized():
        dist.barrier()                  # nobody leaves while a peer still needs its connections
        dist.destroy_process_group()


# ---- deterministic weights ------------------------------------------------------------------
def init_tensor(seed: int, name: str, shape, std: float | None = None, fill: float | None = None):
    """The full (unsharded) initial value of parameter ``name``, the same on every rank and in
    the single-process reference: a generator seeded from (seed, name) makes it independent of
    which other parameters a rank builds."""
    if fill is not None:
        return torch.full(shape, float(fill))
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g) * std


def shard(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    assert full.shape[dim] % size == 0, f"dim {dim} of {tuple(full.shape)} not divisible by {size}"
    return full.chunk(size, dim)[rank].contiguous()


# ---- timing ---------------------------------------------------------------------------------
class Profiler:
    """Counts and times collectives by kind (``with prof("all_reduce tp-fwd"): ...``) and steps.

    When enabled, a timed region starts and ends with a CUDA synchronisation (on GPU), so its
    time is the collective's alone, not the compute queued before it; disabled, it costs
    nothing. A receive's time includes waiting for the peer to produce the data (pipeline
    bubbles show up there)."""

    def __init__(self, enabled: bool, rt: Runtime):
        self.enabled, self.rt = enabled, rt
        self.reset()

    def reset(self):
        self.calls = defaultdict(int)
        self.seconds = defaultdict(float)
        self.steps, self.step_seconds = 0, 0.0

    def __call__(self, kind: str):
        return _Timed(self, kind) if self.enabled else _NOOP

    def add_step(self, seconds: float):
        self.steps += 1
        self.step_seconds += seconds

    def summary(self) -> dict:
        return {"steps": self.steps, "step_s": self.step_seconds,
                "kinds": {k: (self.calls[k], self.seconds[k]) for k in sorted(self.calls)}}

    def report(self, title: str) -> str:
        """Every rank's table, gathered to rank 0 (call on every rank; returns '' elsewhere)."""
        mine = (title, self.summary())
        rows = [mine]
        if dist.is_initialized():
            rows = [None] * dist.get_world_size()
            dist.all_gather_object(rows, mine)
        if self.rt.rank != 0:
            return ""
        lines = []
        for t, s in rows:
            steps, step_s = s["steps"], s["step_s"]
            lines.append(f"profile {t}: {steps} steps, {1e3 * step_s / max(steps, 1):.2f} ms/step")
            lines.append(f"  {'collective':<24}{'calls':>7}{'total ms':>11}{'ms/step':>9}{'share':>8}")
            comm = 0.0
            for k, (n, sec) in s["kinds"].items():
                comm += sec
                lines.append(f"  {k:<24}{n:>7}{1e3 * sec:>11.2f}{1e3 * sec / max(steps, 1):>9.3f}"
                             f"{100 * sec / step_s if step_s else 0:>7.1f}%")
            lines.append(f"  {'all collectives':<24}{'':>7}{1e3 * comm:>11.2f}{1e3 * comm / max(steps, 1):>9.3f}"
                         f"{100 * comm / step_s if step_s else 0:>7.1f}%")
        return "\n".join(lines)


class _Timed:
    __slots__ = ("kind", "p", "t0")

    def __init__(self, p, kind):
        self.p, self.kind = p, kind

    def __enter__(self):
        self.p.rt.sync()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.p.rt.sync()
        self.p.calls[self.kind] += 1
        self.p.seconds[self.kind] += time.perf_counter() - self.t0
        return False


class _NoOp:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NOOP = _NoOp()


# ---- tensor parallelism (Megatron-LM's f and g) -----------------------------------------------
class TP:
    """A tensor-parallel group: ``group`` is None when size is 1 (then every op is the identity)."""

    def __init__(self, group, rank: int, size: int, prof: Profiler):
        self.group, self.rank, self.size, self.prof = group, rank, size, prof


class _CopyToTP(torch.autograd.Function):
    """f: identity forward, all-reduce of the input gradient backward (the input feeds every shard)."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x

    @staticmethod
    def backward(ctx, grad):
        tp = ctx.tp
        grad = grad.contiguous().clone()
        with tp.prof("all_reduce tp-bwd"):
            dist.all_reduce(grad, group=tp.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """g: all-reduce of the partial sums forward, identity backward (each shard's gradient is its own)."""

    @staticmethod
    def forward(ctx, x, tp):
        x = x.contiguous()
        with tp.prof("all_reduce tp-fwd"):
            dist.all_reduce(x, group=tp.group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x, tp: TP):
    return x if tp.group is None else _CopyToTP.apply(x, tp)


def reduce_from_tp(x, tp: TP):
    return x if tp.group is None else _ReduceFromTP.apply(x, tp)


class ColumnParallelLinear(nn.Module):
    """y_shard = x W_shard^T + b_shard: each rank owns out_features/tp rows of W; output stays split."""

    def __init__(self, name, in_f, out_f, tp: TP, seed: int, std: float, bias: bool = True):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(shard(init_tensor(seed, name + ".weight", (out_f, in_f), std), 0, tp.rank, tp.size))
        self.weight.tp_dim = 0
        self.bias = None
        if bias:
            self.bias = nn.Parameter(shard(torch.zeros(out_f), 0, tp.rank, tp.size))
            self.bias.tp_dim = 0

    def forward(self, x):
        return F.linear(copy_to_tp(x, self.tp), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum_r x_shard_r W_shard_r^T + b: each rank owns in_features/tp columns; all-reduce joins."""

    def __init__(self, name, in_f, out_f, tp: TP, seed: int, std: float):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(shard(init_tensor(seed, name + ".weight", (out_f, in_f), std), 1, tp.rank, tp.size))
        self.bias = nn.Parameter(torch.zeros(out_f))       # replicated, added once after the reduce
        self.weight.tp_dim = 1

    def forward(self, x):
        return reduce_from_tp(F.linear(x, self.weight), self.tp) + self.bias


# ---- pipeline parallelism -------------------------------------------------------------------
class P2P:
    """Activation / gradient exchange between neighbouring stages (global ranks ``prev``/``next``,
    None at the ends). Every exchange is one ``batch_isend_irecv``, so a stage that sends and
    receives at the same point never waits on a peer doing the same (NCCL, Gloo and pyccl alike)."""

    def __init__(self, prev, next_, shape, dtype, device, prof: Profiler):
        self.prev, self.next, self.shape, self.dtype, self.device, self.prof = prev, next_, shape, dtype, device, prof

    def _go(self, send=None, send_to=None, recv_from=None):
        ops, buf = [], None
        if send is not None:
            ops.append(dist.P2POp(dist.isend, send.detach().contiguous(), send_to))
        if recv_from is not None:
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, buf, recv_from))
        kind = "send+recv" if send is not None and recv_from is not None else "send" if send is not None else "recv"
        with self.prof(kind):
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        return buf

    def recv_forward(self):
        return None if self.prev is None else self._go(recv_from=self.prev)

    def send_forward(self, y):
        if self.next is not None:
            self._go(send=y, send_to=self.next)

    def send_forward_recv_backward(self, y):
        return None if self.next is None else self._go(send=y, send_to=self.next, recv_from=self.next)

    def send_backward_recv_forward(self, g):
        return None if self.prev is None else self._go(send=g, send_to=self.prev, recv_from=self.prev)

    def recv_backward(self):
        return None if self.next is None else self._go(recv_from=self.next)

    def send_backward(self, g):
        if self.prev is not None:
            self._go(send=g, send_to=self.prev)


def one_f_one_b(num_micro: int, pp_rank: int, pp_size: int, p2p: P2P, forward, backward):
    """The 1F1B (PipeDream-flush) schedule of Megatron-LM, one training step.

    ``forward(i, x)`` runs micro-batch i through this stage (x: the received activation, None on
    the first stage) and returns its output (the scaled loss on the last stage);
    ``backward(x, y, dy)`` back-propagates (dy None on the last stage) and returns dL/dx.
    Stage s first runs pp-s-1 forwards (warm-up), then alternates one forward and one backward,
    then drains the remaining backwards: at most pp-s micro-batches' activations are alive.
    """
    warmup = min(pp_size - pp_rank - 1, num_micro)
    steady = num_micro - warmup
    alive = deque()
    for i in range(warmup):
        x = p2p.recv_forward()
        y = forward(i, x)
        p2p.send_forward(y)
        alive.append((x, y))
    x = p2p.recv_forward() if steady > 0 else None
    for j in range(steady):
        y = forward(warmup + j, x)
        dy = p2p.send_forward_recv_backward(y)
        alive.append((x, y))
        x0, y0 = alive.popleft()
        dx = backward(x0, y0, dy)
        if j == steady - 1:
            x = None
            p2p.send_backward(dx)
        else:
            x = p2p.send_backward_recv_forward(dx)
    for _ in range(warmup):
        x0, y0 = alive.popleft()
        dy = p2p.recv_backward()
        p2p.send_backward(backward(x0, y0, dy))
