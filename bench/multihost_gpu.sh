#!/usr/bin/env bash
# CUDA tensors across emulated hosts on one GPU machine (one GPU is enough: ranks share it).
#   bench/multihost_gpu.sh [tests] [bench] [examples]      (default: all three)
# tests: tests/test_cuda_multihost.py (+ the CPU schedule test); bench: bench/multihost_gpu.py
# (pyccl staged vs NCCL socket vs Gloo vs pyccl CPU tensors); examples: tp_pp_train.py and
# moe_inference.py with --device cuda, every rank its own host (PER_HOST ranks per host), --check.
# Env: BENCH_ARGS (to multihost_gpu.py), TESTS_BUDGET (s), PYTEST_ARGS.
set -u -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
MODES=${*:-tests bench examples}
. bench/gpu_site.sh                  # pyccl laid out from the tree where it is not installed
FAILED=0
TORCHRUN="python3 -m torch.distributed.run --standalone"
for m in $MODES; do
  case $m in
  tests)
    timeout -k 5 "${TESTS_BUDGET:-240}" python3 -m pytest -q -p no:cacheprovider -x --timeout=200 \
      tests/test_cuda_multihost.py tests/test_staging.py ${PYTEST_ARGS:-} 2>&1 | tail -40 || FAILED=$((FAILED + 1)) ;;
  bench)
    timeout -k 5 "${BENCH_BUDGET:-150}" $TORCHRUN --nproc-per-node 2 bench/multihost_gpu.py ${BENCH_ARGS:-} 2>&1 \
      | grep -v "^\[rank\|OMP_NUM\|^\*\*\*\|Warning\|warn(" || FAILED=$((FAILED + 1)) ;;
  examples)
    for args in "examples/tp_pp_train.py --tp 2 --pp 2 --steps 10" "examples/moe_inference.py"; do
      echo "=== 2 hosts x 2 ranks: $args --device cuda --check"
      # every rank its own PYCCL_HOST_ID: host<RANK / 2>
      timeout -k 5 120 $TORCHRUN --nproc-per-node 4 --no-python bash -c \
        "PYCCL_HOST_ID=host\$((RANK / ${PER_HOST:-2})) exec python3 $args --device cuda --check --quiet" 2>&1 \
        | grep -v "OMP_NUM\|^\*\*\*\|^\s*$" | tail -${EXAMPLE_TAIL:-12} || FAILED=$((FAILED + 1))
    done ;;
  esac
done
echo "multihost_gpu.sh: $FAILED failed part(s)"
exit $FAILED
