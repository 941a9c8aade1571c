#!/usr/bin/env bash
# Issue 31 on a GPU: examples/elastic_train.py with CUDA tensors, 2 ranks sharing one GPU. A rank
# SIGKILLs itself at step 5, the survivor shrinks, `pyccl.launch --elastic` starts a replacement
# that joins (grow), the model and optimiser state are broadcast to it, training goes on, and
# the final parameters are compared with an uninterrupted run: MATCH or DIFFER. Then every
# process must exit 0 (the first GPU run printed MATCH, then crashed at exit: SIGABRT/SIGSEGV).
#   BUDGET=120 bash bench/gpu_elastic.sh     (repository root, on the GPU machine)
# Two runs: rank 1 killed (the replacement becomes rank 1), then rank 0 killed (the survivor
# becomes rank 0 and hands the state over); each gets about half of BUDGET (timeout inside).
# To show a crash's cause: PYTHONFAULTHANDLER=1 (Python stacks of every thread on SIGSEGV /
# SIGABRT), TORCH_SHOW_CPP_STACKTRACES=1, PYCCL_DEBUG=INFO (engine choices, aborts), the example's --trace-exit (how far each rank got,
# the threads alive at exit, the Python version), each process's own log and the launcher's
# (pyccl.launch --log-dir: $OUT/elastic-<run>/rank<R>.<K>.log, launch.log, kept whole).
# Exit status: the number of runs that did not both print MATCH and end with exit code 0.
set -u -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1 TORCH_SHOW_CPP_STACKTRACES=1 PYCCL_DEBUG=${PYCCL_DEBUG:-INFO}   # INFO: engine choices, closes
export PYCCL_TIMEOUT=${PYCCL_TIMEOUT:-40}      # a replacement's torch + CUDA start took ~10 s on the H200
DEVICE=${DEVICE:-cuda}               # DEVICE=cpu: the script's own check on a machine without a GPU
BUDGET=${BUDGET:-120}
OUT=${OUT:-/tmp/gpu_elastic_out}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
mkdir -p "$OUT"
. bench/gpu_site.sh                  # pyccl laid out from the tree where it is not installed (no C core)
START=$(date +%s)
BAD=0
for run in 1 0; do                   # the rank killed
  left=$((BUDGET - ($(date +%s) - START) - 3))
  T=$(( run == 1 ? left / 2 : left ))
  [ "$T" -lt 15 ] && { echo "== kill rank $run: skipped, $left s of the budget left"; BAD=$((BAD + 1)); continue; }
  LOG="$OUT/elastic-kill$run"
  mkdir -p "$LOG"
  echo "== kill rank $run at step 5, 2 ranks, --device $DEVICE (one GPU for both), timeout $T s"
  t0=$(date +%s.%N)
  timeout -k 3 "$T" python3 -m pyccl.launch --elastic --log-dir "$LOG" -n 2 examples/elastic_train.py \
    --device "$DEVICE" --kill-rank "$run" --kill-step 5 --check --trace-exit > "$LOG/launcher.out" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  # the launcher's lines (seconds since its start), then the example's, per process log
  sed 's/^/  launch /' "$LOG/launch.log" 2>/dev/null | tail -8
  for f in "$LOG"/rank*.log; do
    [ -e "$f" ] || continue
    echo "  -- $(basename "$f")"
    grep -E '^(elastic_train|MATCH|DIFFER)' "$f" | sed 's/^elastic_train: //; s/^/    /' | tail -9
    # anything that says why a process died (faulthandler, C++ terminate, glibc, CUDA, Python)
    grep -nE 'Fatal Python|Thread 0x|Current thread|File "|terminate called|what\(\)|FATAL|abort|Abort|egmentation|corrupt|double free|invalid pointer|CUDA error|Traceback|Error|WARN|ERROR' "$f" \
      | grep -vE '^[0-9]+:elastic_train| INFO ' | head -40 | sed 's/^/    ! /'
  done
  grep -v '^pyccl.launch' "$LOG/launcher.out" | head -5 | sed 's/^/  launcher.out: /'
  match=$(cat "$LOG"/rank*.log 2>/dev/null | grep -cx MATCH)
  echo "== kill rank $run: exit status $rc, MATCH lines $match, $(python3 -c "print(f'{$t1 - $t0:.1f}')") s"
  { [ "$rc" = 0 ] && [ "$match" -ge 1 ]; } || BAD=$((BAD + 1))
done
echo "SUMMARY: $((2 - BAD)) of 2 runs printed MATCH and exited 0 (logs under $OUT/elastic-kill*)"
exit $BAD
