#!/usr/bin/env bash
# CUDA windows (ccl/windows/cuda.py, issue 30) on one GPU machine; ranks share the GPU(s).
#   bench/gpu_window.sh [tests] [moe] [bench] [moe-kernel]   (default: all four, in TOTAL_BUDGET=118 s at most)
#   tests  tests/test_cuda_window.py: a peer SIGKILLed while the stream waits, a wait that times out,
#          the torch backend, then 2 and 3 ranks: every dtype at both ends, 0 bytes, cupy arrays, many
#          puts + one signal, puts from every peer at once, no sync inside the calls, bad input
#   moe    examples/moe_inference.py --device cuda --dispatch window --window-puts copies --check (bitwise
#          against the single-process run) and its host time per MoE layer; moe-kernel: --window-puts kernel
#   bench  bench/window.py --cuda: 8 B put+signal vs dist.send/recv, host us per call and ping-pong
set -u -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. bench/gpu_site.sh                  # pyccl laid out from the tree where it is not installed
FAILED=0
END=$((SECONDS + ${TOTAL_BUDGET:-118}))     # every step's timeout is cut to what is left of the total
left() { local l=$((END - SECONDS - 2)); [ "$l" -lt "$1" ] && echo $((l > 1 ? l : 1)) || echo "$1"; }
RUN="python3 -m torch.distributed.run --standalone --nproc-per-node 2"
QUIET='^\[rank\|OMP_NUM\|^\*\*\*\|Warning\|warn('
nvidia-smi --query-gpu=index,name --format=csv,noheader 2>/dev/null
for m in ${*:-tests moe bench moe-kernel}; do
  echo "=== $m (t=${SECONDS}s)"
  case $m in
  tests)
    timeout -k 2 "$(left ${TESTS_BUDGET:-50})" python3 -m pytest -v -p no:cacheprovider --timeout=40 -rs \
      tests/test_cuda_window.py ${PYTEST_ARGS:-} 2>&1 | grep -E "PASSED|FAILED|ERROR|SKIPPED|Error|assert|passed|failed" \
      | cut -c1-600 | tail -60 || FAILED=$((FAILED + 1)) ;;
  moe|moe-kernel)
    puts=copies; [ $m = moe-kernel ] && puts=kernel
    timeout -k 2 "$(left ${MOE_BUDGET:-24})" $RUN examples/moe_inference.py --backend pyccl --device cuda --quiet \
      --warmup 1 --runs 1 --dispatch window --check --window-puts $puts 2>&1 | grep -v "$QUIET" | tail -8 \
      || FAILED=$((FAILED + 1)) ;;
  bench)
    timeout -k 2 "$(left ${BENCH_BUDGET:-18})" $RUN bench/window.py --cuda --sizes 8 --iters ${ITERS:-100} --rounds 3 2>&1 \
      | grep -v "$QUIET" | grep -v "^RESULT " || FAILED=$((FAILED + 1)) ;;
  esac
done
echo "=== failed steps: $FAILED (t=${SECONDS}s)"
exit $FAILED
