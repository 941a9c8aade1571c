# Sourced by rxe-vm.sh and two-vm.sh: make sure a soft-RoCE VM can be booted from here.
#
# Installs what is missing (apt, as root): qemu-system-x86, linux-image-amd64 (a Debian kernel
# with rdma_rxe), rdma-core, ibverbs-utils/-providers, perftest, python3-pyverbs (the reference
# the tests check pyccl against), libibverbs-dev; virtme-ng (pip, command `vng`); builds
# pyccl._verbs. Sets PY (this Python), VNG, KERNEL, KVER; exits 2 when something cannot be had.
say() { echo "${VM_SAY:-vm}: $*" >&2; }

PKGS="qemu-system-x86 linux-image-amd64 rdma-core ibverbs-utils ibverbs-providers perftest python3-pyverbs libibverbs-dev iproute2 kmod busybox-static"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then say "missing packages:$missing (run as root or install them)"; exit 2; fi
    say "installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
PY="$(python3 -c 'import sys; print(sys.executable)')"
# pip's script folder first on PATH: under pyenv a freshly installed `vng` has no shim until
# `pyenv rehash`, and vng itself runs `virtme-run` through PATH.
export PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
command -v vng >/dev/null 2>&1 || "$PY" -m pip install -q virtme-ng
VNG="$(command -v vng || true)"
[ -x "$VNG" ] || { say "virtme-ng (vng) is not installed"; exit 2; }
"$PY" -c 'import pyccl._verbs' 2>/dev/null || "$PY" native/build_verbs.py >/dev/null
"$PY" -c 'import pyccl, pyccl._verbs' || { say "pyccl is not importable: pip install -e . first"; exit 2; }

KERNEL="$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)"
[ -n "$KERNEL" ] || { say "no kernel in /boot (apt-get install linux-image-amd64)"; exit 2; }
KVER="${KERNEL#/boot/vmlinuz-}"
[ -d "/lib/modules/$KVER" ] || { say "no /lib/modules/$KVER for $KERNEL"; exit 2; }
