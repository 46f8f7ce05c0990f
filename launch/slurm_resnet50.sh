#!/bin/bash
# ResNet-50 on ImageNet across Slurm nodes: one srun task per node runs torchrun, which starts one worker per GPU.
#
#   sbatch launch/slurm_resnet50.sh [key=value ...]        extra arguments override the trainer config
#   sbatch -N 4 --time=12:00:00 launch/slurm_resnet50.sh   any #SBATCH default below can be overridden
#
# Environment: CONFIG (preset, default configs/resnet50_imagenet.yaml), RUNS_ROOT (default runs),
# NPROC_PER_NODE (workers per node; default the GPUs on the node, required for CPU runs), MASTER_PORT (rendezvous
# port on the first node, default 29500), MAX_RESTARTS (torchrun restarts per job attempt, default 0),
# NCCL_DEBUG (default WARN), LOG_RANKS (local ranks shown in the job log, default all), NUMA_BINDING (torchrun's
# --numa-binding, default none), CONTAINER_IMAGE / CONTAINER_MOUNTS (run inside an enroot image through pyxis).
# See launch/README.md.
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
# An array task is a job of its own, but SLURM_JOB_ID of the last task to start is the array's id, which names
# every task: requeue and name the run by ARRAYJOB_TASK instead (the trainer's run-dir lock records the same).
if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
    job=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
else
    job=$SLURM_JOB_ID
fi
# The job id survives a requeue, so the next attempt finds this attempt's checkpoints and resumes. A run.dir
# among the arguments wins (the trainer takes the last value), so that a new job can resume a cancelled one.
run_dir=${RUNS_ROOT:-runs}/slurm-$job
for arg in "$@"; do
    if [[ $arg == run.dir=* ]]; then
        run_dir=${arg#run.dir=}
    fi
done
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
# A worker that crashes in native code (SIGSEGV, SIGABRT, SIGBUS) prints the Python stack of every thread.
export PYTHONFAULTHANDLER=1
# Progress reaches the job log when it is printed, not when a buffer fills.
export PYTHONUNBUFFERED=1
# NCCL's warnings name the peer and the transport that failed; INFO adds the topology and the network it chose.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# Slurm 22.05's srun does not inherit sbatch's --cpus-per-task, so where a site binds tasks to cores, our one task
# per node gets one core, shared by torchrun, every worker and their DALI threads. Without --exact the step already
# holds all of the job's CPUs on each node; --cpu-bind=none keeps the task on all of them. (--cpus-per-task would
# need a count, and $SLURM_CPUS_ON_NODE is the first node's, wrong wherever the nodes differ.)
srun_args=(--label --kill-on-bad-exit=1 --cpu-bind=none)
if [[ -n ${CONTAINER_IMAGE:-} ]]; then
    srun_args+=(--container-image="$CONTAINER_IMAGE" --container-mounts="${CONTAINER_MOUNTS:-$PWD:$PWD}"
                --container-workdir="$PWD")
fi
torchrun_args=(--nnodes="$SLURM_NNODES" --nproc-per-node="$nproc"
               --rdzv-backend=c10d --rdzv-endpoint="$head_addr:${MASTER_PORT:-29500}" --rdzv-id="$SLURM_JOB_ID"
               --max-restarts="${MAX_RESTARTS:-0}" --tee=3 "--log-line-prefix-template=[rank\${rank}]: ")
if [[ -n ${LOG_RANKS:-} ]]; then
    torchrun_args+=(--local-ranks-filter="$LOG_RANKS")
fi
if [[ -n ${NUMA_BINDING:-} ]]; then
    torchrun_args+=(--numa-binding="$NUMA_BINDING")
fi

# The exit status of background process $1. A trapped signal interrupts `wait` with 128+n while the process still
# runs: keep waiting for its real exit status.
# shellcheck disable=SC2317  # also reached through srun's bash -c
wait_exit() {
    local status
    while true; do
        status=0
        wait "$1" || status=$?
        if ((status > 128)) && kill -0 "$1" 2>/dev/null; then
            continue
        fi
        return "$status"
    done
}

# The one srun task on each node (it runs through `bash -c` with this function's text): starts torchrun with
# per-rank logs under the run directory, and ends with one line saying how the node's part ended.
# shellcheck disable=SC2317  # reached through srun's bash -c and traps, which shellcheck does not follow
node_main() {
    set -uo pipefail
    local run_dir=$1
    shift
    local node=${SLURMD_NODENAME:-$(hostname)} log_dir cpus
    log_dir=$run_dir/logs/$node
    cpus=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status)
    echo "node $node: starting torchrun on $(nproc) CPUs ($cpus) of the ${SLURM_CPUS_ON_NODE:-?} Slurm gave the" \
         "node; per-rank logs in $log_dir"

    # Slurm signals every process of the step: this shell, torchrun's agent and the workers. The workers agree on
    # a step, save and exit; this shell only notes the signal, and which checkpoint was the latest when it came.
    local received='' latest_then=''
    trap '[[ -n $received ]] || { received=USR1; latest_then=$(latest); }' USR1
    trap '[[ -n $received ]] || { received=TERM; latest_then=$(latest); }' TERM
    # torchrun's agent answers SIGTERM by stopping its workers and then raising SignalException, whose traceback
    # would end every node's log after a normal scancel: the same launcher, with that exception as an exit code.
    local launcher='import sys
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main
sys.argv[0] = "torchrun"
try:
    main()
except SignalException as e:
    sys.exit(128 + e.sigval)'
    # The agent has no USR1 handler, and USR1's default action would kill it and take the workers down before
    # they save; an ignored signal stays ignored across exec, while the workers install their own handler.
    (trap '' USR1 && exec python3 -c "$launcher" --log-dir="$log_dir" "$@") &
    local pid=$! status=0
    wait_exit "$pid" || status=$?
    trap - USR1 TERM

    local now
    now=$(latest)
    if [[ -n $received && ($status == 0 || $status -gt 128) ]]; then
        if [[ -n $now && $now != "$latest_then" ]]; then
            echo "node $node: stopped on SIG$received; checkpoint saved at step $((10#${now:5:9})):" \
                 "$run_dir/checkpoints/$now"
        elif [[ -n $now ]]; then
            echo "node $node: stopped on SIG$received before a checkpoint was saved; the latest is step" \
                 "$((10#${now:5:9})): $run_dir/checkpoints/$now"
        else
            echo "node $node: stopped on SIG$received; no checkpoint yet in $run_dir/checkpoints"
        fi
        return 0
    fi
    if ((status == 0)); then
        echo "node $node: training done; latest checkpoint: $run_dir/checkpoints/$now"
    else
        echo "node $node: torchrun exited with $status; per-rank logs in $log_dir"
    fi
    return "$status"
}
# The name of the latest complete checkpoint (ckpt-<step>.pt), or nothing.
# shellcheck disable=SC2317
latest() {
    cat "$run_dir/checkpoints/latest" 2>/dev/null || true
}

echo "attempt $((${SLURM_RESTART_COUNT:-0} + 1)) of job $job: $SLURM_NNODES nodes x $nproc workers," \
     "rendezvous $head_addr:${MASTER_PORT:-29500}, run dir $run_dir"

srun "${srun_args[@]}" bash -c "$(declare -f node_main latest wait_exit); node_main \"\$@\"" node_main "$run_dir" \
    "${torchrun_args[@]}" -m trainer.main --config "$config" run.dir="$run_dir" "$@" &
srun_pid=$!

# --signal=B:USR1 reaches only this shell: srun forwards what it receives to every task of the step.
received=
# shellcheck disable=SC2317
forward() {
    received=$1
    echo "received SIG$1: forwarding it to the trainer" >&2
    kill -s "$1" "$srun_pid" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

status=0
wait_exit "$srun_pid" || status=$?
trap - USR1 TERM

# The trainer exits 0 after a USR1-triggered checkpoint; SIGTERM (scancel) means stop for good, so no requeue.
if [[ $received == USR1 && $status == 0 ]]; then
    echo "checkpoint saved after SIGUSR1: requeueing job $job" >&2
    scontrol requeue "$job"
fi
exit "$status"
