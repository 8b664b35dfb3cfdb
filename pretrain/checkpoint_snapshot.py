"""Async checkpoints that do not wait for DeepSpeed's own ``torch.save``.

DeepSpeed writes its shards through a pluggable checkpoint engine (``engine.checkpoint_engine``, whose
``save(state_dict, path)`` it calls once per file). The non-blocking engines it ships do not fit here:
``FastCheckpointEngine`` and ``DecoupledCheckpointEngine`` (a writer process around the fast one) write
through DeepSpeed's async-IO op, which needs libaio, and DataStates needs its own package;
``torch.distributed.checkpoint.async_save`` writes the DCP format, which neither DeepSpeed's loader nor
its universal converter reads. So async mode swaps in :class:`SnapshotCheckpointEngine`: while a
capture is open, each ``save`` copies the state dict's tensors to CPU memory (a memcpy; on a GPU a
device-to-host copy) and returns; the checkpointer's background thread later runs the plain
``torch.save`` of each snapshot into the staging directory. The files are byte-for-byte what
``TorchCheckpointEngine`` writes from the same state (same serializer, same storage sharing), except
that CUDA tensors are stored as CPU tensors, which every DeepSpeed load path reads with
``map_location="cpu"`` anyway.

Cost: host memory for one checkpoint's engine state, kept between saves (:class:`BufferPool`); the
checkpointer keeps at most one save in flight, so one set of buffers is enough.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

log = logging.getLogger("diffdis.checkpoint")

PendingWrite = tuple[object, str]  # (snapshot, path)


class BufferPool:
    """Host buffers for snapshots, kept from one checkpoint to the next. Copying into memory that is
    already mapped runs at memory bandwidth; into fresh memory every page faults first, which made a
    snapshot cost as much as the ``torch.save`` it replaces. A buffer is reused only after the
    previous checkpoint's writes are done (the checkpointer keeps one save in flight)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, int], list[torch.UntypedStorage]] = {}
        self._free: dict[tuple[str, int], list[torch.UntypedStorage]] = {}

    def reset(self) -> None:
        """Every buffer is free again (the previous snapshot was written)."""
        self._free = {key: list(buffers) for key, buffers in self._buffers.items()}

    def copy(self, storage: torch.UntypedStorage) -> torch.UntypedStorage:
        pinned = storage.device.type != "cpu"
        key = ("pinned" if pinned else "cpu", storage.nbytes())
        free = self._free.get(key)
        if free:
            buffer = free.pop()
        else:
            buffer = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pinned).untyped_storage()
            self._buffers.setdefault(key, []).append(buffer)
        if pinned:  # device to host, through byte tensors over the two storages
            _as_bytes(buffer).copy_(_as_bytes(storage))
        else:  # numpy's copy is one plain memcpy; torch's splits it over OpenMP threads, which under a
            # loaded CPU made the same copy 2-10x slower
            np.copyto(_as_bytes(buffer).numpy(), _as_bytes(storage).numpy())
        return buffer

    @property
    def nbytes(self) -> int:
        return sum(key[1] * len(buffers) for key, buffers in self._buffers.items())


def _as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def snapshot(obj, pool: BufferPool, memo: dict | None = None):
    """A copy of a (nested) state dict that training can no longer change, its tensors in ``pool``'s
    host buffers.

    Tensors are copied per *storage*, and each copy is rebuilt as the same view (offset, size, stride)
    of the copied storage: tensors that shared memory still do, so ``torch.save`` writes the same
    storages it would have written from the live state. Containers are copied; other leaves (numbers,
    strings, configs) are kept by reference: DeepSpeed builds them fresh for each save."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = (storage.device, storage.data_ptr(), storage.nbytes())
        copied = memo.get(key)
        if copied is None:
            copied = memo[key] = pool.copy(storage)
        out = torch.empty(0, dtype=obj.dtype).set_(copied, obj.storage_offset(), obj.size(), obj.stride())
        if isinstance(obj, torch.nn.Parameter):
            out = torch.nn.Parameter(out, requires_grad=obj.requires_grad)
        elif obj.requires_grad:  # torch.save records the flag
            out.requires_grad_(True)
        return out
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the mapping's type (OrderedDict, defaultdict, ...)
        for key, value in obj.items():
            out[key] = snapshot(value, pool, memo)
        return out
    if isinstance(obj, list):
        return [snapshot(v, pool, memo) for v in obj]
    if isinstance(obj, tuple):
        values = [snapshot(v, pool, memo) for v in obj]
        return type(obj)(*values) if hasattr(obj, "_fields") else type(obj)(values)
    return obj


class SnapshotCheckpointEngine(TorchCheckpointEngine):
    """``TorchCheckpointEngine`` whose saves, between :meth:`capture` and :meth:`release`, are snapshots
    returned by ``release`` for :meth:`write` (the checkpointer's background thread). Outside a capture
    it writes at once (a save the checkpointer did not start)."""

    def __init__(self, config_params=None, zipfile_serialization: bool | None = None):
        super().__init__(config_params)
        self.name = "SnapshotCheckpointEngine"
        if zipfile_serialization is not None:
            self.zipfile_serialization = zipfile_serialization
        self._pending: list[PendingWrite] | None = None
        self._memo: dict = {}
        self.pool = BufferPool()

    def capture(self) -> None:
        """Start a checkpoint's capture; the previous one's snapshots must be written by now."""
        self._pending, self._memo = [], {}
        self.pool.reset()

    def release(self) -> list[PendingWrite]:
        pending, self._pending, self._memo = self._pending or [], None, {}
        return pending

    def save(self, state_dict, path: str) -> None:
        if self._pending is None:
            super().save(state_dict, path)
        else:  # one memo per checkpoint: a storage two files share is copied once
            self._pending.append((snapshot(state_dict, self.pool, self._memo), path))

    def write(self, state_dict, path: str) -> None:
        super().save(state_dict, path)


def install_snapshot_engine(engine) -> SnapshotCheckpointEngine | None:
    """Swap DeepSpeed's default ``TorchCheckpointEngine`` for a :class:`SnapshotCheckpointEngine` (same
    serialization setting). A run configured with another engine keeps it (returns None): its saves
    then block as that engine does."""
    current = getattr(engine, "checkpoint_engine", None)
    if isinstance(current, SnapshotCheckpointEngine):
        return current
    if type(current) is not TorchCheckpointEngine:
        log.warning("async checkpoints: DeepSpeed's checkpoint engine is %s, not the default torch.save one: "
                    "its writes are not moved to the background", type(current).__name__)
        return None
    replacement = SnapshotCheckpointEngine(zipfile_serialization=current.zipfile_serialization)
    engine.checkpoint_engine = replacement
    return replacement

