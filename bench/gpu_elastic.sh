#!/usr/bin/env bash
# Issue 31 on a GPU: examples/elastic_train.py with CUDA tensors, 2 ranks sharing one GPU. A rank
# SIGKILLs itself at step 5, the survivor shrinks, `pyccl.launch --elastic` starts a replacement
# that joins (grow), the model and optimiser state are broadcast to it, training goes on, and
# the final parameters are compared with an uninterrupted run: MATCH or DIFFER. Then every
# process must exit 0 (the first GPU run printed MATCH, then crashed at exit: SIGABRT/SIGSEGV).
#   BUDGET=120 bash bench/gpu_elastic.sh     (repository root, on the GPU machine)
# Runs (no kernel disk cache, see below): rank 1 killed (the replacement becomes rank 1), then
# rank 0 killed (the survivor becomes rank 0 and hands the state over), then, if 25 s of BUDGET
# are left, a control: rank 1
# killed with the first GPU run's end (--plain-exit: shutdown alone, no barrier/synchronize/gc).
# Each run's timeout (inside) is at most 50 s; the first leaves 25 s for the second.
# To show a crash's cause: PYTHONFAULTHANDLER=1 (Python stacks of every thread on SIGSEGV /
# SIGABRT; the example adds SIGTERM, so a rank the launcher stops shows where it hung),
# TORCH_SHOW_CPP_STACKTRACES=1, PYCCL_DEBUG=INFO (engine choices, aborts), the example's
# --trace-exit (how far each rank got, the threads alive at exit, the Python version), each
# process's own log and the launcher's (pyccl.launch --log-dir: $OUT/elastic-<run>/rank<R>.<K>.log,
# launch.log, kept whole).
# Exit status: the number of runs that did not both print MATCH and end with exit code 0.
set -u -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1 TORCH_SHOW_CPP_STACKTRACES=1 PYCCL_DEBUG=${PYCCL_DEBUG:-INFO}   # INFO: engine choices, closes
export PYCCL_TIMEOUT=${PYCCL_TIMEOUT:-40}      # a replacement's torch + CUDA start took ~10 s on the H200
# No kernel disk cache (unless set): every process builds its CUDA kernels itself, so the
# replacement (it exits ~0.5 s after its first CUDA call) exits while its background build runs,
# the case that crashed the first GPU run (a thread inside NVRTC at exit: bench/exit_during_build.py).
# With a warm cache (the 2026-12-08 run) no build thread is alive at exit and nothing is shown.
export PYCCL_KERNEL_CACHE=${PYCCL_KERNEL_CACHE-0}
DEVICE=${DEVICE:-cuda}               # DEVICE=cpu: the script's own check on a machine without a GPU
BUDGET=${BUDGET:-120}
OUT=${OUT:-/tmp/gpu_elastic_out}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
mkdir -p "$OUT"
. bench/gpu_site.sh                  # pyccl laid out from the tree where it is not installed (no C core)
START=$(date +%s)
BAD=0
RUNS=("1" "0" "1 --plain-exit")
for i in 0 1 2; do
  set -- ${RUNS[$i]}
  run=$1; extra=${2:-}
  left=$((BUDGET - ($(date +%s) - START) - 3))
  T=$(( i == 0 ? left - 25 : left )); [ "$T" -gt 50 ] && T=50      # run 1 leaves 25 s for run 2
  name="kill$run${extra:+-plain}"
  if [ "$T" -lt 20 ]; then
    echo "== $name: skipped, $left s of the budget left"; [ "$i" -lt 2 ] && BAD=$((BAD + 1)); continue
  fi
  LOG="$OUT/elastic-$name"
  mkdir -p "$LOG"
  echo "== kill rank $run at step 5 $extra, 2 ranks, --device $DEVICE (one GPU for both), timeout $T s"
  t0=$(date +%s.%N)
  timeout -k 3 "$T" python3 -m pyccl.launch --elastic --log-dir "$LOG" -n 2 examples/elastic_train.py \
    --device "$DEVICE" --kill-rank "$run" --kill-step 5 --check --trace-exit $extra > "$LOG/launcher.out" 2>&1
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
      | grep -vE '^[0-9]+:elastic_train| INFO ' | head -30 | sed 's/^/    ! /'
  done
  grep -v '^pyccl.launch' "$LOG/launcher.out" | head -5 | sed 's/^/  launcher.out: /'
  match=$(cat "$LOG"/rank*.log 2>/dev/null | grep -cx MATCH)
  secs=$(python3 -c "print(f'{$t1 - $t0:.1f}')")
  echo "== $name: exit status $rc, MATCH lines $match, $secs s"
  echo "$rc $match $secs" > "$LOG/result"
  ok=0; { [ "$rc" = 0 ] && [ "$match" -ge 1 ]; } && ok=1
  [ "$i" -lt 2 ] && [ "$ok" = 0 ] && BAD=$((BAD + 1))
  [ "$i" = 2 ] && echo "== control (--plain-exit) clean: $ok"
done
# The digest, last (a caller may keep only the tail): per run its result, the launcher's failure
# lines, and per process how far it got, the threads alive at exit and the first crash lines.
echo "== DIGEST"
python3 - "$OUT" <<'PY'
import glob, os, re, sys
CRASH = re.compile(r"Fatal Python error|terminate called|what\(\)|FATAL|egmentation|double free|corrupt|invalid pointer|"
                   r"CUDA error|Error:|Aborted")
for d in sorted(glob.glob(os.path.join(sys.argv[1], "elastic-*")), key=os.path.getmtime):
    res = open(os.path.join(d, "result")).read().split() if os.path.exists(os.path.join(d, "result")) else ["?"] * 3
    print(f"{os.path.basename(d)[8:]}: exit {res[0]}, MATCH {res[1]}, {res[2]} s")
    try:
        for ln in open(os.path.join(d, "launch.log")):
            if "failed" in ln or "wait to join" in ln:
                print("  L" + ln.rstrip()[:160])
    except OSError:
        pass
    for f in sorted(glob.glob(os.path.join(d, "rank*.log"))):
        lines = open(f, errors="replace").read().splitlines()
        stage = [ln.split(" ", 5)[-1] for ln in lines if "exit trace" in ln]
        crash = [i for i, ln in enumerate(lines) if CRASH.search(ln) and " INFO " not in ln]
        bits = []
        if stage:
            bits.append(" | ".join(x[:160] for x in stage[-2:]))
        if crash:
            i = crash[0]
            top = [ln.strip() for ln in lines[i:i + 12] if ln.strip().startswith("File")][:2]
            bits.append("CRASH " + lines[i].strip()[:120] + (" @ " + " < ".join(t[5:85] for t in top) if top else ""))
        print(f"  {os.path.basename(f)[:-4]}: " + ("; ".join(bits) if bits else "(no trace: killed, or never started)"))
PY
echo "SUMMARY: $((2 - BAD)) of 2 runs printed MATCH and exited 0 (logs under $OUT/elastic-*)"
exit $BAD
