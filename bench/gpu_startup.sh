#!/usr/bin/env bash
# GPU start-up and memory (issue 32), one GPU, 2 ranks sharing it. Run from the repository root on the
# GPU machine:   bash bench/gpu_startup.sh [probe|final]      (each mode: under 4 minutes)
#   probe  nvcc present?; NVRTC compile times (common, one kernel, one unit, all units on 4/8 threads, one
#          module of everything); first call of every op x dtype with an empty cache (cupy's and pyccl's);
#          the torch backend's init + first bfloat16 all_reduce; device memory after every op at 1/64 MiB.
#   final  the same measurements, then tests/test_cuda_memory.py and the cache's CPU tests.
# Large output (cubins, caches) goes under $OUT (default /tmp/gpu_startup_out).
set -u -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. bench/gpu_site.sh
OUT=${OUT:-/tmp/gpu_startup_out}
mkdir -p "$OUT"
MODE=${1:-probe}
RUN="python3 -m torch.distributed.run --standalone --nproc-per-node 2"
QUIET='^\[rank\|OMP_NUM\|^\*\*\*\|Warning\|warn('
FAILED=0
fresh_cache() {        # an empty kernel cache (cupy's and pyccl's): a fresh machine
  rm -rf "$OUT/cache"; mkdir -p "$OUT/cache/cupy" "$OUT/cache/pyccl"
  export CUPY_CACHE_DIR=$OUT/cache/cupy PYCCL_KERNEL_CACHE=$OUT/cache/pyccl
}
echo "== $(date -u +%H:%M:%S) machine"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>&1 | head -2
nproc
if command -v nvcc >/dev/null; then nvcc --version | tail -2; else echo "nvcc: not on PATH"; fi
ls -d /usr/local/cuda*/bin/nvcc 2>/dev/null || echo "no /usr/local/cuda*/bin/nvcc"
python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'cuda', cupy.cuda.runtime.runtimeGetVersion(), 'torch', torch.__version__)"
python3 - <<'EOF' 2>&1 | tail -3
import glob, sys
for b in sys.path:
    for p in glob.glob(b + "/nvidia/*/lib/libnvrtc*") + glob.glob(b + "/nvidia/*/include/cuda_fp16.h"):
        print("found", p)
EOF

if [ "$MODE" = probe ]; then
  echo "== $(date -u +%H:%M:%S) NVRTC compile times (ctypes, this tree's source)"
  timeout -k 5 75 python3 bench/gpu_startup.py nvrtc 2>&1 | tail -20 || FAILED=$((FAILED + 1))
fi

echo "== $(date -u +%H:%M:%S) first call of every op x dtype, empty cache, 1 MiB (pyccl.init, 2 ranks)"
fresh_cache
timeout -k 5 60 $RUN bench/gpu_startup.py first 2>&1 | grep -v "$QUIET" | tail -20 || FAILED=$((FAILED + 1))
if [ "$MODE" = final ]; then
  echo "== $(date -u +%H:%M:%S) the same with the cache warm (a second process)"
  timeout -k 5 40 $RUN bench/gpu_startup.py first 2>&1 | grep -v "$QUIET" | tail -20 || FAILED=$((FAILED + 1))
fi

echo "== $(date -u +%H:%M:%S) torch backend: init_process_group + first bfloat16 all_reduce, empty cache"
fresh_cache
timeout -k 5 30 $RUN bench/gpu_startup.py torchfirst 2>&1 | grep -v "$QUIET" | tail -5 || FAILED=$((FAILED + 1))
echo "== $(date -u +%H:%M:%S) torch backend again, cache warm"
timeout -k 5 25 $RUN bench/gpu_startup.py torchfirst 2>&1 | grep -v "$QUIET" | tail -5 || FAILED=$((FAILED + 1))

echo "== $(date -u +%H:%M:%S) device memory (2 ranks on one GPU, float32)"
timeout -k 5 45 $RUN bench/gpu_startup.py memory 2>&1 | grep -v "$QUIET" | tail -20 || FAILED=$((FAILED + 1))

if [ "$MODE" = final ]; then
  echo "== $(date -u +%H:%M:%S) python -m pyccl.doctor kernels"
  timeout -k 5 20 python3 -m pyccl.doctor kernels 2>&1 | tail -12 || FAILED=$((FAILED + 1))
  echo "== $(date -u +%H:%M:%S) tests"
  fresh_cache
  timeout -k 10 "${TESTS_BUDGET:-100}" python3 -m pytest -q -p no:cacheprovider --timeout=90 \
    tests/test_cuda_memory.py tests/test_kernel_cache.py ${PYTEST_ARGS:-} 2>&1 | tail -25 || FAILED=$((FAILED + 1))
fi
echo "== $(date -u +%H:%M:%S) done, $FAILED step(s) failed"
exit $FAILED
