#!/usr/bin/env bash
# vitlab on a GPU, in one go: what a session that is lent a GPU runs first (under 8 minutes on one H100/H200).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# From the repository root, with a Python whose torch sees CUDA (the package need not be installed: src/ is put
# on PYTHONPATH; pytest, and PyYAML, Pillow, safetensors, matplotlib as vitlab needs them, must import). Runs, each
# under its own time limit, and writes each step's output to OUT_DIR (default gpu-check/) as well as the terminal:
#   1. the machine: nvidia-smi, torch and CUDA versions, the bf16 and fp32 matmul peaks;
#   2. the test suite's GPU-capable tests (marker `device`) with VITLAB_TEST_DEVICE=cuda: the bench step equal to
#      fit()'s step bit for bit, no host read in a step, the whole step under torch.compile, the attention paths,
#      exact resume;
#   3. `vitlab bench` of ViT-B/16 at 224 px, batch 256, bf16, compiled, train and infer, with --check-syncs (any
#      host-device synchronisation inside a timed step is an error) and utilisation against the measured bf16 peak;
#   4. with two or more GPUs: a 2-process torchrun DDP run on NCCL (the built-in digits, 2 epochs);
#   5. the first minutes of the cifar10-gpu recipe (benchmarks/accuracy.py with a time limit), when CIFAR-10 is
#      found: DATA_ROOT (default ../shared/data) holding cifar10-jpeg/cifar10-jpeg.tar.gz, as in ../shared/data.
#      (The lent machine gets the repository only: copy that folder into an ignored one, e.g. `mkdir -p
#      .gpu-data && cp -r ../shared/data/cifar10-jpeg .gpu-data/` with `.gpu-data/` in .git/info/exclude, carry
#      it, and run `DATA_ROOT=.gpu-data bash benchmarks/gpu_check.sh $OUT`.)
# A step that fails or runs out of time is reported and the next one runs; the exit status is the number of
# failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu-check}
DATA_ROOT=${DATA_ROOT:-../shared/data}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
failed=0

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, its output to the terminal and a log
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

step machine 60 bash -c "nvidia-smi; $PY - <<'EOF'
import torch
from vitlab.bench import matmul_peak
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')
for dtype in ('bf16', 'fp32'):
    print(f'matmul peak {dtype}: {matmul_peak(\"cuda\", dtype) / 1e12:.1f} TFLOP/s')
EOF"
step tests 150 env VITLAB_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider -m device tests
for mode in train infer; do
    step "bench-vit-b16-$mode" 150 "$PY" -m vitlab bench --model vit-b16 --batch 256 --mode "$mode" --device cuda \
        --precision bf16 --compile --check-syncs --repeats 5
done
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$gpus" -ge 2 ]; then
    step ddp-nccl 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m vitlab train \
        --device cuda --set epochs=2 --out "$OUT_DIR/ddp-run"
else
    echo "=== ddp-nccl: skipped ($gpus GPU(s); it needs 2)"
fi
if [ -f "$DATA_ROOT/cifar10-jpeg/cifar10-jpeg.tar.gz" ]; then
    step cifar10-gpu 210 "$PY" benchmarks/accuracy.py cifar10-gpu --data-root "$DATA_ROOT" \
        --cache-dir "$OUT_DIR/cache" --out "$OUT_DIR/cifar10-gpu" --set time_limit_minutes=2 --at 1 2
else
    echo "=== cifar10-gpu: skipped (no $DATA_ROOT/cifar10-jpeg/cifar10-jpeg.tar.gz; set DATA_ROOT)"
fi
echo "=== done: $failed step(s) failed; logs in $OUT_DIR/"
exit "$failed"
