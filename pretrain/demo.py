"""``diffdis demo``: the whole flow that exists so far, on embedded defaults, locally on CPU.

built-in digits → train (DeepSpeed engine, checkpoints) → zero-shot + retrieval on held-out digits →
a sample grid and a loss plot. Rerunning with the same ``--out`` resumes and re-evaluates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pretrain.config import CONFIGS_DIR, load_run_config
from pretrain.evaluate import evaluate, load_checkpoint, sample_grid
from pretrain.plots import plot_losses
from pretrain.trainer import Trainer

DEMO_CONFIG = CONFIGS_DIR / "demo.yaml"
DEMO_PROMPTS = [f"a handwritten digit {word}" for word in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]


def run_demo(out_dir: str | Path, overrides: list[str] = ()) -> dict:
    started = time.perf_counter()
    out_dir = Path(out_dir)
    run_dir = out_dir / "run"
    config = load_run_config(DEMO_CONFIG, overrides)
    Trainer(config, run_dir, resume="auto").train()
    train_s = time.perf_counter() - started
    loaded = load_checkpoint(run_dir)
    zeroshot = evaluate(loaded, "zeroshot")
    retrieval = evaluate(loaded, "retrieval")
    samples = sample_grid(loaded, DEMO_PROMPTS, out_dir / "samples.png", per_prompt=8)
    losses = plot_losses(run_dir / "metrics.jsonl", out_dir / "loss.png")
    summary = {
        "zeroshot_top1": zeroshot["top1"],
        "zeroshot_top5": zeroshot["top5"],
        "retrieval": {k: v for k, v in retrieval.items() if k.startswith(("i2t", "t2i"))},
        "checkpoint_step": loaded.step,
        "train_s": round(train_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "run_dir": str(run_dir),
        "checkpoint": str(loaded.path),
        "metrics": str(run_dir / "metrics.jsonl"),
        "samples_png": str(samples),
        "loss_png": str(losses),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["summary_json"] = str(out_dir / "summary.json")
    return summary
