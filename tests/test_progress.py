"""Progress output: a tqdm bar on a terminal, periodic plain lines in logs (CI, Slurm, pipes)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.progress import PROGRESS_ENV, PlainProgress, format_seconds, progress
from pretrain.config import CONFIGS_DIR

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(bar: PlainProgress, clock: Clock, updates: int, seconds_each: float) -> None:
    for _ in range(updates):
        clock.now += seconds_each
        bar.update(1)


def test_a_line_every_tenth_of_the_run_with_rate_and_eta():
    clock, lines = Clock(), []
    bar = PlainProgress(620, "train", "step", emit=lines.append, clock=clock)
    bar.set_postfix(loss="0.5300")
    run(bar, clock, 620, 0.5)  # 31 s per 10%: the percentage, not the 60 s timer, decides
    bar.close()
    assert len(lines) == 10
    assert lines[0] == "train: 62/620 step (10%), 2.00 step/s, elapsed 31s, eta 4m39s, loss=0.5300"
    assert lines[-1] == "train: 620/620 step (100%), 2.00 step/s, elapsed 5m10s, loss=0.5300"


def test_slow_loops_report_every_interval_and_close_reports_the_end():
    clock, lines = Clock(), []
    bar = PlainProgress(1000, "shard", "img", emit=lines.append, clock=clock, every_s=60)
    run(bar, clock, 10, 25.0)  # 1% of the run: only the timer fires, at 75, 150 and 225 s
    bar.close()
    bar.close()
    assert [line.split(",")[0] for line in lines] == ["shard: 3/1000 img (0%)", "shard: 6/1000 img (1%)",
                                                      "shard: 9/1000 img (1%)", "shard: 10/1000 img (1%)"]
    assert "25.00 s/img" in lines[0] and "eta 6h55m" in lines[0]


def test_a_resumed_run_counts_only_its_own_progress():
    clock, lines = Clock(), []
    bar = PlainProgress(620, "train", "step", initial=300, emit=lines.append, clock=clock)
    run(bar, clock, 9, 1.0)
    assert lines == []  # the next tenth is at 310
    run(bar, clock, 1, 1.0)
    assert lines == ["train: 310/620 step (50%), 1.00 step/s, elapsed 10s, eta 5m10s"]


def test_terminal_gets_tqdm_and_everything_else_plain_lines(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    tty = Terminal()
    bar = progress(5, "train", stream=tty)
    for _ in range(5):
        bar.update(1)
    bar.close()
    assert type(bar).__name__ == "tqdm" and tty.getvalue().count("\r") >= 2  # redrawn in place
    assert isinstance(progress(5, "train", stream=io.StringIO()), PlainProgress)
    monkeypatch.setenv(PROGRESS_ENV, "log")
    assert isinstance(progress(5, "train", stream=Terminal()), PlainProgress)
    monkeypatch.setenv(PROGRESS_ENV, "off")
    silent = progress(5, "train", stream=Terminal())
    silent.update(1), silent.set_postfix(loss=1.0), silent.close()
    assert not isinstance(silent, PlainProgress) and type(silent).__name__ != "tqdm"
    monkeypatch.setenv(PROGRESS_ENV, "bars")
    with pytest.raises(ValueError, match=PROGRESS_ENV):
        progress(5, "train")


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 59.4, 61, 3599, 3725)] == ["0s", "59s", "1m01s", "59m59s", "1h02m"]


@pytest.mark.integration
def test_piped_training_log_has_lines_not_carriage_returns(tmp_path):
    """``diffdis train`` with stdout/stderr piped, as under Slurm or CI."""
    env = {k: v for k, v in os.environ.items()
           if k != PROGRESS_ENV and not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_"))}
    command = [sys.executable, "-m", "pretrain.cli", "train", "--config", str(CONFIGS_DIR / "tiny.yaml"), "--out",
               str(tmp_path / "run"), "train.steps=6", "train.batch_size=8", "train.checkpoint_every=100"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if "diffdis.progress: train: " in line]
    assert output.count("\r") <= 2, output.count("\r")
    assert len(lines) == 6, lines  # every step crosses a tenth of a 6-step run
    assert lines[-1].split("train: ")[1].startswith("6/6 step (100%)")


def test_a_timed_line_just_before_a_threshold_is_not_followed_by_a_second_one():
    clock, lines = Clock(), []
    bar = PlainProgress(620, "train", "step", emit=lines.append, clock=clock, every_s=60)
    run(bar, clock, 372, 1.0)  # timer lines at steps 60, 120, ..., 360; the 60% threshold is step 372
    steps = [int(line.split(" ")[1].split("/")[0]) for line in lines]
    assert steps == [60, 120, 180, 240, 300, 360], lines  # 62, 124, ... 372 stood for by the timed lines
    run(bar, clock, 20, 0.5)  # faster now: the next line is the 70% threshold (434), not a timed one
    run(bar, clock, 42, 0.5)
    assert [int(line.split(" ")[1].split("/")[0]) for line in lines][6:] == [434], lines
