#!/bin/bash
# K2-Think SFT on Slurm: `sbatch slurm/sft.sh` trains with pretrain_sft.py on 32 nodes x 8 GPUs.
#
# Submit from the repository root (or set REPO), after `mkdir -p logs`:
#
#   mkdir -p logs
#   OVERRIDES="data.prefixes=[/data/am] model.init_checkpoint=/ckpt/qwen2.5-32b-mcore checkpoint.save_dir=/runs/k2" \
#       sbatch slurm/sft.sh
#
# Before submitting, check on the login node (a CPU; no GPU, data or weights needed, only the paths the
# config names) that every rank's GPU memory fits: the real model, optimizer and schedule on fake tensors,
# the first and the last pipeline stage, exit status 1 if one would not fit:
#
#   python pretrain_sft.py --config configs/k2think_qwen2.5_32b.yaml --dry-run --gpus 256 $OVERRIDES
#
# Allocation (sbatch flags override the #SBATCH lines below): --nodes (32), --gpus-per-node (8),
# --time (48 h), --partition, --account.
# Environment variables (all optional except what your config leaves unset, typically the paths):
#   CONFIG         YAML configuration (default configs/k2think_qwen2.5_32b.yaml)
#   OVERRIDES      space-separated key=value overrides for the config (paths: data.prefixes,
#                  model.init_checkpoint, checkpoint.save_dir)
#   GPUS_PER_NODE  processes per node (default: SLURM_GPUS_ON_NODE, else 8); on a CPU cluster, the
#                  number of gloo processes
#   VENV           virtual environment to activate (default REPO/.venv); or ACTIVATE, a command that
#                  sets up the environment instead (e.g. a container or module load)
#   LOG_DIR        per-job log directory root (default REPO/logs): LOG_DIR/JOBID/nodeN-HOST.log holds
#                  every rank of node N (appended to when the job is requeued)
#   MAX_FAILURE_REQUEUES  requeues after failures over the whole run (default 3; USR1 stops don't count)
#   WANDB_API_KEY  only read from the environment by wandb; this script never prints or stores it
#
# One srun task per node starts torchrun with a c10d rendezvous hosted on the first node of the
# allocation (port derived from the job id). A failing rank fails the job (--kill-on-bad-exit), and
# the script's exit status is the job's.
#
# Fault handling: 15 minutes before the time limit Slurm sends USR1 to this script, which passes it
# to the trainer; the trainer saves a checkpoint after its current iteration and stops; the script
# then requeues the job, which resumes from that checkpoint (checkpoint.resume=auto). A job that
# fails (a rank's non-zero exit, a lost node, a hung step ended by the trainer's watchdog) is requeued
# too, to resume from its newest intact checkpoint, at most MAX_FAILURE_REQUEUES times over the run
# (default 3; counted in SAVE_DIR/failure_requeues.json), and not when it failed again without a new
# checkpoint since the previous failure (slurm/requeue.py), so a crash never turns into a loop.
#
#SBATCH --job-name=k2think-sft
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
CONFIG=${CONFIG:-configs/k2think_qwen2.5_32b.yaml}
OVERRIDES=${OVERRIDES:-}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
LOG_DIR=${LOG_DIR:-$REPO/logs}/$SLURM_JOB_ID
cd "$REPO"
mkdir -p "$LOG_DIR"

if [ -n "${ACTIVATE:-}" ]; then
    eval "$ACTIVATE"
else
    # shellcheck disable=SC1091
    source "${VENV:-$REPO/.venv}/bin/activate"
fi

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))

# Node-local caches: shared file systems make thousands of ranks contend on the same small files.
ME=${USER:-$(id -un)}
export HF_HOME=${HF_HOME:-/tmp/$ME-hf}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/$ME-triton}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/$ME-inductor}
# megatron-core needs one CUDA work queue per device for its TP/SP communication overlap ordering.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# NCCL at 256 GPUs: fail fast and loudly instead of hanging on a lost peer; keep the InfiniBand
# defaults (set NCCL_SOCKET_IFNAME / NCCL_IB_HCA for your fabric if NCCL picks the wrong devices).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}  # longer IB retry timeout: transient link flaps at scale
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTHONUNBUFFERED=1

echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_JOB_NUM_NODES nodes x $GPUS_PER_NODE processes," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, config $CONFIG, logs $LOG_DIR"

# torchrun ignores USR1 (an ignored signal stays ignored across exec), so only the trainer processes,
# which install their own handler, act on it; the first node hosts the rendezvous store.
# shellcheck disable=SC2016
srun --kill-on-bad-exit=1 --ntasks-per-node=1 --output="$LOG_DIR/node%n-%N.log" --open-mode=append --export=ALL \
    bash -c 'trap "" USR1; exec torchrun --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$0" \
        --rdzv-backend=c10d --rdzv-endpoint="$1" --rdzv-id="$SLURM_JOB_ID" \
        --rdzv-conf="is_host=$([ "$SLURM_NODEID" = 0 ] && echo 1 || echo 0)" \
        pretrain_sft.py --config "$2" $3' \
    "$GPUS_PER_NODE" "$MASTER_ADDR:$MASTER_PORT" "$CONFIG" "$OVERRIDES" &
SRUN_PID=$!

SIGNALLED=0
forward_stop() {
    SIGNALLED=1
    echo "$(date +%T) USR1: asking the trainer to checkpoint and stop"
    kill -USR1 "$SRUN_PID" 2>/dev/null || true  # srun passes it to every process of the step
}
trap forward_stop USR1

STATUS=0
while true; do  # `wait` returns early when a trapped signal arrives; wait again for srun itself
    wait "$SRUN_PID" && STATUS=0 || STATUS=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done

SAVE_DIR=$(python -c 'import sys; from sft.config import load_config; print(load_config(sys.argv[1], sys.argv[2].split()).checkpoint.save_dir)' \
    "$CONFIG" "$OVERRIDES")
requeue() {
    # Slurm refuses a requeue while the finished step is still completing: retry for a while.
    for attempt in $(seq 20); do
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        echo "requeue attempt $attempt refused; retrying in 3 s" >&2
        sleep 3
    done
    echo "could not requeue job $SLURM_JOB_ID; resubmit it to resume from the checkpoint" >&2
    exit 1
}

if [ "$STATUS" = 0 ] && [ -f "$SAVE_DIR/finished.json" ]; then
    echo "training finished: $SAVE_DIR/finished.json"
elif [ "$STATUS" = 0 ] && [ "$SIGNALLED" = 1 ]; then
    echo "stopped on USR1 with a checkpoint; requeueing job $SLURM_JOB_ID to resume"
    requeue
else
    [ "$STATUS" = 0 ] && STATUS=1  # stopped without finishing or being asked to: a failure too
    # The cause: the watchdog's report of a hung step, else the last error line of any rank.
    CAUSE=$( (grep -h "past the bound" "$LOG_DIR"/node*.log || grep -h -E "Error|error:" "$LOG_DIR"/node*.log) \
        2>/dev/null | tail -n 1 | cut -c1-300 || true)
    echo "training failed (exit status $STATUS): ${CAUSE:-no error line in the node logs}; logs in $LOG_DIR" >&2
    if python slurm/requeue.py "$SAVE_DIR" --status "$STATUS" --max-requeues "${MAX_FAILURE_REQUEUES:-3}" \
            --cause "$CAUSE" --job "$SLURM_JOB_ID"; then
        echo "requeueing job $SLURM_JOB_ID after the failure to resume from its newest intact checkpoint"
        requeue
    fi
    echo "not requeued; fix the cause and resubmit (it resumes from the newest intact checkpoint)" >&2
fi
exit "$STATUS"
