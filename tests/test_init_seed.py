"""``train.init_seed``: the weights come from it, every draw of training from ``train.seed``."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import CONFIGS_DIR, load_run_config
from pretrain.trainer import Trainer, seed_everything


def _built(tmp_path, name: str, *overrides: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The initial weights of a tiny run and the first 16 numbers its global RNG draws after set-up
    (where training's timesteps and noise come from)."""
    config = load_run_config(CONFIGS_DIR / "tiny.yaml", [
        "data.source=digits", "model.image_size=8", "train.steps=2", "train.batch_size=8",
        "health.enabled=false", *overrides])
    trainer = Trainer(config, tmp_path / name)
    weights = {key: value.detach().clone() for key, value in trainer.model.state_dict().items()}
    return weights, torch.rand(16)


@pytest.mark.integration
def test_init_seed_sets_the_weights_and_train_seed_the_draws(tmp_path):
    seed5, _ = _built(tmp_path, "seed5", "train.seed=5")
    seed0, _ = _built(tmp_path, "seed0", "train.seed=0")
    split, split_draws = _built(tmp_path, "split", "train.seed=0", "train.init_seed=5")
    assert split.keys() == seed5.keys()
    for key in split:
        torch.testing.assert_close(split[key], seed5[key], rtol=0, atol=0, msg=key)
    differing = [key for key in split if not torch.equal(split[key], seed0[key])]
    assert len(differing) > len(split) // 2  # the random-init weights (zero-init and norm layers agree)
    seed_everything(0)  # what training draws next is train.seed's stream, untouched by the init
    torch.testing.assert_close(split_draws, torch.rand(16), rtol=0, atol=0)
