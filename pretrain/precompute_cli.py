"""``diffdis precompute``: pixel shards → feature shards (frozen-autoencoder latents) for training.

The model side of ``data_pipeline.precompute``: it builds the frozen autoencoder exactly as training
would (from a saved model folder, or from a run config seeded like the trainer, so a randomly
initialised KL autoencoder gets the same weights), and hands a picklable factory to the Ray tasks.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# torch, Ray and the model load inside the functions: `diffdis --help` builds this parser


@dataclass
class AutoencoderFactory:
    """Builds the frozen image encoder in a Ray worker: ``model_dir`` (a saved DiffDis model) or
    ``run_config`` (+ overrides), seeded with ``train.seed`` like :class:`pretrain.trainer.Trainer`
    (rank 0), whose model builds its autoencoder first."""

    model_dir: str | None = None
    run_config: str | None = None
    overrides: tuple[str, ...] = ()

    def autoencoder(self):
        import torch  # noqa: PLC0415

        from pretrain.config import load_run_config  # noqa: PLC0415
        from pretrain.model import DiffDisModel  # noqa: PLC0415
        from pretrain.model.autoencoder import build_autoencoder  # noqa: PLC0415

        if self.model_dir is not None:
            model = DiffDisModel.from_pretrained(self.model_dir)
            return model.autoencoder, model.config
        config = load_run_config(self.run_config, list(self.overrides))
        torch.manual_seed(config.train.seed)
        return build_autoencoder(config.model.autoencoder, config.model.image_channels), config.model

    def __call__(self, device):
        autoencoder, _ = self.autoencoder()
        return autoencoder.to(device).eval().encode


def model_config(factory: AutoencoderFactory):
    if factory.model_dir is not None:
        from pretrain.model.persistence import CONFIG_NAME  # noqa: PLC0415
        from pretrain.model.config import model_config_from_dict  # noqa: PLC0415

        path = Path(factory.model_dir) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: --model must be a saved DiffDis model folder")
        return model_config_from_dict(json.loads(path.read_text())["model"])
    from pretrain.config import load_run_config  # noqa: PLC0415

    return load_run_config(factory.run_config, list(factory.overrides)).model


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "precompute", help="encode pixel shards into latent feature shards",
        description="Encode WebDataset pixel shards with the frozen autoencoder (one Ray task per shard, GPU "
        "when available) into feature shards with the same keys ({key}.latent.npy, .txt, .json) and a "
        "manifest.json of kind 'features'. Train on them with data.source=shards data.precomputed=true.")
    # one positional list (split in run): argparse cannot put KEY=VALUE after options otherwise
    parser.add_argument("paths", nargs="+", metavar="INPUT_URL OUTPUT_URL [KEY=VALUE ...]",
                        help="pixel shards (manifest URL/dir, glob or brace pattern), the directory URL for the "
                        "feature shards (file://, s3://, path), then dotted overrides for --run-config (before the options, "
                        "e.g. `diffdis precompute IN OUT model.image_size=64 --run-config run.yaml`)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-config", type=Path, help="run config YAML: build the autoencoder as a fresh run would")
    source.add_argument("--model", type=Path, help="saved DiffDis model folder (a checkpoint's model/)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default 64)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    parser.add_argument("--storage-options", default=None, help="fsspec storage options as JSON (default: environment)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from data_pipeline.precompute import precompute_features  # noqa: PLC0415
    from data_pipeline.storage import parse_storage_options  # noqa: PLC0415

    if len(args.paths) < 2:
        raise ValueError("give INPUT_URL and OUTPUT_URL")
    args.input, args.output, args.overrides = args.paths[0], args.paths[1], args.paths[2:]
    if args.overrides and args.run_config is None:
        raise ValueError("KEY=VALUE overrides apply to --run-config only")
    factory = AutoencoderFactory(str(args.model) if args.model else None,
                                 str(args.run_config) if args.run_config else None, tuple(args.overrides))
    config = model_config(factory)
    started = time.perf_counter()
    manifest = precompute_features(
        args.input, args.output, factory, config.image_size, batch_size=args.batch_size,
        storage_options=parse_storage_options(args.storage_options), num_cpus=args.num_cpus,
        description={"autoencoder": asdict(config.autoencoder), "image_channels": config.image_channels,
                     "model": str(args.model) if args.model else None,
                     "run_config": str(args.run_config) if args.run_config else None},
    )
    summary = {"output": args.output, "shards": len(manifest.shards), "samples": manifest.total_samples,
               "bytes": manifest.total_bytes, "latent_shape": manifest.features["latent.npy"]["shape"],
               "counts": manifest.counts, "wall_s": round(time.perf_counter() - started, 2)}
    print(f"wrote {summary['samples']} samples in {summary['shards']} feature shards to {args.output} "
          f"(latents {summary['latent_shape']}, {summary['bytes']} bytes, {summary['wall_s']} s); counts {manifest.counts}")
    print(json.dumps(summary))
    return 0
