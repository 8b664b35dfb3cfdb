#!/usr/bin/env bash
# Every GPU-only figure of the project in one command, sized for one lent GPU machine and a short lease.
#
#   bash benchmarks/gpu_wheels.sh                 # once, here: .whl/ with what a bare GPU machine lacks
#   bash benchmarks/gpu.sh [OUT_DIR]              # there (device tool: carry [".whl"]); OUT_DIR default $OUT
#
# In order of what is still unmeasured (benchmarks/RESULTS.md), each step under its own time limit, so a
# slow or failing step costs only its own slot and the rest still run:
#   1. train  the `small` checkpoint: configs/small-digits.yaml on the in-memory digits stream, bf16
#             (GPU_TRAIN_STEPS, default 1860; a time-out's SIGTERM makes the trainer save, and the
#             newest complete checkpoint is measured)
#   2. zeroshot  benchmarks/bench_zeroshot_steps.py on it: top-1 and images/s vs DDIM steps 1-50 and
#             guidance, with the plot (issue 11: <= 4 steps within 1 point of 50, >= 10x faster)
#   3. kernels   benchmarks/bench_kernels.py: xformers vs SDPA vs naive, fused GroupNorm+SiLU and InfoNCE
#             vs eager, the sd-base step with kernels on vs off (compiled Triton, bf16, MFU)
#   4. zero   benchmarks/bench_zero.py --nproc 1: ZeRO-1/2/3 vs DDP step time, peak memory, MFU for
#             small and sd-base (one GPU: the stages' memory, not their communication)
# Writes to OUT_DIR (at most 8 files, what the device tool brings back): one log per step, the zero-shot
# plot, env.txt (GPU, driver, versions, commit) and summary.json (per step: exit status, seconds and the
# step's last-line JSON figures). Prints summary.json last. Exit status 0 when every step passed.
# Environment: GPU_BENCH_STEPS (steps to run, default "train zeroshot kernels zero"), GPU_TRAIN_STEPS,
# GPU_LIMIT_TRAIN / _ZEROSHOT / _KERNELS / _ZERO (seconds: 170 / 80 / 150 / 130), GPU_ZEROSHOT_ARGS (extra
# bench_zeroshot_steps.py arguments, e.g. "--quick"), PYTHON (python3).
# On a CPU machine it runs too (fp32, Triton's interpreter), as a check of this script, not a measurement:
#   PYTHON=.venv/bin/python GPU_TRAIN_STEPS=4 GPU_BENCH_STEPS="train zeroshot" \
#       GPU_ZEROSHOT_ARGS="--quick --limit 16" bash benchmarks/gpu.sh /tmp/gpu-smoke
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=${1:-${OUT:-$root/gpu-results}}
mkdir -p "$out"
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/diffdis-gpu.XXXXXX")
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$work/torch_extensions}

# packages: the carried wheels, installed beside the machine's own torch only when an import is missing
# (xformers only where CUDA is: elsewhere attention dispatch uses SDPA and the wheel is not needed)
missing=$("$python" - <<'EOF'
import importlib.util, torch
wanted = ["deepspeed", "diffusers", "webdataset", "jsonschema"] + (["xformers"] if torch.cuda.is_available() else [])
print(" ".join(m for m in wanted if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    wheels=()
    if [ "$missing" = xformers ]; then wheels=(.whl/xformers-*.whl); else wheels=(.whl/*.whl); fi
    if ! ls "${wheels[@]}" > /dev/null 2>&1; then
        echo "gpu.sh: missing $missing and no wheels for it in .whl/ (run benchmarks/gpu_wheels.sh, carry .whl)" >&2
        exit 2
    fi
    echo "gpu.sh: installing carried wheels for: $missing"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" "${wheels[@]}" \
        || { echo "gpu.sh: installing ${wheels[*]} failed" >&2; exit 2; }
    export PYTHONPATH="$PYTHONPATH:$work/site"  # after the machine's own packages: never shadow its torch
fi

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo '+dirty')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$python" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}")
for name in ("triton", "xformers", "deepspeed", "diffusers"):
    try:
        module = __import__(name)
        print(f"{name} {module.__version__}")
    except Exception as error:  # a version line is informative, not required
        print(f"{name}: {type(error).__name__}: {error}")
EOF
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

summary="{}"
# step NAME LIMIT_S COMMAND...: run under `timeout` (SIGTERM, then SIGKILL 20 s later), log to OUT/NAME.log
step() {
    local name=$1 limit=$2 started=$SECONDS code
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout -k 20 "$limit" "$@" > "$out/$name.log" 2>&1
    code=$?
    tail -n 25 "$out/$name.log"
    summary=$("$python" - "$summary" "$name" "$code" "$((SECONDS - started))" "$out/$name.log" <<'EOF'
import json, sys
summary, name, code, seconds, log = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
figures = None
for line in reversed(open(log, errors="replace").read().splitlines()):
    if line.startswith("{"):
        try:
            figures = json.loads(line)
        except ValueError:
            continue
        break
summary[name] = {"exit": code, "timed_out": code in (124, 137), "seconds": seconds, "figures": figures}
print(json.dumps(summary))
EOF
)
    echo "== $name: exit $code after $((SECONDS - started)) s"
}

run="$work/small"
for name in ${GPU_BENCH_STEPS:-train zeroshot kernels zero}; do
    case $name in
        train) step train "${GPU_LIMIT_TRAIN:-170}" "$python" -m pretrain.cli train --config configs/small-digits.yaml \
                   --out "$run" --resume auto data.source=digits "train.steps=${GPU_TRAIN_STEPS:-1860}" ;;
        zeroshot) step zeroshot "${GPU_LIMIT_ZEROSHOT:-80}" "$python" benchmarks/bench_zeroshot_steps.py "$run" \
                   --plot "$out/zeroshot_steps.png" ${GPU_ZEROSHOT_ARGS:-} ;;
        kernels) step kernels "${GPU_LIMIT_KERNELS:-150}" "$python" benchmarks/bench_kernels.py ;;
        zero) step zero "${GPU_LIMIT_ZERO:-130}" "$python" benchmarks/bench_zero.py --nproc 1 --size small --size sd-base ;;
        *) echo "gpu.sh: unknown step '$name' (train, zeroshot, kernels, zero)" >&2; exit 2 ;;
    esac
done
echo "$summary" > "$out/summary.json"
rm -rf "$work"
echo "$summary"
"$python" -c "import json, sys; sys.exit(any(s['exit'] for s in json.loads(sys.argv[1]).values()))" "$summary"
