"""The inference part of a checkpoint, on a local path or an object store, verified before it is read.

Evaluation needs only ``model/`` (or ``model-ema/``: safetensors + config + tokenizer), ``config.yaml``
and ``COMPLETE``; DeepSpeed's shards (pickles, and most of the bytes) are never read. Every file used is
checked against the size and CRC-32 that ``COMPLETE`` recorded, so a corrupt weights file is named
rather than loaded. Local checkpoints are verified in place; object-store ones are downloaded to a
scratch directory (only those files) and verified there.

A checkpoint can vanish while it is read (keep-last-K pruning by the trainer): that is
:class:`CheckpointGone`, distinct from a damaged one (:class:`pretrain.checkpoint.CheckpointError`),
because a watcher should log and move on from the first but report the second.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pretrain.checkpoint import CheckpointError, file_digest
from pretrain.checkpoint_store import COMPLETE, TAG_PATTERN, CheckpointStore

log = logging.getLogger("diffdis.evaluator")

EMA_FOLDER = "model-ema"
# test hook: "STEP:SECONDS" sleeps after COMPLETE is read and before the files are (lets a test delete
# the checkpoint mid-read, as keep-last-K pruning would)
PAUSE_BEFORE_READ_ENV = "DIFFDIS_TEST_EVAL_PAUSE_BEFORE_READ"


class CheckpointGone(FileNotFoundError):
    """The checkpoint was deleted (keep-last-K) while it was being read."""


def inference_files(marker: dict, use_ema: bool = True) -> list[str]:
    """The files of a checkpoint that inference reads, from its COMPLETE manifest: the EMA folder when
    the run kept one (and ``use_ema``), else ``model/``; plus ``config.yaml`` and ``model/config.json``
    (what marks a checkpoint folder for ``pretrain.evaluate.resolve_checkpoint``)."""
    files = marker.get("files", {})
    folder = EMA_FOLDER if use_ema and f"{EMA_FOLDER}/config.json" in files else "model"
    chosen = sorted(name for name in files if name.startswith(f"{folder}/"))
    if not chosen:
        raise CheckpointError(f"its {COMPLETE} marker lists no {folder}/ files: not a checkpoint this evaluator can read")
    return sorted({*chosen, "model/config.json", "config.yaml"})


def _pause_hook(tag: str) -> None:
    hook = os.environ.get(PAUSE_BEFORE_READ_ENV, "")
    match = TAG_PATTERN.match(tag)
    if hook and match and int(hook.split(":")[0]) == int(match.group(1)):
        time.sleep(float(hook.split(":")[1]))


def verify(directory: Path, marker: dict, names: list[str], display: str) -> None:
    """Each of ``names`` under ``directory`` has the size and CRC-32 COMPLETE recorded, else a
    :class:`CheckpointError` naming the file (as ``display/name``)."""
    files = marker.get("files", {})
    for name in names:
        if name not in files:
            raise CheckpointError(f"{display}/{name} is not listed in {COMPLETE}")
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{display}/{name} is missing")
        size, crc = file_digest(path)
        entry = files[name]
        if size != entry["bytes"] or crc != entry["crc32"]:
            raise CheckpointError(f"checkpoint file {display}/{name} is corrupt: {size} bytes, CRC-32 {crc:08x}; "
                                  f"{COMPLETE} recorded {entry['bytes']} bytes, CRC-32 {entry['crc32']:08x}")


def fetch(store: CheckpointStore, tag: str, scratch: Path, use_ema: bool = True) -> Path:
    """A verified local directory holding ``tag``'s inference files (the checkpoint itself on a local
    store; a download under ``scratch`` otherwise). Raises :class:`CheckpointGone` when the checkpoint
    disappears meanwhile, :class:`CheckpointError` (naming the file) when a file is damaged."""
    try:
        marker_text = store.read_text(tag, COMPLETE)
    except FileNotFoundError as error:
        raise CheckpointGone(f"{store.display(tag)} is gone (deleted by keep-last-K?)") from error
    marker = json.loads(marker_text)
    names = inference_files(marker, use_ema)
    _pause_hook(tag)
    try:
        if store.local:
            directory = store.local_path(tag)
        else:
            directory = scratch / tag
            directory.mkdir(parents=True, exist_ok=True)
            (directory / COMPLETE).write_text(marker_text)
            for name in names:
                target = directory / name
                target.parent.mkdir(parents=True, exist_ok=True)
                store.fs.get_file(store.path(tag, name), str(target))
        verify(directory, marker, names, store.display(tag))
    except FileNotFoundError as error:
        if not store.exists(tag, COMPLETE):
            raise CheckpointGone(f"{store.display(tag)} was deleted while it was read (keep-last-K?)") from error
        raise CheckpointError(f"{error}: a file its {COMPLETE} marker lists is missing") from error
    return directory


def _newest(store: CheckpointStore) -> str | None:
    tags = store.complete_tags()
    return tags[-1] if tags else None


def locate(source: str) -> tuple[CheckpointStore, str] | None:
    """(store, tag) of the checkpoint ``source`` names, when it is one on a store: a checkpoint URL
    (``s3://b/ckpts/step-000000100``), a checkpoint root URL or a run prefix (its newest complete
    checkpoint), or a local run directory whose ``train.checkpoint_dir`` is elsewhere (on S3). None
    for local checkpoint/run/export folders, which :func:`pretrain.evaluate.resolve_checkpoint` reads."""
    source = source.rstrip("/")
    if "://" in source and not source.startswith("file://"):
        parent, _, tag = source.rpartition("/")
        if TAG_PATTERN.match(tag):
            store = CheckpointStore(parent)
            if not store.is_complete(tag):
                raise FileNotFoundError(f"{source} has no {COMPLETE} marker: it is incomplete or does not exist")
            return store, tag
        for root in (source, f"{source}/checkpoints"):
            store = CheckpointStore(root)
            tag = _newest(store)
            if tag is not None:
                return store, tag
        raise FileNotFoundError(f"{source} holds no complete checkpoint (looked in {source} and {source}/checkpoints)")
    path = Path(source.removeprefix("file://"))
    if (path / "config.yaml").is_file() and not (path / "checkpoints").is_dir() and not (path / "model").is_dir():
        from pretrain.config import RunConfig  # noqa: PLC0415
        from pretrain.config_io import load_config  # noqa: PLC0415

        root = load_config(RunConfig, path / "config.yaml").train.checkpoint_dir
        if root:
            store = CheckpointStore(root)
            tag = _newest(store)
            if tag is None:
                raise FileNotFoundError(f"run {path} keeps its checkpoints in {store.display()}, which holds no complete one")
            return store, tag
    return None


@contextmanager
def local_checkpoint(source: str | Path, use_ema: bool = True) -> Iterator[tuple[str, str | None]]:
    """``(local path, source URL)``: a path ``pretrain.evaluate.load_checkpoint`` reads, for any checkpoint
    source, and the URL of the checkpoint chosen (None for local sources). A checkpoint on an object
    store is downloaded (inference files only, verified) for the duration of the block."""
    found = locate(str(source))
    if found is None:
        yield str(source).removeprefix("file://"), None
        return
    store, tag = found
    with tempfile.TemporaryDirectory(prefix="diffdis-eval-") as scratch:
        yield str(fetch(store, tag, Path(scratch), use_ema)), store.display(tag)
