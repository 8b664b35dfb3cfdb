"""One checkpointer for the whole training state (DESIGN.md "Checkpoints").

Layout under the checkpoint root (a local path or an ``s3://`` URL)::

    step-000000100/            one directory per step
        <DeepSpeed ZeRO per-rank shards>      engine.save_checkpoint
        trainer_state/rank-00000.json          step, data position, RNG states: one file per rank
        model/                                 safetensors weights + config + tokenizer (inference)
        model-ema/                             the same for the EMA weights (when train.ema_decay > 0)
        config.yaml                            the resolved run config
        .done/rank-00000.json                  async mode: rank r's files are in place
        COMPLETE                               written last: step, world size, ZeRO stage, every
                                               file's size and CRC-32; without it the directory
                                               does not exist for resume or eval
    latest                                     the newest complete tag, written after COMPLETE
    universal/step-000000100/                  DeepSpeed universal copy, made when resuming at
                                               another world size (local roots; cached beside)

Every rank saves into its own local staging directory (``engine.save_checkpoint`` takes a
directory per call, so ranks on different nodes never share one), then moves (local root: a rename)
or uploads (object store) each of its files whole. Rank 0 writes ``COMPLETE`` once every rank's files
are in place, then ``latest``, then prunes to the newest ``keep_last``. In async mode training is
blocked only while the state is copied to memory: DeepSpeed's shards are snapshotted
(``pretrain.checkpoint_snapshot``) and written, like the inference folders, moved and uploaded, by a
background thread. A write that fails (disk full, store unreachable past the retries) raises
:class:`CheckpointWriteError` naming the file; the step is left without COMPLETE, so nothing reads it.

Trainer state is JSON and weights are safetensors, so nothing of ours is unpickled on load; DeepSpeed's
own shards are loaded by DeepSpeed (which unpickles): resume only from checkpoints you wrote.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pretrain.checkpoint_snapshot import install_snapshot_engine
from pretrain.checkpoint_store import COMPLETE, TAG_PATTERN, CheckpointStore, is_transient

log = logging.getLogger("diffdis.checkpoint")

LATEST = "latest"
DONE_DIR = ".done"
UNIVERSAL_DIR = "universal"
TRAINER_STATE_DIR = "trainer_state"
_TAG = TAG_PATTERN
# test hook: "STEP:SECONDS" sleeps before COMPLETE of that step (lets a test kill -9 mid-save)
SLEEP_BEFORE_COMPLETE_ENV = "DIFFDIS_TEST_SLEEP_BEFORE_COMPLETE"
ASYNC_DONE_TIMEOUT_S = 3600.0  # rank 0 waits this long for the other ranks' files in async mode


class CheckpointError(ValueError):
    """A checkpoint is damaged or cannot be loaded; the message names the file. (A ValueError: bad
    input, so the CLI reports it and exits 2.)"""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, store unreachable): the message names the file and
    the newest complete checkpoint, which is untouched."""


class _OtherRankFailed(CheckpointWriteError):
    """Rank 0's background thread: another rank reported that its files failed."""


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class RNGState:
    """Python, NumPy and torch (CPU, and CUDA when present) generator states, as JSON."""

    def __init__(self, seed: int = 0):
        self.seed = seed

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

    def reshard_state(self, rank_states: list[dict], new_rank: int, new_world: int) -> dict:
        """At another world size rank r keeps old rank r's generators; a rank that did not exist
        gets generators seeded from (seed, rank, old world size), distinct from every other rank's."""
        if new_rank < len(rank_states):
            return rank_states[new_rank]
        seed = self.seed + new_rank + 1_000_003 * len(rank_states)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        return self.state_dict()


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


def step_of(directory: Path | str) -> int | None:
    match = _TAG.match(Path(str(directory).rstrip("/")).name)
    return int(match.group(1)) if match else None


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE).is_file()


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under a local ``root``, oldest first."""
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


def file_digest(path: Path) -> tuple[int, int]:
    """(bytes, CRC-32) of a file: cheap enough to compute for every shard (zlib runs at GB/s), and
    catches the truncated or overwritten shard that a size check alone would miss."""
    crc, size = 0, 0
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


def read_marker(store: CheckpointStore, tag: str) -> dict:
    if not store.is_complete(tag):
        raise FileNotFoundError(
            f"{store.display(tag)} has no {COMPLETE} marker: it is incomplete (a save was interrupted); "
            "resume from an earlier checkpoint"
        )
    return json.loads(store.read_text(tag, COMPLETE))


@dataclass
class Restored:
    step: int
    directory: Path  # a local copy of the checkpoint (the store itself, or the download cache)
    marker: dict


class Checkpointer:
    """Saves and restores the DeepSpeed engine plus every registered :class:`Stateful` piece.

    ``stateful`` maps names to objects whose ``state_dict`` is JSON (the trainer's step counter, the
    data stream position, RNG states); each rank writes its own. Resuming at another world size asks
    each piece for ``reshard_state(rank_states, new_rank, new_world)`` (see :func:`reshard`).
    """

    def __init__(
        self,
        store: CheckpointStore,
        engine,
        stateful: dict[str, Stateful],
        rank: int,
        world_size: int,
        keep_last: int = 3,
        *,
        local_rank: int = 0,
        staging_dir: str | Path | None = None,
        cache_dir: str | Path | None = None,
        async_save: bool = False,
    ):
        self.store = store
        self.engine = engine
        self.stateful = stateful
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.keep_last = keep_last
        if staging_dir is None:
            if not store.local:
                raise ValueError(f"checkpoints on {store.url} need a local staging directory")
            staging_dir = store.local_path(".staging")
        self.staging = Path(staging_dir)
        self.cache = Path(cache_dir) if cache_dir is not None else self.staging.parent / ".checkpoint-cache"
        self.async_save = async_save
        self.last_blocked_s = 0.0
        self._pending: Future | None = None
        self._pending_error: BaseException | None = None
        # one long-lived writer thread: starting a thread per save cost ~25 ms of blocked time on a busy CPU
        self._writer: ThreadPoolExecutor | None = None
        # async mode: DeepSpeed's own writes become memory snapshots written by the background thread
        self._snapshots = install_snapshot_engine(engine) if async_save else None
        self._found_tags: set[str] | None = None  # step directories that existed before this run's first save

    # -- collectives -------------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def _all_gather(self, value):
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    # -- save --------------------------------------------------------------------------------------
    def save(self, step: int, write_extras=None) -> str:
        """Write checkpoint ``step``; ``write_extras(directory)`` runs on every rank inside the staged
        directory (rank 0 writes the model folders and config). Returns the checkpoint's URL/path.
        In async mode it returns once the state is snapshotted to memory; :attr:`last_blocked_s` says
        how long training was blocked. A failed write raises :class:`CheckpointWriteError` (async mode:
        from the next ``save``/``wait``/``close``), naming the file; the step stays incomplete."""
        started = time.perf_counter()
        self.wait()
        tag = tag_for(step)
        stage_root = self.staging / f"rank-{self.rank:05d}"
        stage_dir = stage_root / tag
        shutil.rmtree(stage_dir, ignore_errors=True)
        if self.rank == 0:
            if self._found_tags is None:  # listed once per run: on object stores a query is a round trip
                self._found_tags = set(self.store.tags())
            if tag in self._found_tags:  # left by an earlier run: a save it did not finish, or a checkpoint
                # newer than the one this run resumed from
                self.store.remove(tag)
                self._found_tags.discard(tag)
        self._barrier()
        if self._snapshots is not None:
            self._snapshots.capture()  # async: DeepSpeed's torch.save calls become memory snapshots
        try:
            self.engine.save_checkpoint(str(stage_root), tag=tag, save_latest=False)
        except Exception as error:  # noqa: BLE001 - re-raised with the checkpoint named
            raise self._write_failure(tag, f"DeepSpeed could not write its shards under {stage_dir}", error) from error
        finally:
            engine_writes = self._snapshots.release() if self._snapshots is not None else []
        state_dir = stage_dir / TRAINER_STATE_DIR
        state_dir.mkdir(parents=True, exist_ok=True)
        state = {name: obj.state_dict() for name, obj in self.stateful.items()}
        (state_dir / f"rank-{self.rank:05d}.json").write_text(json.dumps(state))
        # write_extras may return a function that finishes its writes (from CPU snapshots it took):
        # async mode runs it in the background thread, before the files are listed and moved
        finish = write_extras(stage_dir) if write_extras is not None else None
        if self.async_save:
            self._pending_error = None
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
            self._pending = self._writer.submit(self._persist_in_background, tag, step, stage_dir, engine_writes, finish)
        else:
            self._save_sync(tag, step, stage_dir, finish)
        self.last_blocked_s = time.perf_counter() - started
        return self.store.display(tag)

    def _save_sync(self, tag: str, step: int, stage_dir: Path, finish) -> None:
        """Every rank persists its files; failures are gathered so that all ranks raise the same error
        (none is left waiting in a collective)."""
        manifest, problem = None, None
        try:
            if callable(finish):
                self._finish_extras(tag, stage_dir, finish)
            manifest = self._persist(tag, stage_dir, staged_files(stage_dir))
        except Exception as error:  # noqa: BLE001 - gathered, then raised on every rank
            problem = self._write_failure(tag, f"rank {self.rank} failed persisting {stage_dir}", error)
            shutil.rmtree(stage_dir, ignore_errors=True)  # a full disk gets its space back
        results = self._all_gather((manifest, None if problem is None else str(problem)))
        failed = [(rank, text) for rank, (_, text) in enumerate(results) if text]
        if failed:
            raise problem if problem is not None else CheckpointWriteError(f"rank {failed[0][0]}: {failed[0][1]}")
        if self.rank == 0:
            try:
                self._finalize(tag, step, [m for m, _ in results])
            except CheckpointWriteError as error:
                problem = error
        text = self._all_gather(None if problem is None else str(problem))[0]
        if text:
            raise problem if problem is not None else CheckpointWriteError(f"rank 0: {text}")

    def _persist(self, tag: str, stage_dir: Path, files: list[str]) -> dict:
        """Move/upload this rank's staged files; returns their manifest entries."""
        manifest = {}
        for relative in files:
            source = stage_dir / relative
            size, crc = file_digest(source)
            manifest[relative] = {"bytes": size, "crc32": crc, "rank": self.rank}
            try:
                self.store.put(source, tag, relative)
            except Exception as error:  # noqa: BLE001 - re-raised with the file named
                verb = "moving" if self.store.local else "uploading"
                raise self._write_failure(tag, f"rank {self.rank} failed {verb} {source} to {self.store.display(tag, relative)}",
                                          error) from error
        shutil.rmtree(stage_dir, ignore_errors=True)
        return manifest

    def _finish_extras(self, tag: str, stage_dir: Path, finish) -> None:
        try:
            finish()
        except Exception as error:  # noqa: BLE001 - re-raised with the checkpoint named
            raise self._write_failure(tag, f"rank {self.rank} failed writing the inference folders under {stage_dir}",
                                      error) from error

    def _write_failure(self, tag: str, what: str, error: BaseException) -> CheckpointWriteError:
        if isinstance(error, CheckpointWriteError):
            return error
        if self._found_tags is not None:
            self._found_tags.add(tag)  # partial files: a later save at this step removes them first
        try:
            complete = self.store.complete_tags()
            newest = self.store.display(complete[-1]) if complete else "none yet"
        except Exception:  # noqa: BLE001 - the store itself may be what failed
            newest = "unknown (the store cannot be listed now)"
        return CheckpointWriteError(
            f"checkpoint {self.store.display(tag)} was not written: {what}: {type(error).__name__}: {error}. It has "
            f"no {COMPLETE} marker, so --resume auto and eval skip it; the newest complete checkpoint is {newest}")

    def _persist_in_background(self, tag: str, step: int, stage_dir: Path, engine_writes: list, finish=None) -> None:
        """Async mode, one thread per rank: DeepSpeed's snapshots to the staging directory, the
        inference folders, then the move/upload. No torch.distributed here (collectives from a second
        thread would interleave with training's): ranks report through ``.done/rank-R.json`` files in
        the checkpoint itself (or ``.done/rank-R.failed`` with the error), which rank 0 waits for
        before writing COMPLETE."""
        try:
            for state, path in engine_writes:
                try:
                    self._snapshots.write(state, path)
                except Exception as error:  # noqa: BLE001 - re-raised with the file named
                    raise self._write_failure(tag, f"rank {self.rank} failed writing {path}", error) from error
            engine_writes.clear()  # the snapshots' memory goes back now, not at the next save
            if callable(finish):
                self._finish_extras(tag, stage_dir, finish)
            manifest = self._persist(tag, stage_dir, staged_files(stage_dir))
            self.store.write_text(json.dumps(manifest), tag, DONE_DIR, f"rank-{self.rank:05d}.json")
            if self.rank == 0:
                self._finalize(tag, step, self._wait_for_ranks(tag))
        except BaseException as error:  # noqa: BLE001 - reported by wait()
            self._pending_error = error
            engine_writes.clear()
            shutil.rmtree(stage_dir, ignore_errors=True)  # a full disk gets its space back
            if self.world_size > 1 and not isinstance(error, _OtherRankFailed):
                try:  # best effort: lets rank 0 stop waiting and name this rank's failure
                    self.store.write_text(str(error), tag, DONE_DIR, f"rank-{self.rank:05d}.failed")
                except Exception:  # noqa: BLE001
                    pass

    def _wait_for_ranks(self, tag: str) -> list[dict]:
        """Rank 0, async mode: every rank's manifest, once all have reported (or the first failure)."""
        deadline = time.monotonic() + ASYNC_DONE_TIMEOUT_S
        names = [f"rank-{r:05d}" for r in range(self.world_size)]
        while True:
            try:
                for name in names:
                    if self.store.exists(tag, DONE_DIR, f"{name}.failed"):
                        raise _OtherRankFailed(self.store.read_text(tag, DONE_DIR, f"{name}.failed"))
                if all(self.store.exists(tag, DONE_DIR, f"{name}.json") for name in names):
                    return [json.loads(self.store.read_text(tag, DONE_DIR, f"{name}.json")) for name in names]
            except _OtherRankFailed:
                raise
            except Exception as error:  # noqa: BLE001 - a store blip while polling: keep polling
                if not is_transient(error):
                    raise
            if time.monotonic() > deadline:
                raise CheckpointWriteError(f"{self.store.display(tag)}: not every rank finished its files within "
                                           f"{ASYNC_DONE_TIMEOUT_S:.0f} s; left incomplete")
            time.sleep(0.2)

    def _finalize(self, tag: str, step: int, manifests: list[dict]) -> None:
        """Rank 0: COMPLETE (with every file's size and checksum), then ``latest``, then pruning."""
        hook = os.environ.get(SLEEP_BEFORE_COMPLETE_ENV, "")
        if hook and int(hook.split(":")[0]) == step:
            time.sleep(float(hook.split(":")[1]))
        files = {name: entry for manifest in manifests for name, entry in manifest.items()}
        marker = {"step": step, "world_size": self.world_size, "zero_stage": self.engine.zero_optimization_stage(),
                  "time": time.time(), "files": files}
        try:
            self.store.write_text(json.dumps(marker), tag, COMPLETE)
        except Exception as error:  # noqa: BLE001 - re-raised with the file named
            raise self._write_failure(tag, f"writing {self.store.display(tag, COMPLETE)} failed", error) from error
        try:
            self.store.write_text(tag, LATEST)
        except Exception as error:  # noqa: BLE001 - the checkpoint is complete; only the pointer lags
            log.warning("checkpoint %s is complete but %s was not updated (%s: %s); --resume auto scans for "
                        "COMPLETE markers, so it is still found", self.store.display(tag), self.store.display(LATEST),
                        type(error).__name__, error)
        log.info("checkpoint %s complete (%d files)", self.store.display(tag), len(files))
        self._prune()

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.store.complete_tags()[: -self.keep_last]:
            self.store.remove(old)
            for copy_root in (self._local_root(), self.cache):
                shutil.rmtree(copy_root / UNIVERSAL_DIR / old, ignore_errors=True)
                (copy_root / UNIVERSAL_DIR / f"{old}.converted").unlink(missing_ok=True)
            shutil.rmtree(self.cache / old, ignore_errors=True)

    def _local_root(self) -> Path:
        return self.store.local_path() if self.store.local else self.cache

    def wait(self) -> None:
        """Block until the previous async save is persisted (and, on rank 0, complete)."""
        if self._pending is not None:
            self._pending.result()  # _persist_in_background keeps its errors in _pending_error
            self._pending = None
            if self._pending_error is not None:
                error, self._pending_error = self._pending_error, None
                if isinstance(error, CheckpointError):
                    raise error
                raise CheckpointError(f"background checkpoint save failed: {type(error).__name__}: {error}") from error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
        self._barrier()

    # -- load --------------------------------------------------------------------------------------
    def load(self, store: CheckpointStore, tag: str, exclude: tuple[str, ...] = ()) -> Restored:
        """Restore engine and stateful pieces from a complete checkpoint (any world size). Pieces named
        in ``exclude`` keep their current state (a guard rollback keeps the data position); a piece
        with ``state_optional = True`` that the checkpoint lacks keeps its state too."""
        marker = read_marker(store, tag)
        directory = self._localize(store, tag)
        self._verify(store, tag, directory, marker)
        saved_world = int(marker["world_size"])
        load_root = directory.parent
        if saved_world != self.world_size and int(marker.get("zero_stage", 1)) >= 1:
            load_root = self._universal(store, directory)
            log.info("%s was written by %d processes, this run has %d: loading its DeepSpeed universal copy %s",
                     store.display(tag), saved_world, self.world_size, load_root / tag)
        try:
            load_path, _ = self.engine.load_checkpoint(str(load_root), tag=tag)
        except Exception as error:  # noqa: BLE001 - re-raised with the checkpoint named
            raise CheckpointError(f"DeepSpeed could not load {store.display(tag)}: {type(error).__name__}: {error}") from error
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no engine state in {store.display(tag)}")
        states = []
        for old_rank in range(saved_world):
            state_file = directory / TRAINER_STATE_DIR / f"rank-{old_rank:05d}.json"
            if not state_file.is_file():
                raise FileNotFoundError(f"{store.display(tag, TRAINER_STATE_DIR, state_file.name)} is missing")
            states.append(json.loads(state_file.read_text()))
        for name, obj in self.stateful.items():
            if name in exclude:
                continue
            missing = [k for k, s in enumerate(states) if name not in s]
            if missing and getattr(obj, "state_optional", False) and len(missing) == len(states):
                log.info("%s has no '%s' state (written before it existed): keeping a fresh one",
                         store.display(tag, TRAINER_STATE_DIR), name)
                continue
            if missing:
                raise KeyError(f"{store.display(tag, TRAINER_STATE_DIR)}: rank {missing[0]} has no '{name}' state")
            rank_states = [s[name] for s in states]
            if saved_world == self.world_size:
                obj.load_state_dict(rank_states[self.rank])
            else:
                obj.load_state_dict(reshard(name, obj, rank_states, self.rank, self.world_size))
        return Restored(int(marker["step"]), directory, marker)

    def _localize(self, store: CheckpointStore, tag: str) -> Path:
        """The checkpoint as a local directory: itself on a local root, else a download into the
        cache (one download per node, by local rank 0; reused when already complete)."""
        if store.local:
            return store.local_path(tag)
        directory = self.cache / tag
        done = self.cache / f"{tag}.downloaded"
        if self.local_rank == 0 and not done.is_file():
            shutil.rmtree(directory, ignore_errors=True)
            log.info("downloading %s to %s", store.display(tag), directory)
            store.download(tag, directory)
            done.write_text(store.display(tag))
        self._barrier()
        return directory

    def _verify(self, store: CheckpointStore, tag: str, directory: Path, marker: dict) -> None:
        """Every file COMPLETE lists is present with its size and CRC-32. Ranks split the files and
        agree on the first problem, so all of them raise the same error (none hangs in a collective)."""
        files = sorted(marker.get("files", {}).items())
        problem = None
        for index, (relative, entry) in enumerate(files):
            if index % self.world_size != self.rank:
                continue
            path = directory / relative
            where = f"{store.display(tag, relative)} (written by rank {entry.get('rank', '?')})"
            if not path.is_file():
                problem = f"checkpoint file {where} is missing"
                break
            size, crc = file_digest(path)
            if size != entry["bytes"] or crc != entry["crc32"]:
                problem = (f"checkpoint file {where} is corrupt: {size} bytes, CRC-32 {crc:08x}; "
                           f"COMPLETE recorded {entry['bytes']} bytes, CRC-32 {entry['crc32']:08x}")
                break
        problems = [p for p in self._all_gather(problem) if p]
        if problems:
            raise CheckpointError(f"{problems[0]}; resume from an earlier checkpoint or restore the file")

    def _universal(self, store: CheckpointStore, directory: Path) -> Path:
        """DeepSpeed's universal form of ``directory`` (made once, cached beside it as
        ``universal/TAG``): the only form ZeRO 1-3 load at another data-parallel world size."""
        root = directory.parent / UNIVERSAL_DIR
        tag = directory.name
        done = root / f"{tag}.converted"
        converter = self.rank == 0 if store.local else self.local_rank == 0
        if converter and not done.is_file():
            started = time.perf_counter()
            shutil.rmtree(root / tag, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(directory),
                       "--output_folder", str(root / tag), "--num_extract_workers", "1", "--num_merge_workers", "1",
                       "--inject_missing_state"]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise CheckpointError(f"converting {directory} to DeepSpeed's universal format failed "
                                      f"(exit {result.returncode}): {result.stderr[-2000:]}")
            done.write_text(json.dumps({"source": str(directory), "seconds": time.perf_counter() - started}))
            log.info("converted %s to universal form in %.1f s", directory, time.perf_counter() - started)
        self._barrier()
        if not done.is_file():
            raise CheckpointError(f"{root / tag} was not converted (is {root} on a filesystem every node sees?)")
        return root


def staged_files(stage_dir: Path) -> list[str]:
    """Every file under a rank's staged checkpoint, relative to it, sorted."""
    return sorted(str(p.relative_to(stage_dir)) for p in stage_dir.rglob("*") if p.is_file())


def reshard(name: str, obj, rank_states: list[dict], new_rank: int, new_world: int) -> dict:
    """The state rank ``new_rank`` of ``new_world`` loads, from the states of all saved ranks.

    A stateful piece may implement ``reshard_state(rank_states, new_rank, new_world) -> dict`` (the
    digits stream maps its position; RNGState keeps rank r's generators); or ``merge_states(rank_states)``
    returning one state any rank can load. Pieces whose saved states are all equal (the step counter,
    EMA bookkeeping) need neither."""
    hook = getattr(obj, "reshard_state", None)
    if callable(hook):
        return hook(rank_states, new_rank, new_world)
    merge = getattr(obj, "merge_states", None)
    if callable(merge):
        return merge(rank_states)
    if all(state == rank_states[0] for state in rank_states):
        return rank_states[0]
    raise ValueError(
        f"the saved '{name}' state differs between the {len(rank_states)} ranks and {type(obj).__name__} has no "
        f"reshard_state(rank_states, new_rank, new_world): it cannot resume at world size {new_world}"
    )
