"""The trainer on the real DeepSpeed engine (one CPU process, gloo): learning, checkpoints, resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pretrain.checkpoint import is_complete, latest_complete, tag_for
from pretrain.config import CONFIGS_DIR, load_run_config
from pretrain.evaluate import evaluate, load_checkpoint
from pretrain.model.tokenizer import tokenize
from pretrain.trainer import Trainer

pytestmark = pytest.mark.integration


def _config(*overrides):
    return load_run_config(CONFIGS_DIR / "tiny.yaml", ["train.log_every=1", *overrides])


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained briefly; shared by the tests that need one."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    config = load_run_config(CONFIGS_DIR / "demo.yaml", ["train.log_every=1", "train.steps=120", "train.checkpoint_every=60",
                                                          "health.every=10"])  # diagnostics cost ~1/4 step
    trainer = Trainer(config, run_dir)
    trainer.train()
    return trainer, run_dir


def test_loss_goes_down(trained):
    _, run_dir = trained
    losses = _losses(run_dir)
    assert len(losses) == 120
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def test_the_shipped_recipe_stays_healthy(trained):
    _, run_dir = trained
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    health = [r for r in records if "health/collapsed" in r]
    assert [r["step"] for r in health] == list(range(10, 121, 10))
    assert [r["health/collapsed"] for r in health] == [0] * 12, health


def test_checkpoints_are_complete_and_latest_points_at_the_newest(trained):
    _, run_dir = trained
    root = run_dir / "checkpoints"
    assert is_complete(root / tag_for(60)) and is_complete(root / tag_for(120))
    assert (root / "latest").read_text() == tag_for(120) and latest_complete(root) == root / tag_for(120)
    for name in ("config.yaml", "model/model.safetensors", "model/tokenizer/tokenizer.json", "trainer_state/rank-00000.json"):
        assert (root / tag_for(120) / name).is_file(), name


def test_reloaded_checkpoint_gives_identical_outputs(trained):
    trainer, run_dir = trained
    live = trainer.engine.module.model.eval()
    loaded = load_checkpoint(run_dir, use_ema=False).model  # the demo recipe keeps an EMA; compare the trained weights
    for key, value in live.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    tokens = tokenize(trainer.tokenizer, ["a handwritten 4", "digit 9 (nine)"], live.config.text_encoder.max_length)
    size = live.config.image_size
    latents, t = torch.randn(2, 3, size, size), torch.tensor([10, 900])
    with torch.no_grad():
        expected = live(latents, t, live.encode_text(**tokens).condition).noise_pred
        got = loaded(latents, t, loaded.encode_text(**tokens).condition).noise_pred
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_zero_shot_beats_chance_on_heldout_digits(trained):
    _, run_dir = trained
    result = evaluate(load_checkpoint(run_dir), "zeroshot", steps=1)
    assert result["n"] == 359
    assert result["top1"] > 0.2, result  # chance is 0.1


@pytest.mark.parametrize("captions", [(), ("model.text_encoder.tokenizer_kind=word", "data.caption_unk_rate=0.3")],
                         ids=["plain", "unk-words"])
def test_resume_from_a_mid_run_checkpoint_matches_the_uninterrupted_run(tmp_path, captions):
    """Also with the caption word dropout: its draws come from (seed, rank, step), so they repeat."""
    config = _config("train.steps=6", "train.batch_size=16", "train.checkpoint_every=3", "train.keep_last=0", *captions)
    straight = tmp_path / "straight"
    Trainer(config, straight).train()
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / tag_for(3), resumed / "checkpoints" / tag_for(3))
    shutil.copytree(straight / "tokenizer", resumed / "tokenizer")
    trainer = Trainer(config, resumed, resume="auto")
    trainer.train()
    assert trainer.counter.step == 6
    if captions:  # the trainer's batches do carry the unknown token (training captions never hold it)
        assert (trainer.last_batch["input_ids"] == trainer.tokenizer.unk_token_id).any()
    assert _losses(resumed) == pytest.approx(_losses(straight)[3:], abs=1e-6)
    # the health diagnostics ran at every log step from their own generator: same numbers after resume
    health = {run: [{k: v for k, v in json.loads(line).items() if k.startswith("health/")}
                    for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (straight, resumed)}
    assert len(health[straight][0]) == 7 and len(health[resumed]) == 3
    for got, expected in zip(health[resumed], health[straight][3:]):
        assert got == pytest.approx(expected, abs=1e-6)
    final_a = load_checkpoint(straight).model.state_dict()
    final_b = load_checkpoint(resumed).model.state_dict()
    for key in final_a:
        torch.testing.assert_close(final_b[key], final_a[key], rtol=0, atol=1e-6, msg=key)


def test_resume_auto_skips_a_half_written_checkpoint(tmp_path):
    config = _config("train.steps=4", "train.batch_size=8", "train.checkpoint_every=2", "train.keep_last=0")
    run = tmp_path / "run"
    Trainer(config, run).train()
    # simulate a kill during the save of step 4: its COMPLETE marker never got written
    (run / "checkpoints" / tag_for(4) / "COMPLETE").unlink()
    trainer = Trainer(config, run, resume="auto")
    trainer.maybe_resume()
    assert trainer.counter.step == 2
