#!/usr/bin/env python3
"""Elastic jobs across "hosts" made of network namespaces (root needed; tests/multihost/netns.py).

    python bench/elastic_netns.py --example            # examples/elastic_train.py, 2 hosts x 2 ranks
    python bench/elastic_netns.py --rounds 3 --ranks-per-host 4     # bench/elastic.py's rounds

--example: rank 2 (host 1) kills itself at step 5; when it is gone a replacement starts in
host 1's namespace with PYCCL_JOIN=1, as `pyccl.launch --elastic` would; prints rank 0's
MATCH/DIFFER. --rounds: bench/elastic.py's kill -> shrink -> grow(1) rounds on 2 hosts (the
victims are never rank 0; the joiners, one per round, wait in host 1's namespace), with the
same spans: shm inside a host, TCP between them.
"""
import argparse
import json
import os
import secrets
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from multihost.netns import Hosts  # noqa: E402

from pyccl.store import StoreServer  # noqa: E402


def _env(hosts, server, secret, host, rank=None, size=None, local=None, per_host=None, extra=None):
    e = dict(os.environ, PYCCL_STORE_ADDR=f"{hosts.store_ip}:{server.address[1]}", PYCCL_JOB_SECRET=secret.hex(),
             PYCCL_HOST_ID=f"host{host}", PYCCL_TIMEOUT="60", **(extra or {}))
    if rank is not None:
        e.update(PYCCL_RANK=str(rank), PYCCL_SIZE=str(size), PYCCL_LOCAL_RANK=str(local),
                 PYCCL_LOCAL_SIZE=str(per_host))
    return e


def _start(hosts, host, argv, env):
    return subprocess.Popen(["ip", "netns", "exec", hosts.names[host], sys.executable] + argv, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def example(hosts, per_host, args):
    secret = secrets.token_bytes(32)
    server = StoreServer(hosts.store_ip, 0, secret)
    size = hosts.n * per_host
    prog = [os.path.join(HERE, "..", "examples", "elastic_train.py"), "--kill-rank", "2", "--kill-step", "5",
            "--check"] + args
    procs = {r: _start(hosts, r // per_host, prog, _env(hosts, server, secret, r // per_host, r, size,
                                                          r % per_host, per_host)) for r in range(size)}
    replaced = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
            for r, p in list(procs.items()):
                if p.poll() not in (None, 0) and replaced is None:
                    print(f"rank {r} died ({p.returncode}); starting a replacement on host{r // per_host}", flush=True)
                    replaced = r
                    procs[f"{r}'"] = _start(hosts, r // per_host, prog,
                                            _env(hosts, server, secret, r // per_host, r, size, r % per_host,
                                                 per_host, {"PYCCL_JOIN": "1"}))
            time.sleep(0.05)
        for r, p in procs.items():
            so, se = p.communicate(timeout=10)
            if so.strip():
                print(f"--- rank {r} (rc {p.returncode})\n{so.strip()}")
            if p.returncode not in (0, -9):
                print(se[-3000:])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        server.close()


def rounds(hosts, per_host, n_rounds):
    secret = secrets.token_bytes(32)
    server = StoreServer(hosts.store_ip, 0, secret)
    size = hosts.n * per_host
    victims = [1 + (k * 5) % (size - 1) for k in range(n_rounds)]
    argv = [os.path.join(HERE, "elastic.py"), "--rank", str(n_rounds), ",".join(map(str, victims))]
    procs = [_start(hosts, r // per_host, argv, _env(hosts, server, secret, r // per_host, r, size, r % per_host,
                                                     per_host)) for r in range(size)]
    procs += [_start(hosts, 1, argv, _env(hosts, server, secret, 1, extra={"ELASTIC_ROLE": "joiner",
                                                                         "PYCCL_LOCAL_SIZE": str(per_host)}))
              for _ in range(n_rounds)]
    results = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=120 + 60 * n_rounds)
            results += [json.loads(ln[7:]) for ln in so.splitlines() if ln.startswith("RESULT ")]
            if p.returncode not in (0, None):
                print(se[-2000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        server.close()
    print(f"# 2 namespace hosts x {per_host} ranks, kill -> shrink -> grow(1); spans in s")
    for k in range(n_rounds):
        row = []
        for what in ("shrink", "grow"):
            marks = [r2[what] for res in results for r2 in res["rounds"] if r2["k"] == k]
            row.append(max(m[1] for m in marks) - min(m[0] for m in marks) if marks else float("nan"))
        oks = [r2["ok"] for res in results for r2 in res["rounds"] if r2["k"] == k]
        print(f"round {k}: victim rank {victims[k]}, shrink {row[0]:.3f}, grow {row[1]:.3f}, "
              f"all_reduce correct on {sum(oks)} of {len(oks)} reports")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--example", action="store_true")
    p.add_argument("--rounds", type=int, default=0)
    p.add_argument("--ranks-per-host", type=int, default=2)
    p.add_argument("example_args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    with Hosts(2, net=91) as hosts:
        if a.example:
            example(hosts, a.ranks_per_host, [x for x in a.example_args if x != "--"])
        if a.rounds:
            rounds(hosts, a.ranks_per_host, a.rounds)


if __name__ == "__main__":
    main()
