#!/usr/bin/env bash
# The end-to-end demo on embedded defaults (bootstraps .venv first): built-in digits -> train -> evaluate.
# Arguments go to `diffdis demo`, e.g. --out outputs/demo2 train.steps=100
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
cd "$root"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.venv/torch_extensions}"
exec "$root/.venv/bin/diffdis" demo "$@"
