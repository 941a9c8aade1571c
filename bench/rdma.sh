#!/usr/bin/env bash
# pyccl over ibverbs beside ib_write_bw on the same RDMA device, and beside pyccl over TCP.
# Needs an RDMA device: on a machine without one, run it in the soft-RoCE VM:
#
#   tests/rdma/rxe-vm.sh bash bench/rdma.sh             # writes $RXE_VM_OUT/rdma-bench.json
#   bash bench/rdma.sh --quick                          # fewer sizes and iterations
#
# Three figures, each on 2 ranks of this host over the device's loopback path:
#   1. ib_write_bw (perftest): RDMA WRITE bandwidth of SIZE-byte messages, the device's ceiling;
#   2. pyccl point-to-point: comm.send of a BIG-byte buffer cut into PYCCL_CHUNK_BYTES chunks
#      (pipelined, many in flight), received with comm.recv: target >= 80% of (1);
#   3. bench/allreduce.py busbw over ibverbs and over tcp: target ibverbs >= 1.5x tcp.
# Under software emulation (rxe in a TCG VM) compare the ratios, not the absolute figures.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
PY="$(python3 -c 'import sys; print(sys.executable)')"
OUT="${RXE_VM_OUT:-$ROOT/results}"
mkdir -p "$OUT"
TMP="$(mktemp -d)"
DEV="${PYCCL_IB_HCA:-$(ls /sys/class/infiniband 2>/dev/null | head -n 1)}"
DEV="${DEV%%:*}"
[ -n "$DEV" ] || { echo "bench/rdma.sh: no RDMA device (run it under tests/rdma/rxe-vm.sh)"; exit 2; }
GIDX="${PYCCL_IB_GID_INDEX:-$("$PY" -c 'from pyccl.transports.ibverbs import choose_port; print(max(choose_port()[1], 0))')}"
if [ "$QUICK" = 1 ]; then SIZE=1048576; ITERS=100; BIG=$((16 << 20)); REPS=4; MAXB=4M; NIT=4
else SIZE=1048576; ITERS=300; BIG=$((32 << 20)); REPS=8; MAXB=16M; NIT=8; fi

echo "== 1. ib_write_bw -d $DEV -x $GIDX -s $SIZE -n $ITERS"
ib_write_bw -d "$DEV" -x "$GIDX" -s "$SIZE" -n "$ITERS" -F >"$TMP/srv.txt" 2>&1 &
srv=$!
sleep 2
ib_write_bw -d "$DEV" -x "$GIDX" -s "$SIZE" -n "$ITERS" -F 127.0.0.1 >"$TMP/cli.txt" 2>&1 || true
wait "$srv" || true
cat "$TMP/cli.txt" | tail -n 4
# columns: #bytes #iterations BW peak[MB/sec] BW average[MB/sec] MsgRate[Mpps]
WRITE_MBS="$(awk -v s="$SIZE" '$1 == s && NF >= 4 {print $4}' "$TMP/cli.txt" | tail -n 1)"
[ -n "$WRITE_MBS" ] || WRITE_MBS=0

cat >"$TMP/p2p.py" <<'EOF'
import json, os, sys, time
import numpy as np
import pyccl
big, reps = int(sys.argv[1]), int(sys.argv[2])
comm = pyccl.init()
x = np.ones(big, np.uint8) if comm.rank == 0 else np.zeros(big, np.uint8)
for _ in range(2):                                  # warm: connections, registrations
    comm.send(x, 1) if comm.rank == 0 else comm.recv(x, 0)
comm.barrier()
t0 = time.perf_counter()
for _ in range(reps):
    comm.send(x, 1) if comm.rank == 0 else comm.recv(x, 0)
if comm.rank == 1:
    dt = time.perf_counter() - t0
    assert x.all()
    print(json.dumps({"transport": comm.transport_name, "bytes": big, "reps": reps,
                      "MBps": big * reps / dt / 1e6}))
comm.close()
EOF

p2p() {  # transport -> MB/s
    PYCCL_TRANSPORT="$1" "$PY" -m pyccl.launch -n 2 "$TMP/p2p.py" "$BIG" "$REPS" 2>"$TMP/p2p-$1.err" \
        | tail -n 1 | "$PY" -c 'import json,sys; print("%.2f" % json.loads(sys.stdin.read())["MBps"])' \
        || { cat "$TMP/p2p-$1.err" >&2; echo 0; }
}
echo "== 2. pyccl send/recv of $BIG bytes x $REPS"
P2P_IB="$(p2p ibverbs)"
P2P_TCP="$(p2p tcp)"
echo "ibverbs ${P2P_IB} MB/s, tcp ${P2P_TCP} MB/s, ib_write_bw ${WRITE_MBS} MB/s"

echo "== 3. bench/allreduce.py -b 64K -e $MAXB over ibverbs and tcp (2 ranks)"
for t in ibverbs tcp; do
    PYCCL_TRANSPORT=$t "$PY" -m pyccl.launch -n 2 bench/allreduce.py -b 64K -e "$MAXB" -f 4 \
        -n "$NIT" -w 2 --json "$TMP/ar-$t.json" | tail -n 8
done

"$PY" - "$TMP" "$OUT/rdma-bench.json" "$WRITE_MBS" "$P2P_IB" "$P2P_TCP" "$DEV" <<'EOF'
import json, sys
tmp, out, write, p2p_ib, p2p_tcp, dev = sys.argv[1:7]
write, p2p_ib, p2p_tcp = float(write), float(p2p_ib), float(p2p_tcp)
ar = {}
for t in ("ibverbs", "tcp"):
    try:
        ar[t] = {r["bytes"]: r for r in json.load(open(f"{tmp}/ar-{t}.json"))["rows"] if r.get("library", "pyccl") == "pyccl"}
    except (OSError, KeyError, ValueError):
        ar[t] = {}
def busbw(row):
    for k in ("busbw", "busbw_GBps", "bus_bw"):
        if k in row:
            return float(row[k])
    return float("nan")
rows = []
for size in sorted(set(ar["ibverbs"]) & set(ar["tcp"])):
    a, b = busbw(ar["ibverbs"][size]), busbw(ar["tcp"][size])
    rows.append({"size": size, "busbw_ibverbs": a, "busbw_tcp": b, "ratio": a / b if b else None})
res = {"device": dev, "ib_write_bw_MBps": write, "pyccl_p2p_ibverbs_MBps": p2p_ib,
       "pyccl_p2p_tcp_MBps": p2p_tcp,
       "p2p_vs_ib_write_bw": p2p_ib / write if write else None, "allreduce": rows}
json.dump(res, open(out, "w"), indent=1)
print("\n== summary (", out, ")")
print(f"point-to-point: pyccl/ibverbs {p2p_ib:.1f} MB/s = "
      f"{(p2p_ib / write * 100 if write else float('nan')):.0f}% of ib_write_bw {write:.1f} MB/s (target >= 80%); "
      f"pyccl/tcp {p2p_tcp:.1f} MB/s")
for r in rows:
    ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    print(f"all_reduce {r['size']:>10} B: busbw ibverbs {r['busbw_ibverbs']:.4f} GB/s, tcp "
          f"{r['busbw_tcp']:.4f} GB/s -> {ratio} (target >= 1.5x)")
EOF
rm -rf "$TMP"
