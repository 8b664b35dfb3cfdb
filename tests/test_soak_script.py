"""scripts/soak.sh: what it picks to soak, and what it counts as a pass.

The soak itself (50 runs of every multi-process test) is far too long for CI; these check the two
ways it could silently prove nothing: leaving out a test that starts processes, and counting a run
that only skipped as a pass."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOAK = ROOT / "scripts" / "soak.sh"


def soak(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SOAK)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, "SOAK_NICE": "0", **env})


def test_default_items_are_the_multiprocess_tests_and_every_spawning_file():
    listed = soak(SOAK_LIST="1")
    assert listed.returncode == 0, listed.stderr
    items = set(listed.stdout.split())
    expected = {"tests/kernels/test_infonce_distributed.py", "tests/test_cluster_early_signal.py", "tests/test_distributed.py",
                "tests/test_distributed_loss.py", "tests/test_guard.py", "tests/test_preemption.py"}
    if os.geteuid() == 0:  # the 2-task Slurm jobs; scripts/slurm-local.sh needs root
        expected.add("tests/test_cluster_slurm.py")
    assert items == expected
    # any file that spawns ranks itself is in the list (a new one must carry the marker)
    spawning = {str(path.relative_to(ROOT)) for path in (ROOT / "tests").rglob("test_*.py")
                if path != Path(__file__).resolve() and re.search(r"mp\.spawn\(|nprocs=", path.read_text())}
    assert spawning and spawning <= items
    assert "tests/test_cluster_render.py" not in items  # single-process: it only renders --nproc into job files


def test_a_run_that_only_skipped_is_a_failure_and_a_skip_beside_a_pass_is_not(tmp_path):
    only_skips = tmp_path / "test_only_skips.py"
    only_skips.write_text("import pytest\n\ndef test_a():\n    pytest.skip('no engine here')\n")
    mixed = tmp_path / "test_mixed.py"
    mixed.write_text("import pytest\n\ndef test_a():\n    pytest.skip('optional')\n\ndef test_b():\n    assert 1 + 1 == 2\n")
    common = {"SOAK_RUNS": "2", "SOAK_TRAIN_RUNS": "0", "SOAK_LOG_DIR": str(tmp_path / "logs")}

    failed = soak(SOAK_TESTS=str(only_skips), **common)
    assert failed.returncode == 1, failed.stderr
    figures = json.loads(failed.stdout.strip().splitlines()[-1])
    assert figures["items"][str(only_skips)] == {"passes": 0, "runs": 1}
    assert figures["first_failure"]["run"] == 1 and Path(figures["first_failure"]["log"]).is_file()  # its log is kept

    passed = soak(SOAK_TESTS=str(mixed), **common)
    assert passed.returncode == 0, passed.stderr
    figures = json.loads(passed.stdout.strip().splitlines()[-1])
    assert figures["items"][str(mixed)] == {"passes": 2, "runs": 2} and figures["first_failure"] is None
