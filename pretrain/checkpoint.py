"""One checkpointer for the whole training state (DESIGN.md "Checkpoints").

Layout under ``root``::

    step-000000100/            one directory per step
        <DeepSpeed ZeRO per-rank shards>      engine.save_checkpoint(root, tag)
        trainer_state/rank-00000.json          step, data position, RNG states (one file per rank)
        model/                                 rank 0: safetensors weights + config + tokenizer (inference)
        config.yaml                            the resolved run config
        COMPLETE                               written last; a directory without it does not exist
    latest                                     the newest complete tag (also DeepSpeed's convention)

A half-written directory (killed mid-save) has no ``COMPLETE`` and is never resumed from or evaluated.
Trainer state is JSON and weights are safetensors, so nothing of ours is unpickled on load; DeepSpeed's
own shards are loaded by DeepSpeed (which unpickles): resume only from checkpoints you wrote.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

COMPLETE = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"^step-(\d{9})$")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class RNGState:
    """Python, NumPy and torch (CPU, and CUDA when present) generator states, as JSON."""

    def state_dict(self) -> dict:
        state = {
            "python": _jsonable(random.getstate()),
            "numpy": _jsonable(np.random.get_state()),
            "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        }
        if torch.cuda.is_available():
            state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().cpu().numpy().tobytes()).decode()
        return state

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(_bytes_tensor(state["torch"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]))


def _bytes_tensor(encoded: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def tag_for(step: int) -> str:
    return f"step-{step:09d}"


def step_of(directory: Path) -> int | None:
    match = _TAG.match(directory.name)
    return int(match.group(1)) if match else None


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE).is_file()


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and step_of(d) is not None and is_complete(d)]
    return sorted(found, key=step_of)


def latest_complete(root: str | Path) -> Path | None:
    """The newest complete checkpoint. Found by scanning (``latest`` is a convenience pointer and may
    lag behind or point at a directory a crash left incomplete)."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpointer:
    """Saves and restores the DeepSpeed engine plus every registered :class:`Stateful` piece.

    ``stateful`` maps names to objects whose ``state_dict`` is JSON (the trainer's step counter, the
    data stream position, RNG states); each rank writes its own, since positions and RNG differ per rank.
    """

    def __init__(self, root: str | Path, engine, stateful: dict[str, Stateful], rank: int, world_size: int, keep_last: int = 3):
        self.root = Path(root)
        self.engine = engine
        self.stateful = stateful
        self.rank, self.world_size = rank, world_size
        self.keep_last = keep_last

    def _barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def save(self, step: int, write_extras=None) -> Path:
        """Write checkpoint ``step``; ``write_extras(directory)`` runs on rank 0 before COMPLETE
        (model export, config). Returns the checkpoint directory."""
        tag = tag_for(step)
        directory = self.root / tag
        if self.rank == 0 and directory.exists():  # a stale incomplete attempt at this step
            shutil.rmtree(directory)
        self._barrier()
        self.engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        state_dir = directory / "trainer_state"
        state_dir.mkdir(parents=True, exist_ok=True)
        state = {name: obj.state_dict() for name, obj in self.stateful.items()}
        _write_atomic(state_dir / f"rank-{self.rank:05d}.json", json.dumps(state))
        if self.rank == 0 and write_extras is not None:
            write_extras(directory)
        self._barrier()
        if self.rank == 0:
            marker = {"step": step, "world_size": self.world_size, "time": time.time()}
            _write_atomic(directory / COMPLETE, json.dumps(marker))
            _write_atomic(self.root / LATEST, tag)
            self._prune()
        self._barrier()
        return directory

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in complete_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, directory: str | Path) -> int:
        """Restore engine and stateful pieces from a complete checkpoint; returns its step."""
        directory = Path(directory)
        if not is_complete(directory):
            raise FileNotFoundError(f"{directory} has no {COMPLETE} marker: it is incomplete (a save was interrupted)")
        marker = json.loads((directory / COMPLETE).read_text())
        if marker["world_size"] != self.world_size:
            raise NotImplementedError(
                f"{directory} was written by {marker['world_size']} processes, this run has {self.world_size}: "
                "resuming at another world size is not supported yet"
            )
        state_file = directory / "trainer_state" / f"rank-{self.rank:05d}.json"
        if not state_file.is_file():
            raise FileNotFoundError(f"{state_file} is missing from checkpoint {directory}")
        load_path, _ = self.engine.load_checkpoint(str(directory.parent), tag=directory.name)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no engine state in {directory}")
        state = json.loads(state_file.read_text())
        for name, obj in self.stateful.items():
            if name not in state:
                raise KeyError(f"{state_file} has no '{name}' state")
            obj.load_state_dict(state[name])
        return int(marker["step"])
