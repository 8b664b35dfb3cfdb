"""One saved-model folder layout for every model family: ``config.json`` + ``model.safetensors``.

Why a mixin: DiffDis and the CLIP baseline differ only in what their config records and how a model
is rebuilt from it; the folder format, the safetensors-only loading and the strict weight check must
not drift apart between them (the evaluator and ``export`` read both)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

ModelT = TypeVar("ModelT", bound="SafetensorsFolderMixin")


class SafetensorsFolderMixin:
    """``save_pretrained`` / ``from_pretrained`` for an ``nn.Module`` that implements
    ``_saved_config()`` (a JSON-able dict) and ``_from_saved_config(saved)`` (the model, random init)."""

    def _saved_config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _from_saved_config(cls: type[ModelT], saved: dict[str, Any]) -> ModelT:
        raise NotImplementedError

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (all weights, so the folder is self-contained).
        ``state_dict`` overrides the live weights (e.g. EMA weights)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in (state_dict or self.state_dict()).items()}
        save_file(weights, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        (directory / CONFIG_NAME).write_text(json.dumps(self._saved_config(), indent=2, default=str))
        return directory

    @classmethod
    def from_pretrained(cls: type[ModelT], directory: str | Path,
                        map_location: str | torch.device = "cpu") -> ModelT:
        """Rebuild the model from ``config.json`` and load ``model.safetensors`` (never pickle); a
        weight file that does not match its config is an error naming the file."""
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} is missing: not a saved model folder")
        model = cls._from_saved_config(json.loads((directory / CONFIG_NAME).read_text()))
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"{directory / WEIGHTS_NAME} does not match its config.json: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        return model.to(map_location)
