#!/usr/bin/env python3
"""A model of communicator set-up at 1k, 16k and 100k ranks, from the real code paths.

    python bench/startup_model.py [--clients 4000] [--check /tmp/branch.jsonl]

What each rank does at set-up (ccl/bootstrap.py, counted, not guessed):
  store   : 1 connection (mutual HMAC handshake) + 3 requests (world ticket ADD, SET of its
            address, GET of its successor's), served by the one event-loop thread of the store;
  gather  : R = ceil(log2 N) Bruck rounds; each round one dial + one accept (3 messages each,
            HMAC both ways) and one block of records in, one out; a rank receives N-1 records;
  decode  : every record parsed once (rank part JSON + one host part per run of same-host ranks);
  first   : the first collective opens its plan's connections (tree: <= 6 peers, one round of
            handshakes) and runs 2*log2 N latency steps.

Measured here, in this process, with the real functions:
  c_hs    : CPU of one handshake pair (both ends, through the real Listener and link()),
  c_store : server CPU per client (handshake + the 3 requests), the server in its own process
            loaded by --clients real TCPStore clients (kept open: the selector holds them all),
  c_rec   : CPU to pack + unpack + decode one record (the real _pack/_unpack/_decode at size N),
  bytes   : the bytes a rank receives in the all-gather at size N (the real _pack).
Assumed (a network, not this VM): RTT (default 50 us TCP round trip) and bandwidth BW (default
1 GB/s into Python), stated in the output. On this 2-core host the check is on CPU: the model's
CPU per rank at the measured N against bench/startup.py's, and wall ~ N * CPU / cores.
"""
import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import secrets
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyccl import bootstrap as B          # noqa: E402
from pyccl.store import StoreServer, TCPStore  # noqa: E402
from pyccl.topology.detect import local_info  # noqa: E402


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure_handshake(reps=300) -> float:
    """CPU seconds of one dial + one accept (both ends, listener thread included)."""
    lst = B.listener_for("127.0.0.1", secrets.token_bytes(32))
    t0 = cpu()
    for i in range(reps):
        socks = B.link(lst, "model", 0, [(0, lst.address, B.KIND_BOOT, 0, i)], [(0, B.KIND_BOOT, 0, i)],
                       time.monotonic() + 30, lambda w: "timeout")
        for s in socks.values():
            s.close()
    return (cpu() - t0) / reps


def _server(secret, q, done):
    s = StoreServer("127.0.0.1", 0, secret)
    q.put(s.address)
    done.wait()
    r = resource.getrusage(resource.RUSAGE_SELF)
    q.put((r.ru_utime + r.ru_stime, s.requests, s.handshakes))
    s.close()


def measure_store(clients: int) -> float:
    """Server CPU seconds per client doing the bootstrap's pattern (connect, ADD, SET, GET next)."""
    secret = secrets.token_bytes(32)
    q, done = mp.Queue(), mp.Event()
    p = mp.Process(target=_server, args=(secret, q, done))
    p.start()
    host, port = q.get(timeout=30)
    time.sleep(0.2)
    idle_cpu = None
    B.raise_fd_limit()
    cs = [TCPStore(host, port, secret, timeout=60) for _ in range(clients)]
    for i, c in enumerate(cs):
        c.add("world", 1)
        c.set(f"boot/{i}", b"10.0.0.1:12345")
    for i, c in enumerate(cs):
        c.get(f"boot/{(i + 1) % clients}")
    done.set()
    server_cpu, reqs, hs = q.get(timeout=60)
    for c in cs:
        c.close()
    p.join(10)
    assert reqs == 3 * clients and hs == clients, (reqs, hs)
    del idle_cpu
    return server_cpu / clients


def bruck_bytes_and_cpu(n: int, per_host: int) -> tuple:
    """(bytes rank 0 receives, CPU s to pack+unpack+decode them, rounds) at size n: the real
    _pack/_unpack/_decode on records shaped like local_info's, per_host ranks per host."""
    base = local_info(0)
    recs = []
    for r in range(n):
        info = dict(base, rank=r, pid=10000 + r, host=f"host{r // per_host}/boot",
                    hostname=f"host{r // per_host}", addr=f"10.{r >> 16 & 255}.{r >> 8 & 255}.{r & 255}:40000",
                    next="10.0.0.1:40000", tcp_lanes=2)
        recs.append(B._split_info(info))
    have, nbytes, rounds = 1, 0, 0
    t0 = cpu()
    got_all = [recs[0]]
    while have < n:
        k = min(have, n - have)
        block = B._pack(recs[have:have + k])          # what rank `have` sends rank 0 (its first k)
        nbytes += len(block) + 8
        got_all += B._unpack(block, k, "model")
        have += k
        rounds += 1
    B._decode(got_all)
    return nbytes, cpu() - t0, rounds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4000)
    ap.add_argument("--rtt", type=float, default=50e-6, help="network round trip, seconds")
    ap.add_argument("--bw", type=float, default=1e9, help="bytes/s a rank takes in from a socket")
    ap.add_argument("--per-host", type=int, default=8, help="ranks per host")
    ap.add_argument("--check", help="bench/startup.py --json output of the branch, to compare with")
    ap.add_argument("--sizes", default="1024,16384,102400")
    a = ap.parse_args()
    c_hs = measure_handshake()
    c_store = measure_store(a.clients)
    print(f"# measured: handshake pair {c_hs * 1e6:.0f} us CPU; store server {c_store * 1e6:.0f} us CPU per "
          f"client (handshake + ADD + SET + GET), {a.clients} clients held open")
    print(f"# assumed: RTT {a.rtt * 1e6:.0f} us, {a.bw / 1e9:g} GB/s per rank, {a.per_host} ranks per host")

    def model(n, with_net=True):
        nbytes, c_data, rounds = bruck_bytes_and_cpu(n, a.per_host)
        store = n * c_store                                  # one server thread, all ranks at once
        gather_cpu = rounds * c_hs + c_data
        gather = gather_cpu + (rounds * 3 * a.rtt + nbytes / a.bw if with_net else 0)
        first = c_hs * 3 + (1.5 * a.rtt + 2 * math.ceil(math.log2(n)) * a.rtt if with_net else 0)
        return {"N": n, "rounds": rounds, "bytes": nbytes, "store_s": store, "gather_s": gather,
                "gather_cpu_s": gather_cpu, "first_s": first, "total_s": store + gather + first,
                "cpu_rank_s": gather_cpu + c_hs * 3}
    print(f"{'N':>7} {'rounds':>6} {'MB in/rank':>10} {'store s':>8} {'gather s':>8} {'first s':>8} "
          f"{'total s':>8} {'cpu/rank s':>10}")
    for n in [int(x) for x in a.sizes.split(",")]:
        m = model(n)
        print(f"{n:>7} {m['rounds']:>6} {m['bytes'] / 1e6:>10.2f} {m['store_s']:>8.2f} {m['gather_s']:>8.2f} "
              f"{m['first_s']:>8.3f} {m['total_s']:>8.2f} {m['cpu_rank_s']:>10.3f}", flush=True)
    if a.check:
        rows = [json.loads(x) for x in open(a.check)]
        print("# check against bench/startup.py (this host, 2 cores): bootstrap CPU per rank from the model "
              "(+ the fixed cost measured at N=8), and wall ~ N x CPU/rank / cores + store")
        base = min(rows, key=lambda r: r["N"])
        fixed = base["cpu_per_rank_s"] - model(base["N"], False)["cpu_rank_s"]
        print(f"# fixed per-rank set-up CPU (local_info, Communicator, plan, first all_reduce) = "
              f"{fixed:.3f} s (from N={base['N']})")
        print(f"{'N':>7} {'cpu/rank meas':>13} {'cpu/rank model':>14} {'setup s meas':>12} {'setup s model':>13}")
        for r in sorted(rows, key=lambda r: r["N"]):
            m = model(r["N"], False)
            c = fixed + m["cpu_rank_s"]
            wall = r["N"] * c / len(os.sched_getaffinity(0)) + m["store_s"]
            print(f"{r['N']:>7} {r['cpu_per_rank_s']:>13.3f} {c:>14.3f} {r['setup_s']:>12.2f} {wall:>13.2f}")


if __name__ == "__main__":
    main()
