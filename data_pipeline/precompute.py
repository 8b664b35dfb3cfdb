"""Feature shards: pixel shards encoded once by the frozen autoencoder, so training skips the encoder.

One Ray task per shard (Ray hides behind this entry point; a local Ray starts by itself). Each task
reads its shard with the loader's reader (same decoding, same resize/crop to the model's image size),
encodes batches of images with the encoder the caller's factory builds (on the GPU when Ray gives the
task one), and writes a shard of the same name with the same keys, whole (``storage.write_whole``):

    {key}.latent.npy   float32 latent (C x h x w), ``np.save`` format (webdataset's ``.npy`` decoder reads it)
    {key}.txt          the caption, unchanged
    {key}.json         the source metadata, unchanged

then ``manifest.json`` (kind ``"features"``) last. Captions are kept as text, not encoded: the training
objective (``DiffDisObjective.forward``) takes token ids and runs the text encoder itself, trainable
or frozen, so precomputed text states would have no consumer.

This module knows no model: the caller passes an :class:`EncoderFactory` (``pretrain.precompute_cli``
builds one from a saved model or a run config), which keeps ``data_pipeline`` free of the trainer.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch
import webdataset as wds

from data_pipeline.manifest import Manifest, ShardEntry, write_manifest
from data_pipeline.progress import progress as progress_bar
from data_pipeline.ray_runtime import start_ray
from data_pipeline.storage import join, redact, write_whole
from data_pipeline.wds_io import ShardRead, ShardRef, decode_sample, raw_samples, resolve_shards

log = logging.getLogger("diffdis.precompute")


class ImageEncoder(Protocol):
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor: ...  # Bx3xHxW in [-1, 1] → latents


EncoderFactory = Callable[[torch.device], ImageEncoder]  # picklable: it is shipped to Ray workers


@dataclass
class ShardResult:
    name: str
    samples: int
    bytes: int
    sha256: str
    skipped: dict[str, int] = field(default_factory=dict)
    latent_shape: list[int] | None = None
    read_error: str | None = None
    seconds: float = 0.0


def to_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 images → float32 Bx3xHxW in [-1, 1] (the same scaling as ``collate_images``)."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return batch.div_(127.5).sub_(1.0).contiguous()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_shard(ref: ShardRef, output_dir: str, factory: EncoderFactory, image_size: int, batch_size: int,
                 storage_options: dict | None = None) -> ShardResult:
    """Encode one pixel shard into a feature shard of the same name under ``output_dir``."""
    started = time.perf_counter()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    encoder = factory(device)
    result = ShardResult(ref.name, 0, 0, "")
    buffer = io.BytesIO()
    pending: list[tuple[dict, dict]] = []  # (decoded sample, raw sample)

    def flush(writer: wds.TarWriter) -> None:
        if not pending:
            return
        with torch.no_grad():
            latents = encoder(to_pixels([s["image"] for s, _ in pending]).to(device)).float().cpu().numpy()
        for (sample, raw), latent in zip(pending, latents):
            record = {"__key__": sample["key"], "latent.npy": _npy(latent.astype(np.float32)),
                      "txt": sample["caption"].encode()}
            if "json" in raw:
                record["json"] = raw["json"]
            writer.write(record)
        result.samples += len(pending)
        result.latent_shape = list(latents.shape[1:])
        pending.clear()

    read = ShardRead(ref)
    with wds.TarWriter(buffer, encoder=False) as writer:
        for raw in raw_samples(ref, storage_options, read):
            sample, reason = decode_sample(raw, image_size)
            if sample is None:
                result.skipped[reason] = result.skipped.get(reason, 0) + 1
                log.warning("skipped sample %r of shard %s: %s", raw.get("__key__"), ref.name, reason)
                continue
            pending.append((sample, raw))
            if len(pending) == batch_size:
                flush(writer)
        flush(writer)
    data = buffer.getvalue()
    write_whole(join(output_dir, ref.name), data, storage_options)
    result.bytes, result.sha256 = len(data), hashlib.sha256(data).hexdigest()
    result.read_error = read.error
    result.seconds = time.perf_counter() - started
    return result


def precompute_features(
    input_spec: str,
    output_dir: str,
    factory: EncoderFactory,
    image_size: int,
    *,
    batch_size: int = 64,
    storage_options: dict | None = None,
    num_cpus: int | None = None,
    description: dict[str, Any] | None = None,
    progress: bool = True,
) -> Manifest:
    """Encode every shard of ``input_spec`` into ``output_dir`` (one Ray task each) and write the
    manifest last. ``description`` (e.g. the autoencoder config) is recorded, redacted, in the manifest."""
    shard_set = resolve_shards(input_spec, storage_options)
    if shard_set.kind == "features":
        raise ValueError(f"{input_spec}: these are feature shards already (manifest kind 'features')")
    import ray  # noqa: PLC0415 - Ray only where it is used

    we_started = start_ray(None, num_cpus)
    try:
        return _encode_all(ray, shard_set, input_spec, output_dir, factory, image_size, batch_size, storage_options,
                           description, progress)
    finally:
        if we_started:
            ray.shutdown()


def _encode_all(ray, shard_set, input_spec: str, output_dir: str, factory: EncoderFactory, image_size: int,
                batch_size: int, storage_options: dict | None, description: dict[str, Any] | None,
                progress: bool) -> Manifest:
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(encode_shard)
    factory_ref = ray.put(factory)
    futures = {task.remote(ref, output_dir, factory_ref, image_size, batch_size, storage_options): ref
               for ref in shard_set.shards}
    results: dict[str, ShardResult] = {}
    bar = progress_bar(len(futures), "precompute", unit="shard", disable=not progress)
    remaining = list(futures)
    while remaining:
        done, remaining = ray.wait(remaining, num_returns=1)
        result: ShardResult = ray.get(done[0])
        results[result.name] = result
        bar.update(1)
        bar.set_postfix(samples=sum(r.samples for r in results.values()))
        if result.read_error:
            log.warning("shard %s is truncated or corrupt (%s): %d sample(s) encoded", result.name, result.read_error, result.samples)
    bar.close()
    ordered = [results[ref.name] for ref in shard_set.shards]
    shapes = {tuple(r.latent_shape) for r in ordered if r.latent_shape is not None}
    if len(shapes) > 1:
        raise ValueError(f"{input_spec}: shards gave latents of different shapes {sorted(shapes)}")
    skipped: dict[str, int] = {}
    for r in ordered:
        for reason, n in r.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    manifest = Manifest(
        shards=[ShardEntry(r.name, r.samples, r.bytes, r.sha256) for r in ordered],
        counts={"ok": sum(r.samples for r in ordered), **skipped,
                "truncated_shards": sum(1 for r in ordered if r.read_error)},
        config=redact({"input": input_spec, "image_size": image_size, "batch_size": batch_size,
                       "storage_options": storage_options or {}, **(description or {})}),
        kind="features",
        features={"latent.npy": {"shape": list(shapes.pop()) if shapes else None, "dtype": "float32",
                                 "what": "frozen autoencoder latent (encode_images: posterior mean x scaling)"},
                  "txt": "caption (unchanged)", "json": "source metadata (unchanged)"},
    )
    write_manifest(output_dir, manifest, storage_options)
    return manifest
