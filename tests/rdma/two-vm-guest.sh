#!/bin/bash
# Inside one of the two VMs that two-vm.sh boots: `two-vm-guest.sh ENV a CMD...` or
# `two-vm-guest.sh ENV b` (ENV: the file of variables two-vm.sh wrote).
#
# Both: tmpfs on /tmp and /dev/shm, rdma_rxe, `lo` up with a decoy rxe0 on it (it sorts first,
# so the ibverbs transport has to choose the device by route, not by name), the virtio NIC up
# with this VM's address and rxe1 on it (RoCE v2 GID ::ffff:<address>), then "ready".
# VM b runs vm_agent.py (ranks and commands that VM a's tests ask for) until VM a is done.
# VM a waits for b's "ready", runs CMD in the repository root, writes its status and "stop".
# Files under $TWO_VM_WORK (a host directory both guests write): a/ready a/rc b/ready b/rc stop.
source "$1"
role="$2"
shift 2
set -u
me="$TWO_VM_WORK/$role"
say() { echo "two-vm[$role]: $*" >&2; }
finish() { echo "$1" > "$me/rc"; [ "$role" = a ] && touch "$TWO_VM_WORK/stop"; exit "$1"; }

touch /tmp/.two-vm 2>/dev/null || mount -t tmpfs -o size=50% tmpfs /tmp
mountpoint -q /dev/shm || mount -t tmpfs tmpfs /dev/shm
ulimit -l unlimited
ulimit -n 65536
if [ "$role" = a ]; then ip_me="$TWO_VM_A_IP"; ip_peer="$TWO_VM_B_IP"; else ip_me="$TWO_VM_B_IP"; ip_peer="$TWO_VM_A_IP"; fi
nic="$(ls /sys/class/net | grep -v '^lo$' | head -n 1)"
setup() {
    [ -n "$nic" ] || { say "no network interface besides lo"; return 1; }
    modprobe rdma_rxe || return 1
    ip link set lo up
    rdma link add rxe0 type rxe netdev lo || return 1
    ip addr add "$ip_me/24" dev "$nic" && ip link set "$nic" up || return 1
    rdma link add rxe1 type rxe netdev "$nic" || return 1
    for i in $(seq 100); do
        grep -q ACTIVE "/sys/class/infiniband/rxe1/ports/1/state" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}
if ! setup; then
    say "could not set up soft-RoCE on $nic"
    ip addr >&2; rdma link show >&2 || true
    finish 3
fi
say "$(hostname): $nic $ip_me, $(rdma link show | tr '\n' ';')"
echo ready > "$me/ready"
cd "$TWO_VM_ROOT"

if [ "$role" = b ]; then
    python tests/rdma/vm_agent.py "$TWO_VM_WORK"
    finish $?
fi

# VM a: wait for b (its boot may finish minutes after ours under emulation)
for i in $(seq "$TWO_VM_WAIT_B"); do
    [ -f "$TWO_VM_WORK/b/ready" ] && break
    [ -f "$TWO_VM_WORK/b/rc" ] && { say "VM b failed to set up (status $(cat "$TWO_VM_WORK/b/rc"))"; finish 3; }
    sleep 1
done
[ -f "$TWO_VM_WORK/b/ready" ] || { say "VM b was not ready after ${TWO_VM_WAIT_B}s"; finish 4; }
"$@"
finish $?
