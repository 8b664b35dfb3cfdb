"""``diffdis export``: one checkpoint → one folder for inference without DeepSpeed.

The folder is what ``pretrain.model.load_pretrained`` reads (``config.json``, which names the model
family, DiffDis or the CLIP baseline, and ``model.safetensors``), plus ``tokenizer/`` and the run's
``config.yaml`` (so ``diffdis eval``/``sample`` take it too).
Weights: the EMA average by default when the run kept one (``train.ema_decay > 0``); otherwise, or
with ``use_ema=False``, the trained weights consolidated from the ZeRO shards by DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint`` (exact for stages 1-3, whatever the world size).
Frozen parts (the autoencoder) and buffers come from the checkpoint's ``model/`` folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pretrain.checkpoint import COMPLETE, read_marker
from pretrain.checkpoint_store import CheckpointStore
from pretrain.evaluate import EMA_FOLDER, resolve_checkpoint
from pretrain.model.persistence import CONFIG_NAME, WEIGHTS_NAME
from pretrain.model.factory import saved_family

MODEL_PREFIX = "model."  # the engine wraps the objective (DiffDis or CLIP); its .model is the model


def consolidated_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The trained weights of the model (DiffDis or CLIP) in a checkpoint, as full fp32 tensors."""
    marker = json.loads((directory / COMPLETE).read_text())
    if int(marker.get("zero_stage", 0)) == 0:  # no ZeRO partitions: the model folder holds them whole
        return load_file(str(directory / "model" / WEIGHTS_NAME))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415

    state = get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), tag=directory.name)
    return {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}


def _local_checkpoint(source: str, scratch: Path) -> Path:
    """A local directory for ``source``; an object-store checkpoint is downloaded to ``scratch``."""
    if "://" not in source or source.startswith("file://"):
        return resolve_checkpoint(source.removeprefix("file://"))
    parent, _, tag = source.rstrip("/").rpartition("/")
    store = CheckpointStore(parent)
    if not store.exists(tag, COMPLETE):  # a run prefix: its newest complete checkpoint
        store = CheckpointStore(f"{source.rstrip('/')}/checkpoints")
        tags = store.complete_tags()
        if not tags:
            raise FileNotFoundError(f"{source} holds no complete checkpoint")
        tag = tags[-1]
    read_marker(store, tag)
    store.download(tag, scratch / tag)
    return scratch / tag


def export_checkpoint(source: str | Path, out: str | Path, use_ema: bool = True) -> dict:
    """Write the inference folder ``out`` from checkpoint (or run) ``source``; returns a summary."""
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="diffdis-export-") as scratch:
        directory = _local_checkpoint(str(source), Path(scratch))
        if (directory / WEIGHTS_NAME).is_file():
            raise ValueError(f"{directory} is already an exported folder")
        base_folder = directory / "model"
        family = saved_family(base_folder)
        base = load_file(str(base_folder / WEIGHTS_NAME))
        if use_ema and (directory / EMA_FOLDER / WEIGHTS_NAME).is_file():
            weights, kind = load_file(str(directory / EMA_FOLDER / WEIGHTS_NAME)), "ema"
        else:
            trained = consolidated_weights(directory)
            unknown = sorted(set(trained) - set(base))
            if unknown:
                raise ValueError(f"{directory}: ZeRO shards hold weights the model does not have: {unknown[:5]}")
            weights = {k: trained[k].to(v.dtype) if k in trained else v for k, v in base.items()}
            kind = "trained" if not use_ema else "trained (the run kept no EMA)"
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        shutil.copyfile(base_folder / CONFIG_NAME, out / CONFIG_NAME)
        shutil.copytree(base_folder / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
        shutil.copyfile(directory / "config.yaml", out / "config.yaml")
        step = json.loads((directory / COMPLETE).read_text())["step"] if (directory / COMPLETE).is_file() else None
    return {"out": str(out), "checkpoint": str(source), "family": family, "weights": kind, "step": step,
            "tensors": len(weights)}
