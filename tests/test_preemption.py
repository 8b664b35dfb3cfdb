"""Preemption with 2 real processes: kill -9 during a checkpoint save loses only the steps since the
previous complete checkpoint; SIGTERM makes both ranks stop after the same step, checkpoint, and exit
with the requeue code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cluster.preemption import REQUEUE_EXIT_CODE
from pretrain.checkpoint import COMPLETE, SLEEP_BEFORE_COMPLETE_ENV, tag_for
from tests.test_distributed import ROOT, clean_env, train_command

pytestmark = [pytest.mark.integration, pytest.mark.multiprocess]


def wait_for(condition, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"training exited early with {process.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def logged_steps(run: Path) -> list[int]:
    metrics = run / "metrics.jsonl"
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.is_file() else []


def test_kill_during_save_then_resume_then_sigterm(tmp_path):
    run = tmp_path / "run"
    overrides = ("deepspeed=zero2", "train.steps=200")
    root = run / "checkpoints"
    # 1. kill -9 every process while rank 0 sleeps between the files of step 4 and its COMPLETE marker
    log1 = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(train_command(run, *overrides), cwd=ROOT, stdout=log1, stderr=subprocess.STDOUT,
                             env=clean_env(**{SLEEP_BEFORE_COMPLETE_ENV: "4:300"}), start_new_session=True)
    staged = [root / tag_for(4) / "trainer_state" / f"rank-{r:05d}.json" for r in range(2)]
    wait_for(lambda: all(p.is_file() for p in staged), first)
    time.sleep(1.0)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    assert (root / tag_for(2) / COMPLETE).is_file() and not (root / tag_for(4) / COMPLETE).is_file()
    assert max(logged_steps(run)) == 3  # step 4 is logged after its save, which never finished

    # 2. --resume auto takes step 2 (the half-written step 4 is ignored); SIGTERM to the launcher only
    log2 = open(tmp_path / "second.log", "w")
    second = subprocess.Popen(train_command(run, *overrides, resume=True), cwd=ROOT, stdout=log2,
                              stderr=subprocess.STDOUT, env=clean_env(), start_new_session=True)
    wait_for(lambda: max(logged_steps(run), default=0) >= 5, second)
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=300) == REQUEUE_EXIT_CODE == 75
    output = (tmp_path / "second.log").read_text()
    assert f"resumed from {root / tag_for(2)} (step 2" in output
    steps = logged_steps(run)
    stopped = steps[-1]
    restart = len(steps) - 1 - steps[::-1].index(3)
    assert steps[:restart] == [1, 2, 3] and steps[restart:] == list(range(3, stopped + 1))  # 3, 4, ... again
    assert (root / tag_for(stopped) / COMPLETE).is_file() and stopped < 200
    assert (root / "latest").read_text() == tag_for(stopped)
    states = [json.loads((root / tag_for(stopped) / "trainer_state" / f"rank-{r:05d}.json").read_text()) for r in range(2)]
    assert states[0]["trainer"] == states[1]["trainer"] == {"step": stopped}  # both ranks stopped after the same step
    assert states[0]["data"] == states[1]["data"] == {"epoch": 0, "offset": stopped * 4}
