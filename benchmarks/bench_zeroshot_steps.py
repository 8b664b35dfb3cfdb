"""Zero-shot accuracy and images/s versus DDIM steps and guidance of the query chain (issue 11, item 3).

The paper names slow discriminative inference as its limit: one reverse chain per image. Here the chain
length and the guidance weight are swept on one checkpoint's held-out set. ``ddim_sampler`` uses
"trailing" spacing, so the 1-step chain IS the direct x0 mode: one forward at t = T−1 from pure noise,
whose ê_0 prediction is used as is.

    python benchmarks/bench_zeroshot_steps.py RUN_OR_CHECKPOINT [--steps 1,2,4,10,50] [--guidance 0,1]
        [--limit N] [--plot out.png] [--quick]

Prints a table, then one JSON line with every row and, per guidance, the fewest steps within 1 point of
the 50-step (longest) accuracy and its speed-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.digits import class_prompts  # noqa: E402
from pretrain.checkpoint_fetch import local_checkpoint  # noqa: E402
from pretrain.eval_metrics import classification_metrics  # noqa: E402
from pretrain.evaluate import heldout_data, load_checkpoint  # noqa: E402
from pretrain.inference import class_queries, image_queries  # noqa: E402


def sweep(loaded, steps_list: list[int], guidances: list[float], limit: int | None, seed: int = 0) -> list[dict]:
    pixels, labels, _ = heldout_data(loaded.config)
    pixels, labels = pixels[:limit], labels[:limit]
    classes = class_queries(loaded.model, loaded.tokenizer, class_prompts())
    rows = []
    for guidance in guidances:
        for steps in steps_list:
            image_queries(loaded.model, pixels[:8], loaded.config.diffusion, steps, guidance, seed=seed)  # warm-up
            started = time.perf_counter()
            queries = image_queries(loaded.model, pixels, loaded.config.diffusion, steps, guidance,
                                    batch_size=loaded.config.eval.batch_size, seed=seed)
            seconds = time.perf_counter() - started
            metrics = classification_metrics(queries @ classes.T.to(queries.device), labels)
            rows.append({"steps": steps, "guidance": guidance, "top1": metrics["top1"], "top5": metrics["top5"],
                         "images_per_s": len(pixels) / seconds, "seconds": seconds, "n": len(pixels)})
    return rows


def summary(rows: list[dict]) -> dict:
    """Per guidance: the fewest steps within 1 point of the longest chain's top-1, and its speed-up."""
    result = {}
    for guidance in sorted({r["guidance"] for r in rows}):
        group = sorted((r for r in rows if r["guidance"] == guidance), key=lambda r: r["steps"])
        longest = group[-1]
        good = next(r for r in group if r["top1"] >= longest["top1"] - 0.01)
        result[str(guidance)] = {"reference_steps": longest["steps"], "reference_top1": longest["top1"],
                                 "fewest_steps_within_1pt": good["steps"], "top1": good["top1"],
                                 "speedup": good["images_per_s"] / longest["images_per_s"]}
    return result


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for guidance in sorted({r["guidance"] for r in rows}):
        group = sorted((r for r in rows if r["guidance"] == guidance), key=lambda r: r["steps"])
        left.plot([r["steps"] for r in group], [r["top1"] for r in group], marker="o", label=f"w={guidance:g}")
        right.plot([r["steps"] for r in group], [r["images_per_s"] for r in group], marker="o", label=f"w={guidance:g}")
    for axis, title in ((left, "zero-shot top-1"), (right, "images/s")):
        axis.set_xscale("log")
        axis.set_xlabel("DDIM steps of the query chain (1 = direct x0)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--steps", default="1,2,4,10,50")
    parser.add_argument("--guidance", default="0,1")
    parser.add_argument("--limit", type=int, default=None, help="first N held-out images")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="steps 1,2,4,10; guidance 0; 120 images")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.guidance, args.limit = "1,2,4,10", "0", args.limit or 120
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with local_checkpoint(args.checkpoint) as (directory, url):
        loaded = load_checkpoint(directory, device="cuda" if torch.cuda.is_available() else "cpu")
    rows = sweep(loaded, [int(s) for s in args.steps.split(",")], [float(g) for g in args.guidance.split(",")], args.limit)
    print(f"checkpoint {url or loaded.path} (step {loaded.step}), {rows[0]['n']} held-out images")
    print(f"{'guidance':>8} {'steps':>5} {'top1':>7} {'top5':>7} {'img/s':>9}")
    for row in rows:
        print(f"{row['guidance']:>8g} {row['steps']:>5} {row['top1']:>7.3f} {row['top5']:>7.3f} {row['images_per_s']:>9.1f}")
    if args.plot:
        plot(rows, args.plot)
    print(json.dumps({"checkpoint": url or str(loaded.path), "step": loaded.step, "rows": rows, "summary": summary(rows)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
