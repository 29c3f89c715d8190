#!/bin/bash
# Benchmark scores of a release on one node of 8 GPUs: `sbatch slurm/eval.sh RELEASE`.
#
#   DATA=/data/eval-data OUTPUT=/runs/k2/eval sbatch slurm/eval.sh /runs/k2/release
#
# Runs tools/evaluate.py with the vllm backend from the evaluation's own environment (vLLM pins its own
# torch; build it once from requirements/eval-gpu.txt, whose header says how). A 32B model in bf16 is 64
# GB of weights: tensor parallel 2 leaves each H100 room for the KV cache of 64K-token replies, and 4
# data-parallel copies fill the node's 8 GPUs. The context vLLM gets is the longest prompt plus the token
# cap (tools/evaluate.py refuses a model whose context is shorter), so no prompt is ever cut.
#
# Environment variables:
#   DATA         directory of NAME.jsonl / NAME.parquet benchmark files (required): what
#                tools/get_eval_data.py --out DATA wrote on a machine with hub access (docs/evaluation.md)
#   OUTPUT       directory to write (default RELEASE/eval-PROFILE-JOBID)
#   PROFILE      configs/eval/ profile (default k2think)
#   BENCHMARKS   comma-separated (default aime24,aime25,hmmt25,math500,gpqa_diamond: those with files)
#   TP, DP       tensor and data parallel sizes (default 2 and 4: their product is the node's GPUs)
#   EXTRA        more tools/evaluate.py flags, e.g. "--samples 4 --limit 10"
#   EVAL_VENV    the evaluation environment (default REPO/.venv-eval)
#
#SBATCH --job-name=k2think-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: DATA=DIR [OUTPUT=DIR] sbatch slurm/eval.sh RELEASE" >&2
    exit 2
fi
RELEASE=$1
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
PROFILE=${PROFILE:-k2think}
: "${DATA:?set DATA to the directory of benchmark files (docs/evaluation.md)}"
OUTPUT=${OUTPUT:-$RELEASE/eval-$PROFILE-${SLURM_JOB_ID:-local}}
TP=${TP:-2}
DP=${DP:-4}
cd "$REPO"
EVAL_VENV=${EVAL_VENV:-$REPO/.venv-eval}
if [ ! -x "$EVAL_VENV/bin/python" ]; then
    echo "error: no evaluation environment at $EVAL_VENV; build it from requirements/eval-gpu.txt" >&2
    exit 2
fi
ME=${USER:-$(id -un)}
export HF_HOME=${HF_HOME:-/tmp/$ME-hf}  # node-local: no hub access is needed, the data is local
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

BENCHMARK_FLAGS=()
[ -n "${BENCHMARKS:-}" ] && BENCHMARK_FLAGS=(--benchmarks "$BENCHMARKS")
echo "job ${SLURM_JOB_ID:-local}: $RELEASE, profile $PROFILE, TP $TP x DP $DP, data $DATA -> $OUTPUT"
# shellcheck disable=SC2086
exec "$EVAL_VENV/bin/python" tools/evaluate.py --model "$RELEASE" --data "$DATA" --profile "$PROFILE" \
    "${BENCHMARK_FLAGS[@]}" --backend vllm --tensor-parallel "$TP" --data-parallel "$DP" \
    --output "$OUTPUT" ${EXTRA:-}
