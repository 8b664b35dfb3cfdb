"""Training metrics out: ``RUN/metrics.jsonl`` (one JSON object per line, for scripts) and TensorBoard
scalars under ``RUN/tensorboard`` (for people). Rank 0 only; other ranks' records are dropped.

A name that already has a group (``health/query_spread``) keeps it, so the training-health numbers get
their own ``health`` section on the dashboard; every other name goes under ``train/``.

Two kinds of line in metrics.jsonl: step records (``step``, losses, ``lr``, ...) and guard event records
(``step``, ``event``, ``value``, ``action``; see pretrain/guard.py). Readers tell them apart by ``event``."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


class Monitor:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.metrics_file = run_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - imports tensorboard

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        """Append ``record`` (must hold ``step``) to metrics.jsonl and write its numbers as scalars
        ``train/<name>`` (``<group>/<name>`` as given when the name has a group)."""
        if not self.enabled:
            return
        with self.metrics_file.open("a") as handle:  # non-finite numbers as null: the line stays valid JSON
            handle.write(json.dumps({k: _finite_or_none(v) for k, v in record.items()}) + "\n")
        step = int(record["step"])
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(name if "/" in name else f"train/{name}", value, step)

    def event(self, record: dict, totals: dict[str, int]) -> None:
        """An event record (``{"step", "event", "value", "action", ...}``) into metrics.jsonl, and the
        running ``totals`` as TensorBoard counters ``guard/<name>``."""
        if not self.enabled:
            return
        with self.metrics_file.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        for name, count in totals.items():
            self.writer.add_scalar(f"guard/{name}", count, int(record["step"]))
        self.writer.flush()

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
