#!/bin/bash
# Everything one GPU machine should show, in one run of at most 5 minutes: environment, DALI decode throughput with
# and without the hardware JPEG decoder, ResNet-50 training images/s (synthetic vs DALI, eager vs torch.compile),
# fp16/bf16 runs, SyncBatchNorm, and a bitwise checkpoint resume. See docs/performance.md.
#
#   bench/gpu_check.sh OUT_DIR                one NVIDIA GPU; writes OUT_DIR/gpu_check.json and gpu_check.log
#   bench/gpu_check.sh --cpu-smoke OUT_DIR    the same code at tiny sizes on the CPU (CUDA parts skipped)
#
# Exits 1 if any part failed. Needs the project's packages (torch, torchvision, nvidia-dali, omegaconf, tqdm) and
# no network: W&B is off. PYTHON picks the interpreter (default python3).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
exec "${PYTHON:-python3}" -m bench.gpu_check.run "$@"
