#!/usr/bin/env bash
# GPU first contact: every stage of bench/gpu/stages.py in its own process with its own time limit,
# results appended to OUTDIR/results.jsonl as each stage ends, every stage's output to OUTDIR/stages.log,
# the summary in OUTDIR/gpu_<device>.json. Models and data go to a scratch directory (BENCH_WORK, default
# a new temporary one), never to OUTDIR.
#
#   bench/gpu/run.sh OUTDIR                       # on one H100 (~5 minutes)
#   bench/gpu/run.sh OUTDIR --device cpu --tiny   # the same stages on a CPU, tiny sizes (the test suite)
#
# A failed or timed-out stage is recorded and the next one still runs; the exit status is non-zero if
# any stage failed. Needs megatron-core importable: on a machine without it, put its wheel (and any
# other missing one) in .whl/ first (bench/gpu/README.md); they are installed into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ $# -lt 1 ]; then
    echo "usage: bench/gpu/run.sh OUTDIR [--device cpu] [--tiny]" >&2
    exit 2
fi
OUTDIR=$1
shift
mkdir -p "$OUTDIR"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 BENCH_COMMAND="bench/gpu/run.sh OUTDIR $*"
export BENCH_WORK=${BENCH_WORK:-$(mktemp -d /tmp/k2think-gpu-bench.XXXXXX)}
if ! "$PYTHON" -c "import megatron.core" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

failed=0
stage() {  # stage NAME SECONDS
    local name=$1 limit=$2 started status
    started=$(date +%s)
    echo "=== $name (limit $limit s)" >>"$OUTDIR/stages.log"
    timeout --kill-after=15 "$limit" "$PYTHON" bench/gpu/stages.py "$name" --out "$OUTDIR" "${@:3}" \
        >>"$OUTDIR/stages.log" 2>&1
    status=$?
    if [ $status -ne 0 ]; then
        failed=1
        if [ $status -eq 124 ] || [ $status -eq 137 ]; then  # killed: the stage wrote no line of its own
            printf '{"stage": "%s", "pass": false, "seconds": %d, "figures": {"error": "timed out after %d s"}}\n' \
                "$name" $(( $(date +%s) - started )) "$limit" >>"$OUTDIR/results.jsonl"
        fi
    fi
    echo "$name: exit $status after $(( $(date +%s) - started )) s" | tee -a "$OUTDIR/stages.log"
}

stage env 60 "$@"
stage train_vs_cpu 150 "$@"
stage attention 60 "$@"
stage verify 120 "$@"
stage resume 150 "$@"
stage shard 240 "$@"
stage full_width 240 "$@"
stage summary 30 "$@"
exit $failed
