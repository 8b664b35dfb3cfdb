"""How long a checkpoint blocks training: synchronous vs asynchronous saves.

A save writes DeepSpeed's shards and the inference folders to a local staging directory (this
blocks: the state must not change while it is written), then moves or uploads every file and writes
COMPLETE. Synchronous mode waits for all of it; async mode returns after the local write and does the
rest in a background thread while training continues. The target here is S3 (a local moto server,
as in the tests) or a local directory (``--target local``); staging is on tmpfs (/dev/shm) when present,
as on a node with fast local disk. Goal: async blocked time <= 0.1x sync.

    python benchmarks/bench_checkpoint.py [--quick] [--size tiny|small] [--saves N] [--target s3|local]

Prints a table, then one JSON object of the figures as the last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import CONFIGS_DIR, load_run_config  # noqa: E402


def start_s3() -> tuple[object, str]:
    """A moto S3 server on 127.0.0.1 with a bucket; its endpoint goes into the environment."""
    import fsspec  # noqa: PLC0415
    from moto.server import ThreadedMotoServer  # noqa: PLC0415

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{server._server.server_port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("bench")
    return server, "s3://bench"


def measure(mode: str, size: str, saves: int, steps_between: int, target: str, scratch: Path) -> dict:
    from pretrain.trainer import Trainer  # noqa: PLC0415

    staging_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else scratch
    staging = Path(tempfile.mkdtemp(prefix="diffdis-staging-", dir=staging_root))
    overrides = [f"train.batch_size=8", "train.log_every=1000", "train.ema_decay=0.999", "deepspeed=zero2",
                 f"train.async_checkpoint={'true' if mode == 'async' else 'false'}", f"train.checkpoint_staging_dir={staging}",
                 f"train.checkpoint_dir={target}/{mode}", "train.keep_last=2", f"train.steps={saves * steps_between}"]
    base = CONFIGS_DIR / ("tiny.yaml" if size == "tiny" else "model/small.yaml")
    trainer = Trainer(load_run_config(base, overrides), scratch / mode)
    blocked, total_bytes = [], 0
    try:
        for save in range(saves):
            for _ in range(steps_between):
                trainer.optimizer_step()
                trainer.counter.step += 1
            trainer.checkpointer.save(trainer.counter.step, trainer.save_extras)
            blocked.append(trainer.checkpointer.last_blocked_s)
        trainer.checkpointer.close()
        tags = trainer.store.complete_tags()
        marker = json.loads(trainer.store.read_text(tags[-1], "COMPLETE"))
        total_bytes = sum(entry["bytes"] for entry in marker["files"].values())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"blocked_ms": 1000 * statistics.median(blocked), "checkpoint_mb": total_bytes / 1e6, "complete": len(tags)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 saves (< 2 minutes on a 2-core CPU)")
    parser.add_argument("--size", default=None, choices=["tiny", "small"])
    parser.add_argument("--saves", type=int, default=None)
    parser.add_argument("--steps-between", type=int, default=2, help="training steps between saves (async overlaps them)")
    parser.add_argument("--target", default="s3", choices=["s3", "local"])
    args = parser.parse_args()
    size = args.size or ("tiny" if args.quick else "small")
    saves = args.saves or (3 if args.quick else 6)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto server request lines
    server = None
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as scratch:
        scratch = Path(scratch)
        if args.target == "s3":
            server, target = start_s3()
        else:
            target = str(scratch / "target")
        try:
            rows = {mode: measure(mode, size, saves, args.steps_between, target, scratch) for mode in ("sync", "async")}
        finally:
            if server is not None:
                server.stop()
    ratio = rows["async"]["blocked_ms"] / rows["sync"]["blocked_ms"]
    print(f"\ncheckpoint blocked time, {size} model (ZeRO-2, 1 process), target {args.target}, median of {saves} saves")
    print(f"{'mode':<6} {'blocked ms':>11} {'checkpoint MB':>14} {'complete':>9}")
    for mode, row in rows.items():
        print(f"{mode:<6} {row['blocked_ms']:>11.1f} {row['checkpoint_mb']:>14.2f} {row['complete']:>9}")
    print(f"async / sync = {ratio:.3f} (goal <= 0.1)")
    figures = {"benchmark": "bench_checkpoint", "size": size, "target": args.target, "saves": saves,
               "sync_blocked_ms": round(rows["sync"]["blocked_ms"], 2), "async_blocked_ms": round(rows["async"]["blocked_ms"], 2),
               "checkpoint_mb": round(rows["sync"]["checkpoint_mb"], 3), "async_over_sync": round(ratio, 4)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
