#!/usr/bin/env bash
# CUDA windows (ccl/windows/cuda.py, issue 30) on one GPU machine; ranks share the GPU(s).
#   bench/gpu_window.sh [tests] [moe] [bench]        (default: all three, in 235 s at most: TOTAL_BUDGET)
#   tests  tests/test_cuda_window.py (2 and 3 ranks: dtypes, ends, 0 bytes, many puts + one signal,
#          puts from every peer at once, bad input, a wait that times out, a peer SIGKILLed, torch backend)
#   bench  bench/window.py --cuda: 8 B put+signal vs dist.send/recv, host us per call and ping-pong
#   moe    examples/moe_inference.py --device cuda: --dispatch all_to_all, window (copies, kernel): --check each,
#          the window outputs compared bitwise with all_to_all's
set -u -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. bench/gpu_site.sh                  # pyccl laid out from the tree where it is not installed
FAILED=0
END=$((SECONDS + ${TOTAL_BUDGET:-235}))    # every step's timeout is cut to what is left of the total
left() { local l=$((END - SECONDS)); [ "$l" -lt "$1" ] && echo $((l > 1 ? l : 1)) || echo "$1"; }
RUN="python3 -m torch.distributed.run --standalone --nproc-per-node 2"
QUIET='^\[rank\|OMP_NUM\|^\*\*\*\|Warning\|warn('
OUTD=${TMPDIR:-/tmp}/pyccl-gpu-window
mkdir -p "$OUTD"
nvidia-smi --query-gpu=index,name --format=csv,noheader 2>/dev/null
for m in ${*:-tests moe bench}; do
  echo "=== $m"
  case $m in
  tests)
    timeout -k 5 "$(left ${TESTS_BUDGET:-95})" python3 -m pytest -v -p no:cacheprovider --timeout=90 -rs \
      tests/test_cuda_window.py ${PYTEST_ARGS:-} 2>&1 | tail -40 || FAILED=$((FAILED + 1)) ;;
  bench)
    timeout -k 5 "$(left 34)" $RUN bench/window.py --cuda --sizes 8,1048576 --iters ${ITERS:-200} --rounds 3 2>&1 | grep -v "$QUIET" \
      || FAILED=$((FAILED + 1)) ;;
  moe)
    ARGS="--backend pyccl --device cuda --quiet --warmup 1 --runs 1"
    for d in "all_to_all" "window --window-puts copies" "window --window-puts kernel"; do
      echo "--- --dispatch $d"
      timeout -k 5 "$(left 33)" $RUN examples/moe_inference.py $ARGS --dispatch $d --check \
        --out "$OUTD/moe-${d##* }.pt" 2>&1 | grep -v "$QUIET" || FAILED=$((FAILED + 1))
    done
    timeout "$(left 8)" python3 -c "
import sys, torch
a = torch.load(sys.argv[1], weights_only=False)
for path in sys.argv[2:]:
    b = torch.load(path, weights_only=False)
    same = torch.equal(a['tokens'], b['tokens']) and torch.equal(a['logits'], b['logits'])
    print('moe on CUDA,', path.rsplit('-', 1)[1], 'puts vs the all_to_all dispatch:', 'BITWISE EQUAL' if same else 'DIFFERENT')
    if not same:
        sys.exit(1)" "$OUTD/moe-all_to_all.pt" "$OUTD/moe-copies.pt" "$OUTD/moe-kernel.pt" || FAILED=$((FAILED + 1)) ;;
  esac
done
echo "=== failed steps: $FAILED"
exit $FAILED
