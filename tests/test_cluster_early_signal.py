"""A preemption warning (SIGUSR1, Slurm's --signal=USR1@GRACE or scancel --signal=USR1) that arrives
while a rank is still starting must not kill it (SIGUSR1's default action): the run trains one
step, checkpoints and exits 75 so that the job is requeued. Run through the local launcher
(--nproc 2, which now also reads a multi-node layout), whose workers learn of the signal from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import preemption
from cluster.preemption import EARLY_SIGNAL_ENV, REQUEUE_EXIT_CODE, PreemptionWatcher, catch_early, early_signal
from pretrain.checkpoint import COMPLETE, tag_for
from pretrain.config import CONFIGS_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
@pytest.mark.multiprocess
def test_usr1_during_startup_checkpoints_after_the_first_step(tmp_path):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")))
    process = subprocess.Popen([sys.executable, "-m", "pretrain.cli", "train", "--config", str(CONFIGS_DIR / "tiny.yaml"),
                                "--out", str(run), "train.steps=50", "train.batch_size=8", "train.log_every=1",
                                "train.checkpoint_every=1000", "--nproc", "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    time.sleep(1.5)  # past interpreter start-up, deep in the imports (the trainer needs > 10 s to start)
    assert process.poll() is None and not (run / "metrics.jsonl").exists()
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == REQUEUE_EXIT_CODE, output[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]
    assert (run / "checkpoints" / tag_for(1) / COMPLETE).is_file()
    assert json.loads((run / "checkpoints" / tag_for(1) / COMPLETE).read_text())["world_size"] == 2


def test_early_signal_reaches_the_first_watcher_and_the_launched_workers(monkeypatch):
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        monkeypatch.setenv(EARLY_SIGNAL_ENV, str(int(signal.SIGUSR1)))  # what the launcher gives its workers
        catch_early()
        assert early_signal() == signal.SIGUSR1
        watcher = PreemptionWatcher()
        assert watcher.requested == signal.SIGUSR1 and watcher.agreed() and early_signal() is None
        watcher.close()
        monkeypatch.delenv(EARLY_SIGNAL_ENV)
        catch_early()
        os.kill(os.getpid(), signal.SIGUSR1)  # recorded, not fatal
        assert early_signal() == signal.SIGUSR1
        second = PreemptionWatcher()
        assert second.requested == signal.SIGUSR1
        second.close()
    finally:
        preemption._early["signum"] = None
        signal.signal(signal.SIGUSR1, previous)
