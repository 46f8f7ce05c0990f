#!/bin/bash
# Everything one GPU machine should show, in one run of at most 6 min 20 s: environment, DALI decode throughput with
# and without the hardware JPEG decoder, ResNet-50 training images/s (synthetic vs DALI, eager then torch.compile),
# a bf16 run, a skipped non-finite fp16 step, host-sync-free steps with EMA, what SyncBatchNorm costs a step and a
# bitwise checkpoint resume, on the real ImageNet samples of ../shared/datasets/imagenet-samples.tar where that
# archive is (generated JPEGs otherwise); --parts fp16,fast_preset,compile_ddp runs the optional parts (2 min 2 s of
# boxes). See docs/performance.md.
#
#   bench/gpu_check.sh OUT_DIR                one NVIDIA GPU; writes OUT_DIR/gpu_check.json, gpu_check.md, gpu_check.log
#   bench/gpu_check.sh --cpu-smoke OUT_DIR    the same code at tiny sizes on the CPU (CUDA parts skipped)
#
# Exits 1 if any part failed (parts cut by the budget or the cap are skipped, a compile cut by its box partial).
# Needs the project's packages (torch, torchvision, omegaconf, tqdm) and no network: W&B is off. Without nvidia-dali
# the parts that read through DALI are skipped (the device image has none; its 476 MB wheel cannot be carried).
# PYTHON picks the interpreter (default python3).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
# The hard cap of 6 min 20 s (bench/gpu_check/run.py's HARD_CAP_S): SIGTERM after 370 s, on which the runner stops
# the running part and writes its report (the parts' budget is 360 s); SIGKILL 10 s later if it has not exited.
# --preserve-status keeps the runner's own exit code: 0 when nothing failed, skipped and partial parts included.
# --foreground leaves Ctrl-C to reach the runner.
exec timeout --foreground --preserve-status --kill-after=10 370 "${PYTHON:-python3}" -m bench.gpu_check.run "$@"
