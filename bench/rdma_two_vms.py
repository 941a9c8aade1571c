#!/usr/bin/env python3
"""RDMA across two VMs: perftest beside pyccl over ibverbs and over TCP, on one virtual link.

    tests/rdma/two-vm.sh python bench/rdma_two_vms.py [--rounds 3] [--quick] [--env PYCCL_IB_QPS=1] [--window]
    tests/rdma/two-vm.sh python bench/rdma_two_vms.py --paired 6     # window puts vs ib_write_bw, 4 MiB, paired

Runs in VM a of tests/rdma/two-vm.sh (VM b serves through its agent); writes
$RXE_VM_OUT/rdma-two-vms.json and prints the table of bench/RESULTS.md ("RDMA across two VMs").
Every figure is between the two VMs (10.78.0.1 -> 10.78.0.2, soft-RoCE rxe1 on each NIC):

  1. ib_write_bw -d rxe1 -x GID -s SIZE -n N -F        (server in b, client in a)
  2. ib_write_lat -d rxe1 -x GID -s 8 -n N -F           (one-way latency, = round trip / 2)
  3. raw TCP: one socket, a sends SIZE-byte blocks, b receives (python, like iperf)
  4. pyccl send/recv, ranks 0 (a) and 1 (b), PYCCL_TRANSPORT=ibverbs and =tcp:
     latency = half the round trip of an 8-byte ping-pong; bandwidth = SIZE-byte sends
     back to back, timed at the receiver until the last lands; and the same sends all
     posted at once (async_op=True), as ib_write_bw keeps many writes in flight;
  5. pyccl all_reduce (2 ranks, float32) time per call, both transports.
Each is repeated --rounds times; the table gives the median and the min-max spread.
The CPUs are emulated (TCG): compare ratios measured in the same run, not absolute figures.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "rdma"))
import twovm  # noqa: E402

RANK = os.path.join(ROOT, "bench", "rdma_two_vms_rank.py")


def _perftest(tool, args, rounds, parse):
    """Median/min/max of `tool` run `rounds` times, server in VM b, client here."""
    vals, cmd = [], None
    for _ in range(rounds):
        for attempt in range(3):
            jid = twovm.post([tool] + args, timeout=120)
            time.sleep(4 + 4 * attempt)                # the server's start under emulation
            cmd = [tool] + args + [twovm.B_IP]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
            except subprocess.TimeoutExpired as e:      # a loaded host: one failed attempt, not the run
                r = subprocess.CompletedProcess(cmd, 124, f"timed out after {e.timeout:.0f}s", "")
            twovm.wait(jid, 60)
            v = parse(r.stdout) if r.returncode == 0 else None
            if v is not None:
                vals.append(v)
                break
            print(f"{tool}: attempt {attempt} failed ({r.returncode}): {r.stdout[-500:]} {r.stderr[-500:]}",
                  file=sys.stderr)
    return _stats(vals), " ".join(cmd)


def _stats(vals):
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)} if vals else None


def _bw(size):
    def parse(out):     # #bytes #iterations BW peak[MB/sec] BW average[MB/sec] MsgRate[Mpps]
        for line in out.splitlines():
            f = line.split()
            if len(f) >= 4 and f[0] == str(size):
                return float(f[3])
        return None
    return parse


def _lat(out):           # #bytes #iterations t_min t_max t_typical t_avg ...
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 6 and f[0] == "8" and re.match(r"^[\d.]+$", f[5]):
            return float(f[5])
    return None


_TCP_SERVER = r"""
import socket, sys, time
s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
s.settimeout(120)
for _ in range(int(sys.argv[2])):
    c, _ = s.accept()
    n = int.from_bytes(c.recv(8, socket.MSG_WAITALL), "little")
    buf = bytearray(1 << 20)
    got = 0
    while got < n:
        k = c.recv_into(buf)
        if not k:
            break
        got += k
    c.sendall(b"k")
    c.close()
"""


def _tcp_raw(size, total, rounds):
    """MB/s of one TCP stream a -> b (python sockets)."""
    import socket
    port = 47000 + os.getpid() % 1000
    jid = twovm.post([sys.executable, "-c", _TCP_SERVER, str(port), str(rounds)], timeout=300)
    vals = []
    block = b"x" * size
    for i in range(rounds):
        for attempt in range(40):
            try:
                c = socket.create_connection((twovm.B_IP, port), 5)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise SystemExit("raw TCP: VM b's server did not come up")
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        n = total // size * size
        t0 = time.perf_counter()
        c.sendall(n.to_bytes(8, "little"))
        for _ in range(n // size):
            c.sendall(block)
        c.recv(1)
        vals.append(n / (time.perf_counter() - t0) / 1e6)
        c.close()
    twovm.wait(jid, 30)
    return _stats(vals)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the pyccl ranks in both VMs (e.g. PYCCL_IB_QPS=1)")
    ap.add_argument("--window", action="store_true",
                    help="one-sided windows (issue 30): put bandwidth and 8 B put+signal latency beside "
                         "send/recv over ibverbs and perftest at 1 and 4 MiB (no TCP, no all_reduce)")
    ap.add_argument("--bw-bytes", type=int, default=None,
                    help="ib_write_bw: at most this many bytes per run (fewer iterations at large sizes; "
                         "default: all iterations, 32 MiB with --window, where a loaded host timed out at 4 MiB)")
    ap.add_argument("--paired", type=int, default=0, metavar="N",
                    help="issue 30, window puts at --paired-size only: N rounds, each one ib_write_bw run "
                         "then a fresh pyccl job's puts and send/recv, so every ratio pairs figures taken "
                         "under the same host load (no latency, no TCP)")
    ap.add_argument("--paired-size", type=int, default=4 << 20)
    a = ap.parse_args()
    if a.bw_bytes is None:
        a.bw_bytes = 32 << 20 if a.window else 0
    from pyccl.transports import ibverbs as ib
    _, gidx, _ = ib.choose_port(twovm.A_IP)
    extra = dict(kv.split("=", 1) for kv in a.env)
    res = {"gid_index": gidx, "rounds": a.rounds, "env": extra}
    if a.paired:
        return paired(a, res, extra, gidx)
    sizes = [1 << 20, 4 << 20] if a.window else [1 << 16, 1 << 20, 4 << 20]
    iters = 100 if a.quick else 200
    res["ib_write_bw"] = {}
    for s in sizes:
        n = iters if not a.bw_bytes else max(5, min(iters, a.bw_bytes // s))
        st, cmd = _perftest("ib_write_bw", ["-d", "rxe1", "-x", str(gidx), "-s", str(s), "-n", str(n), "-F"],
                            a.rounds, _bw(s))
        res["ib_write_bw"][s] = st
        res["ib_write_bw_cmd"] = cmd
        print(f"ib_write_bw {s} B: {st} MB/s", flush=True)
    st, cmd = _perftest("ib_write_lat", ["-d", "rxe1", "-x", str(gidx), "-s", "8", "-n", str(iters * 5), "-F"],
                        a.rounds, _lat)
    res["ib_write_lat_us"], res["ib_write_lat_cmd"] = st, cmd
    print(f"ib_write_lat 8 B: {st} us", flush=True)
    if a.window:
        return windows(a, res, extra)
    res["tcp_raw_MBps"] = _tcp_raw(1 << 20, (16 if a.quick else 64) << 20, a.rounds)
    print(f"raw TCP: {res['tcp_raw_MBps']} MB/s", flush=True)
    for t in ("ibverbs", "tcp"):
        job = twovm.across([RANK, str(a.rounds), "1" if a.quick else "0"], 1,
                           dict(extra, PYCCL_TRANSPORT=t, PYCCL_TIMEOUT="200"), timeout=500)
        if job.failed():
            print(job.failed(), file=sys.stderr)
            res[t] = None
            continue
        res[t] = job.results[1]
        print(f"pyccl over {t}: {json.dumps(job.results[1])}", flush=True)
    out = os.path.join(os.environ.get("RXE_VM_OUT", "results"), "rdma-two-vms.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(table(res))
    print(f"(written to {out})")


def windows(a, res, extra):
    """--window: the pyccl job over ibverbs with windows beside send/recv, then its table."""
    job = twovm.across([RANK, str(a.rounds), "1" if a.quick else "0", "window"], 1,
                       dict(extra, PYCCL_TRANSPORT="ibverbs", PYCCL_TIMEOUT="200"), timeout=600)
    if job.failed():
        raise SystemExit(job.failed())
    res["window"] = w = job.results[1]
    print(f"pyccl windows over ibverbs: {json.dumps(w)}", flush=True)
    out = os.path.join(os.environ.get("RXE_VM_OUT", "results"), "rdma-two-vms-window.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    lines = ["| measure | size | ib_write_bw / ib_write_lat | pyccl put (window) | pyccl send/recv | put / perftest |",
             "|---|---|---|---|---|---|"]
    for s, st in res["ib_write_bw"].items():
        p, q = w["put_MBps"].get(str(s)), w["p2p_MBps"].get(str(s))
        ratio = f"{p['median'] / st['median'] * 100:.0f} %" if p and st else "n/a"
        lines.append(f"| bandwidth MB/s | {int(s) >> 10} KiB | {_fmt(st)} | {_fmt(p)} | {_fmt(q)} | {ratio} |")
    lat, p = res.get("ib_write_lat_us"), w.get("put_lat_us")
    ratio = f"{p['median'] / lat['median']:.2f}x" if p and lat else "n/a"
    lines.append(f"| one-way latency µs (put+signal; send/recv) | 8 B | {_fmt(lat)} | {_fmt(p)} | "
                 f"{_fmt(w.get('lat_us'))} | {ratio} |")
    print("\n".join(lines))
    print(f"(window link {w.get('window_link')}; written to {out})")


def paired(a, res, extra, gidx):
    """--paired N: per round, ib_write_bw (32 MiB in SIZE writes) then the window puts and the
    send/recv of rdma_two_vms_rank.py (32 MiB in SIZE puts/sends, not --quick) in a fresh job."""
    s = a.paired_size
    n = max(5, min(200, (32 << 20) // s))
    rows, env = [], dict(extra, PYCCL_TRANSPORT="ibverbs", PYCCL_TIMEOUT="200")
    for i in range(a.paired):
        st, cmd = _perftest("ib_write_bw", ["-d", "rxe1", "-x", str(gidx), "-s", str(s), "-n", str(n), "-F"],
                            1, _bw(s))
        job = twovm.across([RANK, "1", "0", "window", str(s)], 1, env, timeout=300)
        if job.failed() or not st:
            print(f"round {i}: perftest {st}, pyccl {job.failed()}", file=sys.stderr)
            continue
        w = job.results[1]
        rows.append((st["median"], w["put_MBps"][str(s)]["median"], w["p2p_MBps"][str(s)]["median"]))
        print(f"round {i}: ib_write_bw {rows[-1][0]:.1f} MB/s, put {rows[-1][1]:.1f}, send/recv {rows[-1][2]:.1f}, "
              f"put/perftest {rows[-1][1] / rows[-1][0] * 100:.0f} %", flush=True)
    res.update(paired_size=s, ib_write_bw_cmd=cmd, paired=[dict(zip(("ib_write_bw", "put", "p2p"), r))
                                                           for r in rows])
    out = os.path.join(os.environ.get("RXE_VM_OUT", "results"), "rdma-two-vms-paired.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"| round | ib_write_bw MB/s | put MB/s | send/recv MB/s | put / ib_write_bw | ({s >> 10} KiB) |")
    print("|---|---|---|---|---|---|")
    for i, (p, q, t) in enumerate(rows):
        print(f"| {i} | {p:.1f} | {q:.1f} | {t:.1f} | {q / p * 100:.0f} % | |")
    if rows:
        ratios = sorted(q / p for p, q, _ in rows)
        print(f"put / ib_write_bw: median {statistics.median(ratios) * 100:.0f} %, min {ratios[0] * 100:.0f} %, "
              f"rounds >= 90 %: {sum(r >= 0.9 for r in ratios)} of {len(ratios)} (written to {out})")


def _fmt(st, unit="", digits=1):
    if not st:
        return "n/a"
    return f"{st['median']:.{digits}f}{unit} ({st['min']:.{digits}f}–{st['max']:.{digits}f})"


def table(res) -> str:
    lines = ["| measure | size | ib_write_bw / ib_write_lat | pyccl ibverbs | pyccl tcp | raw TCP | ibverbs / perftest |",
             "|---|---|---|---|---|---|---|"]
    ibv, tcp = res.get("ibverbs") or {}, res.get("tcp") or {}
    for s, st in res["ib_write_bw"].items():
        s = int(s)
        for key, label, raw in (("p2p_MBps", "send/recv bandwidth MB/s", s == 1 << 20),
                                ("p2p_async_MBps", "send/recv all posted at once (async_op) MB/s", False)):
            p = (ibv.get(key) or {}).get(str(s))
            q = (tcp.get(key) or {}).get(str(s))
            ratio = f"{p['median'] / st['median'] * 100:.0f} %" if p and st else "n/a"
            lines.append(f"| {label} | {s >> 10} KiB | {_fmt(st)} | {_fmt(p)} | {_fmt(q)} | "
                         f"{_fmt(res['tcp_raw_MBps']) if raw else ''} | {ratio} |")
    lat = res.get("ib_write_lat_us")
    p, q = ibv.get("lat_us"), tcp.get("lat_us")
    ratio = f"{p['median'] / lat['median']:.2f}x" if p and lat else "n/a"
    lines.append(f"| one-way latency µs | 8 B | {_fmt(lat)} | {_fmt(p)} | {_fmt(q)} | | {ratio} |")
    for s, p in sorted((ibv.get("allreduce_us") or {}).items(), key=lambda kv: int(kv[0])):
        q = (tcp.get("allreduce_us") or {}).get(s)
        lines.append(f"| all_reduce µs per call (2 ranks) | {int(s)} B | | {_fmt(p, digits=0)} | {_fmt(q, digits=0)} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
