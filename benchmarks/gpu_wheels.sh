#!/usr/bin/env bash
# Wheels for the packages a bare GPU machine lacks, so `benchmarks/gpu.sh` can run there with no network.
#
#   bash benchmarks/gpu_wheels.sh            # here, where pip reaches the package registry -> .whl/
#
# The lent GPU machine (the `device` tool) has CUDA torch, Triton, transformers, tokenizers, safetensors,
# scikit-learn, matplotlib, pyyaml, tensorboard... but not DeepSpeed, diffusers, webdataset, xformers or
# their own needs. Each wheel here is the version this checkout's venv runs (what CI tests), except
# xformers (the `cuda` extra's pin). Binary wheels are fetched for that machine's Python (3.12,
# manylinux x86-64): GPU_WHEELS_PYTHON overrides. DeepSpeed publishes only a source archive; its wheel is
# built here with no ops compiled (pure Python, ops are JIT-built where they are used).
# Why not the machine's own pip: nothing can be fetched there. The wheels (~14 MB) travel with the
# working tree: name `.whl` in the device tool's `carry`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-$root/.venv/bin/python}
target_python=${GPU_WHEELS_PYTHON:-3.12}
dest=$root/.whl
[ -x "$python" ] || { echo "gpu_wheels.sh: no Python at $python (run scripts/bootstrap.sh or set PYTHON)" >&2; exit 2; }

# name==version for each package, from this venv; a package it lacks is an error, not a silent skip
mapfile -t pins < <("$python" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
names = ["webdataset", "braceexpand", "diffusers", "importlib_metadata", "zipp", "hjson", "pydantic", "pydantic_core",
         "annotated-types", "typing-inspection", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py"]
for name in names:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        raise SystemExit(f"gpu_wheels.sh: this venv has no {name}; run scripts/bootstrap.sh first")
EOF
)
deepspeed_version=$("$python" -c "from importlib.metadata import version; print(version('deepspeed'))")
rm -rf "$dest" && mkdir -p "$dest"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$target_python" --implementation cp \
    "${platforms[@]}" -d "$dest" "${pins[@]}" "xformers==0.0.35"
DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "deepspeed==$deepspeed_version"
ls -1 "$dest"
echo "gpu_wheels.sh: $(ls "$dest" | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest (carry: [\".whl\"])"
