#!/usr/bin/env bash
# The four configurations of bench/RESULTS.md "Tuner calibration", one run each:
#   OUT=/tmp/tc1 bash bench/tuner_check.sh [profile.json]
# 4 ranks on one host (shm collectives, then the executor with PYCCL_SHM_COLLECTIVES=0),
# 2 and 3 namespace hosts x 2 ranks (root needed). Run it under flock /tmp/pyccl-bench.lock.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/tuner_check}
mkdir -p "$OUT"
[ $# -ge 1 ] && export PYCCL_TUNE_PROFILE="$1"
echo "# profile: ${PYCCL_TUNE_PROFILE:-default path}  ($(date -u +%H:%M:%S))"
echo "## 4 ranks, one host, default engines"
$PY -m pyccl.launch -n 4 bench/tuner_check.py --json "$OUT/one_host.json"
echo "## 4 ranks, one host, PYCCL_SHM_COLLECTIVES=0 (executor over shm rings)"
PYCCL_SHM_COLLECTIVES=0 $PY -m pyccl.launch -n 4 bench/tuner_check.py --json "$OUT/one_host_exec.json"
echo "## 2 namespace hosts x 2 ranks"
$PY bench/tuner_check.py --hosts 2 --ranks-per-host 2 --json "$OUT/2x2.json"
echo "## 3 namespace hosts x 2 ranks"
$PY bench/tuner_check.py --hosts 3 --ranks-per-host 2 --json "$OUT/3x2.json"
echo "# done $(date -u +%H:%M:%S)"
