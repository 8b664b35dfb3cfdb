"""Checkpoint discovery: only directories with a COMPLETE marker exist for resume and eval."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from pretrain.checkpoint import COMPLETE, RNGState, complete_checkpoints, latest_complete, tag_for
from pretrain.evaluate import resolve_checkpoint


def _fake_checkpoint(root, step, complete=True):
    directory = root / tag_for(step)
    (directory / "model").mkdir(parents=True)
    (directory / "model" / "config.json").write_text("{}")
    if complete:
        (directory / COMPLETE).write_text(json.dumps({"step": step, "world_size": 1}))
    return directory


def test_half_written_checkpoint_is_never_the_latest(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    _fake_checkpoint(root, 100)
    good = _fake_checkpoint(root, 200)
    _fake_checkpoint(root, 300, complete=False)  # killed mid-save
    (root / "latest").write_text(tag_for(300))  # a stale pointer must not matter
    (root / "step-abc").mkdir()
    assert latest_complete(root) == good
    assert [d.name for d in complete_checkpoints(root)] == [tag_for(100), tag_for(200)]
    assert resolve_checkpoint(tmp_path / "run") == good
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        resolve_checkpoint(root / tag_for(300))


def test_run_without_complete_checkpoint_is_reported(tmp_path):
    _fake_checkpoint(tmp_path / "run" / "checkpoints", 5, complete=False)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_rng_state_round_trips_through_json():
    state = json.loads(json.dumps(RNGState().state_dict()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)  # move every generator on
    RNGState().load_state_dict(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[0] == expected[0] and again[1] == expected[1]
    torch.testing.assert_close(again[2], expected[2], rtol=0, atol=0)
