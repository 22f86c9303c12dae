#!/usr/bin/env bash
# The GPU tier in one go, on a machine with a CUDA GPU: the gpu-marked tests, then the recipe's throughput on a
# random ~1.1B-parameter Llama (bf16 + tf32), with the card and its MFU, then tokens/s and peak memory per strategy
# (bf16, QLoRA nf4, FSDP over every GPU when there are 2 or more) against jobs/memory.py's estimates.
#
#   bench/gpu_smoke.sh                   # PEAK_TFLOPS=989 (H100/H200 SXM dense bf16) by default
#   PEAK_TFLOPS=312 bench/gpu_smoke.sh   # A100
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[[ -x $py ]] || py=python3
echo "== card"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())"
echo "== gpu tests"
$py -m pytest -q -s -m gpu tests/test_gpu.py -p no:cacheprovider
echo "== throughput: recipe vs HF Trainer on a random 1.1B Llama, bf16"
model=$(mktemp -d)/llama-1b
$py - "$model" <<'PY'
import sys
from jobs.tiny import tiny_model_dir
from tests.test_gpu import llama_1b
print("params", llama_1b(__import__("pathlib").Path(sys.argv[1]), str(tiny_model_dir())))
PY
$py bench/finetune_throughput.py --model-dir "$model" --max-seq-len 512 --precision bf16 --max-steps 20 \
    --per-device-batch 8 --grad-accum 4 --peak-tflops "${PEAK_TFLOPS:-989}"
echo "== strategies: tokens/s and peak memory per strategy on the same 1.1B Llama (bench/strategy_throughput.py)"
$py bench/strategy_throughput.py --model-dir "$model" --max-seq-len 512 --max-steps 10 --per-device-batch 8 \
    --grad-accum 2
