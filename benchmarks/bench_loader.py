"""Shard loader throughput vs the training step's consumption (samples/s), per model size.

The loader must never be what a step waits for: the goal is loader samples/s >= 5x what one training
step (forward + backward + AdamW of the unified objective, no DeepSpeed) consumes on the same machine.
Shards are written to a temporary directory in img2dataset's layout (JPEG + caption + JSON), at the
model's image size, and read back with ``ShardStream`` (decode, shuffle buffer, position tracking) with
``num_workers`` 0 and 2.

    python benchmarks/bench_loader.py [--quick] [--sizes tiny small] [--batch N]

Prints a table, then one JSON object of the figures as the last line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from data_pipeline.loader import ShardStream
from pretrain.config import CONFIGS_DIR, load_run_config
from pretrain.diffusion import DiffDisObjective
from pretrain.model import DiffDisModel, TokenizerSpec


def write_shards(directory: str, image_size: int, shards: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    for shard in range(shards):
        with wds.TarWriter(os.path.join(directory, f"part-{shard:06d}.tar")) as writer:
            for index in range(per_shard):
                buffer = io.BytesIO()
                pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                key = f"{shard:04d}{index:05d}"
                writer.write({"__key__": key, "jpg": buffer.getvalue(), "txt": f"a photo of thing {index}",
                              "json": {"key": key, "status": "success", "width": image_size, "height": image_size}})


def loader_rate(directory: str, image_size: int, workers: int, samples: int) -> float:
    """Samples/s over ``samples`` samples after the first (worker start-up of later epochs included)."""
    stream = ShardStream(directory, seed=0, num_workers=workers, shuffle_buffer=100, image_size=image_size)
    next(stream)
    started = time.perf_counter()
    for _ in range(samples):
        next(stream)
    elapsed = time.perf_counter() - started
    stream.close()
    return samples / elapsed


def step_rate(size: str, batch: int, iterations: int, device: torch.device) -> tuple[float, int]:
    """Samples/s of the unified training step (bench_step.py's measurement), and the image size."""
    config = load_run_config(CONFIGS_DIR / "model" / f"{size}.yaml")
    torch.manual_seed(0)
    model = DiffDisModel(replace(config.model), TokenizerSpec(1000, 2, 1, 0))
    objective = DiffDisObjective(model, config.diffusion, config.loss).to(device)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, 1000, (batch, config.model.text_encoder.max_length))
    ids[:, -1] = 1
    image = config.model.image_size
    inputs = {"input_ids": ids.to(device), "pixels": (torch.rand(batch, 3, image, image) * 2 - 1).to(device)}
    times = []
    for index in range(iterations + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = objective(**inputs)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= 1:  # warm-up
            times.append(time.perf_counter() - started)
    return batch / statistics.median(times), image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shards, few steps (under 2 minutes on a 2-core CPU)")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "sd-base"])
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shards, per_shard = (4, 128) if args.quick else (8, 512)
    samples = 400 if args.quick else 3000
    iterations = 2 if args.quick else 10

    rows = {}
    for size in args.sizes:
        consume, image = step_rate(size, args.batch, iterations, device)
        with tempfile.TemporaryDirectory() as directory:
            write_shards(directory, image, shards, per_shard)
            rates = {workers: loader_rate(directory, image, workers, samples) for workers in (0, 2)}
        rows[size] = {"image": image, "step": consume, "w0": rates[0], "w2": rates[2]}

    print(f"\nloader vs training step, batch {args.batch}, {device.type} ({platform.processor() or platform.machine()}), "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}; {shards} shards x {per_shard} JPEG samples, {samples} read")
    print(f"{'size':<8} {'image':>6} {'step samples/s':>15} {'loader w=0':>11} {'loader w=2':>11} {'ratio w=0':>10} {'ratio w=2':>10}")
    for size, row in rows.items():
        print(f"{size:<8} {row['image']:>6} {row['step']:>15.0f} {row['w0']:>11.0f} {row['w2']:>11.0f} "
              f"{row['w0'] / row['step']:>10.1f} {row['w2'] / row['step']:>10.1f}")
    best = min(max(row["w0"], row["w2"]) / row["step"] for row in rows.values())
    print(f"smallest loader/step ratio (best worker count) = {best:.1f} (goal: >= 5)")
    figures = {"benchmark": "bench_loader", "device": device.type, "batch": args.batch, "quick": args.quick,
               "cpus": os.cpu_count(), "samples_read": samples}
    for size, row in rows.items():
        figures.update({f"{size}_image": row["image"], f"{size}_step_samples_per_s": round(row["step"], 1),
                        f"{size}_loader_w0_samples_per_s": round(row["w0"], 1),
                        f"{size}_loader_w2_samples_per_s": round(row["w2"], 1),
                        f"{size}_ratio_w0": round(row["w0"] / row["step"], 2), f"{size}_ratio_w2": round(row["w2"] / row["step"], 2)})
    figures["min_ratio"] = round(best, 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
