#!/usr/bin/env python3
"""pyccl vs Gloo across "hosts" made of network namespaces (root needed).

    python bench/multihost.py --hosts 2 --ranks-per-host 2 -- -b 1M -e 64M -f 4

Builds the namespaces of tests/multihost/netns.py, runs bench/allreduce.py --compare gloo
on every rank (shm inside a host, TCP between hosts for pyccl; Gloo uses TCP for all),
prints rank 0's table and removes the namespaces.
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from multihost.netns import Hosts  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--ranks-per-host", type=int, default=2)
    p.add_argument("--op", default="all_reduce")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    extra = [x for x in a.bench_args if x != "--"]
    with Hosts(a.hosts, net=90) as hosts:
        res = hosts.run("", a.ranks_per_host, env={"PYCCL_TIMEOUT": "120"}, timeout=900,
                        argv=[os.path.join(HERE, "collectives.py"), "--op", a.op, "--compare", "gloo"] + extra)
    for rank, rc, out, err in res:
        if rank == 0 or rc != 0:
            print(f"--- rank {rank} (rc {rc}) ---")
            print(out)
            if rc:
                print(err[-2000:])
    return max(rc for _, rc, _, _ in res)


if __name__ == "__main__":
    sys.exit(main())
