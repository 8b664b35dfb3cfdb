"""``diffdis demo``: the whole flow on embedded defaults, locally on CPU.

built-in digits → WebDataset shards (Ray pipeline, ``OUT/shards``) → train from the shards (streaming
loader, DeepSpeed engine, checkpoints) → zero-shot + retrieval on held-out digits → a sample grid and
a loss plot → the evaluator (``diffdis evaluator watch --once`` with the digits suite) over the kept
checkpoints, and its HTML report. Every stage is idempotent: rerunning with the same ``--out`` finds the shards whole,
resumes training from the newest complete checkpoint and re-evaluates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from data_pipeline.pipeline import run_pipeline
from data_pipeline.shard_config import ShardConfig
from pretrain.config import CONFIGS_DIR, load_run_config
from pretrain.config_io import load_config
from pretrain.evaluate import evaluate, load_checkpoint, sample_grid
from pretrain.evaluator import Evaluator, WatchOptions
from pretrain.plots import plot_losses
from pretrain.report import write_report
from pretrain.suite import load_suite
from pretrain.trainer import Trainer

DEMO_CONFIG = CONFIGS_DIR / "demo.yaml"
DEMO_SHARDS_CONFIG = CONFIGS_DIR / "data" / "digits.yaml"
DEMO_PROMPTS = [f"a handwritten digit {word}" for word in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]


def run_demo(out_dir: str | Path, overrides: list[str] = ()) -> dict:
    started = time.perf_counter()
    out_dir = Path(out_dir)
    run_dir = out_dir / "run"
    shards_dir = out_dir / "shards"
    shard_summary = run_pipeline(load_config(ShardConfig, DEMO_SHARDS_CONFIG), str(shards_dir))
    shard_s = time.perf_counter() - started
    config = load_run_config(DEMO_CONFIG, ["data.source=shards", f"data.shards={shards_dir}", *overrides])
    Trainer(config, run_dir, resume="auto").train()
    train_s = time.perf_counter() - started
    loaded = load_checkpoint(run_dir)
    zeroshot = evaluate(loaded, "zeroshot")
    retrieval = evaluate(loaded, "retrieval")
    samples = sample_grid(loaded, DEMO_PROMPTS, out_dir / "samples.png", per_prompt=8)
    losses = plot_losses(run_dir / "metrics.jsonl", out_dir / "loss.png")
    eval_dir = run_dir / "eval"  # the watcher's ledger makes a rerun evaluate only new checkpoints
    Evaluator(str(run_dir / "checkpoints"), eval_dir, load_suite(), WatchOptions(once=True)).run()
    report = write_report(eval_dir)
    summary = {
        "zeroshot_top1": zeroshot["top1"],
        "zeroshot_top5": zeroshot["top5"],
        "retrieval": {k: v for k, v in retrieval.items() if k.startswith(("i2t", "t2i"))},
        "checkpoint_step": loaded.step,
        "shards": {"dir": str(shards_dir), "shards": shard_summary.shards, "samples": shard_summary.samples,
                   "counts": dict(shard_summary.counts), "shard_s": round(shard_s, 1)},
        "train_s": round(train_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "run_dir": str(run_dir),
        "checkpoint": str(loaded.path),
        "metrics": str(run_dir / "metrics.jsonl"),
        "samples_png": str(samples),
        "loss_png": str(losses),
        "eval_dir": str(eval_dir),
        "report_html": str(report),
        "dashboard": f"diffdis dashboard {run_dir}",
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["summary_json"] = str(out_dir / "summary.json")
    return summary
