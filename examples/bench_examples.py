"""Time both examples on several backends, interleaved, and print a markdown table.

    python examples/bench_examples.py                                   # CPU: 4 ranks, pyccl vs gloo
    python examples/bench_examples.py --device cuda --nproc 2 --launcher torchrun \\
        --backends nccl pyccl --layouts 2x1 1x2                          # what examples/gpu_run.sh does

Each round runs every (example, layout, backend) once, backends alternating, so a noisy minute
on a shared machine hits all of them alike; the table gives the median over rounds (and the
range). Every run is launched with --profile --out, and its numbers come from that file:

* training: ms/step = the slowest rank's mean step time after the warm-up steps; tokens/s =
  batch x seq / that; comm % = time inside collectives / step time, mean over ranks; the
  per-kind columns are ms per step, mean over ranks.
* MoE: tokens/s = generated tokens / generation time (prefill + decode) on rank 0; all-to-all %
  as above; ms/step = mean generation step (prefill and decode steps together).
A run that fails is reported with the last line of its error output, and the others go on.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def cmd_for(a, script, args, out):
    prog = [str(HERE / script), *args, "--device", a.device, "--profile", "--quiet", "--out", out]
    if a.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.nproc), *prog]
    return [sys.executable, "-m", "pyccl.launch", "-n", str(a.nproc), *prog]


def run(a, script, args):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.pt")
        p = subprocess.run(cmd_for(a, script, args, out), capture_output=True, text=True, timeout=a.timeout,
                           check=False)
        if p.returncode != 0 or not os.path.exists(out):
            lines = [l for l in (p.stderr + p.stdout).splitlines() if l.strip()]
            err = next((l for l in reversed(lines) if "Error" in l or "error" in l), lines[-1] if lines else "?")
            return {"error": err.strip()[:160]}
        return torch.load(out)


def per_rank_kinds(timing):
    """{kind: ms per step, mean over ranks}, comm share mean over ranks, slowest rank's s/step."""
    kinds, shares, step = {}, [], 0.0
    for t in timing:
        n = max(t["steps"], 1)
        step = max(step, t["step_s"] / n)
        comm = 0.0
        for k, (_, sec) in t["kinds"].items():
            kinds[k] = kinds.get(k, 0.0) + 1e3 * sec / n / len(timing)
            comm += sec
        shares.append(comm / t["step_s"] if t["step_s"] else 0.0)
    return kinds, statistics.mean(shares), step


def med(xs, fmt):
    xs = sorted(xs)
    m = statistics.median(xs)
    return f"{m:{fmt}}" if len(xs) == 1 else f"{m:{fmt}} ({xs[0]:{fmt}}–{xs[-1]:{fmt}})"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--launcher", choices=("pyccl", "torchrun"), default="pyccl")
    p.add_argument("--backends", nargs="+", default=["pyccl", "gloo"])
    p.add_argument("--layouts", nargs="+", default=["2x2", "2x1"], help="training layouts TPxPP")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-args", default="--steps 40 --warmup 10", help="extra tp_pp_train.py arguments")
    p.add_argument("--moe-args", default="--runs 5 --warmup 1", help="extra moe_inference.py arguments")
    p.add_argument("--timeout", type=int, default=300)
    a = p.parse_args()

    configs = [("tp_pp_train.py", f"tp {l.split('x')[0]} pp {l.split('x')[1]}",
                ["--tp", l.split("x")[0], "--pp", l.split("x")[1], *a.train_args.split()]) for l in a.layouts]
    configs.append(("moe_inference.py", f"ep {a.nproc}", a.moe_args.split()))
    results = {}
    for r in range(a.rounds):
        for script, name, args in configs:
            for b in (a.backends if r % 2 == 0 else a.backends[::-1]):
                res = run(a, script, args + ["--backend", b])
                results.setdefault((script, name, b), []).append(res)
                status = res.get("error", "ok")
                print(f"round {r + 1}/{a.rounds} {script} {name} {b}: {status}", file=sys.stderr, flush=True)

    print(f"\n{a.nproc} ranks on {a.device} ({a.launcher} launcher), median of {a.rounds} rounds (range):\n")
    print("| example | layout | backend | ms/step | tokens/s | collectives % of step | ms/step per collective |")
    print("|---|---|---|---|---|---|---|")
    for (script, name, b), rs in results.items():
        ok = [x for x in rs if "error" not in x]
        if not ok:
            print(f"| {script} | {name} | {b} | failed: {rs[0]['error']} | | | |")
            continue
        ms, tps, share, kinds = [], [], [], {}
        for x in ok:
            k, s, step = per_rank_kinds(x["timing"])
            share.append(100 * s)
            for kk, v in k.items():
                kinds.setdefault(kk, []).append(v)
            if script == "tp_pp_train.py":
                ms.append(1e3 * step)
                tps.append(x["tokens_per_step"] / step)
            else:
                times = [t for run_ in x["times"] for t in run_]
                ms.append(1e3 * sum(times) / len(times))
                tps.append(x["generated"] / sum(times))
        per = ", ".join(f"{kk} {statistics.median(v):.2f}" for kk, v in sorted(kinds.items()))
        print(f"| {script} | {name} | {b} | {med(ms, '.1f')} | {med(tps, '.0f')} | {med(share, '.0f')} | {per} |")


if __name__ == "__main__":
    main()
