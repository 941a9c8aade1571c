#!/usr/bin/env bash
# Both examples on one host with 2 GPUs, NCCL vs pyccl, through torchrun; prints the --profile
# tables and a timing table for examples/README.md ("GPU (2 x H200)").
#
#   bash examples/gpu_run.sh            # check, then bench (about 8 minutes)
#   bash examples/gpu_run.sh check      # small sizes: --check against the single-process run, --profile
#   bash examples/gpu_run.sh bench      # bigger sizes, 2 interleaved rounds, markdown table
#
# A run that fails (for instance a backend that cannot take CUDA tensors) is reported and the
# others go on; the exit code is the number of failed runs.
set -u
cd "$(dirname "$0")/.."

# NVLink multicast (NVLS) off: the machines this runs on must not use it.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

MODE=${1:-all}
PY=${PYTHON:-python}
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc-per-node 2"
# bigger than the CI sizes, so that the GPUs have something to do between collectives
TRAIN_BIG="--layers 4 --d-model 1024 --heads 16 --ffn 4096 --seq 256 --batch 32 --micro-batches 4"
MOE_BIG="--layers 4 --d-model 1024 --heads 16 --ffn 2048 --experts 8 --vocab 1024 --batch 64 --prompt 128 --new-tokens 32"
FAILED=0

run() {   # run <label> <command...>: 150 s at most, never stops the script
    echo
    echo "=== $1"
    shift
    echo "+ $*"
    timeout 150 "$@"
    rc=$?
    if [ $rc -ne 0 ]; then
        echo "=== FAILED (exit $rc)"
        FAILED=$((FAILED + 1))
    fi
}

nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>/dev/null
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())"

if [ "$MODE" = all ] || [ "$MODE" = check ]; then
    for b in nccl pyccl; do
        run "train tp 2 pp 1, $b, small, --check" \
            $TORCHRUN examples/tp_pp_train.py --device cuda --backend $b --tp 2 --pp 1 --steps 20 --profile --check
        run "train tp 1 pp 2, $b, small, --check" \
            $TORCHRUN examples/tp_pp_train.py --device cuda --backend $b --tp 1 --pp 2 --steps 20 --profile --check --quiet
        run "moe, $b, small, --check" \
            $TORCHRUN examples/moe_inference.py --device cuda --backend $b --profile --check
        run "moe, $b, big, --check" \
            $TORCHRUN examples/moe_inference.py --device cuda --backend $b $MOE_BIG --runs 3 --profile --check --quiet
    done
fi

if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
    echo
    echo "=== timing table (bigger sizes; median of 2 interleaved rounds)"
    timeout 400 $PY examples/bench_examples.py --device cuda --nproc 2 --launcher torchrun \
        --backends nccl pyccl --layouts 2x1 1x2 --rounds 2 --timeout 150 \
        --train-args "$TRAIN_BIG --steps 30 --warmup 10" --moe-args "$MOE_BIG --runs 3 --warmup 1" \
        || FAILED=$((FAILED + 1))
fi

echo
echo "gpu_run.sh: $FAILED failed run(s)"
exit $FAILED
