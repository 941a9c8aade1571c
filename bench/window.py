#!/usr/bin/env python3
"""One-sided put + signal against send/recv, side by side on the same transport (issue 30).

Two ranks play ping-pong: rank 0 sends a message, rank 1 waits for it and sends one back;
the one-way time is half a round trip. The two methods take turns in every round (`--rounds`
rounds of `--iters` round trips each, after a warm-up), and the table gives each method's
median one-way time over the rounds with the (min-max) spread.

- send/recv: `comm.send(x, peer)` / `comm.recv(x, peer)`;
- put+signal: `win.put(x, peer, signal=0)` / `win.wait_signal(0, 1)` on a window of the
  same size (same host: cross-memory attach; config `tcp`: the TCP emulation; config `ibverbs`:
  RDMA WRITE, where an RDMA device is, e.g. `tests/rdma/rxe-vm.sh python bench/window.py
  --configs ibverbs`).

CUDA (`--cuda`, under `torchrun --standalone --nproc-per-node 2 bench/window.py --cuda --sizes 8`,
backend "pyccl"): host time per call of put+signal and wait_signal (queued on the stream) against
dist.send / dist.recv of the same CUDA tensor, and a ping-pong's one-way wall time
(bench/gpu_window.sh runs it on the GPU machine).

Usage: `python bench/window.py` launches every configuration (`--configs shm,tcp`) on 2 local
ranks through `python -m pyccl.launch` and prints a markdown table (`--json FILE` also saves
it); inside the launch it runs as `--rank-side`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

CONFIGS = {"shm": {}, "tcp": {"PYCCL_TRANSPORT": "tcp"}, "ibverbs": {"PYCCL_TRANSPORT": "ibverbs"}}
DEFAULT = ["shm", "tcp"]                 # ibverbs: where an RDMA device is (tests/rdma/rxe-vm.sh)


def pingpong_sendrecv(comm, x, iters):
    other = 1 - comm.rank
    t = time.perf_counter()
    for _ in range(iters):
        if comm.rank == 0:
            comm.send(x, other)
            comm.recv(x, other)
        else:
            comm.recv(x, other)
            comm.send(x, other)
    return (time.perf_counter() - t) / iters / 2


def pingpong_put(win, comm, x, iters):
    other = 1 - comm.rank
    t = time.perf_counter()
    for _ in range(iters):
        if comm.rank == 0:
            win.put(x, other, signal=0)
            win.wait_signal(0, 1)
        else:
            win.wait_signal(0, 1)
            win.put(x, other, signal=0)
    return (time.perf_counter() - t) / iters / 2


def rank_side(args):
    import pyccl
    comm = pyccl.init()
    out = []
    for nbytes in args.sizes:
        x = np.zeros(max(nbytes // 4, 1) if nbytes >= 4 else 0, np.float32) if nbytes % 4 == 0 else None
        if x is None:
            x = np.zeros(nbytes, np.uint8)
        win = comm.window(np.zeros_like(x))
        kind = win.transport(1 - comm.rank)
        iters = args.iters if nbytes <= 65536 else max(10, args.iters // 20)
        pingpong_sendrecv(comm, x, max(10, iters // 5))            # warm-up: connections, caches
        pingpong_put(win, comm, x, max(10, iters // 5))
        times = {"send/recv": [], "put+signal": []}
        for _ in range(args.rounds):
            comm.barrier()
            times["send/recv"].append(pingpong_sendrecv(comm, x, iters))
            comm.barrier()
            times["put+signal"].append(pingpong_put(win, comm, x, iters))
        win.close()
        out.append({"bytes": x.nbytes, "link": kind, "comm": comm.transport_name, "iters": iters,
                    "rounds": args.rounds, "us": {k: [v * 1e6 for v in vs] for k, vs in times.items()}})
    if comm.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    comm.close()


def cuda_rank_side(args):
    """Under torchrun, backend "pyccl", CUDA tensors of one GPU (or one per rank): host time per
    call of put+signal (origin) and wait_signal (target) against dist.send / dist.recv of the
    same tensor, then the one-way time of a ping-pong queued on the streams (rank 0 prints);
    windows of both wait modes (ccl/windows/cuda.py WAIT: a spinning kernel, cuStreamWaitValue64)."""
    import torch
    import torch.distributed as dist
    import pyccl.torch_backend as tb
    import pyccl.windows.cuda as cw
    rank = int(os.environ["RANK"])
    dev = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    dist.init_process_group("pyccl", device_id=dev)
    other = 1 - rank
    modes = ("kernel", "stream")
    out = []
    for nbytes in args.sizes:
        x = torch.zeros(max(nbytes // 4, 1), device=dev)
        wins = {}
        for m in modes:
            cw.WAIT = m
            wins[m] = tb.window(torch.zeros_like(x), signals=2)
        iters = args.iters if nbytes <= 65536 else max(10, args.iters // 20)
        res = {"bytes": x.numel() * 4, "iters": iters, "rounds": args.rounds, "link": wins["kernel"].transport(other),
               "modes": {m: wins[m].wait_mode for m in modes}, "us": {k: [] for k in ("send", "recv")}}
        for m in modes:
            for k in ("put+signal", "wait_signal", "put+signal pingpong"):
                res["us"][f"{k} {m}"] = []
        res["us"]["send/recv pingpong"] = []

        def timed(fn):
            torch.cuda.synchronize()
            dist.barrier()
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            host = (time.perf_counter() - t) / iters * 1e6
            torch.cuda.synchronize()
            for w in wins.values():
                w.synchronize()
            return host

        def sendrecv():
            if rank == 0:
                return timed(lambda: dist.send(x, other)), "send"
            return timed(lambda: dist.recv(x, other)), "recv"

        def putsignal(m):
            win = wins[m]
            if rank == 0:
                return timed(lambda: win.put(x, other, signal=0)), f"put+signal {m}"
            return timed(lambda: win.wait_signal(0, 1)), f"wait_signal {m}"

        def pp_sendrecv():
            if rank == 0:
                dist.send(x, other)
                dist.recv(x, other)
            else:
                dist.recv(x, other)
                dist.send(x, other)

        def pp_put(m):
            win = wins[m]
            if rank == 0:
                win.put(x, other, signal=1)
                win.wait_signal(1, 1)
            else:
                win.wait_signal(1, 1)
                win.put(x, other, signal=1)

        host_fns = [sendrecv] + [lambda m=m: putsignal(m) for m in modes]
        pp_fns = [(pp_sendrecv, "send/recv pingpong")] + [(lambda m=m: pp_put(m), f"put+signal pingpong {m}")
                                                         for m in modes]
        for fn in host_fns:                                   # warm-up
            fn()
        for _ in range(args.rounds):
            for fn in host_fns:
                host, name = fn()
                res["us"][name].append(host)
            for fn, name in pp_fns:
                n = max(10, iters // 10)
                torch.cuda.synchronize()
                dist.barrier()
                t = time.perf_counter()
                for _ in range(n):
                    fn()
                torch.cuda.synchronize()
                for w in wins.values():
                    w.synchronize()
                res["us"][name].append((time.perf_counter() - t) / n / 2 * 1e6)
        for w in wins.values():
            w.close()
        out.append(res)
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
        print("| bytes | waits | send µs host/call | put+signal µs host/call | put+signal / send (host) | "
              "send/recv ping-pong µs one-way | put+signal ping-pong µs one-way | put / sendrecv (ping-pong) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in out:
            u = r["us"]
            for m in modes:
                p, pp = u[f"put+signal {m}"], u[f"put+signal pingpong {m}"]
                print(f"| {r['bytes']} | {r['modes'][m]} | {fmt(u['send'])} | {fmt(p)} | "
                      f"{statistics.median(p) / statistics.median(u['send']):.2f} | {fmt(u['send/recv pingpong'])} | "
                      f"{fmt(pp)} | {statistics.median(pp) / statistics.median(u['send/recv pingpong']):.2f} |")
        print(f"\nmedian over {args.rounds} rounds (min-max), {args.iters} calls per round; host time per call "
              f"on rank 0 (the origin); ping-pong: wall time of round trips / 2 (two processes on one GPU "
              f"time-slice: read ping-pong figures as the path's behaviour, not the GPU's speed)")
    dist.barrier()
    if rank == 1:
        print("RESULT-TARGET " + json.dumps([{"bytes": r["bytes"], "recv": [round(v, 1) for v in r["us"]["recv"]],
                                               **{f"wait_signal {m}": [round(v, 1) for v in r["us"][f"wait_signal {m}"]]
                                                  for m in modes}} for r in out]), flush=True)
    dist.destroy_process_group()


def fmt(vs):
    return f"{statistics.median(vs):.1f} ({min(vs):.1f}-{max(vs):.1f})"


def driver(args):
    rows = []
    for name in args.configs:
        env = {**os.environ, **CONFIGS[name]}
        cmd = [sys.executable, "-m", "pyccl.launch", "-n", "2", os.path.abspath(__file__), "--rank-side",
               "--sizes", ",".join(map(str, args.sizes)), "--iters", str(args.iters), "--rounds", str(args.rounds)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if r.returncode or line is None:
            sys.exit(f"{name}: {' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
        for res in json.loads(line[7:]):
            rows.append({"config": name, **res})
    print("| config | bytes | window link | send/recv µs one-way | put+signal µs one-way | put/sendrecv |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        s, p = row["us"]["send/recv"], row["us"]["put+signal"]
        print(f"| {row['config']} (comm {row['comm']}) | {row['bytes']} | {row['link']} | {fmt(s)} | {fmt(p)} | "
              f"{statistics.median(p) / statistics.median(s):.2f} |")
    print(f"\nmedian over {args.rounds} rounds (min-max), {args.iters} round trips per round (1/20 of it "
          f"above 64 KiB), methods alternating each round; 2 ranks on one host")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", type=lambda s: s.split(","), default=DEFAULT)
    ap.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[8, 1 << 20])
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--rank-side", action="store_true")
    ap.add_argument("--cuda", action="store_true",
                    help="CUDA tensors through the torch backend; run under torchrun --nproc-per-node 2")
    args = ap.parse_args()
    if args.cuda:
        cuda_rank_side(args)
    else:
        rank_side(args) if args.rank_side else driver(args)


if __name__ == "__main__":
    main()
