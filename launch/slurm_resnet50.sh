#!/bin/bash
# ResNet-50 on ImageNet across Slurm nodes: one srun task per node runs torchrun, which starts one worker per GPU.
#
#   sbatch launch/slurm_resnet50.sh [key=value ...]        extra arguments override the trainer config
#   sbatch -N 4 --time=12:00:00 launch/slurm_resnet50.sh   any #SBATCH default below can be overridden
#
# Environment: CONFIG (preset, default configs/resnet50_imagenet.yaml), RUNS_ROOT (default runs),
# NPROC_PER_NODE (workers per node; default the GPUs on the node, required for CPU runs), MASTER_PORT (rendezvous
# port on the first node, default 29500), MAX_RESTARTS (torchrun restarts per job attempt, default 0),
# CONTAINER_IMAGE / CONTAINER_MOUNTS (run inside an enroot image through pyxis). See launch/README.md.
#
#SBATCH --job-name=resnet50
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
set -euo pipefail

config=${CONFIG:-configs/resnet50_imagenet.yaml}
# The job id survives a requeue, so the next attempt finds this attempt's checkpoints and resumes.
run_dir=${RUNS_ROOT:-runs}/slurm-$SLURM_JOB_ID
nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}}
if [[ ! $nproc =~ ^[1-9][0-9]*$ ]]; then
    echo "no GPUs visible on $(hostname); set NPROC_PER_NODE for a CPU run" >&2
    exit 2
fi
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)
# NodeAddr is how Slurm itself reaches the node; it equals the node name unless the cluster says otherwise.
head_addr=$(scontrol show node "$head_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# torchrun's agent otherwise keeps one store for every restart, and restarted workers read the dead workers'
# gloo/NCCL addresses from it and hang; a store per rendezvous round (on a free port of the first node) avoids that.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

container_args=()
if [[ -n ${CONTAINER_IMAGE:-} ]]; then
    container_args=(--container-image="$CONTAINER_IMAGE" --container-mounts="${CONTAINER_MOUNTS:-$PWD:$PWD}"
                    --container-workdir="$PWD")
fi

echo "attempt $((${SLURM_RESTART_COUNT:-0} + 1)) of job $SLURM_JOB_ID: $SLURM_NNODES nodes x $nproc workers," \
     "rendezvous $head_addr:${MASTER_PORT:-29500}, run dir $run_dir"

# Slurm delivers a step signal to every process of the step, torchrun's agent included. The agent has no USR1
# handler, so USR1 would kill it and take the workers down before they save; ignoring it here (the ignore is
# inherited through exec) keeps the agent alive while the workers, which install their own handler, save.
srun --label --kill-on-bad-exit=1 "${container_args[@]}" \
    bash -c 'trap "" USR1; echo "node $SLURMD_NODENAME: starting torchrun"; exec "$@"' torchrun-node \
    torchrun --nnodes="$SLURM_NNODES" --nproc-per-node="$nproc" \
    --rdzv-backend=c10d --rdzv-endpoint="$head_addr:${MASTER_PORT:-29500}" --rdzv-id="$SLURM_JOB_ID" \
    --max-restarts="${MAX_RESTARTS:-0}" \
    -m trainer.main --config "$config" run.dir="$run_dir" "$@" &
srun_pid=$!

# --signal=B:USR1 reaches only this shell: srun forwards what it receives to every task of the step.
received=
forward() {
    received=$1
    echo "received SIG$1: forwarding it to the trainer" >&2
    kill -s "$1" "$srun_pid" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# A trapped signal interrupts `wait` with 128+n while srun still runs; keep waiting for its real exit status.
while true; do
    status=0
    wait "$srun_pid" || status=$?
    if ((status > 128)) && kill -0 "$srun_pid" 2>/dev/null; then
        continue
    fi
    break
done
trap - USR1 TERM

# The trainer exits 0 after a USR1-triggered checkpoint; SIGTERM (scancel) means stop for good, so no requeue.
if [[ $received == USR1 && $status == 0 ]]; then
    echo "checkpoint saved after SIGUSR1: requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
