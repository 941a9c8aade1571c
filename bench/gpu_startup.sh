#!/usr/bin/env bash
# GPU start-up and memory (issue 32), one GPU, 2 ranks sharing it. Run from the repository root on the
# GPU machine:   bash bench/gpu_startup.sh [probe|final|check]      (one budget: BUDGET s, 230 by default)
#   probe  the first call of every op x dtype with an empty kernel cache; the torch backend's init + first
#          bfloat16 all_reduce (cache empty, then warm); device memory after every op at 1/64 MiB, suspend,
#          resume, close; a graph replayed after suspend/resume (one test); NVRTC compile times; the first
#          calls with the code before issue 32 (git archive of BASE, where the checkout has .git).
#   final  (BUDGET=120) tests/test_cuda_memory.py, then the torch backend's cold first call and the memory
#          probe, as far as the budget goes.
#   check  (BUDGET=120) tests/test_cuda_memory.py (memory by stage, graph replay after suspend/resume, the
#          warm first calls with where their time goes), the device memory of each part of the state in one
#          process (gpu_startup.py parts), then tests/test_cuda.py for what is left of the budget (at most
#          CUDA_S s; CUDA_TESTS: other node ids instead, e.g. the spawned-process tests at the file's end that a
#          first call did not reach; CUDA_ARGS: more options).
# Every step is bounded by `timeout` and by what is left of the budget; large output goes under $OUT.
set -u -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/gpu_startup_out}
mkdir -p "$OUT"
MODE=${1:-probe}
BUDGET=${BUDGET:-230}
BASE=${BASE:-6b5a285}                  # main before issue 32
RUN="python3 -m torch.distributed.run --standalone --nproc-per-node 2"
QUIET='^\[rank\|OMP_NUM\|^\*\*\*\|Warning\|warn(\|W1207\|^ *warnings.warn'
FAILED=0
OLDPATH=${PYTHONPATH:-}
. bench/gpu_site.sh
NEWPATH=${PYTHONPATH:-}

left() { echo $((BUDGET - SECONDS)); }
# step TITLE LIMIT COMMAND...: run COMMAND under timeout min(LIMIT, budget left); skipped when < 10 s are left
step() {
  local title=$1 limit=$2; shift 2
  local t; t=$(left)
  [ "$t" -lt "$limit" ] && limit=$t
  if [ "$limit" -lt 10 ]; then echo "== $title: skipped (budget spent)"; return; fi
  echo "== $(date -u +%H:%M:%S) [+${SECONDS}s] $title (<= ${limit}s)"
  timeout -k 5 "$limit" "$@" 2>&1 | grep -v "$QUIET" | tail -"${TAIL:-25}"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "   (exit $rc)"; FAILED=$((FAILED + 1)); }
}
fresh_cache() {        # an empty kernel cache (cupy's and pyccl's): a fresh machine
  rm -rf "$OUT/cache"; mkdir -p "$OUT/cache/cupy" "$OUT/cache/pyccl"
  export CUPY_CACHE_DIR=$OUT/cache/cupy PYCCL_KERNEL_CACHE=$OUT/cache/pyccl
}

echo "== $(date -u +%H:%M:%S) machine"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>&1 | head -2
echo "cpus $(nproc) $(python3 -V 2>&1) $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
if [ "$MODE" != check ]; then
  if command -v nvcc >/dev/null; then nvcc --version | tail -2; else echo "nvcc: not on PATH"; fi
  ls -d /usr/local/cuda*/bin/nvcc 2>/dev/null || echo "no /usr/local/cuda*/bin/nvcc"
  python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'cuda runtime', cupy.cuda.runtime.runtimeGetVersion(), 'torch', torch.__version__)"
  python3 -c "
from pyccl.engines.cuda import nvrtc
print('libnvrtc', nvrtc.lib()._name, 'version', nvrtc.version())" 2>&1 | tail -1
fi

if [ "$MODE" = check ]; then          # BUDGET=120: issue 32's tests first, then the GPU suite after the kernel changes
  TAIL=50 step "tests/test_cuda_memory.py: memory by stage, graphs after suspend/resume, warm first calls with their parts" 56 \
    bash -c "set -o pipefail; python3 -m pytest -q -s -p no:cacheprovider --timeout=45 -rfE --tb=line \
    tests/test_cuda_memory.py::test_memory_bounded_and_given_back tests/test_cuda_memory.py::test_graph_replays_after_suspend_and_resume \
    tests/test_cuda_memory.py::test_first_calls_cold_then_warm 2>&1 | tee $OUT/test_cuda_memory.log"
  step "device memory by part, one process (cudaMemGetInfo)" 12 python3 bench/gpu_startup.py parts
  step "the same with CUDA_MODULE_LOADING=EAGER (is module memory given back on unload?)" 12 \
    env CUDA_MODULE_LOADING=EAGER python3 bench/gpu_startup.py parts
  # tests/test_cuda.py in file order (every dtype and op first) until the budget is spent: SIGINT
  # makes pytest print what passed, failed and was not reached
  CUDA_S=$(( $(left) - 8 < ${CUDA_S:-58} ? $(left) - 8 : ${CUDA_S:-58} ))
  if [ "$CUDA_S" -ge 10 ]; then
    echo "== $(date -u +%H:%M:%S) [+${SECONDS}s] tests/test_cuda.py (<= ${CUDA_S}s)"
    timeout -s INT -k 5 "$CUDA_S" python3 -m pytest -q -p no:cacheprovider --timeout=55 -rfEs --tb=short --durations=8 \
      ${CUDA_TESTS:-tests/test_cuda.py} ${CUDA_ARGS:-} > "$OUT/test_cuda.log" 2>&1
    echo "   (exit $?)"; grep -v "$QUIET" "$OUT/test_cuda.log" | grep -v "^ *$" | tail -"${CUDA_TAIL:-30}"
  else
    echo "== tests/test_cuda.py: skipped (budget spent)"
  fi
  echo "== $(date -u +%H:%M:%S) [+${SECONDS}s] done, $FAILED step(s) failed"
  exit $FAILED
fi

if [ "$MODE" = final ]; then          # BUDGET=120: the tests first, then what fits of the measurements
  fresh_cache
  TAIL=120 step "tests/test_cuda_memory.py (memory, suspend/resume, graph replay, first calls cold and warm)" 88 \
    python3 -m pytest -q -s -p no:cacheprovider --timeout=85 tests/test_cuda_memory.py ${PYTEST_ARGS:-}
  fresh_cache
  step "torch backend: init_process_group + first bfloat16 all_reduce, empty cache" 15 \
    $RUN bench/gpu_startup.py torchfirst
  step "device memory probe (2 ranks, float32; cudaMemGetInfo over the baseline, both ranks)" 25 \
    $RUN bench/gpu_startup.py memory
  step "NVRTC compile times (one kernel, one unit, every unit on 8 threads)" 25 \
    python3 bench/gpu_startup.py nvrtc --one-module 0
  echo "== $(date -u +%H:%M:%S) [+${SECONDS}s] done, $FAILED step(s) failed"
  exit $FAILED
fi

fresh_cache
step "first call of every op x dtype, empty kernel cache, 1 MiB (pyccl.init, 2 ranks)" 45 \
  $RUN bench/gpu_startup.py first
step "torch backend: init_process_group + first bfloat16 all_reduce, cache as left by the step above" 25 \
  $RUN bench/gpu_startup.py torchfirst
fresh_cache
step "torch backend: init_process_group + first bfloat16 all_reduce, empty cache" 25 \
  $RUN bench/gpu_startup.py torchfirst
step "device memory (2 ranks on one GPU, float32; cudaMemGetInfo over the baseline, both ranks)" 40 \
  $RUN bench/gpu_startup.py memory
[ "$MODE" = final ] && step "python -m pyccl.doctor kernels" 20 python3 -m pyccl.doctor kernels
[ "$MODE" = probe ] && TAIL=15 step "a CUDA graph captured before suspend, replayed after resume (test)" 45 \
  python3 -m pytest -q -p no:cacheprovider --timeout=40 -s \
  tests/test_cuda_memory.py::test_graph_replays_after_suspend_and_resume
step "NVRTC compile times (ctypes, this tree's source)" 55 python3 bench/gpu_startup.py nvrtc

if [ "$MODE" = probe ]; then
  if git rev-parse --verify -q "$BASE^{commit}" >/dev/null 2>&1; then
    rm -rf "$OUT/old" && mkdir -p "$OUT/old" && git archive "$BASE" ccl transports topology bench | tar -x -C "$OUT/old"
    export PYTHONPATH=$OLDPATH
    (cd "$OUT/old" && PYCCL_SITE=/tmp/pyccl-site-old . bench/gpu_site.sh && echo "$PYTHONPATH" > "$OUT/old.path")
    export PYTHONPATH=$(cat "$OUT/old.path")
    fresh_cache
    step "BEFORE issue 32 ($BASE): first call of every op x dtype, empty cache" 40 $RUN bench/gpu_startup.py first
    export PYTHONPATH=$NEWPATH
  else
    echo "== no git history here: the code before issue 32 is not measured"
  fi
fi
echo "== $(date -u +%H:%M:%S) [+${SECONDS}s] done, $FAILED step(s) failed"
exit $FAILED
