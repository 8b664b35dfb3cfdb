"""Step time of DeepSpeed ZeRO-1/2/3 against plain torch DDP, same model, same batch, 2 processes.

ZeRO trades step time for memory (stage 1 partitions the optimizer state, 2 also the gradients,
3 also the weights); the goal here is ZeRO-2 within 1.2x of DDP. On CPU the processes talk over
gloo in fp32; on CUDA over NCCL in bf16, and the table adds peak memory per rank and MFU
(model FLOPs from torch's FlopCounterMode over the device's peak bf16 rate).

    python benchmarks/bench_zero.py [--quick] [--size tiny|small|sd-base] [--batch N] [--nproc 2]

Prints a table, then one JSON object of the figures as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_step import build, count_flops, make_batch  # noqa: E402
from cluster.env import free_port  # noqa: E402
from pretrain.engine import (  # noqa: E402
    Runtime, build_optimizer, deepspeed_config, default_extensions_dir, register_external_parameters,
    shutdown_distributed,
)

MODES = ["ddp", "zero1", "zero2", "zero3"]
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def time_mode(mode: str, size: str, micro: int, iterations: int, rank: int, world: int, device: torch.device) -> dict:
    objective, _, config = build(size, "unified", device)
    objective.rank, objective.world_size = rank, world
    bf16 = device.type == "cuda"
    config.train.batch_size = micro * world
    config.optim.grad_clip = 0.0
    optimizer, schedule = build_optimizer(objective, config.optim, total_steps=10**6)
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if bf16 else None)

        def step(batch):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    else:
        import deepspeed  # noqa: PLC0415

        config.deepspeed.zero_stage = int(mode[-1])
        ds_config = deepspeed_config(config, world, Runtime(device, "nccl" if bf16 else "gloo", bf16))
        engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
        if config.deepspeed.zero_stage == 3:
            register_external_parameters(objective)

        def step(batch):
            engine.backward(engine(**batch)["loss"])
            engine.step()
    torch.manual_seed(rank)
    batch = make_batch(config, micro, device)
    if bf16:
        batch["pixels"] = batch["pixels"].to(torch.bfloat16) if mode != "ddp" else batch["pixels"]
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step(batch)
    times = []
    for _ in range(iterations):
        if bf16:
            torch.cuda.synchronize()
        dist.barrier()
        started = time.perf_counter()
        step(batch)
        if bf16:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    slowest = torch.tensor([statistics.median(times)])
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    row = {"ms": 1000 * float(slowest)}
    if bf16:
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(rank)
    import deepspeed  # noqa: PLC0415

    deepspeed.utils.logger.setLevel("WARNING")
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    rows = {}
    for size in args.sizes:
        for mode in MODES:
            rows[f"{size}/{mode}"] = time_mode(mode, size, args.batch, args.iterations, rank, world, device)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    shutdown_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, few iterations (< 2 minutes on a 2-core CPU)")
    parser.add_argument("--size", action="append", choices=["tiny", "small", "sd-base"],
                        help="model size (repeatable; default tiny on CPU, small and sd-base on CUDA)")
    parser.add_argument("--batch", type=int, default=8, help="micro batch per process")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    args.sizes = args.size or (["tiny"] if args.quick or not cuda else ["small", "sd-base"])
    args.iterations = args.iterations or (5 if args.quick else 20)
    if cuda:
        args.nproc = min(args.nproc, torch.cuda.device_count())
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "rows.json")
        mp.spawn(worker, args=(args.nproc, free_port(), args, out), nprocs=args.nproc, join=True)
        rows = json.loads(Path(out).read_text())

    figures = {"benchmark": "bench_zero", "device": "cuda" if cuda else "cpu", "nproc": args.nproc,
               "micro_batch": args.batch, "iterations": args.iterations, "precision": "bf16" if cuda else "fp32"}
    peak = peak_flops()
    print(f"\nstep time, {args.nproc} processes, micro batch {args.batch}, {figures['device']} {figures['precision']}, "
          f"median of {args.iterations} (slowest rank)")
    print(f"{'size/mode':<16} {'ms/step':>9} {'x DDP':>7} {'samples/s':>10} {'peak GiB':>9} {'MFU':>6}")
    for size in args.sizes:
        flops = None
        if cuda:
            objective, optimizer, config = build(size, "unified", torch.device("cuda", 0))
            flops = count_flops(objective, optimizer, make_batch(config, args.batch, torch.device("cuda", 0)))
            del objective, optimizer
        ddp = rows[f"{size}/ddp"]["ms"]
        for mode in MODES:
            row = rows[f"{size}/{mode}"]
            ratio = row["ms"] / ddp
            throughput = args.batch * args.nproc / (row["ms"] / 1000)
            mfu = flops / (row["ms"] / 1000) / peak if (flops and peak) else None
            mem = row.get("peak_mem_gib")
            print(f"{size + '/' + mode:<16} {row['ms']:>9.1f} {ratio:>7.2f} {throughput:>10.1f} "
                  f"{'-' if mem is None else f'{mem:.2f}':>9} {'-' if mfu is None else f'{mfu:.1%}':>6}")
            prefix = f"{size}_{mode}"
            figures[f"{prefix}_ms"] = round(row["ms"], 2)
            figures[f"{prefix}_x_ddp"] = round(ratio, 3)
            figures[f"{prefix}_samples_per_s"] = round(throughput, 2)
            if mem is not None:
                figures[f"{prefix}_peak_mem_gib"] = round(mem, 3)
            if mfu is not None:
                figures[f"{prefix}_mfu"] = round(mfu, 4)
    first = args.sizes[0]
    print(f"ZeRO-2 / DDP = {figures[f'{first}_zero2_x_ddp']:.2f} (goal <= 1.2)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
