#!/usr/bin/env bash
# Soak the multi-process code paths (not in CI): the tests marked `multiprocess` (pyproject.toml: they
# start several training processes by mp.spawn, `--nproc` or srun tasks; the Slurm ones only as root,
# which scripts/slurm-local.sh needs), one item per test file, SOAK_RUNS times in a row each, then a
# 2-process tiny training run (`diffdis train --nproc 2`) SOAK_RUNS times. Stops at the first failure
# (a run that only skipped counts as one) and keeps its log.
# Prints passes/runs per item and, as the last line, one JSON object with the figures.
#
#   SOAK_RUNS=5 bash scripts/soak.sh            # default 50 runs of each
#   SOAK_TESTS="tests/test_distributed_loss.py" SOAK_TRAIN_RUNS=10 bash scripts/soak.sh
#
# A niced soak beside full-priority work can starve past pytest-timeout's limit (600 s): a failure
# records whether that fired and the load average, so run it with SOAK_NICE=0 on a quiet machine
# when the figure is to count.
#   SOAK_LIST=1 bash scripts/soak.sh           # print the items it would soak, run nothing
# Environment: SOAK_RUNS (50), SOAK_TESTS (files or node ids, run whole; default: the marked tests), SOAK_TRAIN_RUNS
# (SOAK_RUNS; 0 skips training), SOAK_TRAIN_STEPS (4), SOAK_LOG_DIR (a new temporary folder),
# SOAK_NICE (15; every run is niced), PYTHON (.venv/bin/python).
# Why: teardown races (e.g. gloo threads alive at interpreter exit, docs/design-notes.md) fail
# about 1 run in 7 or rarer; one green CI run says little, 50 in a row say a lot.
set -uo pipefail
nice_level=${SOAK_NICE:-15}
if [ -z "${SOAK_NICED:-}" ]; then  # everything below, and every process it starts, runs niced
    SOAK_NICED=1 exec nice -n "$nice_level" bash "${BASH_SOURCE[0]}" "$@"
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-$root/.venv/bin/python}
runs=${SOAK_RUNS:-50}
train_runs=${SOAK_TRAIN_RUNS:-$runs}
train_steps=${SOAK_TRAIN_STEPS:-4}
logs=${SOAK_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/diffdis-soak.XXXXXX")}
mkdir -p "$logs"
[ -x "$python" ] || { echo "soak.sh: no Python at $python (run scripts/bootstrap.sh or set PYTHON)" >&2; exit 2; }
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, also in spawned processes
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(dirname "$(dirname "$python")")/torch_extensions}"
select=()  # pytest's -m for the default items: only the marked tests of each file run
if [ -n "${SOAK_TESTS:-}" ]; then
    read -r -a tests <<< "$SOAK_TESTS"
else  # a marker, not a grep of the sources: a grep missed tests that start processes through a helper
    marker="multiprocess"
    [ "$(id -u)" -eq 0 ] || marker="multiprocess and not slurm"
    select=(-m "$marker")
    # a module that fails to import must stop the soak, not drop out of it: pytest then exits 2 (5: none marked)
    if ! collected=$("$python" -m pytest --collect-only -q -p no:cacheprovider "${select[@]}" tests 2>&1); then
        echo "soak.sh: collecting the tests marked multiprocess failed (pytest --collect-only -m '$marker'):" >&2
        tail -n 20 <<< "$collected" >&2
        exit 2
    fi
    mapfile -t tests < <(grep -F '::' <<< "$collected" | cut -d: -f1 | sort -u)
fi
if [ -n "${SOAK_LIST:-}" ]; then
    printf '%s\n' "${tests[@]}"
    exit 0
fi

names=() passes=() tried=() failed_json=null started=$SECONDS
summary() {
    local json="{\"runs_per_item\": $runs, \"seconds\": $((SECONDS - started)), \"log_dir\": \"$logs\", \"items\": {"
    echo "soak summary (passes/runs):"
    for i in "${!names[@]}"; do
        echo "  ${names[$i]}: ${passes[$i]}/${tried[$i]}"
        json+="$([ "$i" -gt 0 ] && echo ", ")\"${names[$i]}\": {\"passes\": ${passes[$i]}, \"runs\": ${tried[$i]}}"
    done
    echo "$json}, \"first_failure\": $failed_json}"
}

# only_skipped LOG: pytest's summary line reports skips and no pass. Such a run (the Slurm test without
# root or Slurm) exits 0 but proves nothing, so it is not a pass; a file that also passes tests beside
# a legitimate skip (e.g. test_cluster_render.py where the kubernetes client is installed) still is.
only_skipped() {
    local last
    last=$(tail -n 1 "$1")
    [[ $last == *skipped* && $last != *passed* ]]
}

# soak NAME COUNT COMMAND...: run COMMAND COUNT times; 0 when all passed, 1 at the first failure
soak() {
    local name=$1 count=$2 index=${#names[@]} run log
    shift 2
    names+=("$name") passes+=(0) tried+=(0)
    for ((run = 1; run <= count; run++)); do
        log="$logs/$(printf '%s' "$name" | tr -c 'A-Za-z0-9_.-' '_')-$run.log"
        tried[index]=$run
        if "$@" > "$log" 2>&1 && ! only_skipped "$log"; then
            passes[index]=$run
            rm -f "$log"
            echo "  $name: run $run/$count passed ($((SECONDS - started)) s since start)" >&2
        else
            local code=$? load timed_out=false
            load=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)
            # pytest-timeout firing under a load the soak's niced processes lose to is starvation until
            # shown otherwise: the log's stacks and the run's own files tell a hang from a slow start
            grep -q "Timeout (>" "$log" && timed_out=true
            echo "FAILED: $name, run $run of $count (exit $code; pytest-timeout: $timed_out; load average $load); log kept: $log" >&2
            tail -n 30 "$log" >&2
            failed_json="{\"item\": \"$name\", \"run\": $run, \"log\": \"$log\", \"pytest_timeout\": $timed_out, \"load_average\": \"$load\"}"
            return 1
        fi
    done
    echo "$name: ${passes[index]}/$count passed" >&2
}

train() {  # one fresh 2-process run of the tiny config (`diffdis train` is `python -m pretrain.cli train`)
    rm -rf "$logs/train-run"
    "$python" -m pretrain.cli train --nproc 2 --config configs/tiny.yaml --out "$logs/train-run" \
        "train.steps=$train_steps" train.batch_size=8 "train.checkpoint_every=$train_steps" train.log_every=1
}

echo "soak: $runs runs of ${tests[*]}; $train_runs 2-process training runs ($train_steps steps); logs in $logs" >&2
status=0
for test in "${tests[@]}"; do
    soak "$test" "$runs" "$python" -m pytest -x -q -p no:cacheprovider "${select[@]}" "$test" || { status=1; break; }
done
if [ "$status" -eq 0 ] && [ "$train_runs" -gt 0 ]; then
    soak "diffdis train --nproc 2" "$train_runs" train || status=1
fi
rm -rf "$logs/train-run"
summary
exit "$status"
