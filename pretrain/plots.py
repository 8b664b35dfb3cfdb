"""Plots people would rather look at than numbers: the loss curves of a run."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The step records of a metrics.jsonl (guard event records, which carry ``event``, are left out)."""
    with Path(path).open() as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [r for r in records if "event" not in r]


def plot_losses(metrics_file: str | Path, out: str | Path) -> Path:
    """Total, generation and alignment loss against step, one panel each, saved as PNG."""
    import matplotlib  # noqa: PLC0415 - plotting is optional at import time

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    records = read_metrics(metrics_file)
    steps = [r["step"] for r in records]
    keys = [k for k in ("loss", "loss_gen", "loss_align") if records and k in records[0]]
    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for axis, key in zip(axes[0], keys):
        axis.plot(steps, [float("nan") if r[key] is None else r[key] for r in records])  # null: non-finite
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    out = Path(out)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
