"""The CLIP baseline (``configs/clip.yaml``, ``model.family=clip``): the same trainer, loader, checkpoints,
export and eval as DiffDis, with a ViT image tower and CLIP's symmetric InfoNCE."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pretrain.cli import main
from pretrain.config import CONFIGS_DIR, load_run_config
from pretrain.config_io import ConfigError
from pretrain.diffusion import DiffusionConfig, LossConfig
from pretrain.evaluate import evaluate, heldout_data, load_checkpoint, probe_queries
from pretrain.export import export_checkpoint
from pretrain.inference import image_queries, sample_images
from pretrain.losses import symmetric_info_nce
from pretrain.model import ClipModel, DiffDisModel, build_model, load_pretrained
from pretrain.model.factory import set_activation_checkpointing
from pretrain.objectives import ClipObjective, build_objective
from pretrain.trainer import Trainer, tokenizer_spec

CLIP_CONFIG = CONFIGS_DIR / "clip.yaml"
# The short run: configs/clip.yaml cut to 150 steps. Measured held-out zero-shot top-1 (chance 0.1):
# 96.7% / 96.7% for train.seed 0 / 1 with the word-level tokenizer, weight decay 0.2, EMA and warmup 100
# (79.7% / 82.2% before; without gradient clipping seed 1 was still on the ln 64 plateau at step 150).
TRAIN_STEPS = 150
SHORT_RUN = ["data.source=digits", f"train.steps={TRAIN_STEPS}", f"train.checkpoint_every={TRAIN_STEPS}",
             "train.log_every=10"]
MIN_TOP1 = 0.5


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def clip_config():
    return load_run_config(CLIP_CONFIG)


@pytest.fixture
def clip_model(clip_config, tokenizer):
    def build(seed: int = 0, **fields) -> ClipModel:
        torch.manual_seed(seed)
        return build_model(replace(clip_config.model, **fields), tokenizer_spec(tokenizer)).eval()

    return build


def _pixels(count: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize(("size", "patch"), [(8, 2), (16, 2), (32, 4)])
def test_image_tower_gives_unit_queries_at_every_demo_size(clip_model, clip_config, size, patch):
    model = clip_model(image_size=size, clip=replace(clip_config.model.clip, patch_size=patch))
    pixels = _pixels(3, size)
    with torch.no_grad():
        queries = model.embed_images(pixels)
        other = model.embed_images(_pixels(3, size, seed=1))
    assert queries.shape == (3, model.query_dim) == (3, 64)
    torch.testing.assert_close(queries.norm(dim=-1), torch.ones(3))
    assert (queries - other).abs().max() > 1e-3  # the query depends on the image


def test_image_tower_is_sized_like_the_diffdis_discriminative_path(clip_config, tokenizer):
    """The ViT (+ projection) has about the parameters of DiffDis tiny's discriminative path (joint
    stream + text stream + head, i.e. the dis-only UNet); the text encoders are identical."""
    tokens = tokenizer_spec(tokenizer)
    clip = build_model(clip_config.model, tokens)
    diffdis_config = load_run_config(CONFIGS_DIR / "demo.yaml").model
    dis_only = DiffDisModel(replace(diffdis_config, generation=False), tokens)
    assert _params(clip.text_encoder) == _params(dis_only.text_encoder)
    ratio = _params(clip.vision) / _params(dis_only.unet)
    assert 0.95 < ratio < 1.05, (_params(clip.vision), _params(dis_only.unet))


def test_patch_size_must_divide_the_image_size():
    with pytest.raises(ConfigError, match="model.clip.patch_size"):
        load_run_config(CLIP_CONFIG, ["model.clip.patch_size=3"])
    with pytest.raises(ConfigError, match="model.family"):
        load_run_config(CLIP_CONFIG, ["model.family=vit"])


def test_objective_is_the_shared_info_nce_with_diffdis_keys(clip_model, clip_config, encode):
    model = clip_model().train()
    objective = build_objective(model, clip_config)
    assert isinstance(objective, ClipObjective)
    tokens = encode([f"a handwritten {d}" for d in range(8)])
    pixels = _pixels(8, 8)
    losses = objective(**tokens, pixels=pixels)
    assert set(losses) == {"loss", "loss_gen", "loss_align", "logit_scale"}
    assert losses["loss_gen"] == 0
    assert losses["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)  # CLIP's τ = 0.07
    expected = symmetric_info_nce(model.embed_images(pixels), model.encode_text(**tokens).query, objective.temperature())
    torch.testing.assert_close(losses["loss"], expected)
    losses["loss"].backward()
    for name, part in (("vision", model.vision), ("text", model.text_encoder), ("temperature", objective.temperature)):
        assert sum(p.grad.abs().sum() for p in part.parameters() if p.grad is not None) > 0, name


def test_activation_checkpointing_gives_the_same_gradients(clip_model, clip_config, encode):
    tokens, pixels = encode([f"a handwritten {d}" for d in range(4)]), _pixels(4, 8)

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = clip_model().train()
        set_activation_checkpointing(model, checkpointing)
        assert model.vision.vision_model.encoder.gradient_checkpointing == checkpointing
        ClipObjective(model, clip_config.loss)(**tokens, pixels=pixels)["loss"].backward()
        return {n: p.grad for n, p in model.vision.named_parameters()}

    plain, recomputed = gradients(False), gradients(True)
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_objective_refuses_precomputed_latents(clip_model, encode):
    objective = ClipObjective(clip_model(), LossConfig())
    with pytest.raises(ValueError, match="data.precomputed"):
        objective(**encode(["a handwritten 1"]), latents=torch.zeros(1, 3, 8, 8))


def test_save_and_load_round_trip_gives_identical_image_queries(clip_model, tmp_path):
    model = clip_model()
    model.save_pretrained(tmp_path / "clip")
    loaded = load_pretrained(tmp_path / "clip")
    assert isinstance(loaded, ClipModel)
    pixels = _pixels(5, 8)
    torch.testing.assert_close(image_queries(loaded, pixels, DiffusionConfig()),
                               image_queries(model, pixels, DiffusionConfig()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="model.family=diffdis"):
        DiffDisModel.from_pretrained(tmp_path / "clip")  # e.g. `diffdis precompute --model-dir` on a CLIP folder


def test_factory_still_loads_diffdis_folders(make_model, tmp_path):
    make_model().save_pretrained(tmp_path / "diffdis")
    assert isinstance(load_pretrained(tmp_path / "diffdis"), DiffDisModel)


def test_sampling_a_clip_model_fails_clearly(clip_model, tokenizer):
    with pytest.raises(ValueError, match="no image generator"):
        sample_images(clip_model(), tokenizer, ["a handwritten 7"], DiffusionConfig())


# -- the real trainer (DeepSpeed engine, gloo, one process) ------------------------------------------


@pytest.fixture(scope="module")
def trained_clip(tmp_path_factory):
    """configs/clip.yaml, shortened, from the in-memory digits stream."""
    run_dir = tmp_path_factory.mktemp("clip") / "run"
    config = load_run_config(CLIP_CONFIG, SHORT_RUN)
    trainer = Trainer(config, run_dir)
    trainer.train()
    return trainer, run_dir


@pytest.mark.integration
def test_clip_baseline_beats_chance_on_heldout_zero_shot(trained_clip):
    trainer, run_dir = trained_clip
    assert isinstance(trainer.model, ClipModel)
    result = evaluate(load_checkpoint(run_dir), "zeroshot")
    assert result["n"] == 359 and result["ddim_steps"] is None  # scored directly, no query chain
    assert result["top1"] >= MIN_TOP1, result  # chance is 0.1
    probe = probe_queries(load_checkpoint(run_dir))  # the digits path: 1,438 training images, 359 held out
    assert list(probe) == ["probe_digit"] and probe["probe_digit"] >= 0.8, probe  # measured 0.97 (zero-shot 0.97)
    retrieval = evaluate(load_checkpoint(run_dir), "retrieval")
    # chance R@10 is 10/359; the ceiling is about 10/36, since captions of one class score alike (measured 0.23)
    assert retrieval["i2t_r10"] >= 0.15, retrieval


@pytest.mark.integration
def test_checkpoint_and_export_give_the_live_image_queries(trained_clip, tmp_path):
    trainer, run_dir = trained_clip
    live = trainer.model.eval()
    pixels, _, _ = heldout_data(trainer.config)
    expected = image_queries(live, pixels[:32], DiffusionConfig())
    loaded = load_checkpoint(run_dir, use_ema=False).model  # the live weights (configs/clip.yaml keeps an EMA too)
    assert isinstance(loaded, ClipModel)
    torch.testing.assert_close(image_queries(loaded, pixels[:32], DiffusionConfig()), expected, rtol=0, atol=0)
    ema = load_checkpoint(run_dir).model  # what eval reads, and what export writes
    ema_queries = image_queries(ema, pixels[:32], DiffusionConfig())
    assert not torch.equal(ema_queries, expected)
    summary = export_checkpoint(run_dir, tmp_path / "export")
    assert summary["family"] == "clip" and summary["step"] == TRAIN_STEPS
    exported = load_checkpoint(tmp_path / "export").model
    torch.testing.assert_close(image_queries(exported, pixels[:32], DiffusionConfig()), ema_queries, rtol=0, atol=0)


@pytest.mark.integration
def test_sample_command_on_a_clip_checkpoint_exits_with_a_clear_message(trained_clip, tmp_path, capsys):
    _, run_dir = trained_clip
    code = main(["sample", str(run_dir), "--prompt", "a handwritten 3", "--out", str(tmp_path / "grid.png")])
    assert code == 2
    assert "CLIP baseline" in capsys.readouterr().err and not (tmp_path / "grid.png").exists()
