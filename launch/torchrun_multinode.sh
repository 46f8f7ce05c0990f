#!/bin/bash
# Training on one or more machines without Slurm: run this script once on every node.
#
#   NNODES=2 RDZV_ENDPOINT=node0:29500 launch/torchrun_multinode.sh [key=value ...]    elastic (c10d) rendezvous
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun_multinode.sh ...              static ranks
#   launch/torchrun_multinode.sh run.dir=runs/exp1                                       one node
#
# Environment: CONFIG (preset, default configs/resnet50_imagenet.yaml), NNODES (default 1), NPROC_PER_NODE
# (default the GPUs on the node, else 1), RDZV_ENDPOINT and RDZV_ID (c10d rendezvous, the same on every node),
# NODE_RANK, MASTER_ADDR, MASTER_PORT (static rendezvous; port default 29500), MAX_RESTARTS (default 3).
# A failed worker makes torchrun restart every worker, up to MAX_RESTARTS times; the trainer resumes from the
# latest checkpoint in run.dir, so give the run a fixed run.dir. Restarts across nodes need RDZV_ENDPOINT:
# with static ranks the other nodes cannot learn of the restart.
set -euo pipefail

config=${CONFIG:-configs/resnet50_imagenet.yaml}
nnodes=${NNODES:-1}
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
nproc=${NPROC_PER_NODE:-$((gpus > 0 ? gpus : 1))}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# torchrun's agent otherwise keeps one store for every restart, and restarted workers read the dead workers'
# gloo/NCCL addresses from it and hang; a store per rendezvous round (on a free port of the first node) avoids that.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

if [[ -n ${RDZV_ENDPOINT:-} ]]; then
    rendezvous=(--rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-imagenet}")
elif [[ -n ${NODE_RANK:-} ]]; then
    rendezvous=(--node-rank="$NODE_RANK" --master-addr="${MASTER_ADDR:?MASTER_ADDR names node 0}"
                --master-port="${MASTER_PORT:-29500}")
elif ((nnodes == 1)); then
    rendezvous=(--standalone)
else
    echo "NNODES=$nnodes needs RDZV_ENDPOINT=host:port (elastic) or NODE_RANK and MASTER_ADDR (static)" >&2
    exit 2
fi

exec torchrun --nnodes="$nnodes" --nproc-per-node="$nproc" "${rendezvous[@]}" \
    --max-restarts="${MAX_RESTARTS:-3}" \
    -m trainer.main --config "$config" "$@"
