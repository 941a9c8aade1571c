#!/usr/bin/env bash
# Run a command on real verbs: boot a Debian kernel with soft-RoCE (rdma_rxe) under qemu,
# once, and run the command inside with this repository and this Python; exit with its status.
#
#   tests/rdma/rxe-vm.sh                                  # python -m pytest -q tests/rdma
#   tests/rdma/rxe-vm.sh python -m pytest -q tests/rdma -k p2p
#   tests/rdma/rxe-vm.sh bash bench/rdma.sh
#
# What it does (see ../../shared/notes/soft-roce.md for what was seen working):
#  1. installs what is missing (vm-prepare.sh): qemu-system-x86, linux-image-amd64, rdma-core,
#     ibverbs-utils, perftest, python3-pyverbs, libibverbs-dev (apt, as root) and virtme-ng
#     (pip), and builds pyccl._verbs;
#  2. boots the newest /boot/vmlinuz-* with `vng --disable-kvm` (KVM aborts or hangs on these
#     hosts): the guest sees the host's filesystem read-only, same paths, same Python;
#  3. inside, as root: tmpfs on /tmp, modprobe rdma_rxe, `lo` up (127.0.0.1) and
#     `rdma link add rxe0 type rxe netdev lo` (RoCE v2 GID ::ffff:127.0.0.1); a dummy
#     interface `rxenet` (10.77.0.1/24) gets a second device rxe1 for tests that want one;
#  4. runs the command in the repository root; its output is the console output.
#
# Environment: RXE_VM_BUDGET (seconds for this whole script, installs included, default
# 1200 = 20 min: the VM is stopped when it runs out), RXE_VM_CPUS (default: host cores, at
# most 4), RXE_VM_MEM (3G), RXE_VM_OUT (a host directory the guest may write, exported to
# the command as $RXE_VM_OUT; default build/rxe-vm/out). PYCCL_* and CI variables are passed
# into the guest. Exit status: the command's; 2 = could not prepare, 3 = no soft-RoCE in the
# guest, 4 = the VM died or ran out of budget before the command finished.
# Time under software emulation (2 host cores): boot ~0.5-4 min depending on host load,
# tests/rdma ~7-10 min.
set -euo pipefail
T0=$(date +%s)
BUDGET="${RXE_VM_BUDGET:-1200}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
# default: the RDMA tests (pytest's plugins that only cost start-up time under emulation off)
[ $# -gt 0 ] || set -- python -m pytest -q -p no:cacheprovider -p no:hypothesispytest -p no:benchmark \
    --durations=10 tests/rdma

# ---- 1. what the VM needs (vm-prepare.sh: apt packages, virtme-ng, pyccl._verbs, the kernel) -----
VM_SAY=rxe-vm
source "$ROOT/tests/rdma/vm-prepare.sh"

# ---- 2. the guest's script --------------------------------------------------------------------
WORK="$ROOT/build/rxe-vm"
OUT="${RXE_VM_OUT:-$WORK/out}"
mkdir -p "$WORK" "$OUT"
rm -f "$WORK/rc"
{
    echo "#!/bin/bash"
    echo "export PATH='$(dirname "$PY"):/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'"
    echo "export HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 RXE_VM=1 RXE_VM_OUT='$OUT'"
    for v in $(compgen -e | grep -E '^(PYCCL_[A-Z0-9_]*|CI|PYTHONPATH)$' || true); do
        printf 'export %s=%q\n' "$v" "${!v}"
    done
    cat <<'GUEST'
set -u
touch /tmp/.rxe-vm 2>/dev/null || mount -t tmpfs -o size=50% tmpfs /tmp
mountpoint -q /dev/shm || mount -t tmpfs tmpfs /dev/shm
ulimit -l unlimited
ulimit -n 65536
setup() {
    modprobe rdma_rxe || return 1
    ip link set lo up
    rdma link add rxe0 type rxe netdev lo || return 1
    ip link add rxenet type dummy && ip addr add 10.77.0.1/24 dev rxenet && ip link set rxenet up \
        && rdma link add rxe1 type rxe netdev rxenet || echo "rxe-vm: (no second rxe device)"
    for i in $(seq 50); do
        grep -q ACTIVE /sys/class/infiniband/rxe0/ports/1/state 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}
if ! setup; then
    echo "rxe-vm: could not set up soft-RoCE in the guest" >&2
    rdma link show >&2 || true
    echo 3 > "$RXE_VM_WORK/rc"
    exit 3
fi
rdma link show
cd "$RXE_VM_ROOT"
"$@"
rc=$?
echo "$rc" > "$RXE_VM_WORK/rc"
exit "$rc"
GUEST
} > "$WORK/guest.sh"
sed -i "2i export RXE_VM_ROOT='$ROOT' RXE_VM_WORK='$WORK'" "$WORK/guest.sh"
chmod +x "$WORK/guest.sh"

# ---- 3. boot, run, report -------------------------------------------------------------------------
CPUS="${RXE_VM_CPUS:-$(nproc)}"
[ "$CPUS" -le 4 ] || CPUS=4
EXTRA=""
case "$OUT/" in "$WORK"/*) ;; *) EXTRA="--rwdir $OUT" ;; esac
ARGS=""
for a in "$@"; do ARGS="$ARGS $(printf '%q' "$a")"; done
LEFT=$(( BUDGET - ($(date +%s) - T0) - 35 ))
[ "$LEFT" -gt 60 ] || { say "only ${LEFT}s of the ${BUDGET}s budget left after installing: not booting"; exit 4; }
say "booting $KERNEL ($CPUS vCPUs, ${RXE_VM_MEM:-3G}, software emulation, ${LEFT}s left) to run:$ARGS"
start=$(date +%s)
set +e
timeout --kill-after=30 "$LEFT" "$VNG" --disable-kvm -r "$KERNEL" \
    --cpus "$CPUS" --memory "${RXE_VM_MEM:-3G}" --rwdir "$WORK" $EXTRA \
    --exec "bash $WORK/guest.sh$ARGS" </dev/null
vrc=$?
set -e
took=$(( $(date +%s) - start ))
if [ -f "$WORK/rc" ]; then
    rc="$(cat "$WORK/rc")"
    say "command exited with $rc after ${took}s in the VM"
    exit "$rc"
fi
if [ "$vrc" = 124 ] || [ "$vrc" = 137 ]; then
    say "the VM ran past ${LEFT}s (RXE_VM_BUDGET=${BUDGET}s in all) and was stopped"
else
    say "the VM ended (status $vrc) before the command finished"
fi
exit 4
