#!/usr/bin/env bash
# CUDA windows (ccl/windows/cuda.py, issue 30) on one GPU machine; ranks share the GPU(s).
#   TOTAL_BUDGET=118 bash bench/gpu_window.sh        (every step's timeout is cut to what is left of it)
# 1. at once, side by side (correctness does not depend on timing; 16 cores):
#    tests  tests/test_cuda_window.py: a peer SIGKILLed while the stream waits, a wait that times out,
#           the torch backend, then 2 and 3 ranks: the MoE exchange of examples/moe_cuda_window.py
#           (rows in place, 0 device syncs while queuing), every dtype at both ends, 0 bytes, cupy
#           arrays, many puts + one signal, puts from every peer at once, no sync inside, bad input
#    moe    examples/moe_inference.py --device cuda --dispatch window --check, --window-puts kernel,
#           fused, fused with --window-wait stream, copies: bitwise against the single-process run,
#           host us per MoE layer, device syncs
# 2. alone (timings): bench/window.py --cuda: 8 B put+signal vs dist.send/recv, host us per call and
#    ping-pong one-way time, windows of both wait modes (spinning kernel, cuStreamWaitValue64).
# 3. if time is left: the MoE (fused puts, both waits) alone, for its host time.
# Full logs go to $OUT (or /tmp/gpu_window); stdout gets the compact lines.
set -u -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. bench/gpu_site.sh                  # pyccl laid out from the tree where it is not installed
LOG=${OUT:-/tmp/gpu_window}
mkdir -p "$LOG"
FAILED=0
END=$((SECONDS + ${TOTAL_BUDGET:-118}))
left() { local l=$((END - SECONDS - 2)); [ "$l" -lt "$1" ] && echo $((l > 1 ? l : 1)) || echo "$1"; }
RUN="python3 -m torch.distributed.run --standalone --nproc-per-node 2"
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader 2>/dev/null

MOES="kernel-kernel fused-kernel fused-stream copies-kernel"      # --window-puts - --window-wait
moe() {   # $1: puts-wait, $2: seconds at most
  timeout -k 2 "$(left "$2")" $RUN examples/moe_inference.py --backend pyccl --device cuda --quiet --warmup 1 \
    --runs 2 --dispatch window --check --window-puts "${1%-*}" --window-wait "${1#*-}" > "$LOG/moe_$1.log" 2>&1
  echo "rc=$?"
}
(for p in $MOES; do echo "moe $p $(moe $p ${MOE_BUDGET:-30}) (t=${SECONDS}s)"; done) > "$LOG/moe.rc" 2>&1 &
MOE_PID=$!

echo "=== tests (t=${SECONDS}s)"
timeout -k 2 "$(left ${TESTS_BUDGET:-84})" python3 -m pytest -v -s -p no:cacheprovider --timeout=70 -rfEs \
  tests/test_cuda_window.py ${PYTEST_ARGS:-} > "$LOG/tests.log" 2>&1
rc=$?; [ $rc = 0 ] || FAILED=$((FAILED + 1))
grep -E "PASSED|FAILED|ERROR|SKIPPED|us median|^E  |passed|failed|Timeout" "$LOG/tests.log" | cut -c1-400 | tail -70
echo "tests rc=$rc (t=${SECONDS}s)"

wait $MOE_PID
echo "=== moe (side by side with the tests)"
for p in $MOES; do
  grep -E "window dispatch on CUDA|check:|tokens in" "$LOG/moe_$p.log" 2>/dev/null | cut -c1-500 | sed "s/^/[$p] /"
  grep -q "check:" "$LOG/moe_$p.log" 2>/dev/null || grep -E "Error|Exception|assert|Killed|Timeout" "$LOG/moe_$p.log" 2>/dev/null \
    | grep -v "error_file\|errors.html\|ChildFailedError\|raise " | head -4 | cut -c1-300 | sed "s/^/[$p] /"
done
cat "$LOG/moe.rc"
[ "$(grep -c "rc=0" "$LOG/moe.rc")" = 4 ] || FAILED=$((FAILED + 1))

echo "=== bench 8 B, alone (t=${SECONDS}s)"
timeout -k 2 "$(left ${BENCH_BUDGET:-40})" $RUN bench/window.py --cuda --sizes 8 --iters ${ITERS:-200} --rounds 5 \
  > "$LOG/bench.log" 2>&1 || FAILED=$((FAILED + 1))
grep -E "^\||^median|RESULT-TARGET|Error|Exception" "$LOG/bench.log" | grep -v "ChildFailedError\|raise " | cut -c1-600 | head -14
if [ $((END - SECONDS)) -ge ${ALONE_MIN:-20} ]; then         # time left: the host time per MoE layer again, alone
  echo "=== moe alone, fused puts, both waits, no check (t=${SECONDS}s)"
  for w in kernel stream; do
    timeout -k 2 "$(left 25)" $RUN examples/moe_inference.py --backend pyccl --device cuda --quiet --warmup 1 \
      --runs 3 --dispatch window --window-puts fused --window-wait $w > "$LOG/moe_alone_$w.log" 2>&1
    grep -E "window dispatch on CUDA|tokens in" "$LOG/moe_alone_$w.log" | cut -c1-500 | sed "s/^/[alone $w] /"
    [ $((END - SECONDS)) -ge 16 ] || break
  done
fi
echo "=== summary (the full logs are in \$OUT)"          # the last lines: what a 2.5 kB tail keeps
grep -E "^(FAILED|ERROR) " "$LOG/tests.log" | sed 's/ - .*//' | cut -c1-110 | head -12
grep -E "(passed|failed|error).* in [0-9.]+s" "$LOG/tests.log" | tail -1
for f in "$LOG"/moe_*.log; do
  [ -f "$f" ] || continue
  m=$(grep -m1 "rank 0: " "$f" | grep -oE "[0-9.]+ us median|wait_signal part [0-9.]+|syncs while queuing: [0-9]+" | tr '\n' ' ')
  e=$(grep -m1 -E "^[A-Za-z.]*(Error|Exception|Timeout|Failure)" "$f" | cut -c1-120)
  echo "$(basename "$f" .log): $(grep -oE "check: [A-Z]+" "$f" | head -1) $m${e:+ ERR $e}"
done
grep -E "^\| [0-9]" "$LOG/bench.log" 2>/dev/null | cut -c1-200
echo "=== failed steps: $FAILED (t=${SECONDS}s)"
exit $FAILED
