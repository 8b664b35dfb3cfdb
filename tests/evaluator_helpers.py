"""Real checkpoints for the evaluator's tests, written in milliseconds.

The project's own :class:`pretrain.checkpoint.Checkpointer` writes them (staging, move or upload,
``COMPLETE`` with every file's size and CRC-32, ``latest``, keep-last-K pruning), with the trainer's
``model/`` + tokenizer + ``config.yaml`` inside. Only DeepSpeed's engine is left out: its shards are
what the evaluator never reads, and starting it costs seconds per run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain.checkpoint import Checkpointer
from pretrain.checkpoint_store import CheckpointStore
from pretrain.config_io import dump_yaml

TINY_SUITE = """
tasks:
  - {kind: zeroshot, name: zs, data: heldout, limit: 24, steps: 1}
"""


class NoShardsEngine:
    """The two calls the checkpointer makes on a DeepSpeed engine; writes no shards."""

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False) -> None:
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)

    def zero_optimization_stage(self) -> int:
        return 0


def checkpointer(url: str, staging: Path, keep_last: int = 0) -> Checkpointer:
    return Checkpointer(CheckpointStore(url), NoShardsEngine(), {}, rank=0, world_size=1, keep_last=keep_last,
                        staging_dir=staging, cache_dir=staging / "cache")


def save_step(writer: Checkpointer, step: int, model, tokenizer, config, ema_model=None) -> str:
    """Checkpoint ``step`` with ``model``'s weights as the inference folder (and ``ema_model``'s as
    ``model-ema/``, as the trainer writes them when ``train.ema_decay > 0``)."""

    def extras(directory: Path) -> None:
        for folder, weights in (("model", model), ("model-ema", ema_model)):
            if weights is not None:
                weights.save_pretrained(directory / folder)
                tokenizer.save_pretrained(str(directory / folder / "tokenizer"))
        dump_yaml(config, directory / "config.yaml")

    return writer.save(step, extras)


def corrupt_file(path: Path) -> None:
    """Flip bytes in the middle of a file, keeping its size (only the CRC-32 can tell)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(255 - b for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


def ledger(eval_dir: Path) -> list[dict]:
    path = eval_dir / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def perturbed(model, seed: int):
    """The same architecture with other weights, so checkpoints differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
    return model
