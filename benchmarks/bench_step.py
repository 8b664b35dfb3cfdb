"""Step time of unified DiffDis vs the gen-only and dis-only baselines, beside their FLOP ratio.

The alignment pass runs only the joint stream and the head, so the unified step's unavoidable extra
cost over gen-only is the FLOP ratio; the goal is a measured time ratio within 10% of it.
Forward + backward + AdamW step of the training objective (no DeepSpeed: this measures the model).

    python benchmarks/bench_step.py [--quick] [--size tiny|small|sd-base] [--batch N]

Prints a table, then one JSON object of the figures as the last line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import CONFIGS_DIR, load_run_config
from pretrain.diffusion import DiffDisObjective
from pretrain.model import DiffDisModel, TokenizerSpec

VARIANTS = {
    "gen-only": dict(discrimination=False),
    "dis-only": dict(generation=False),
    "unified": dict(),
}


def build(size: str, variant: str, device: torch.device):
    config = load_run_config(CONFIGS_DIR / "model" / f"{size}.yaml")
    torch.manual_seed(0)
    model = DiffDisModel(replace(config.model, **VARIANTS[variant]), TokenizerSpec(1000, 2, 1, 0))
    loss = replace(config.loss, align_weight=0.0 if variant == "gen-only" else config.loss.align_weight)
    objective = DiffDisObjective(model, config.diffusion, loss).to(device)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-4)
    return objective, optimizer, config


def make_batch(config, batch: int, device: torch.device) -> dict:
    length = config.model.text_encoder.max_length
    ids = torch.randint(3, 1000, (batch, length))
    ids[:, -1] = 1  # EOS, where the text encoder pools
    size = config.model.image_size
    return {"input_ids": ids.to(device), "pixels": (torch.rand(batch, 3, size, size) * 2 - 1).to(device)}


def step(objective, optimizer, batch, autocast: bool) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = objective(**batch)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def count_flops(objective, optimizer, batch) -> int:
    with FlopCounterMode(display=False) as counter:
        torch.manual_seed(0)
        loss = objective(**batch)["loss"]
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def time_steps(objective, optimizer, batch, iterations: int, warmup: int, device: torch.device) -> list[float]:
    autocast = device.type == "cuda"
    for _ in range(warmup):
        step(objective, optimizer, batch, autocast)
    times = []
    for _ in range(iterations):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        step(objective, optimizer, batch, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few iterations (under 2 minutes on a 2-core CPU)")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "sd-base"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    iterations = args.iterations or (5 if args.quick else 20)

    rows = {}
    for variant in VARIANTS:
        objective, optimizer, config = build(args.size, variant, device)
        batch = make_batch(config, args.batch, device)
        flops = count_flops(objective, optimizer, batch)
        times = time_steps(objective, optimizer, batch, iterations, warmup=2, device=device)
        rows[variant] = {"ms": 1000 * statistics.median(times), "gflop": flops / 1e9}
        del objective, optimizer

    base = rows["gen-only"]
    print(f"\nstep time, {args.size} model, batch {args.batch}, {device.type} ({platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, median of {iterations}")
    print(f"{'variant':<10} {'ms/step':>10} {'x gen-only':>11} {'GFLOP/step':>11} {'FLOP x gen-only':>16}")
    for name, row in rows.items():
        print(f"{name:<10} {row['ms']:>10.1f} {row['ms'] / base['ms']:>11.2f} {row['gflop']:>11.2f} "
              f"{row['gflop'] / base['gflop']:>16.2f}")
    time_ratio = rows["unified"]["ms"] / base["ms"]
    flop_ratio = rows["unified"]["gflop"] / base["gflop"]
    print(f"unified time ratio / FLOP ratio = {time_ratio / flop_ratio:.3f} (goal: within 10% of 1.0)")
    figures = {
        "benchmark": "bench_step", "size": args.size, "batch": args.batch, "device": device.type,
        "iterations": iterations,
        **{f"{name}_ms": round(row["ms"], 2) for name, row in rows.items()},
        **{f"{name}_gflop": round(row["gflop"], 3) for name, row in rows.items()},
        "unified_time_ratio": round(time_ratio, 3), "unified_flop_ratio": round(flop_ratio, 3),
        "time_over_flop_ratio": round(time_ratio / flop_ratio, 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
