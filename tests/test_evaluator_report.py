"""``diffdis dashboard`` serves the evaluator's scalars beside the trainer's (a real TensorBoard on a free
loopback port), and ``diffdis report``'s page renders in headless Chromium with every image loaded."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from pretrain.evaluator import Evaluator, WatchOptions
from pretrain.model import DiffDisModel
from pretrain.monitor import Monitor
from pretrain.report import write_report
from pretrain.suite import load_suite
from pretrain.trainer import tokenizer_spec
from tests.evaluator_helpers import TINY_SUITE, checkpointer, ledger, perturbed, save_step

REPO = Path(__file__).resolve().parents[1]
SUITE = TINY_SUITE + "  - {kind: samples, name: grid, prompts: [a handwritten digit two, a handwritten digit five], per_prompt: 3, steps: 2}\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_config, tokenizer) -> Path:
    """A run as the trainer leaves it (metrics.jsonl + tensorboard/ through the trainer's Monitor,
    checkpoints/) and RUN/eval written by the evaluator over checkpoints 10, 20, 30."""
    run = tmp_path_factory.mktemp("run")
    monitor = Monitor(run, enabled=True)
    for step in range(1, 31):
        monitor.log({"step": step, "loss": 3.0 - step / 30, "loss_gen": 1.0 - step / 60, "loss_align": 2.0 - step / 60})
    monitor.close()
    torch.manual_seed(0)
    model = DiffDisModel(tiny_config.model, tokenizer_spec(tokenizer)).eval()
    writer = checkpointer(str(run / "checkpoints"), run / ".staging")
    for step in (10, 20, 30):
        save_step(writer, step, perturbed(model, step), tokenizer, tiny_config)
    suite = run / "suite.yaml"
    suite.write_text(SUITE)
    Evaluator(str(run / "checkpoints"), run / "eval", load_suite(suite), WatchOptions(once=True, device="cpu")).run()
    return run


def test_dashboard_serves_train_and_eval_scalars_on_loopback(run_dir, tmp_path):
    log_file = tmp_path / "dashboard.log"
    with log_file.open("w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "pretrain.cli", "dashboard", str(run_dir), "--port", "0"],
                                   cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline, url = time.monotonic() + 90, None
        while url is None and time.monotonic() < deadline and process.poll() is None:
            found = re.search(r"TensorBoard at (http://127\.0\.0\.1:\d+/)", log_file.read_text())
            url = found.group(1) if found else time.sleep(0.2)
        assert url is not None, log_file.read_text()[-3000:]
        records = [r for r in ledger(run_dir / "eval") if r["status"] == "evaluated"]
        tags = {}
        while time.monotonic() < deadline:  # TensorBoard loads event files in the background
            tags = requests.get(f"{url}data/plugin/scalars/tags", timeout=10).json()
            if "eval/zs/top1" in tags.get("eval", {}) and "train/loss" in tags.get("train", {}):
                break
            time.sleep(0.5)
        assert "eval/zs/top1" in tags["eval"] and "eval/zs/mean_per_class_recall" in tags["eval"]
        assert "train/loss" in tags["train"]
        points = requests.get(f"{url}data/plugin/scalars/scalars", params={"run": "eval", "tag": "eval/zs/top1"},
                              timeout=10).json()
        assert [p[1] for p in points] == [10, 20, 30]  # the training step axis
        assert [p[2] for p in points] == pytest.approx([r["metrics"]["zs"]["top1"] for r in records], abs=1e-6)
        train = requests.get(f"{url}data/plugin/scalars/scalars", params={"run": "train", "tag": "train/loss"}, timeout=10).json()
        assert len(train) == 30 and train[-1][1] == 30
        images = requests.get(f"{url}data/plugin/images/tags", timeout=10).json()
        assert "eval/grid" in images["eval"]
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def chromium_installed() -> str:
    """Debian's chromium, installed here when missing (the test set-up; ~16 s after apt-get update, as
    root, the way CI runs). Skipped, with the reason, only where it cannot be installed."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("needs Debian's chromium; installing it needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-2000:]}"
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium but it is not on PATH"
    return found


def test_report_renders_in_headless_chromium(run_dir, tmp_path, chromium_installed):
    index = write_report(run_dir / "eval", tmp_path / "report")
    page = index.read_text()
    assert page.count("<tr>") == 1 + 3  # header + one row per checkpoint
    for name in ("loss.png", "metric-zs.png", "latest-grid.png"):
        assert f'src="{name}"' in page and (index.parent / name).is_file()

    def chromium(target: Path, screenshot: Path) -> str:
        result = subprocess.run([chromium_installed, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                                 "--log-level=0", f"--screenshot={screenshot}", "--window-size=1200,900",
                                 "--virtual-time-budget=5000", target.as_uri()],
                                capture_output=True, text=True, timeout=120)
        assert screenshot.is_file(), result.stderr[-3000:]
        return result.stderr

    shot = tmp_path / "report.png"
    console = [line for line in chromium(index, shot).splitlines() if "CONSOLE" in line]
    assert console == []  # no console messages at all, errors included
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50  # not blank: text, plots, images

    # the same page with a probe that reports how many images decoded (file:// failures log nothing)
    probe = index.parent / "probe.html"
    probe.write_text(page.replace("</body>", "<script>window.addEventListener('load',()=>{const i=[...document.images];"
                                  "console.log('IMAGES '+i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length)})"
                                  "</script></body>"))
    found = re.search(r"IMAGES (\d+)/(\d+)", chromium(probe, tmp_path / "probe.png"))
    assert found is not None and found.group(1) == found.group(2) and int(found.group(2)) == 3  # loss, metric-zs, latest-grid
