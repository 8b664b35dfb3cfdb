#!/usr/bin/env bash
# Create the project's virtualenv at .venv (idempotent: a second run with an unchanged pyproject.toml
# does nothing). torch goes in first, as its own step, so that no dependency can pull a CUDA build of
# several GB onto a CPU machine; with torch present, the project's torch range installs nothing more.
#   DIFFDIS_TORCH_SPEC   torch requirement to install first (default: torch==2.13.0)
#   DIFFDIS_PYTHON       interpreter for the venv (default: python3)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.bootstrap-$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
[ -f "$stamp" ] && exit 0

echo "bootstrap: setting up $venv (one time, ~2-3 minutes)" >&2
[ -x "$venv/bin/python" ] || "${DIFFDIS_PYTHON:-python3}" -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    pip install "${DIFFDIS_TORCH_SPEC:-torch==2.13.0}"
fi
# DS_BUILD_OPS=0: DeepSpeed builds its ops on first use instead of at install time.
DS_BUILD_OPS=0 pip install -e "$root[test]"
# Packages whose declared dependencies would replace torch (pyproject.toml [tool.diffdis.bootstrap] says why).
no_deps=$("$venv/bin/python" - "$root/pyproject.toml" <<'PY'
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
with open(sys.argv[1], "rb") as file:
    print(" ".join(tomllib.load(file)["tool"]["diffdis"]["bootstrap"]["no-deps"]))
PY
)
# shellcheck disable=SC2086 # one word per requirement
[ -z "$no_deps" ] || pip install --no-deps $no_deps
"$venv/bin/python" -c "import torch, deepspeed, diffusers, transformers, triton, pretrain, pretrain.fid; pretrain.fid.inception_class()" \
    || { echo "bootstrap: the environment in $venv is incomplete (see the pip output above)" >&2; exit 1; }
rm -f "$venv"/.bootstrap-*
touch "$stamp"
echo "bootstrap: ready ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))" >&2
