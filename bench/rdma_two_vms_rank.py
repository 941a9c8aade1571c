#!/usr/bin/env python3
"""One rank (0 in VM a, 1 in VM b) of bench/rdma_two_vms.py: `rdma_two_vms_rank.py ROUNDS QUICK`.

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


def main(rounds, quick):
    comm = pyccl.init()
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
    main(int(sys.argv[1]), sys.argv[2] == "1")
