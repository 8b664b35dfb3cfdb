"""``diffdis``: the command line. Each subcommand parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from cluster import ClusterError
from pretrain.config_io import ConfigError

EPILOG_OVERRIDES = (
    "Config overrides are dotted KEY=VALUE pairs after the options, parsed as YAML values, e.g.\n"
    "  train.steps=50 model.unet.block_channels=[32,64] optim.lr=2e-3\n"
    "Unknown keys and wrong types are rejected with the key's name."
)


def _setup_logging(verbose: bool) -> None:
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID", "0")  # srun sets only SLURM_PROCID
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _print_json(record: dict) -> None:
    print(json.dumps(record))


def cmd_train(args: argparse.Namespace) -> int:
    from cluster.preemption import REQUEUE_EXIT_CODE, catch_early  # noqa: PLC0415

    catch_early()  # a SIGUSR1 during the slow start-up below must not kill the rank (cluster/preemption.py)
    from pretrain.config import load_run_config  # noqa: PLC0415 - keep --help fast

    config = load_run_config(args.config, args.overrides)  # bad config: exit 2 before any process starts
    if args.nproc is not None:  # the launched processes run the same command without --nproc
        from pretrain.launch import launch_local  # noqa: PLC0415

        return launch_local(args.nproc, _without_nproc(args.argv))
    from pretrain.engine import shutdown_distributed  # noqa: PLC0415
    from pretrain.guard import DIVERGED_EXIT_CODE, TrainingDivergedError  # noqa: PLC0415
    from pretrain.trainer import Trainer  # noqa: PLC0415

    trainer = Trainer(config, args.out, resume=args.resume)
    try:
        last = trainer.train()
    except TrainingDivergedError as error:  # every rank stops at the same step with the same message
        if trainer.dist.is_main:
            print(f"diffdis train: error: {error}; exiting with {DIVERGED_EXIT_CODE}", file=sys.stderr)
        return DIVERGED_EXIT_CODE
    preempted, is_main = trainer.preempted, trainer.dist.is_main
    trainer.engine.destroy()
    del trainer  # the engine holds DeepSpeed's process groups: drop it before they are destroyed
    shutdown_distributed()
    if preempted:
        print(f"preempted: checkpoint {last}; exiting with {REQUEUE_EXIT_CODE} (requeue, then --resume auto)")
        return REQUEUE_EXIT_CODE
    if is_main:
        print(f"run directory: {args.out}\nlatest checkpoint: {last}")
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line each launched process runs: this one without ``--nproc N``."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            kept.append(item)
    return kept


def cmd_export(args: argparse.Namespace) -> int:
    from pretrain.export import export_checkpoint  # noqa: PLC0415

    out = export_checkpoint(args.checkpoint, args.out, use_ema=not args.no_ema)
    print(f"exported {out['weights']} weights of {out['checkpoint']} to {out['out']}")
    _print_json(out)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pretrain.checkpoint_fetch import local_checkpoint  # noqa: PLC0415
    from pretrain.evaluate import evaluate, load_checkpoint, sample_grid  # noqa: PLC0415

    suite = None
    if args.suite is not None:
        from pretrain.suite import SuiteRunner, load_suite  # noqa: PLC0415

        suite = load_suite(args.suite)
    with local_checkpoint(args.checkpoint, use_ema=True if suite is None else suite.use_ema) as (directory, url):
        loaded = load_checkpoint(directory, use_ema=True if suite is None else suite.use_ema)
    where = url or str(loaded.path)  # a download's temporary folder is gone: name the URL
    if suite is not None:
        outcome = SuiteRunner(suite, args.images).run(loaded)
        result = {"checkpoint": where, "checkpoint_step": outcome.step, "metrics": outcome.metrics,
                  "images": outcome.images}
    elif args.task == "sample":
        out = sample_grid(loaded, args.prompt or ["a handwritten digit seven"], args.out, steps=args.steps, guidance=args.guidance)
        result = {"task": "sample", "path": str(out), "checkpoint_step": loaded.step}
    else:
        result = evaluate(loaded, args.task, steps=args.steps, guidance=args.guidance)
        result["checkpoint"] = where
    if args.json:
        _print_json(result)
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value:.4f}" if isinstance(value, float) else f"{key:>16}: {value}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from pretrain.checkpoint_fetch import local_checkpoint  # noqa: PLC0415
    from pretrain.evaluate import load_checkpoint, sample_grid  # noqa: PLC0415

    with local_checkpoint(args.checkpoint) as (directory, _):
        loaded = load_checkpoint(directory)
    out = sample_grid(loaded, args.prompt, args.out, per_prompt=args.per_prompt, steps=args.steps,
                      guidance=args.guidance, seed=args.seed)
    print(f"wrote {out} ({len(args.prompt)} prompt(s) x {args.per_prompt} samples, checkpoint step {loaded.step})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pretrain.demo import run_demo  # noqa: PLC0415

    summary = run_demo(args.out, args.overrides)
    print(f"\nDemo finished in {summary['wall_s']:.0f} s. Held-out zero-shot top-1 {summary['zeroshot_top1']:.1%}.")
    for key in ("run_dir", "checkpoint", "metrics", "samples_png", "loss_png", "eval_dir", "report_html", "dashboard",
                "summary_json"):
        print(f"  {key:>12}: {summary[key]}")
    _print_json(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffdis",
        description="Pretrain and evaluate DiffDis: one diffusion model that generates images from text "
        "and classifies / retrieves image-text pairs by diffusing the text embedding.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    train = sub.add_parser("train", help="train a model", formatter_class=fmt, epilog=EPILOG_OVERRIDES,
                           description="Train DiffDis with the DeepSpeed engine. Writes RUN/config.yaml, "
                           "RUN/metrics.jsonl, RUN/checkpoints/step-NNNNNNNNN/ (COMPLETE written last) and RUN/checkpoints/latest.")
    train.add_argument("--config", type=Path, help="run config YAML (default: embedded defaults, the tiny model)")
    train.add_argument("--out", type=Path, required=True, help="run directory")
    train.add_argument("--resume", default=None, metavar="auto|CHECKPOINT",
                       help="'auto': continue from the newest complete checkpoint in --out (fresh start if none); "
                       "or a checkpoint directory")
    train.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="start N local processes (one per GPU, or CPU processes on gloo). Not needed under "
                       "torchrun/srun/Kubernetes, which set RANK/WORLD_SIZE (or SLURM_PROCID/SLURM_NTASKS) themselves. "
                       "After SIGTERM/SIGUSR1 every rank finishes its step, checkpoints and the command exits 75 "
                       "(requeue; rerun with --resume auto). When the NaN/loss-spike guard (train.guard) runs out "
                       "of rollbacks the command exits 65 (do not requeue: the run diverges)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    train.set_defaults(func=cmd_train)

    export = sub.add_parser("export", help="consolidate a checkpoint into an inference folder (safetensors)",
                            description="Write one folder that pretrain.model.load_pretrained loads without DeepSpeed: "
                            "model.safetensors (the EMA weights when the run kept them; --no-ema for the trained "
                            "weights, consolidated from the ZeRO shards), config.json, tokenizer/ and the run's config.yaml. "
                            "Prints a JSON summary as the last line.")
    export.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a run directory (its newest complete checkpoint) "
                        "or a checkpoint directory")
    export.add_argument("--out", type=Path, required=True, help="output folder")
    export.add_argument("--no-ema", action="store_true", help="export the trained weights, not their EMA")
    export.set_defaults(func=cmd_export)

    evaluate = sub.add_parser("eval", help="evaluate one checkpoint", formatter_class=fmt,
                              description="Evaluate a checkpoint (or a run's newest complete one) on held-out data.\n"
                              "  zeroshot : top-1/top-5 from the image-conditioned text-query chain (a CLIP model: its image\n"
                              "             embeddings) vs class prompt ensembles\n"
                              "  retrieval: image->text and text->image recall@1/5/10\n"
                              "  sample   : a grid of generated images (--prompt, --out)")
    evaluate.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a run directory, a checkpoint directory, "
                          "an exported folder, or an s3:// checkpoint / checkpoint root / run prefix")
    evaluate.add_argument("--task", choices=["zeroshot", "retrieval", "sample"], default="zeroshot")
    evaluate.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the run's eval config)")
    evaluate.add_argument("--guidance", type=float, default=None, help="classifier-free guidance weight w")
    evaluate.add_argument("--prompt", action="append", help="prompt for --task sample (repeatable)")
    evaluate.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG for --task sample")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    evaluate.add_argument("--suite", type=Path, default=None, help="run this suite YAML (configs/eval/digits.yaml is the "
                          "demo's) instead of --task; the watcher runs the same suites")
    evaluate.add_argument("--images", type=Path, default=Path("eval-images"), help="folder for the suite's sample grids")
    evaluate.set_defaults(func=cmd_eval)

    sample = sub.add_parser("sample", help="generate images from text", description="Text-to-image with DDIM and "
                            "classifier-free guidance; one grid row per prompt.")
    sample.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="as for eval (s3:// accepted)")
    sample.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    sample.add_argument("--out", type=Path, required=True, help="output PNG")
    sample.add_argument("--per-prompt", type=int, default=8, help="images per prompt (default 8)")
    sample.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the run's eval config)")
    sample.add_argument("--guidance", type=float, default=None, help="guidance weight w (default: the run's eval config)")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=cmd_sample)

    demo = sub.add_parser("demo", help="end-to-end demo on built-in digits: shard, train, evaluate (CPU, minutes)",
                          formatter_class=fmt, epilog=EPILOG_OVERRIDES,
                          description="Shard scikit-learn's bundled digits into OUT/shards (Ray pipeline, "
                          "configs/data/digits.yaml), train configs/demo.yaml from the shards, then evaluate "
                          "zero-shot classification and retrieval on held-out digits and write a sample grid and "
                          "a loss plot. Rerunning with the same --out reuses the shards and resumes training. "
                          "Prints the paths and, as the last line, one JSON summary.")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output directory (default outputs/demo)")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    demo.set_defaults(func=cmd_demo)

    from pretrain import eval_cli, precompute_cli, shard_cli, submit_cli  # noqa: PLC0415

    shard_cli.add_parser(sub)
    eval_cli.add_parser(sub)
    precompute_cli.add_parser(sub)
    submit_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"diffdis {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ClusterError as error:
        print(f"diffdis {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
