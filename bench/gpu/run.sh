#!/usr/bin/env bash
# GPU first contact: every stage of bench/gpu/stages.py in its own process with its own time limit,
# results appended to OUTDIR/results.jsonl as each stage ends, every stage's output to OUTDIR/stages.log,
# the summary in OUTDIR/gpu_<device>.json. Models and data go to a scratch directory (BENCH_WORK, default
# a new temporary one), never to OUTDIR.
#
#   BENCH_DEADLINE=400 bench/gpu/run.sh OUTDIR    # on one GPU, every stage within 400 s in all
#   STAGES="shard full_width" bench/gpu/run.sh OUTDIR   # a rerun of those stages; the summary merges them
#                                                 # with the lines already in OUTDIR/results.jsonl
#   bench/gpu/run.sh OUTDIR --device cpu --tiny   # the same stages on a CPU, tiny sizes (the test suite)
#
# Environment: BENCH_DEADLINE caps the whole run in seconds (each stage gets at most what remains, less
# SUMMARY_SECONDS kept for the summary; a stage left less than MIN_STAGE_SECONDS is recorded as skipped);
# STAGES names the stages to run, in their usual order (the summary always ends the run); BENCH_USABLE_GIB
# overrides the device memory the sizes are planned for and BENCH_ITERS the timed steps of the throughput
# stages (bench/gpu/stages.py, sizing.py); PYTHON the interpreter.
# A failed, timed-out or skipped stage is recorded and the next one still runs; the exit status is 1 if
# any stage failed, 2 for a usage error, 3 if megatron-core cannot be imported. On a machine without
# megatron-core, put its wheel in .whl/ first (bench/gpu/fetch_wheels.sh): it is installed into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/../.."
ALL_STAGES="env train_vs_cpu attention verify resume shard full_width moe_vs_cpu"
SUMMARY_SECONDS=30
MIN_STAGE_SECONDS=20
KILL_AFTER=10  # seconds between the SIGTERM at a stage's limit and its SIGKILL
if [ $# -lt 1 ] || [[ $1 == -* ]]; then
    echo "usage: [BENCH_DEADLINE=SECONDS] [STAGES=\"name ...\"] bench/gpu/run.sh OUTDIR [--device cpu] [--tiny]" >&2
    exit 2
fi
OUTDIR=$1
shift
STAGES=${STAGES:-$ALL_STAGES}
for name in $STAGES; do
    if [[ " $ALL_STAGES summary " != *" $name "* ]]; then
        echo "error: STAGES names '$name'; the stages are: $ALL_STAGES (the summary always runs)" >&2
        exit 2
    fi
done
DEADLINE=${BENCH_DEADLINE:-}
if [ -n "$DEADLINE" ] && ! [[ $DEADLINE =~ ^[0-9]+$ ]]; then
    echo "error: BENCH_DEADLINE=$DEADLINE must be a whole number of seconds" >&2
    exit 2
fi
STARTED=$(date +%s)
mkdir -p "$OUTDIR"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 BENCH_COMMAND="bench/gpu/run.sh OUTDIR $*"
export BENCH_WORK=${BENCH_WORK:-$(mktemp -d /tmp/k2think-gpu-bench.XXXXXX)}
# The checkout's packages, for every process the stages start: the project is not installed there.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

importable() {  # whether megatron.core imports; the error's output in $import_error
    import_error=$("$PYTHON" -c "import megatron.core" 2>&1)
}
importable
imported=$?
if [ $imported -ne 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    importable
    imported=$?
fi
if [ $imported -ne 0 ]; then
    echo "error: megatron.core cannot be imported by $PYTHON (${import_error##*$'\n'}). Put megatron-core's" \
        "wheel in .whl/ first (bench/gpu/fetch_wheels.sh downloads it there) and carry .whl to this machine." \
        | tee -a "$OUTDIR/stages.log" >&2
    exit 3
fi

seconds_left() {  # what BENCH_DEADLINE leaves now, less $1 seconds kept for later
    echo $(( STARTED + DEADLINE - $(date +%s) - $1 ))
}

record_line() {  # record_line NAME SECONDS ERROR: a failed stage's line, for a stage that wrote none
    printf '{"stage": "%s", "pass": false, "seconds": %d, "figures": {"error": "%s"}}\n' "$1" "$2" "$3" \
        >>"$OUTDIR/results.jsonl"
}

failed=0
stage() {  # stage NAME SECONDS [ARGS...]: runs it within its limit, capped by the deadline
    local name=$1 limit=$2 started status lines_before reserve=$SUMMARY_SECONDS
    shift 2
    [ "$name" = summary ] && reserve=0
    if [ -n "$DEADLINE" ] && [ "$(seconds_left $((reserve + KILL_AFTER)))" -lt "$limit" ]; then
        limit=$(seconds_left $((reserve + KILL_AFTER)))
        if [ "$name" != summary ] && [ "$limit" -lt $MIN_STAGE_SECONDS ]; then
            record_line "$name" 0 "skipped: BENCH_DEADLINE=$DEADLINE left $limit s (rerun it with STAGES=$name)"
            echo "$name: skipped, $limit s left of BENCH_DEADLINE=$DEADLINE" | tee -a "$OUTDIR/stages.log"
            failed=1
            return
        fi
        [ "$limit" -lt 5 ] && limit=5
    fi
    started=$(date +%s)
    lines_before=$(cat "$OUTDIR/results.jsonl" 2>/dev/null | wc -l)
    echo "=== $name (limit $limit s)" >>"$OUTDIR/stages.log"
    BENCH_STAGE_LIMIT=$limit timeout --kill-after=$KILL_AFTER "$limit" \
        "$PYTHON" bench/gpu/stages.py "$name" --out "$OUTDIR" "$@" >>"$OUTDIR/stages.log" 2>&1
    status=$?
    if [ $status -ne 0 ]; then
        failed=1
        if [ "$(cat "$OUTDIR/results.jsonl" 2>/dev/null | wc -l)" -eq "$lines_before" ]; then
            local why="exited with status $status without a result"
            [ $status -eq 124 ] || [ $status -eq 137 ] && why="timed out after $limit s"
            record_line "$name" $(( $(date +%s) - started )) "$why"
        fi
    fi
    echo "$name: exit $status after $(( $(date +%s) - started )) s" | tee -a "$OUTDIR/stages.log"
}

declare -A LIMIT=([env]=60 [train_vs_cpu]=150 [attention]=60 [verify]=120 [resume]=150 [moe_vs_cpu]=150 [shard]=240 [full_width]=240)
for name in $ALL_STAGES; do
    [[ " $STAGES " == *" $name "* ]] && stage "$name" "${LIMIT[$name]}" "$@"
done
stage summary $SUMMARY_SECONDS "$@"
exit $failed
