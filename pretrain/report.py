"""``diffdis report EVAL_DIR``: one static HTML page for people without TensorBoard.

Everything on it comes from files the evaluator and trainer already write: the ledger
(``EVAL_DIR/results.jsonl``), the sample grids it names, and the run's ``metrics.jsonl`` for the loss
curve (``pretrain.plots.plot_losses``). The page and its PNGs sit in one folder with relative links,
so it can be copied anywhere or opened from a file:// URL; it loads nothing from the network.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

from pretrain.evaluator import COUNT_KEYS, WATCH_INFO, read_results
from pretrain.plots import plot_losses

def _metric_names(records: list[dict], task: str) -> list[str]:
    names: list[str] = []
    for record in records:
        for name, value in record["metrics"].get(task, {}).items():
            if name not in names and name not in COUNT_KEYS and isinstance(value, (int, float)):
                names.append(name)
    return names


def plot_task(records: list[dict], task: str, out: Path) -> Path:
    """Every metric of ``task`` against the training step of the checkpoint, one line each."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axis = plt.subplots(figsize=(5, 3.2))
    for name in _metric_names(records, task):
        points = [(r["step"], r["metrics"][task][name]) for r in records if name in r["metrics"].get(task, {})]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=name)
    axis.set_title(task)
    axis.set_xlabel("training step")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def _find_run(eval_dir: Path) -> Path | None:
    """The run whose loss to show: EVAL_DIR's parent, or the parent of a local checkpoint root the
    watcher was given, when it holds metrics.jsonl."""
    candidates = [eval_dir.parent]
    info = eval_dir / WATCH_INFO
    if info.is_file():
        checkpoints = json.loads(info.read_text()).get("checkpoints", "")
        if "://" not in checkpoints:
            candidates.append(Path(checkpoints).parent)
    return next((c for c in candidates if (c / "metrics.jsonl").is_file()), None)


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def write_report(eval_dir: str | Path, out: str | Path | None = None, run_dir: str | Path | None = None) -> Path:
    """Write ``out/index.html`` (default ``EVAL_DIR/report``) with its PNGs; returns the page's path."""
    eval_dir = Path(eval_dir)
    records = read_results(eval_dir)
    if not records:
        raise FileNotFoundError(f"{eval_dir / 'results.jsonl'} has no results yet: run `diffdis evaluator watch ... --out {eval_dir}`")
    out = Path(out) if out is not None else eval_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    evaluated = [r for r in records if r["status"] == "evaluated"]
    tasks = [t for r in evaluated for t in r["metrics"]]
    tasks = list(dict.fromkeys(tasks))
    sections = [f"<h1>Evaluation report</h1><p>{len(evaluated)} checkpoint(s) evaluated, {len(records) - len(evaluated)} "
                f"skipped; ledger <code>{html.escape(str(eval_dir / 'results.jsonl'))}</code></p>"]

    run = Path(run_dir) if run_dir is not None else _find_run(eval_dir)
    if run is not None and (run / "metrics.jsonl").is_file():
        plot_losses(run / "metrics.jsonl", out / "loss.png")
        sections.append('<h2>Training loss</h2><img src="loss.png" alt="training loss">')

    if tasks:
        images = "".join(f'<img src="{html.escape(plot_task(evaluated, t, out / f"metric-{t}.png").name)}" alt="{html.escape(t)}">'
                         for t in tasks)
        sections.append(f"<h2>Metrics by training step</h2><div>{images}</div>")

    latest = next((r for r in reversed(evaluated) if r.get("images")), None)
    if latest is not None:
        grids = []
        for name, path in latest["images"].items():
            if Path(path).is_file():
                target = out / f"latest-{name}.png"
                shutil.copyfile(path, target)
                grids.append(f'<figure><img src="{target.name}" alt="{html.escape(name)}"><figcaption>{html.escape(name)}, '
                             f'step {latest["step"]}</figcaption></figure>')
        if grids:
            sections.append(f"<h2>Latest samples</h2>{''.join(grids)}")

    columns = [(t, m) for t in tasks for m in _metric_names(evaluated, t)]
    header = "".join(f"<th>{html.escape(t)}<br>{html.escape(m)}</th>" for t, m in columns)
    rows = []
    for record in records:
        cells = "".join(f"<td>{_cell(record.get('metrics', {}).get(t, {}).get(m, ''))}</td>" for t, m in columns)
        note = html.escape(record.get("error", ""))
        rows.append(f"<tr><td>{record['step']}</td><td>{html.escape(record['status'])}</td><td>{record.get('seconds', '')}</td>"
                    f"{cells}<td>{note}</td></tr>")
    sections.append(f"<h2>Every checkpoint</h2><table><tr><th>step</th><th>status</th><th>seconds</th>{header}"
                    f"<th>note</th></tr>{''.join(rows)}</table>")

    style = ("body{font-family:sans-serif;margin:2em;color:#222}img{margin:4px;border:1px solid #ddd;max-width:100%}"
             "figure{display:inline-block;margin:0 1em 1em 0}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>DiffDis evaluation</title>'
            f'<link rel="icon" href="data:,"><style>{style}</style></head><body>{"".join(sections)}</body></html>')
    index = out / "index.html"
    index.write_text(page)
    return index
