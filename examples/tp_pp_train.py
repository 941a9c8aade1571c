"""Train a small GPT with tensor, pipeline and data parallelism on torch.distributed (pyccl).

    torchrun --nproc-per-node 4 examples/tp_pp_train.py --tp 2 --pp 2          # pyccl (default)
    python -m pyccl.launch -n 4 examples/tp_pp_train.py --tp 2 --pp 1 --backend gloo
    python examples/tp_pp_train.py                                              # 1 process: the reference

world = dp x pp x tp; ranks are numbered tp fastest, then dp, then pp (Megatron-LM's order), so
a tensor-parallel group holds neighbouring ranks.

* Tensor parallelism (Megatron-LM): in every block the QKV projection and the first MLP layer
  are column-parallel (each rank owns heads / ffn columns), the attention output projection and
  the second MLP layer are row-parallel; one all-reduce joins the partial sums in the forward
  pass, one all-reduce joins the input gradients of each column-parallel layer in the backward
  pass (autograd functions in examples/parallel.py).
* Pipeline parallelism: the blocks are split over pp stages; stages exchange activations
  forward and their gradients backward with send/recv (batch_isend_irecv) on the 1F1B schedule
  over --micro-batches micro-batches.
* Data parallelism over the remaining ranks: the global batch is split over dp replicas; after
  the step's backward passes the gradients are averaged with one all-reduce over the dp group.

Every weight's initial value is drawn from (seed, parameter name) before being sharded and every
rank draws the same global batch, so one process without any parallelism (`--tp 1 --pp 1`, no
launcher) trains the same model on the same data: `--check` has rank 0 run that reference
afterwards and compare the parameters, `--out` writes the gathered full parameters for a test.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parallel as par

# The training text: the opening of "Alice's Adventures in Wonderland" (Lewis Carroll, 1865;
# public domain). A character-level model learns its letter statistics within a few steps.
TEXT = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
    "nothing to do: once or twice she had peeped into the book her sister was reading, but it had "
    "no pictures or conversations in it, 'and what is the use of a book,' thought Alice 'without "
    "pictures or conversations?' So she was considering in her own mind (as well as she could, for "
    "the hot day made her feel very sleepy and stupid), whether the pleasure of making a "
    "daisy-chain would be worth the trouble of getting up and picking the daisies, when suddenly a "
    "White Rabbit with pink eyes ran close by her. There was nothing so very remarkable in that; "
    "nor did Alice think it so very much out of the way to hear the Rabbit say to itself, 'Oh "
    "dear! Oh dear! I shall be late!' (when she thought it over afterwards, it occurred to her that "
    "she ought to have wondered at this, but at the time it all seemed quite natural); but when "
    "the Rabbit actually took a watch out of its waistcoat-pocket, and looked at it, and then "
    "hurried on, Alice started to her feet, for it flashed across her mind that she had never "
    "before seen a rabbit with either a waistcoat-pocket, or a watch to take out of it, and burning "
    "with curiosity, she ran across the field after it, and fortunately was just in time to see it "
    "pop down a large rabbit-hole under the hedge."
)
VOCAB = sorted(set(TEXT))
DATA = torch.tensor([VOCAB.index(c) for c in TEXT], dtype=torch.long)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences per step)")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step and replica")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--check", action="store_true",
                   help="rank 0 then trains the single-process reference and compares the parameters")
    return par.common_args(p).parse_args(argv)


# ---- the model ------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-LN transformer block; heads and the MLP's hidden units are split over the tp group."""

    def __init__(self, i, a, tp: par.TP):
        super().__init__()
        d, s, std = a.d_model, a.seed, 0.02 * 5
        assert a.heads % tp.size == 0 and a.ffn % tp.size == 0, "--heads and --ffn must divide by --tp"
        self.heads, self.hd = a.heads // tp.size, d // a.heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        # QKV rows are laid out (head, q|k|v, head_dim): a contiguous row shard is whole heads.
        # No bias: a key bias cannot change the softmax, so its gradient is rounding noise, which
        # Adam would blow up into real (and run-dependent) updates.
        self.qkv = par.ColumnParallelLinear(f"blocks.{i}.qkv", d, 3 * d, tp, s, std, bias=False)
        self.proj = par.RowParallelLinear(f"blocks.{i}.proj", d, d, tp, s, std / math.sqrt(2 * a.layers))
        self.fc1 = par.ColumnParallelLinear(f"blocks.{i}.fc1", d, a.ffn, tp, s, std)
        self.fc2 = par.RowParallelLinear(f"blocks.{i}.fc2", a.ffn, d, tp, s, std / math.sqrt(2 * a.layers))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, self.heads, 3, self.hd).permute(3, 0, 2, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(o.transpose(1, 2).reshape(b, t, self.heads * self.hd))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Stage(nn.Module):
    """The blocks of one pipeline stage; the first also embeds, the last also has the LM head."""

    def __init__(self, a, tp: par.TP, pp_rank: int, pp_size: int):
        super().__init__()
        assert a.layers % pp_size == 0, "--layers must divide by --pp"
        self.first, self.last = pp_rank == 0, pp_rank == pp_size - 1
        d, v, s = a.d_model, len(VOCAB), a.seed
        if self.first:
            self.tok = nn.Parameter(par.init_tensor(s, "tok", (v, d), 0.1))
            self.pos = nn.Parameter(par.init_tensor(s, "pos", (a.seq, d), 0.1))
        per = a.layers // pp_size
        self.blocks = nn.ModuleDict({str(i): Block(i, a, tp) for i in range(pp_rank * per, (pp_rank + 1) * per)})
        if self.last:
            self.ln_f = nn.LayerNorm(d)
            self.head = nn.Parameter(par.init_tensor(s, "head", (v, d), 0.1))

    def forward(self, x):
        if self.first:
            x = F.embedding(x, self.tok) + self.pos[: x.shape[1]]
        for blk in self.blocks.values():
            x = blk(x)
        return F.linear(self.ln_f(x), self.head) if self.last else x


def global_batch(a, step):
    """The step's global batch: the same on every rank (seeded by step), replicas take slices."""
    g = torch.Generator().manual_seed(a.seed * 7919 + step)
    start = torch.randint(0, len(DATA) - a.seq - 1, (a.batch,), generator=g)
    idx = start[:, None] + torch.arange(a.seq + 1)
    chunk = DATA[idx]
    return chunk[:, :-1], chunk[:, 1:]


# ---- training -------------------------------------------------------------------------------
def train(a, rt: par.Runtime) -> dict | None:
    """Train on this rank's part of the model; returns the gathered results on rank 0."""
    tp, pp = a.tp, a.pp
    if rt.world % (tp * pp):
        raise SystemExit(f"world size {rt.world} is not a multiple of tp*pp = {tp * pp}")
    dp = rt.world // (tp * pp)
    tp_rank, dp_rank, pp_rank = rt.rank % tp, rt.rank // tp % dp, rt.rank // (tp * dp)
    rank_of = lambda t, d, p: t + tp * (d + dp * p)
    if a.batch % (dp * a.micro_batches):
        raise SystemExit(f"--batch {a.batch} must divide by dp*micro-batches = {dp * a.micro_batches}")
    mb = a.batch // (dp * a.micro_batches)
    prof = par.Profiler(a.profile, rt)

    # Groups: every rank creates every group, in the same order (torch's rule).
    tp_group = dp_group = None
    if tp > 1:
        for p in range(pp):
            for d in range(dp):
                g = dist.new_group([rank_of(t, d, p) for t in range(tp)])
                if (d, p) == (dp_rank, pp_rank):
                    tp_group = g
    if dp > 1:
        for p in range(pp):
            for t in range(tp):
                g = dist.new_group([rank_of(t, d, p) for d in range(dp)])
                if (t, p) == (tp_rank, pp_rank):
                    dp_group = g
    tpc = par.TP(tp_group, tp_rank, tp, prof)

    stage = Stage(a, tpc, pp_rank, pp).to(rt.device)
    params = [p for p in stage.parameters()]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01, foreach=False)
    p2p = par.P2P(rank_of(tp_rank, dp_rank, pp_rank - 1) if pp_rank > 0 else None,
                  rank_of(tp_rank, dp_rank, pp_rank + 1) if pp_rank < pp - 1 else None,
                  (mb, a.seq, a.d_model), torch.float32, rt.device, prof)
    logger = rt.rank == rank_of(0, 0, pp - 1)          # holds the loss: last stage, tp 0, dp 0
    tokens_per_step = a.batch * a.seq
    losses = []
    if logger and not a.quiet:
        print(f"[tp_pp_train] {a.backend} on {rt.device.type}: world {rt.world} = dp {dp} x pp {pp} x tp {tp}, "
              f"{a.layers} layers d_model {a.d_model}, batch {a.batch} x seq {a.seq} in {a.micro_batches} "
              f"micro-batches of {mb} per replica", flush=True)

    for step in range(a.steps):
        if step == a.warmup:
            prof.reset()                    # the first --warmup steps are left out of the timings
        rt.sync()
        t0 = time.perf_counter()
        x_all, y_all = global_batch(a, step)
        rows = slice(dp_rank * mb * a.micro_batches, (dp_rank + 1) * mb * a.micro_batches)
        xs = x_all[rows].to(rt.device).split(mb)
        ys = y_all[rows].to(rt.device).split(mb)
        micro_losses = []

        def forward(i, x):
            if x is not None:
                x.requires_grad_()
            out = stage(xs[i] if stage.first else x)
            if not stage.last:
                return out
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), ys[i].reshape(-1))
            micro_losses.append(loss.detach())
            return loss / a.micro_batches

        def backward(x, y, dy):
            torch.autograd.backward(y, dy)
            return None if x is None else x.grad

        opt.zero_grad(set_to_none=True)
        par.one_f_one_b(a.micro_batches, pp_rank, pp, p2p, forward, backward)
        if dp > 1:                          # average the gradients over the replicas, one bucket
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            with prof("all_reduce dp-grads"):
                dist.all_reduce(flat, group=dp_group)
            flat /= dp
            off = 0
            for p in params:
                p.grad.copy_(flat[off: off + p.numel()].view_as(p))
                off += p.numel()
        opt.step()
        if stage.last:
            loss = torch.stack(micro_losses).mean()
            if dp > 1:
                with prof("all_reduce loss"):
                    dist.all_reduce(loss, group=dp_group)
                loss /= dp
            losses.append(loss.item())
        rt.sync()
        dt = time.perf_counter() - t0
        if step >= a.warmup:
            prof.add_step(dt)
        if logger and not a.quiet:
            print(f"[tp_pp_train] step {step + 1:>3}/{a.steps}  loss {losses[-1]:.4f}  {1e3 * dt:7.1f} ms  "
                  f"{tokens_per_step / dt:8.0f} tokens/s", flush=True)

    # Gather every rank's shards to rank 0 (also from dp > 0 to check that replicas agree).
    mine = {"coords": (tp_rank, dp_rank, pp_rank),
            "params": {n: (getattr(p, "tp_dim", None), p.detach().cpu()) for n, p in stage.named_parameters()},
            "losses": losses if logger else None, "timing": prof.summary()}
    everyone = par.gather_objects(rt, mine)
    report = prof.report(f"rank {rt.rank} (tp {tp_rank} pp {pp_rank} dp {dp_rank})") if a.profile else ""
    if rt.rank != 0:
        return None
    if report:
        print(report, flush=True)
    res = assemble(everyone, dict(world=rt.world, tp=tp, pp=pp, dp=dp, backend=a.backend))
    res["tokens_per_step"] = tokens_per_step
    return res


def assemble(everyone, layout) -> dict:
    """Full parameters from the shards of the dp-0 replica; `divergence` is the largest difference
    between copies that must be equal (other replicas; replicated parameters over tp)."""
    by = {r["coords"]: r for r in everyone}
    tp, dp, pp = layout["tp"], layout["dp"], layout["pp"]
    full, divergence = {}, 0.0
    for p in range(pp):
        for name, (tdim, _) in by[(0, 0, p)]["params"].items():
            shards = [by[(t, 0, p)]["params"][name][1] for t in range(tp)]
            full[name] = shards[0] if tdim is None else torch.cat(shards, tdim)
            for t in range(tp):
                for d in range(dp):
                    ref = by[(0 if tdim is None else t, 0, p)]["params"][name][1]
                    divergence = max(divergence, (by[(t, d, p)]["params"][name][1] - ref).abs().max().item())
    losses = next(r["losses"] for r in everyone if r["losses"] is not None)
    timing = [r["timing"] for r in everyone]
    return {"params": full, "losses": losses, "divergence": divergence, "layout": layout, "timing": timing}


def compare(got: dict, ref: dict, rtol=1e-4, atol=1e-5) -> float:
    """Largest |got - ref| - rtol*|ref| over all parameters (<= atol means they match)."""
    assert got.keys() == ref.keys(), f"parameter names differ: {sorted(set(got) ^ set(ref))}"
    worst = -math.inf
    for n in ref:
        assert got[n].shape == ref[n].shape, f"{n}: shape {tuple(got[n].shape)} vs {tuple(ref[n].shape)}"
        worst = max(worst, ((got[n].double() - ref[n].double()).abs() - rtol * ref[n].double().abs()).max().item())
    return worst


def reference(a) -> dict:
    """The same training in one process: no tp, no pp, no dp; the same global batches."""
    b = argparse.Namespace(**{**vars(a), "tp": 1, "pp": 1, "profile": False, "quiet": True})
    dev = torch.device("cuda", torch.cuda.current_device()) if a.device == "cuda" else torch.device("cpu")
    return train(b, par.Runtime(0, 1, 0, dev, None))


def main(argv=None):
    a = parse(argv)
    rt = par.init(a.backend, a.device, a.threads)
    res = train(a, rt)
    if res is not None:
        ls = res["losses"]
        tim = [t for t in res["timing"] if t["steps"]]
        ms = 1e3 * max(t["step_s"] / t["steps"] for t in tim) if tim else float("nan")
        print(f"[tp_pp_train] loss {ls[0]:.4f} -> {ls[-1]:.4f} over {len(ls)} steps; "
              f"{ms:.1f} ms/step after {a.warmup} warm-up steps "
              f"({a.batch * a.seq / ms * 1e3:.0f} tokens/s); replica divergence {res['divergence']:.3g}",
              flush=True)
        if a.check:
            worst = compare(res["params"], reference(a)["params"])
            ok = worst <= 1e-5
            print(f"[tp_pp_train] check against the single-process run: max(|diff| - 1e-4*|ref|) = "
                  f"{worst:.3g} -> {'MATCH' if ok else 'MISMATCH'}", flush=True)
        if a.out:
            torch.save(res, a.out)
    par.finish(rt)
    if res is not None and a.check and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
