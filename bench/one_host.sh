#!/usr/bin/env bash
# Issue 33's table: every collective on NRANKS (2) local ranks, pyccl beside Gloo and MPICH in one
# run each, float32, sizes 8 B / 1 MiB / 16 MiB / 128 MiB, each with the same run's memcpy (the
# memory limit), then one markdown table with the targets.
#   NRANKS=4 bash bench/one_host.sh [outdir]      (needs mpiexec + mpi4py: pip install mpich mpi4py)
set -euo pipefail
out=${1:-bench-out}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
for op in all_reduce all_gather reduce_scatter broadcast all_to_all; do
    sizes=1M,16M,128M
    [ "$op" = all_reduce ] && sizes=8,1M,16M,128M
    mpiexec -n "${NRANKS:-2}" python "$here/collectives.py" --op "$op" --compare gloo,mpi --sizes "$sizes" \
        -n "${ITERS:-30}" --json "$out/$op.json" 2>&1 | grep -v -e FutureWarning -e "return func"
done
python "$here/summary.py" "$out"/*.json
