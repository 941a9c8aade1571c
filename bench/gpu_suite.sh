#!/usr/bin/env bash
# GPU suite: build/import check, GPU tests, then pyccl vs NCCL through torch.distributed, one table.
#   bench/gpu_suite.sh [--quick]          (run from anywhere; writes logs and the table to $OUT or ./gpu-results)
# Needs: >= 2 GPUs of one host, torch with NCCL, cupy. Without cffi the C core is not built and
# pyccl runs its numpy twins on the CPU side (the GPU path does not use the C core).
set -u -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUTDIR=${OUT:-$ROOT/gpu-results}
mkdir -p "$OUTDIR"
cd "$ROOT"

# 1. pyccl importable: installed, or laid out from the source tree (no cffi needed).
if ! python3 -c "import pyccl.communicator" 2>/dev/null; then
  if python3 -c "import cffi" 2>/dev/null && python3 -m pip install -q --no-build-isolation --no-deps -e . ; then
    echo "pyccl: installed editable (C core built)"
  else
    SITE=${PYCCL_SITE:-/tmp/pyccl-site}
    rm -rf "$SITE"; mkdir -p "$SITE/pyccl"
    cp -r ccl/. "$SITE/pyccl/"; rm -f "$SITE"/pyccl/_native*.so
    cp -r transports "$SITE/pyccl/transports"; cp -r topology "$SITE/pyccl/topology"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    echo "pyccl: from the source tree at $SITE (no C core: numpy twins on the CPU side)"
  fi
fi
python3 - <<'PY'
import torch, cupy, pyccl.reduce as r
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, nccl {torch.cuda.nccl.version()}, "
      f"cupy {cupy.__version__}, GPUs {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, "
      f"pyccl C core {'yes' if r.NATIVE_AVAILABLE else 'no'}")
PY
nvidia-smi topo -m 2>&1 | head -6

# 2. GPU tests.
timeout -k 10 "${TESTS_BUDGET:-900}" python3 -m pytest -q -p no:cacheprovider ${PYTEST_STOP--x} --timeout="${TEST_TIMEOUT:-300}" tests/test_cuda.py ${PYTEST_ARGS:-} 2>&1 | tee "$OUTDIR/tests.log"
TESTS=$?

# 3. Benchmark: pyccl vs NCCL in the same processes.
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
timeout -k 10 "${BENCH_BUDGET:-900}" python3 -m torch.distributed.run --standalone --nproc_per_node="$NGPU" bench/gpu_bench.py --out "$OUTDIR" "$@" \
  2>&1 | tee "$OUTDIR/bench.log"
BENCH=$?

# 4. Optional diagnostics (free-running vs synchronised timing per variant): GPU_PROBE=1.
if [ "${GPU_PROBE:-0}" = "1" ]; then
  timeout -k 10 300 python3 -m torch.distributed.run --standalone --nproc_per_node="$NGPU" bench/gpu_probe.py \
    2>&1 | grep -v '^\[rank\|OMP_NUM\|^\*\*\*' | tee "$OUTDIR/probe.log"
fi
echo "tests exit $TESTS, bench exit $BENCH; results in $OUTDIR"
exit $(( TESTS != 0 || BENCH != 0 ))
