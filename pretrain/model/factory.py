"""Build or load the network a config names (``model.family``): DiffDis or the CLIP baseline.

The trainer, the evaluator and export go through these two functions, so a CLIP run uses the same
trainer, data loader, checkpoints and eval as DiffDis. Saved folders record their family in
``config.json`` (folders saved before the field existed are DiffDis).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pretrain.model.clip import ClipModel
from pretrain.model.config import ModelConfig
from pretrain.model.diffdis import DiffDisModel
from pretrain.model.persistence import CONFIG_NAME
from pretrain.model.text_encoder import TokenizerSpec

FAMILIES: dict[str, type[nn.Module]] = {"diffdis": DiffDisModel, "clip": ClipModel}


def model_class(family: str) -> type[nn.Module]:
    if family not in FAMILIES:
        raise ValueError(f"unknown model.family {family!r}: expected one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


def build_model(config: ModelConfig, tokens: TokenizerSpec) -> DiffDisModel | ClipModel:
    """A freshly initialised model of ``config.family``."""
    return model_class(config.family)(config, tokens)


def saved_family(directory: str | Path) -> str:
    """The ``model.family`` recorded in a saved model folder's ``config.json``."""
    config_file = Path(directory) / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: not a saved model folder")
    return json.loads(config_file.read_text()).get("model", {}).get("family", "diffdis")


def load_pretrained(directory: str | Path, map_location: str | torch.device = "cpu") -> DiffDisModel | ClipModel:
    """The model saved in ``directory`` (``save_pretrained``'s folder), of whichever family it is."""
    family = saved_family(directory)
    try:
        cls = model_class(family)
    except ValueError as error:
        raise ValueError(f"{Path(directory) / CONFIG_NAME}: {error}") from None
    return cls.from_pretrained(directory, map_location=map_location)


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute activations in backward: the UNet's blocks (DiffDis) or the ViT's layers (CLIP). A
    training-memory switch set on a freshly built model (not part of the saved config)."""
    if isinstance(model, ClipModel):
        if enabled:
            model.enable_activation_checkpointing()
    else:
        model.unet.gradient_checkpointing = enabled
