#!/usr/bin/env python3
"""The TCP ceiling of the multi-host CPU benchmark: two network namespaces (tests/multihost/netns.py),
one plain socket between them, each side sending N bytes while it receives N (sendall on a
thread, recv_into here), as a 2-rank all-reduce's ring steps do. No pyccl: what the kernel's
TCP over the veths gives Python on this machine, to read bench/multihost.py's numbers against.

    sudo python bench/tcp_ceiling.py [--bytes 64M] [--reps 6]
"""
import argparse
import os
import socket
import subprocess
import sys
import threading
import time

PORT = 29517


def side(role, addr, n, reps):
    buf, rbuf = bytearray(b"\1" * n), bytearray(n)
    if role == "server":
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((addr, PORT))
        ls.listen(1)
        s, _ = ls.accept()
    else:
        for _ in range(100):
            try:
                s = socket.create_connection((addr, PORT))
                break
            except OSError:
                time.sleep(0.1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(reps):
        t = time.perf_counter()
        th = threading.Thread(target=s.sendall, args=(buf,))
        th.start()
        mv = memoryview(rbuf)
        while len(mv):
            mv = mv[s.recv_into(mv):]
        th.join()
        dt = time.perf_counter() - t
        print(f"{role}: {n / dt / 1e9:.2f} GB/s each way ({dt * 1e3:.1f} ms for {n} bytes)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bytes", default="64M")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--addr", help=argparse.SUPPRESS)
    a = ap.parse_args()
    n = int(a.bytes[:-1]) << {"K": 10, "M": 20, "G": 30}[a.bytes[-1]] if a.bytes[-1] in "KMG" else int(a.bytes)
    if a.side:
        return side(a.side, a.addr, n, a.reps)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "tests", "multihost"))
    from netns import Hosts
    with Hosts(2, net=91) as h:
        addr = "10.91.0.1"
        cmd = [sys.executable, os.path.abspath(__file__), "--bytes", str(n), "--reps", str(a.reps), "--addr", addr]
        srv = subprocess.Popen(["ip", "netns", "exec", h.names[0], *cmd, "--side", "server"])
        time.sleep(0.5)
        cli = subprocess.Popen(["ip", "netns", "exec", h.names[1], *cmd, "--side", "client"])
        return max(srv.wait(timeout=300), cli.wait(timeout=300))


if __name__ == "__main__":
    sys.exit(main())
