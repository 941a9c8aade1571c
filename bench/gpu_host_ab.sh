#!/usr/bin/env bash
# GPU host time per call of two pyccl trees, alternated on one machine (issue 33's "nothing slower
# elsewhere": the tree before the one-host CPU work against this one).
#   git archive --format=tar.gz REV ccl transports topology > OLD.tgz
#   BUDGET=110 bash bench/gpu_host_ab.sh OLD.tgz [rounds]
# Each round runs this tree's bench/gpu_host_time.py (2 ranks sharing GPU 0, torchrun) once with the
# old package and once with this one, the order flipped every round; both laid out without the C
# core, as bench/gpu_site.sh does. Prints rank 0's table rows per run; stops starting runs when fewer
# than 30 s of BUDGET are left.
set -u
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
tmp=${TMPDIR:-/tmp}/pyccl-ab
rm -rf "$tmp"; mkdir -p "$tmp/old-src"
tar -xzf "$1" -C "$tmp/old-src"
lay() {   # lay(tree, site): the package from a tree, without compiled modules
  mkdir -p "$2/pyccl"
  cp -r "$1/ccl/." "$2/pyccl/"; rm -f "$2"/pyccl/*.so
  cp -r "$1/transports" "$2/pyccl/transports"; cp -r "$1/topology" "$2/pyccl/topology"
}
lay "$tmp/old-src" "$tmp/old"; lay . "$tmp/new"
end=$((SECONDS + ${BUDGET:-110}))
for r in $(seq "${2:-2}"); do
  order="old new"; [ $((r % 2)) = 0 ] && order="new old"
  for v in $order; do
    left=$((end - SECONDS)); [ $left -lt 30 ] && { echo "== budget left ${left}s: stop"; exit 0; }
    echo "== round $r $v (t=${SECONDS}s)"
    PYTHONPATH="$tmp/$v" timeout -k 3 $((left - 5)) python3 -m torch.distributed.run --standalone \
      --nproc-per-node 2 bench/gpu_host_time.py --sizes 8K,1M,16M --calls 20 --repeats 3 2>&1 |
      grep -E '^\| [a-z_]+ \| [0-9]|^\| [0-9]+ \||Error|error' | head -24
  done
done
