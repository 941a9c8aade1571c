#!/usr/bin/env bash
# RDMA between two kernels: boot two VMs under software emulation joined by a virtual Ethernet
# link, soft-RoCE (rdma_rxe) on each VM's NIC, and run a command in VM a while VM b serves.
#
#   tests/rdma/two-vm.sh                         # python -m pytest tests/rdma in VM a (what CI runs)
#   tests/rdma/two-vm.sh python -m pytest -q tests/rdma/test_two_vms.py -k mismatch
#   tests/rdma/two-vm.sh python bench/rdma_two_vms.py --rounds 3   # bench/RESULTS.md "RDMA across two VMs"
#
# What it does:
#  1. vm-prepare.sh: installs qemu, a Debian kernel, rdma-core, perftest, python3-pyverbs,
#     virtme-ng when missing, builds pyccl._verbs;
#  2. boots VM a (`vng --disable-kvm`, host filesystem read-only, same Python) with a virtio-net
#     NIC on QEMU's socket netdev listening on 127.0.0.1:<free port>, then VM b connecting to
#     it: one Ethernet segment, nothing else on it. Each VM: rxe0 on `lo` (a decoy), rxe1 on
#     its NIC; VM a is 10.78.0.1/24, VM b 10.78.0.2/24 (hostnames pyccl-vm-a, -b);
#  3. VM b runs tests/rdma/vm_agent.py: VM a's tests post jobs (start ranks, run a command)
#     as files in build/two-vm/jobs (a host directory both guests write), b runs them;
#  4. VM a runs the command (in the repository root; the pyccl store it hosts is reachable
#     from b over the link), writes its exit status and `stop`; b's agent ends.
# Both qemu processes run under `nice -n 10` with TWO_VM_CPUS vCPUs each.
#
# Environment: TWO_VM_BUDGET (seconds for the whole script, default 1200: both VMs are stopped
# when it runs out), TWO_VM_CPUS (2), TWO_VM_MEM (3G). PYCCL_* and CI pass into the guests.
# Exit status: the command's; 2 = could not prepare, 3 = no soft-RoCE in a guest, 4 = a VM
# died or the budget ran out before the command finished, 5 = VM b's agent failed.
set -euo pipefail
T0=$(date +%s)
BUDGET="${TWO_VM_BUDGET:-1200}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
[ $# -gt 0 ] || set -- python -m pytest -q -p no:cacheprovider -p no:hypothesispytest -p no:benchmark \
    --durations=15 tests/rdma
VM_SAY=two-vm
source "$ROOT/tests/rdma/vm-prepare.sh"

WORK="$ROOT/build/two-vm"
rm -rf "$WORK"
mkdir -p "$WORK/a" "$WORK/b" "$WORK/jobs"
CPUS="${TWO_VM_CPUS:-2}"
MEM="${TWO_VM_MEM:-3G}"
LEFT=$(( BUDGET - ($(date +%s) - T0) - 40 ))
[ "$LEFT" -gt 120 ] || { say "only ${LEFT}s of the ${BUDGET}s budget left after installing: not booting"; exit 4; }
{
    echo "export PATH='$(dirname "$PY"):/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'"
    echo "export HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 RXE_VM=1"
    echo "export TWO_VM=1 TWO_VM_ROOT='$ROOT' TWO_VM_WORK='$WORK' TWO_VM_A_IP=10.78.0.1 TWO_VM_B_IP=10.78.0.2"
    echo "export TWO_VM_WAIT_B=$(( LEFT / 2 )) TWO_VM_AGENT_S=$LEFT RXE_VM_OUT='$WORK'"
    for v in $(compgen -e | grep -E '^(PYCCL_[A-Z0-9_]*|CI|PYTHONPATH)$' || true); do
        printf 'export %s=%q\n' "$v" "${!v}"
    done
} > "$WORK/env.sh"

PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
ARGS=""
for a in "$@"; do ARGS="$ARGS $(printf '%q' "$a")"; done
boot() {  # role, netdev mode (listen|connect), MAC suffix, extra guest args
    local role="$1" mode="$2" mac="$3"
    shift 3
    nice -n 10 timeout --kill-after=30 "$LEFT" "$VNG" --disable-kvm -r "$KERNEL" --name "pyccl-vm-$role" \
        --cpus "$CPUS" --memory "$MEM" --rwdir "$WORK" \
        --qemu-opts="-netdev socket,id=n0,$mode=127.0.0.1:$PORT -device virtio-net-pci,netdev=n0,mac=52:54:00:78:00:$mac" \
        --exec "bash $ROOT/tests/rdma/two-vm-guest.sh $WORK/env.sh $role$*" </dev/null
}
say "booting two VMs of $KERNEL ($CPUS vCPUs, $MEM each, software emulation, link on 127.0.0.1:$PORT, ${LEFT}s left) to run:$ARGS"
start=$(date +%s)
set +e
boot a listen 01 "$ARGS" &
pa=$!
for i in $(seq 100); do                       # b's qemu connects at start: a must listen first
    "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1', $PORT), 1).close()" 2>/dev/null && break
    kill -0 "$pa" 2>/dev/null || break
    sleep 0.3
done
boot b connect 02 >"$WORK/b/console.log" 2>&1 &
pb=$!
wait "$pa"
va=$?
touch "$WORK/stop"                            # a is gone: b's agent ends within 0.1 s
for i in $(seq 60); do kill -0 "$pb" 2>/dev/null || break; sleep 1; done
kill "$pb" 2>/dev/null
wait "$pb"
vb=$?
set -e
took=$(( $(date +%s) - start ))
rb="$(cat "$WORK/b/rc" 2>/dev/null || echo none)"
if [ "$rb" != 0 ]; then
    say "VM b ended with status $rb (VM status $vb); its console:"
    tail -n 60 "$WORK/b/console.log" >&2
fi
if [ -f "$WORK/a/rc" ]; then
    rc="$(cat "$WORK/a/rc")"
    say "command exited with $rc after ${took}s in the VMs"
    [ "$rc" = 0 ] && [ "$rb" != 0 ] && [ "$rb" != none ] && rc=5
    exit "$rc"
fi
if [ "$va" = 124 ] || [ "$va" = 137 ]; then
    say "VM a ran past ${LEFT}s (TWO_VM_BUDGET=${BUDGET}s in all) and was stopped"
else
    say "VM a ended (status $va) before the command finished"
fi
exit 4
