"""Precomputed feature shards: the loss from precomputed latents equals the loss from pixels (same
samples, same noise), with the identity and the KL autoencoder; the CLI; training from features."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from data_pipeline.loader import ShardStream
from data_pipeline.manifest import read_manifest
from data_pipeline.precompute import precompute_features
from pretrain.config import CONFIGS_DIR, load_run_config
from pretrain.data import make_batch
from pretrain.diffusion import DiffDisObjective
from pretrain.engine import Runtime
from pretrain.model import DiffDisModel
from pretrain.precompute_cli import AutoencoderFactory
from pretrain.trainer import tokenizer_spec
from tests.test_loader import write_shards

pytestmark = pytest.mark.integration

CPU = Runtime(torch.device("cpu"), "gloo", False)
KL = ["model.autoencoder.kind=kl", "model.autoencoder.block_out_channels=[32,32]", "model.autoencoder.norm_num_groups=8"]


@pytest.fixture(scope="module")
def ray_session(ray_local):
    return ray_local


@pytest.fixture(scope="module")
def pixel_shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pixels")
    keys = write_shards(directory, shards=3, per_shard=4, broken={"000100001": "decode"})
    return str(directory), [k for k in keys if k != "000100001"]


def _config(*overrides):
    return load_run_config(CONFIGS_DIR / "tiny.yaml", ["model.image_size=8", *overrides])


@pytest.mark.parametrize("autoencoder", ["identity", "kl"])
def test_loss_from_precomputed_latents_equals_loss_from_pixels(autoencoder, pixel_shards, ray_session, tokenizer, tmp_path):
    pixels_dir, keys = pixel_shards
    config = _config(*(KL if autoencoder == "kl" else []))
    torch.manual_seed(0)
    model = DiffDisModel(config.model, tokenizer_spec(tokenizer))
    model.save_pretrained(tmp_path / "model")
    features_dir = str(tmp_path / "features")
    manifest = precompute_features(pixels_dir, features_dir, AutoencoderFactory(model_dir=str(tmp_path / "model")),
                                   config.model.image_size, batch_size=3, progress=False)
    assert manifest.kind == "features" and read_manifest(features_dir).total_samples == len(keys) == 11
    assert manifest.counts["decode_error"] == 1
    assert manifest.features["latent.npy"]["shape"] == [model.latent_channels, model.latent_size, model.latent_size]

    pixel_samples = [next(s) for s in [ShardStream(pixels_dir, shuffle_buffer=0, image_size=8, expect="pixels")] for _ in range(11)]
    feature_samples = [next(s) for s in [ShardStream(features_dir, shuffle_buffer=0, expect="features")] for _ in range(11)]
    assert [s["key"] for s in pixel_samples] == [s["key"] for s in feature_samples]
    assert all(a["caption"] == b["caption"] and a["label"] == b["label"] for a, b in zip(pixel_samples, feature_samples))
    from_pixels = make_batch(pixel_samples, tokenizer, config, CPU)
    from_latents = make_batch(feature_samples, tokenizer, config, CPU)
    assert set(from_pixels) - set(from_latents) == {"pixels"} and set(from_latents) - set(from_pixels) == {"latents"}

    torch.testing.assert_close(from_latents["latents"], model.encode_images(from_pixels["pixels"]), rtol=0, atol=1e-6)
    objective = DiffDisObjective(model, config.diffusion, config.loss)
    torch.manual_seed(123)
    expected = objective(**from_pixels)
    torch.manual_seed(123)
    got = objective(**from_latents)
    for name in ("loss", "loss_gen", "loss_align"):
        assert abs(float(got[name]) - float(expected[name])) <= 1e-6, (name, float(got[name]), float(expected[name]))
    assert float(expected["loss"]) > 0


def test_run_config_factory_builds_the_autoencoder_the_trainer_builds(tokenizer):
    config = _config(*KL)
    torch.manual_seed(config.train.seed)  # the trainer seeds train.seed + rank, then builds the model
    trainer_model = DiffDisModel(config.model, tokenizer_spec(tokenizer))
    factory = AutoencoderFactory(run_config=str(CONFIGS_DIR / "tiny.yaml"), overrides=("model.image_size=8", *KL))
    pixels = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(factory(torch.device("cpu"))(pixels), trainer_model.encode_images(pixels), rtol=0, atol=0)


def test_cli_writes_feature_shards_and_the_trainer_trains_on_them(pixel_shards, ray_session, tmp_path, capsys):
    """`diffdis precompute` in this process (reusing the module's Ray session: a subprocess would start
    its own Ray, tens of seconds here)."""
    from pretrain.cli import main  # noqa: PLC0415

    pixels_dir, keys = pixel_shards
    out = tmp_path / "features"
    options = ["--run-config", str(CONFIGS_DIR / "tiny.yaml"), "--batch-size", "4", "--num-cpus", "2"]
    assert main(["precompute", pixels_dir, str(out), "model.image_size=8", *options]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == len(keys) and summary["shards"] == 3 and summary["latent_shape"] == [3, 8, 8]
    first = next(ShardStream(str(out), shuffle_buffer=0))
    assert first["latent"].dtype == np.float32 and first["latent"].shape == (3, 8, 8)
    assert main(["precompute", str(tmp_path / "nowhere"), str(tmp_path / "x"), *options]) == 2
    assert "nowhere" in capsys.readouterr().err

    from pretrain.trainer import Trainer  # noqa: PLC0415

    config = _config("data.source=shards", f"data.shards={out}", "data.precomputed=true", "data.num_workers=0",
                     "train.steps=2", "train.batch_size=4", "train.checkpoint_every=2", "train.log_every=1")
    trainer = Trainer(config, tmp_path / "run")
    trainer.train()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert trainer.stream.state_dict()["samples"] == 8
    with pytest.raises(Exception, match="kind is 'features'"):
        Trainer(_config("data.source=shards", f"data.shards={out}"), tmp_path / "wrong")
