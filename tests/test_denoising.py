"""Held-out L_IG on fixed draws (``pretrain.denoising``) and its suite task."""

from __future__ import annotations

import math

import pytest
import torch

from data_pipeline.digits import caption_for
from pretrain.denoising import band_names, denoising_loss
from pretrain.diffusion import DiffDisObjective


SIZE = 8  # the demo's size: the tiny model is ~10x cheaper here than at the tiny config's own size


@pytest.fixture
def digits_batch():
    from data_pipeline.dataset import collate_images  # noqa: PLC0415
    from data_pipeline.digits import load_digits_split  # noqa: PLC0415

    split = load_digits_split("train", image_size=SIZE)
    pixels = collate_images([{"image": image} for image in split.images[:24]])
    captions = [caption_for(int(label), i % 5) for i, label in enumerate(split.labels[:24])]
    return pixels, captions


def test_bands_cover_the_schedule_without_gaps():
    bands = band_names(1000)
    assert [name for name, _, _ in bands] == ["t0-49", "t50-199", "t200-499", "t500-999"]
    assert bands[0][1] == 0 and bands[-1][2] == 1000
    assert all(previous[2] == following[1] for previous, following in zip(bands, bands[1:]))


def test_fixed_draws_do_not_depend_on_the_batch_size(make_model, tokenizer, tiny_config, digits_batch):
    pixels, captions = digits_batch
    model = make_model(seed=0, image_size=SIZE)
    whole = denoising_loss(model, tokenizer, pixels, captions, tiny_config.diffusion, draws=3, batch_size=64)
    pieces = denoising_loss(model, tokenizer, pixels, captions, tiny_config.diffusion, draws=3, batch_size=5)
    assert whole.loss == pytest.approx(pieces.loss, rel=1e-5)
    assert whole.loss_uncond == pytest.approx(pieces.loss_uncond, rel=1e-5)
    assert whole.by_band.keys() == pieces.by_band.keys()
    again = denoising_loss(model, tokenizer, pixels, captions, tiny_config.diffusion, draws=3, batch_size=64)
    assert again == whole  # same seed, same draws, same figures to the bit
    other_seed = denoising_loss(model, tokenizer, pixels, captions, tiny_config.diffusion, draws=3, seed=1)
    assert other_seed.loss != whole.loss
    metrics = whole.as_metrics()
    assert metrics["caption_gain"] == pytest.approx(whole.loss_uncond - whole.loss)
    assert metrics["n_images"] == 24 and metrics["draws"] == 3
    assert all(math.isfinite(value) for value in metrics.values())


def test_it_falls_when_the_generation_task_trains(make_model, tokenizer, encode, tiny_config, digits_batch):
    """The figure measures what L_IG trains: 30 AdamW steps on these pairs lower it by a clear margin
    (on the fixed draws, which training never saw)."""
    pixels, captions = digits_batch
    model = make_model(seed=0, image_size=SIZE)
    torch.manual_seed(0)
    before = denoising_loss(model, tokenizer, pixels, captions, tiny_config.diffusion, draws=4)
    objective = DiffDisObjective(model, tiny_config.diffusion, tiny_config.loss).train()
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=2e-3)
    tokens = encode(captions)
    for _ in range(30):
        optimizer.zero_grad()
        objective(tokens["input_ids"], tokens["attention_mask"], pixels=pixels)["loss"].backward()
        optimizer.step()
    model.eval()
    after = denoising_loss(model, tokenizer, pixels, captions, tiny_config.diffusion, draws=4)
    assert after.loss < 0.5 * before.loss, (before, after)
    assert after.loss_uncond < 0.5 * before.loss_uncond


def test_mismatched_inputs_are_named(make_model, tokenizer, tiny_config, digits_batch):
    pixels, captions = digits_batch
    with pytest.raises(ValueError, match="24 images but 23 captions"):
        denoising_loss(make_model(image_size=SIZE), tokenizer, pixels, captions[:-1], tiny_config.diffusion)
    with pytest.raises(ValueError, match="draws must be >= 1"):
        denoising_loss(make_model(image_size=SIZE), tokenizer, pixels, captions, tiny_config.diffusion, draws=0)


def test_the_suite_task_reports_the_same_figures(tmp_path, make_model, tokenizer, tiny_config):
    from pretrain.evaluate import heldout_data, load_checkpoint  # noqa: PLC0415
    from pretrain.suite import SuiteRunner, load_suite  # noqa: PLC0415
    from tests.evaluator_helpers import checkpointer, save_step  # noqa: PLC0415

    model = make_model(seed=0)
    root = tmp_path / "ckpts"
    save_step(checkpointer(str(root), tmp_path / "staging"), 1, model, tokenizer, tiny_config)
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text("tasks:\n  - {kind: denoising, name: val, data: heldout, limit: 16, draws: 2, seed: 3}\n")
    loaded = load_checkpoint(root / "step-000000001")
    metrics = SuiteRunner(load_suite(suite_file), tmp_path / "img").run(loaded).metrics["val"]
    pixels, _, captions = heldout_data(loaded.config)
    direct = denoising_loss(loaded.model, tokenizer, pixels[:16], captions[:16], loaded.config.diffusion, draws=2, seed=3)
    assert metrics["loss"] == pytest.approx(direct.loss, rel=1e-6)
    assert metrics["n_images"] == 16 and {"loss_uncond", "caption_gain", "loss_t0-49"} <= metrics.keys()
