"""``diffdis evaluator watch``: a separate process that evaluates every complete checkpoint once.

It polls a checkpoint root (local or ``s3://``), and runs the suite (``pretrain.suite``) on each
checkpoint with a ``COMPLETE`` marker that its ledger does not list yet, in step order (or newest first,
when it has fallen behind and the newest matters most). The trainer is never touched: the evaluator
only lists and reads, so at worst it competes for the machine's CPU/disk/network.

**The ledger** ``EVAL_DIR/results.jsonl`` is the record of what is finished: one JSON line per
checkpoint, ``status`` one of ``evaluated`` (with the metrics), ``corrupt`` (a file failed its CRC-32 or
is missing; the message names it), ``deleted`` (pruned by keep-last-K while it was being read) or
``failed`` (any other error, with its text). A line is appended with one ``write`` on an ``O_APPEND``
descriptor and fsynced, and only after the checkpoint's TensorBoard events are flushed; so a watcher
killed at any moment has either finished a checkpoint (its line is there) or not (it is evaluated again
on restart), and nothing is recorded twice. A final partial line (a crash inside the write, e.g. a full
disk) is dropped on start. The cost of that order: a kill between the flush and the append leaves the
step's TensorBoard points written twice (TensorBoard shows the newer), never missing.

Transient storage errors (the object store unreachable) are not recorded: that checkpoint is retried
at the next poll. ``EVAL_DIR`` is a local directory (the ledger relies on POSIX append and rename).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pretrain.checkpoint import CheckpointError
from pretrain.checkpoint_fetch import CheckpointGone, fetch
from pretrain.checkpoint_store import COMPLETE, CheckpointStore, is_transient
from pretrain.suite import SuiteConfig, SuiteRunner

log = logging.getLogger("diffdis.evaluator")

RESULTS = "results.jsonl"
TENSORBOARD = "tensorboard"
SAMPLES = "samples"
WATCH_INFO = "watch.json"
# test hook: "STEP:SECONDS" sleeps after evaluating that step and before recording it (a test kills
# the watcher there: evaluated but not finished)
PAUSE_BEFORE_COMMIT_ENV = "DIFFDIS_TEST_EVAL_PAUSE_BEFORE_COMMIT"


class Ledger:
    """``results.jsonl``: what this evaluator finished, one line per checkpoint tag."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []
        if path.is_file():
            data = path.read_bytes()
            complete, _, partial = data.rpartition(b"\n")
            if partial.strip():  # a crash inside the last write: drop the fragment, keep the rest
                log.warning("%s ends in a partial line (%d bytes); dropped it", path, len(partial))
                temporary = path.with_suffix(".tmp")
                temporary.write_bytes(complete + b"\n" if complete else b"")
                os.replace(temporary, path)
            self.records = [json.loads(line) for line in complete.decode().splitlines() if line.strip()]

    def tags(self) -> set[str]:
        return {record["tag"] for record in self.records}

    def append(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        self.records.append(record)


def read_results(eval_dir: str | Path) -> list[dict]:
    """The ledger's records (what ``diffdis report`` plots), oldest first."""
    return Ledger(Path(eval_dir) / RESULTS).records


# sizes and settings, not quality: kept in the ledger, left off the dashboard and the plots
COUNT_KEYS = ("n", "n_images", "n_captions", "n_real", "n_generated", "ddim_steps", "draws")


def flat_scalars(metrics: dict[str, dict]) -> dict[str, float]:
    """``{"task": {"top1": x}}`` → ``{"eval/task/top1": x}`` (numbers only, counts left out): the
    TensorBoard tags."""
    return {f"eval/{task}/{name}": float(value) for task, values in metrics.items() for name, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in COUNT_KEYS}


@dataclass
class WatchOptions:
    poll_s: float = 30.0
    once: bool = False  # evaluate what is complete now (and whatever completes meanwhile), then exit
    newest_first: bool = False  # when behind: newest checkpoint first (default: step order)
    device: str = "auto"  # auto: cuda when available, else cpu


class Evaluator:
    def __init__(self, checkpoints: str, eval_dir: str | Path, suite: SuiteConfig, options: WatchOptions | None = None):
        self.store = CheckpointStore(checkpoints)
        self.eval_dir = Path(eval_dir)
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        self.suite = suite
        self.options = options or WatchOptions()
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if self.options.device == "auto" else self.options.device
        self.ledger = Ledger(self.eval_dir / RESULTS)
        self.runner = SuiteRunner(suite, self.eval_dir / SAMPLES)
        self.scratch = self.eval_dir / ".scratch"
        self._writer = None
        self._stop = threading.Event()
        (self.eval_dir / WATCH_INFO).write_text(json.dumps({"checkpoints": self.store.display(), "suite": asdict(suite)}, indent=1))

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - imports tensorboard

            self._writer = SummaryWriter(log_dir=str(self.eval_dir / TENSORBOARD))
        return self._writer

    def pending(self) -> list[str]:
        """Complete checkpoints not in the ledger, in the order they will be evaluated."""
        done = self.ledger.tags()
        todo = [tag for tag in self.store.complete_tags() if tag not in done]
        return todo[::-1] if self.options.newest_first else todo

    def _lock(self) -> int:
        """An exclusive lock on ``EVAL_DIR/.lock`` for as long as :meth:`run` runs: two watchers on one
        ledger would both evaluate a checkpoint neither has recorded yet."""
        descriptor = os.open(self.eval_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 64, 0).decode(errors="replace").strip()
            os.close(descriptor)
            raise ValueError(f"another evaluator (pid {holder or '?'}) is writing {self.eval_dir}; stop it or give "
                             "another --out") from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, str(os.getpid()).encode(), 0)
        return descriptor

    def run(self) -> int:
        """Evaluate until stopped (``once``: until nothing is pending); returns how many were evaluated."""
        lock = self._lock()
        log.info("watching %s (%d already in %s); suite: %s", self.store.display(), len(self.ledger.records),
                 self.eval_dir / RESULTS, ", ".join(t.name for t in self.suite.tasks))
        evaluated = 0
        try:
            while True:
                try:
                    todo = self.pending()
                except Exception as error:  # noqa: BLE001 - a store blip: try again at the next poll
                    if not is_transient(error):
                        raise
                    log.warning("cannot list %s (%s); retrying in %.0f s", self.store.display(), error, self.options.poll_s)
                    todo = None
                if todo and not self._stop.is_set():
                    record = self.evaluate(todo[0])
                    evaluated += record is not None and record["status"] == "evaluated"
                    continue  # list again: newer checkpoints may have completed, older ones been pruned
                if (self.options.once and todo is not None) or self._stop.wait(self.options.poll_s):
                    return evaluated
        finally:
            self.close()
            os.close(lock)  # releases the lock

    def stop(self) -> None:
        """Ask :meth:`run` (in another thread) to return after the checkpoint in progress."""
        self._stop.set()

    def evaluate(self, tag: str) -> dict | None:
        """Evaluate one checkpoint and record the outcome; None when it should be retried later."""
        started = time.perf_counter()
        log.info("evaluating %s", self.store.display(tag))
        record = {"tag": tag, "step": int(tag.split("-")[1]), "checkpoint": self.store.display(tag)}
        try:
            result = self._evaluate(tag)
        except CheckpointGone as error:
            log.warning("skipped %s: %s", self.store.display(tag), error)
            record.update(status="deleted", error=str(error))
        except CheckpointError as error:
            log.error("skipped %s: %s", self.store.display(tag), error)
            record.update(status="corrupt", error=str(error))
        except Exception as error:  # noqa: BLE001 - the service outlives one bad checkpoint
            if is_transient(error):
                log.warning("%s: storage unreachable (%s); retrying at the next poll", self.store.display(tag), error)
                self._stop.wait(self.options.poll_s)
                return None
            if isinstance(error, (FileNotFoundError, OSError)) and not self.store.exists(tag, COMPLETE):
                log.warning("skipped %s: deleted while it was evaluated (keep-last-K?)", self.store.display(tag))
                record.update(status="deleted", error=f"{type(error).__name__}: {error}")
            else:
                log.exception("evaluating %s failed; recorded as failed (delete its line in %s to retry)",
                              self.store.display(tag), self.eval_dir / RESULTS)
                record.update(status="failed", error=f"{type(error).__name__}: {error}")
        else:
            record.update(status="evaluated", metrics=result.metrics, images=result.images)
            self._write_events(record["step"], result.metrics, result.images)
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
        record["seconds"] = round(time.perf_counter() - started, 3)
        record["time"] = time.time()
        self._pause_hook(record["step"])
        self.ledger.append(record)
        if record["status"] == "evaluated":
            summary = ", ".join(f"{k.removeprefix('eval/')}={v:.4g}" for k, v in flat_scalars(record["metrics"]).items())
            log.info("evaluated %s in %.1f s: %s", tag, record["seconds"], summary)
        return record

    def _evaluate(self, tag: str):
        from pretrain.evaluate import load_checkpoint  # noqa: PLC0415

        directory = fetch(self.store, tag, self.scratch, self.suite.use_ema)
        loaded = load_checkpoint(directory, device=self.device, use_ema=self.suite.use_ema)
        return self.runner.run(loaded)

    def _write_events(self, step: int, metrics: dict, images: dict) -> None:
        from PIL import Image  # noqa: PLC0415

        for name, value in flat_scalars(metrics).items():
            self.writer.add_scalar(name, value, step)
        for name, path in images.items():
            self.writer.add_image(f"eval/{name}", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    @staticmethod
    def _pause_hook(step: int) -> None:
        hook = os.environ.get(PAUSE_BEFORE_COMMIT_ENV, "")
        if hook and int(hook.split(":")[0]) == step:
            log.info("test hook: pausing %s s before recording step %d", hook.split(":")[1], step)
            time.sleep(float(hook.split(":")[1]))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
