#!/bin/bash
# Everything one GPU machine should show, in one run of at most 6 minutes: environment, DALI decode throughput with
# and without the hardware JPEG decoder, ResNet-50 training images/s (synthetic vs DALI, eager vs torch.compile),
# fp16/bf16 runs, a skipped non-finite fp16 step, host-sync-free steps, SyncBatchNorm, a bitwise checkpoint resume
# and the trainer compiled with DDP, on the real ImageNet samples of ../shared/datasets/imagenet-samples.tar where
# that archive is (generated JPEGs otherwise). See docs/performance.md.
#
#   bench/gpu_check.sh OUT_DIR                one NVIDIA GPU; writes OUT_DIR/gpu_check.json, gpu_check.md, gpu_check.log
#   bench/gpu_check.sh --cpu-smoke OUT_DIR    the same code at tiny sizes on the CPU (CUDA parts skipped)
#
# Exits 1 if any part failed (parts cut by the budget or the cap are skipped, not failed). Needs the project's
# packages (torch, torchvision, nvidia-dali, omegaconf, tqdm) and no network: W&B is off. PYTHON picks the
# interpreter (default python3).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
# The hard cap of 6 minutes: SIGTERM after 345 s, on which the runner stops the running part and writes its report
# (the parts' budget is 330 s); SIGKILL 15 s later if it has not exited. --preserve-status keeps the runner's own
# exit code: 0 when nothing failed, skipped parts included. --foreground leaves Ctrl-C to reach the runner.
exec timeout --foreground --preserve-status --kill-after=15 345 "${PYTHON:-python3}" -m bench.gpu_check.run "$@"
