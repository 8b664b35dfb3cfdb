"""Training-health diagnostics (pretrain/diagnostics.py) and their place in the trainer's log records.

The numbers at init are the measured signature of the fix in ``model.unet.zero_init_query_in``: with it,
ê_0 depends on the image and not at all on the noisy query; without it, the noise dominates (before the
fix, batch 64: 1 − cos change 0.713 for new noise vs 0.0064 for another image at t_e = 999)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch

from data_pipeline.dataset import collate_images, make_digits_stream
from pretrain.config import CONFIGS_DIR, load_run_config
from pretrain.config_io import ConfigError
from pretrain.diagnostics import HealthConfig, collapse_verdict, mean_pairwise_cosine, training_health
from pretrain.diffusion import DiffDisObjective, DiffusionConfig, LossConfig, drop_mask, predict_clean_query
from pretrain.trainer import Trainer

TIMESTEPS = [999, 500, 100]


@pytest.fixture(scope="module")
def digits_batch():
    """64 training pairs of the tiny config (16x16 digits, template captions)."""
    stream = iter(make_digits_stream("train", 16, seed=0))
    samples = [next(stream) for _ in range(64)]
    return collate_images(samples), [s["caption"] for s in samples]


@pytest.fixture
def health_at_init(make_model, tiny_config, encode, digits_batch):
    def run(zero_init: bool, seed: int = 0) -> dict[str, float]:
        model = make_model(seed, unet=replace(tiny_config.model.unet, zero_init_query_in=zero_init))
        pixels, captions = digits_batch
        with torch.no_grad():
            latents, text = model.encode_images(pixels), model.encode_text(**encode(captions))
        return training_health(model, latents, text, DiffusionConfig(), HealthConfig(timesteps=TIMESTEPS, max_samples=64),
                               torch.Generator().manual_seed(0))

    return run


def test_mean_pairwise_cosine_on_known_vectors():
    assert mean_pairwise_cosine(torch.ones(5, 3)) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(4)) == pytest.approx(0.0)
    # rows 1, -1 and two orthogonal ones: pairs (1, 2) = -1, the other five = 0
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, 0, 1]])) == pytest.approx(-2 / 12)


def test_with_zero_init_the_prediction_depends_on_the_image_and_not_on_the_noise(health_at_init):
    for seed in (0, 1):  # measured sens_image: 0.0164 (seed 0), 0.0067 (seed 1)
        health = health_at_init(zero_init=True, seed=seed)
        for t in TIMESTEPS:
            assert abs(health[f"health/sens_noise_t{t}"]) < 1e-6, (seed, health)  # e_t has no path in yet
            assert health[f"health/sens_image_t{t}"] > 0.004, (seed, health)
            # the text token is a learned constant: t_e changes nothing either
            assert health[f"health/sens_image_t{t}"] == pytest.approx(health["health/sens_image_t999"], abs=1e-6)
        assert collapse_verdict(health, HealthConfig(timesteps=TIMESTEPS), step=0) == (False, "")


def test_without_zero_init_the_noise_dominates_and_the_verdict_says_so(health_at_init):
    health = health_at_init(zero_init=False)
    image = {t: health[f"health/sens_image_t{t}"] for t in TIMESTEPS}
    noise = {t: health[f"health/sens_noise_t{t}"] for t in TIMESTEPS}
    # measured: noise 0.656 / 0.490 / 0.062 vs image 0.0036 / 0.0035 / 0.0029 at t_e = 999 / 500 / 100
    assert noise[999] > 0.4 and noise[500] > 0.3 and noise[100] > 0.03, noise
    assert noise[999] > noise[500] > noise[100], noise  # the more noise in e_t, the more ê_0 follows it
    assert all(image[t] < 0.01 for t in TIMESTEPS), image
    assert noise[999] > 50 * image[999], (noise, image)
    collapsed, reason = collapse_verdict(health, HealthConfig(timesteps=TIMESTEPS), step=0)
    assert collapsed and "ignores the image at t_e=999" in reason, reason
    # predictions of a random head follow e_t, so they are spread (measured 0.31) though they say nothing
    assert health["health/prediction_spread"] < 0.6, health


def test_each_spread_check_waits_for_its_grace_steps_and_the_image_check_does_not():
    spread = {"health/query_spread": 0.95, "health/prediction_spread": 0.97,
              "health/sens_image_t999": 0.2, "health/sens_noise_t999": 0.01}
    config = HealthConfig(timesteps=[999], grace_steps=100, query_grace_steps=60)
    assert collapse_verdict(spread, config, step=50) == (False, "")
    collapsed, reason = collapse_verdict(spread, config, step=60)
    assert collapsed and "text queries collapsed (query_spread 0.950" in reason and "prediction" not in reason, reason
    collapsed, reason = collapse_verdict(spread, config, step=100)
    assert collapsed and "text queries" in reason and "predictions collapsed (prediction_spread 0.970" in reason
    assert collapse_verdict(spread, HealthConfig(timesteps=[999]), step=1)[0]  # queries: no grace by default
    assert collapse_verdict(spread, config)[0]  # no step: judged always
    blind = {**spread, "health/query_spread": 0.5, "health/prediction_spread": 0.5, "health/sens_image_t999": 0.0001}
    collapsed, reason = collapse_verdict(blind, config, step=1)
    assert collapsed and reason.startswith("ê_0 ignores the image"), reason


def test_diagnostics_leave_the_global_rng_alone(health_at_init):
    state = torch.get_rng_state()
    health_at_init(zero_init=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_the_training_pass_and_the_diagnostics_share_one_masking(make_model, encode):
    """alignment_pass = predict_clean_query with the pass's own random draws (t_e, ε, dropout)."""
    objective = DiffDisObjective(make_model(), DiffusionConfig(cfg_dropout=0.5), LossConfig())
    text = objective.model.encode_text(**encode(["a handwritten 7", "digit 5 (five)", "a handwritten 3", "a 1"]))
    latents = torch.rand(4, 3, 16, 16) * 2 - 1
    torch.manual_seed(3)
    trained = objective.alignment_pass(latents, text)
    torch.manual_seed(3)
    timesteps, noise = objective._query_timesteps(4, latents.device), torch.randn_like(text.query)
    drop = drop_mask(4, 0.5, latents.device)
    assert 0 < int(drop.sum()) < 4  # both branches of the mask are exercised
    again = predict_clean_query(objective.model, latents, text.query, timesteps, noise, objective.alphas_cumprod,
                                objective.diffusion, drop)
    torch.testing.assert_close(again, trained, rtol=0, atol=0)


def test_health_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="t_e=1000 must lie in"):
        load_run_config(CONFIGS_DIR / "tiny.yaml", ["health.timesteps=[1000]"])
    with pytest.raises(ConfigError, match="max_samples=1"):
        load_run_config(CONFIGS_DIR / "tiny.yaml", ["health.max_samples=1"])


# -- in the trainer -------------------------------------------------------------------------------------
HEALTH_KEYS = {"health/query_spread", "health/prediction_spread", "health/collapsed",
               "health/sens_image_t999", "health/sens_noise_t999", "health/sens_image_t500", "health/sens_noise_t500"}


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "training health" in r.getMessage()]


class OneCaptionTrainer(Trainer):
    """Every caption of every batch replaced by the first one: a caption column broken upstream (a
    default string everywhere). The queries are then identical whatever the encoder does: a collapse
    by construction, to check that the verdict, the warning and the record follow."""

    def next_batch(self):
        batch = super().next_batch()
        for key in ("input_ids", "attention_mask"):
            batch[key] = batch[key][:1].expand_as(batch[key]).clone()
        return batch


@pytest.mark.integration
def test_collapse_is_logged_once_per_episode_and_recorded(tmp_path, caplog):
    config = load_run_config(CONFIGS_DIR / "demo.yaml", ["train.steps=3", "train.log_every=1", "train.batch_size=16",
                                                         "train.checkpoint_every=100", "model.text_encoder.trainable=false"])
    caplog.set_level(logging.INFO, logger="diffdis.train")
    OneCaptionTrainer(config, tmp_path / "run").train()
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert HEALTH_KEYS <= record.keys() and "logit_scale" in record, record.keys()
        assert record["health/collapsed"] == 1 and record["health/query_spread"] > 0.999, record
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "text queries collapsed" in warnings[0] and "step 1" in warnings[0], warnings
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: PLC0415

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("health/collapsed")] == [1, 1, 1]
    assert "train/loss" in events.Tags()["scalars"]


@pytest.mark.integration
def test_a_healthy_run_stays_silent(tmp_path, caplog):
    config = load_run_config(CONFIGS_DIR / "demo.yaml", ["train.steps=15", "train.log_every=5", "train.checkpoint_every=100"])
    caplog.set_level(logging.INFO, logger="diffdis.train")
    Trainer(config, tmp_path / "run").train()
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records] == [5, 10, 15]
    for record in records:
        assert HEALTH_KEYS <= record.keys(), record.keys()
        assert record["health/collapsed"] == 0, record
        assert record["health/query_spread"] < 0.9, record
        # the image decides ê_0 at t_e = 999 (measured at step 5: 0.14 vs 0.004)
        assert record["health/sens_image_t999"] > 2 * record["health/sens_noise_t999"], record
    assert _warnings(caplog) == []


@pytest.mark.integration
def test_the_gen_only_baseline_has_no_health_numbers(tmp_path):
    config = load_run_config(CONFIGS_DIR / "gen-only.yaml", ["train.steps=1", "train.batch_size=8", "train.checkpoint_every=100"])
    Trainer(config, tmp_path / "run").train()
    (record,) = _records(tmp_path / "run")
    assert "loss_gen" in record and not any(key.startswith("health/") for key in record), record
