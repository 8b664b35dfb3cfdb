"""The ``diffdis`` command line: help, the eval JSON contract, and clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pretrain.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["train", "eval", "sample", "demo", "export"])
def test_every_subcommand_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert len(capsys.readouterr().out) > 300


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["train", "--config", "configs/tiny.yaml", "--out", "{tmp}/r", "model.unet.chanels=3"], "model.unet.chanels"),
        (["train", "--out", "{tmp}/r", "train.steps=abc"], "train.steps"),
        (["train", "--out", "{tmp}/r", "model.unet.block_channels=[32,'x']"], "model.unet.block_channels"),
        (["train", "--config", "{tmp}/missing.yaml", "--out", "{tmp}/r"], "missing.yaml"),
        (["eval", "{tmp}/no-such-run", "--json"], "no-such-run"),
    ],
)
def test_bad_input_exits_nonzero_and_names_the_culprit(args, named, tmp_path, capsys):
    code = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2
    assert named in capsys.readouterr().err


@pytest.mark.integration
def test_eval_prints_one_json_object_last(tmp_path):
    run = tmp_path / "run"
    train = _run("train", "--config", "configs/tiny.yaml", "--out", str(run), "train.steps=2", "train.batch_size=8",
                 "train.checkpoint_every=2")
    assert train.returncode == 0, train.stderr[-2000:]
    result = _run("eval", str(run), "--task", "zeroshot", "--json", "--steps", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"top1", "top5", "n", "ddim_steps", "checkpoint_step"} <= record.keys()
    assert record["n"] == 359 and record["ddim_steps"] == 1 and record["checkpoint_step"] == 2
    retrieval = _run("eval", str(run), "--task", "retrieval", "--json", "--steps", "1")
    keys = json.loads(retrieval.stdout.strip().splitlines()[-1]).keys()
    assert {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} <= keys
    sample = _run("sample", str(run), "--prompt", "a handwritten 3", "--out", str(tmp_path / "grid.png"),
                  "--per-prompt", "2", "--steps", "2")
    assert sample.returncode == 0 and (tmp_path / "grid.png").stat().st_size > 100
