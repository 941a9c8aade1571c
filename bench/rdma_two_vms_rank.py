#!/usr/bin/env python3
"""One rank (0 in VM a, 1 in VM b) of bench/rdma_two_vms.py: `rdma_two_vms_rank.py ROUNDS QUICK [window [SIZES]]`.

With `window` (bench/rdma_two_vms.py --window, issue 30) it measures one-sided windows beside
send/recv instead (see `windows`); SIZES (bytes, comma-separated): only the bandwidth at those
sizes, no 8-byte latency (bench/rdma_two_vms.py --paired).

Every rank prints `RESULT {...}`; rank 1's has lat_us (half an 8-byte ping-pong's round trip),
p2p_MBps per size (rank 0 sends REPS buffers back to back, rank 1 times from the first receive's
post to the last one's end, after a warm-up), p2p_async_MBps (the same, all posted at once with
async_op=True), allreduce_us per size; each {median, min, max} over ROUNDS.
"""
import json
import os
import statistics
import sys
import time

import numpy as np

import pyccl


def stats(v):
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def windows(comm, rounds, quick, sizes=(1 << 20, 4 << 20), latency=True):
    """Issue 30 beside send/recv: 8-byte put+signal ping-pong (half the round trip) and put
    bandwidth (rank 0 puts REPS buffers back to back into rank 1's window, then one signal;
    rank 1 times from the barrier to the end of its wait), per size; send/recv the same way."""
    r, peer = comm.rank, 1 - comm.rank
    pp = 50 if quick else 200
    out = {"put_lat_us": [], "lat_us": [], "put_MBps": {}, "p2p_MBps": {}}
    small = np.zeros(1, np.float64)
    win8 = comm.window(np.zeros(1, np.float64), signals=1)
    wins = {s: comm.window(np.zeros(s, np.uint8), signals=1) for s in sizes}
    bufs = {s: np.ones(s, np.uint8) for s in sizes}
    for _ in range(rounds):
        for warm in ((True, False) if latency else ()):
            n = 10 if warm else pp
            comm.barrier()
            t0 = time.perf_counter()
            for _ in range(n):
                if r == 0:
                    win8.put(small, peer, signal=0)
                    win8.wait_signal(0, 1)
                else:
                    win8.wait_signal(0, 1)
                    win8.put(small, peer, signal=0)
            if not warm:
                out["put_lat_us"].append((time.perf_counter() - t0) / n / 2 * 1e6)
            comm.barrier()
            t0 = time.perf_counter()
            for _ in range(n):
                if r == 0:
                    comm.send(small, peer)
                    comm.recv(small, peer)
                else:
                    comm.recv(small, peer)
                    comm.send(small, peer)
            if not warm:
                out["lat_us"].append((time.perf_counter() - t0) / n / 2 * 1e6)
        for s in sizes:
            x, win = bufs[s], wins[s]
            reps = max(4, min(32, (32 << 20) // s // (4 if quick else 1)))
            for warm in (True, False):
                k = 2 if warm else reps
                comm.barrier()
                t0 = time.perf_counter()
                if r == 0:
                    for _ in range(k):
                        win.put(x, peer)
                    win.signal(peer, 0)
                else:
                    win.wait_signal(0, 1)
                if not warm:
                    out["put_MBps"].setdefault(s, []).append(s * k / (time.perf_counter() - t0) / 1e6)
                comm.barrier()
                t0 = time.perf_counter()
                for _ in range(k):
                    comm.send(x, peer) if r == 0 else comm.recv(x, peer)
                if not warm:
                    out["p2p_MBps"].setdefault(s, []).append(s * k / (time.perf_counter() - t0) / 1e6)
    links = {win8.transport(peer)}
    for w in [win8, *wins.values()]:
        w.close()
    return {"transport": comm.transport_name, "window_link": sorted(links),
            "put_lat_us": stats(out["put_lat_us"]) if latency else None,
            "lat_us": stats(out["lat_us"]) if latency else None,
            "put_MBps": {str(s): stats(v) for s, v in out["put_MBps"].items()},
            "p2p_MBps": {str(s): stats(v) for s, v in out["p2p_MBps"].items()}}


def main(rounds, quick, what="p2p", sizes=None):
    comm = pyccl.init()
    if what == "window":
        res = {"rank": comm.rank}
        got = windows(comm, rounds, quick, *([[int(x) for x in sizes.split(",")], False] if sizes else []))
        if comm.rank == 1:
            res.update(got)
        os.write(1, ("RESULT " + json.dumps(res) + "\n").encode())
        comm.close()
        return
    r, peer = comm.rank, 1 - comm.rank
    lat, bw, bw_async, ar = [], {}, {}, {}
    sizes = [1 << 16, 1 << 20, 4 << 20]
    ar_sizes = [8, 1 << 16, 1 << 20, 4 << 20]
    small = np.zeros(1, np.float64)
    bufs = {s: np.ones(s, np.uint8) for s in sizes}
    pp = 50 if quick else 200
    for _ in range(rounds):
        for warm in (True, False):              # ping-pong of 8 bytes
            n = 10 if warm else pp
            comm.barrier()
            t0 = time.perf_counter()
            for _ in range(n):
                if r == 0:
                    comm.send(small, peer)
                    comm.recv(small, peer)
                else:
                    comm.recv(small, peer)
                    comm.send(small, peer)
            if not warm:
                lat.append((time.perf_counter() - t0) / n / 2 * 1e6)
        for s in sizes:                        # bandwidth, one direction
            x = bufs[s]
            reps = max(4, min(64, (32 << 20) // s // (4 if quick else 1)))
            # one after another, then all posted at once (as perftest keeps many writes in flight)
            for out, at_once in ((bw, False), (bw_async, True)):
                for warm in (True, False):
                    k = 2 if warm else reps
                    comm.barrier()
                    t0 = time.perf_counter()
                    works = [comm.send(x, peer, async_op=at_once) if r == 0 else
                             comm.recv(x, peer, async_op=at_once) for _ in range(k)]
                    for w in works if at_once else ():
                        w.wait()
                    if not warm:
                        out.setdefault(s, []).append(s * k / (time.perf_counter() - t0) / 1e6)
        for s in ar_sizes:                     # all_reduce of float32
            x = np.ones(max(1, s // 4), np.float32)
            reps = 20 if s <= 1 << 16 else 5
            comm.all_reduce(x)
            comm.barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                comm.all_reduce(x)
            ar.setdefault(s, []).append((time.perf_counter() - t0) / reps * 1e6)
    res = {"rank": r}                          # every rank reports (twovm.Job.failed wants all)
    if r == 1:                                 # the receiver's clock is the one that counts
        res.update({"transport": comm.transport_name, "lat_us": stats(lat),
                    "p2p_MBps": {str(s): stats(v) for s, v in bw.items()},
                    "p2p_async_MBps": {str(s): stats(v) for s, v in bw_async.items()},
                    "allreduce_us": {str(s): stats(v) for s, v in ar.items()}})
    os.write(1, ("RESULT " + json.dumps(res) + "\n").encode())
    comm.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] == "1", *sys.argv[3:5])
