#!/usr/bin/env bash
# Run the test suite (bootstraps .venv first). Extra arguments go to pytest, e.g. -m "not integration".
# The suite runs in DIFFDIS_TEST_WORKERS pytest-xdist workers (default 2; 0 = in this process), each
# taking a whole test file at a time (--dist loadfile): a file's module fixtures (the distributed runs,
# the Slurm cluster) are then built once, and files that share a service never run side by side. Much
# of a serial run waits on process start-up and rendezvous, so two workers fill both cores of a small
# machine. Pass -n yourself (or -p no:xdist) to choose otherwise.
# pytest's exit code 5 ("no tests collected") is turned into a failure: a suite that ran nothing passed nothing.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh" || exit 1
cd "$root"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.venv/torch_extensions}"
workers=(-n "${DIFFDIS_TEST_WORKERS:-2}" --dist loadfile)
for arg in "$@"; do
    case "$arg" in
        -n|-n[0-9]*|--numprocesses|--numprocesses=*|no:xdist|-pno:xdist) workers=() ;;
    esac
done
"$root/.venv/bin/python" -m pytest "${workers[@]}" "$@"
code=$?
if [ "$code" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests; failing on purpose" >&2
    exit 1
fi
exit "$code"
