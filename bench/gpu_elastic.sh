#!/usr/bin/env bash
# Issue 31 on a GPU: examples/elastic_train.py with CUDA tensors, 2 ranks sharing one GPU. A rank
# SIGKILLs itself at step 5, the survivor shrinks, `pyccl.launch --elastic` starts a replacement
# that joins (grow), the model and optimiser state are broadcast to it, training goes on, and
# the final parameters are compared with an uninterrupted run: MATCH or DIFFER.
#   bash bench/gpu_elastic.sh     (repository root, on the GPU machine; < 2 min: T1=62 s, T2=40 s)
# Two runs: rank 1 killed (the replacement becomes rank 1), then rank 0 killed (the survivor
# becomes rank 0 and hands the state over). Exit status: the number of runs without MATCH.
set -u -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYCCL_TIMEOUT=${PYCCL_TIMEOUT:-60}
DEVICE=${DEVICE:-cuda}               # DEVICE=cpu: the script's own check on a machine without a GPU
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. bench/gpu_site.sh                  # pyccl laid out from the tree where it is not installed (no C core)
timeout -k 2 10 python3 - <<'PY'
import torch, pyccl.reduce as r
try:
    import cupy
    cp = cupy.__version__
except ImportError as e:
    cp = f"missing ({e})"
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, GPUs {torch.cuda.device_count()} x "
      f"{torch.cuda.get_device_name(0)}, cupy {cp}, pyccl C core {'yes' if r.NATIVE_AVAILABLE else 'no'}",
      flush=True)
PY
FAILED=0
for spec in "1 ${T1:-62}" "0 ${T2:-40}"; do
  set -- $spec
  echo "== kill rank $1 at step 5, 2 ranks, --device $DEVICE (one GPU for both), timeout $2 s"
  out=$(timeout -k 5 "$2" python3 -m pyccl.launch --elastic -n 2 examples/elastic_train.py --device "$DEVICE" \
        --kill-rank "$1" --kill-step 5 --check 2>&1)
  rc=$?
  echo "$out" | grep -E 'elastic_train|MATCH|DIFFER|pyccl.launch|Error|error' | tail -12
  echo "== exit status $rc"
  echo "$out" | grep -qx MATCH || FAILED=$((FAILED + 1))
done
echo "SUMMARY: $((2 - FAILED)) of 2 runs printed MATCH"
if [ "$FAILED" -gt 0 ] && [ "$DEVICE" != cpu ] && [ "${CONTROL:-0}" = 1 ]; then       # the same on CPU tensors, to tell a GPU problem from the set-up's
  echo "== control: kill rank 1, --device cpu, timeout 25 s"
  timeout -k 2 25 python3 -m pyccl.launch --elastic -n 2 examples/elastic_train.py --kill-rank 1 --kill-step 5 \
    --check 2>&1 | tail -8
fi
exit $FAILED
