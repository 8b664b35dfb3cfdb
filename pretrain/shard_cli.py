"""``diffdis shard``: a folder / URL table / shards / digits / scenes → WebDataset shards on any fsspec URL.

Lives beside the CLI rather than in ``data_pipeline`` because it loads YAML through
``pretrain.config_io``, and ``data_pipeline`` must not import ``pretrain`` (tests/test_boundaries.py).
Precedence: ShardConfig defaults ← ``--config`` YAML ← option flags ← dotted ``KEY=VALUE`` overrides.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from pretrain.config_io import ConfigError, deep_merge, from_dict, load_yaml_tree, parse_overrides

DESCRIPTION = """\
Turn a source into WebDataset shards ({prefix}-{index:06d}.tar with {key}.jpg|png|webp, {key}.txt,
{key}.json), one {prefix}-{index:06d}.stats.json beside each, and manifest.json written last.

SOURCE is one of
  a folder         images (jpg, png, webp, ...) with same-stem .txt captions, searched recursively
  a table          .csv/.tsv/.parquet/.jsonl with url and caption columns (img2dataset's layout);
                   url may be http(s)://, file:// or a path (relative: to the table's folder)
  shards           a .tar, a brace pattern 'data-{000000..000009}.tar', or a folder of tars
                   (ours or img2dataset's: jpg/txt/json keys) to re-filter / re-shard
  digits[:split]   the bundled scikit-learn digits ('train' or 'heldout'), label in each json
  scenes[:split]   procedural captioned shapes ('train' or 'heldout': attribute triples never in
                   train), shape/colour/size/position and packed label in each json
OUTPUT_URL is a local path, file://... or s3://bucket/prefix.

Shard i holds input items [i*N, (i+1)*N) that pass the filters, so the output is a pure function
of the inputs and the config: byte-identical for any number of workers. A rerun resumes (writes
only missing or damaged shards) and a rerun of a finished job writes nothing. Local runs start
their own Ray; --ray-address joins a cluster.
"""

EPILOG = """\
Dotted KEY=VALUE overrides set any ShardConfig field; put them right after OUTPUT_URL, e.g.
  diffdis shard SRC OUT filters.min_caption_length=5 source.caption_seed=3 --size 64
Rejected samples are counted by reason: failed_download, failed_decode, too_small, too_large,
bad_aspect, empty_caption, caption_length, duplicate, low_score.

Examples:
  diffdis shard digits outputs/digits-shards --config configs/data/digits.yaml
  diffdis shard scenes:train outputs/scenes-shards --config configs/data/scenes.yaml
  diffdis shard captions.parquet s3://bucket/laion-64 --size 64 --samples-per-shard 10000 \\
      --storage-options '{"endpoint_url": "http://minio:9000"}'
  diffdis shard photos/ out/ --dry-run
"""

# flag dest → dotted ShardConfig field
FLAG_FIELDS = {
    "kind": "source.kind", "url_column": "source.url_column", "caption_column": "source.caption_column",
    "timeout": "source.download_timeout", "retries": "source.download_retries",
    "size": "image.size", "resize_mode": "image.resize_mode", "format": "image.format", "quality": "image.quality",
    "max_pixels": "image.max_pixels", "min_image_size": "filters.min_image_size",
    "max_aspect_ratio": "filters.max_aspect_ratio", "scorer": "filters.scorer", "min_score": "filters.min_score",
    "samples_per_shard": "samples_per_shard", "prefix": "prefix", "num_workers": "run.num_workers",
    "max_in_flight": "run.max_in_flight",
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("shard", help="make WebDataset shards from a folder, URL table, shards, digits or scenes",
                                   description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE", help="folder, table file, shard URL(s), digits[:train|heldout] or scenes[:train|heldout]")
    parser.add_argument("output", metavar="OUTPUT_URL", help="where shards go: path, file://... or s3://...")
    parser.add_argument("--config", help="ShardConfig YAML, e.g. configs/data/digits.yaml")
    group = parser.add_argument_group("source")
    group.add_argument("--kind", choices=["auto", "folder", "table", "shards", "digits", "scenes"],
                       help="source kind (default auto: decided from SOURCE)")
    group.add_argument("--url-column", help="table column holding URLs (default url)")
    group.add_argument("--caption-column", help="table column holding captions (default caption)")
    group.add_argument("--timeout", type=float, help="download timeout per attempt, seconds (default 10)")
    group.add_argument("--retries", type=int, help="download retries after the first attempt (default 2)")
    group = parser.add_argument_group("images and filters")
    group.add_argument("--size", type=int, help="output image size in pixels (default 64)")
    group.add_argument("--resize-mode", choices=["center_crop", "keep_ratio", "pad"],
                       help="center_crop (default), keep_ratio (shorter side = size) or pad (black borders)")
    group.add_argument("--format", choices=["jpg", "png", "webp"], help="stored image format (default jpg)")
    group.add_argument("--quality", type=int, help="jpg/webp quality 1-100 (default 95)")
    group.add_argument("--max-pixels", type=int, help="declared width*height above this is rejected as too_large")
    group.add_argument("--min-image-size", type=int, help="reject images whose shorter side is smaller (too_small)")
    group.add_argument("--max-aspect-ratio", type=float, help="reject images more elongated than this (bad_aspect)")
    group.add_argument("--no-dedup", action="store_true", help="keep exact duplicates (default: drop them)")
    group.add_argument("--scorer", metavar="MODULE:CALLABLE",
                       help="per-sample scorer fn(image, sample, **filters.scorer_options) -> float")
    group.add_argument("--min-score", type=float, help="samples scoring below are dropped as low_score")
    group = parser.add_argument_group("shards and execution")
    group.add_argument("--samples-per-shard", type=int, help="input items per shard (default 1000)")
    group.add_argument("--prefix", help="shard name prefix (default part)")
    group.add_argument("--num-workers", type=int, help="CPUs for a local Ray (default: all)")
    group.add_argument("--max-in-flight", type=int, help="units submitted but not committed (default 2 x CPUs)")
    group.add_argument("--ray-address", help="join this Ray cluster (e.g. ray://head:10001 or auto)")
    group.add_argument("--storage-options", metavar="JSON",
                       help="fsspec storage options (endpoint, credentials); default: the environment. "
                       "Never written to manifests or logs")
    group.add_argument("--verify", action="store_true",
                       help="on resume, re-hash existing shards against their stats (reads them all)")
    group.add_argument("--dry-run", action="store_true", help="show the plan (units, shards, destination, config); write nothing")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument("--json", action="store_true", help="print the summary as one JSON object, last line")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted ShardConfig overrides")
    parser.set_defaults(func=run)
    return parser


def build_config(args: argparse.Namespace):
    from data_pipeline.shard_config import ShardConfig  # noqa: PLC0415

    tree: dict[str, Any] = load_yaml_tree(args.config) if args.config else {}
    flags: dict[str, Any] = {"source": {"path": args.source}}
    for dest, dotted in FLAG_FIELDS.items():
        value = getattr(args, dest, None)
        if value is not None:
            node = flags
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    if args.no_dedup:
        flags.setdefault("filters", {})["dedup"] = False
    if args.verify:
        flags.setdefault("run", {})["verify_sha256"] = True
    merged = deep_merge(deep_merge(tree, flags), parse_overrides(args.overrides))
    try:
        return from_dict(ShardConfig, merged)
    except ConfigError as error:
        if args.config:
            raise ConfigError(f"{error} (config file: {args.config})") from error
        raise


def _print_plan(plan) -> None:
    print(f"source       : {plan.source} [{plan.kind}]")
    print(f"destination  : {plan.output_url}")
    print(f"items        : {plan.items}, {plan.samples_per_shard} per shard -> {plan.units} units/shards "
          f"({', '.join(plan.first_shards)}{', ...' if plan.units > 3 else ''})")
    print(f"already done : {len(plan.done_units)} units; to write: {len(plan.todo_units)}")
    print("config       :")
    print(json.dumps(plan.config, indent=2, sort_keys=True))


def _print_summary(summary) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = Console(file=sys.stdout)
    if summary.nothing_to_do:
        console.print(f"Nothing to do: {summary.output_url} is complete ({summary.shards} shards, "
                      f"{summary.samples} samples, manifest unchanged).")
        return
    table = Table(title=f"diffdis shard -> {summary.output_url}", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    for reason, count in summary.counts.items():
        table.add_row(reason.replace("_", " ") if reason.endswith("_shards") else f"samples: {reason}", f"{count:,}")
    table.add_row("shards (tars)", f"{summary.shards:,}")
    table.add_row("units written / reused", f"{summary.units_written} / {summary.units_reused}")
    table.add_row("bytes", f"{summary.bytes:,}")
    table.add_row("wall time (processing)", f"{summary.wall_s:.1f} s ({summary.process_s:.1f} s)")
    table.add_row("throughput (items processed)", f"{summary.items_per_s:,.0f} /s")
    table.add_row(f"per core ({summary.cpus} CPUs)", f"{summary.items_per_s_per_core:,.0f} /s")
    table.add_row("manifest", summary.manifest_url)
    console.print(table)
    for problem in summary.input_problems:
        console.print(f"warning: {problem}", markup=False)


# Their DEBUG records carry signed request headers (the access key id) and request bodies.
CHATTY_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3fs", "fsspec", "urllib3", "requests")


def run(args: argparse.Namespace) -> int:
    from data_pipeline.pipeline import plan_pipeline, run_pipeline  # noqa: PLC0415 - keep --help fast
    from data_pipeline.storage import StorageError, parse_storage_options  # noqa: PLC0415

    for name in CHATTY_LOGGERS:  # even with -v: credentials must never reach a log
        logging.getLogger(name).setLevel(logging.WARNING)
    config = build_config(args)
    options = parse_storage_options(args.storage_options)
    try:
        if args.dry_run:
            _print_plan(plan_pipeline(config, args.output, options))
            return 0
        summary = run_pipeline(config, args.output, options, ray_address=args.ray_address,
                               progress=not args.no_progress)
    except StorageError as error:
        print(f"diffdis shard: error: {error}\nShards already written are kept; rerun the same command to resume.",
              file=sys.stderr)
        return 1
    _print_summary(summary)
    if args.json:
        print(json.dumps(summary.as_dict()))
    return 0
