"""``ShardConfig``: everything that decides what the shards hold, plus how many workers make them.

The shards are a pure function of the inputs and the *content* sections (``source``, ``image``,
``filters``, ``samples_per_shard``, ``prefix``); the ``run`` section (workers, in-flight window)
changes only how fast they are made. That is why only the content sections are recorded in the
manifest and hashed into the fingerprint that guards resumption: a job restarted with more
workers resumes; a job restarted with another image size refuses to mix shards.

Loaded from YAML by ``pretrain.config_io.load_config(ShardConfig, path, overrides)`` (the CLI
does this; this package does not import the trainer's packages), or built directly in Python.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

SourceKind = Literal["auto", "folder", "table", "shards", "digits", "scenes"]
ResizeMode = Literal["center_crop", "keep_ratio", "pad"]
ImageFormat = Literal["jpg", "png", "webp"]

# Pillow's own default (Image.MAX_IMAGE_PIXELS): ~89 megapixels, a 1024 MB RGBA image.
DEFAULT_MAX_PIXELS = 89_478_485


@dataclass
class SourceConfig:
    """Where samples come from. ``path`` is a folder, a table file, shard URLs, ``digits[:split]`` or
    ``scenes[:split]``.

    ``kind: auto`` decides from ``path``: ``digits``/``digits:heldout`` → digits, ``scenes``/
    ``scenes:heldout`` → scenes (data_pipeline.scenes); ``.csv``,
    ``.parquet``, ``.jsonl`` → table; ``.tar`` files, brace patterns or a folder of tars →
    shards; any other folder → folder of images with ``.txt`` sidecar captions.
    """

    kind: SourceKind = "auto"
    path: str = ""
    url_column: str = "url"  # img2dataset's default column names
    caption_column: str = "caption"
    download_timeout: float = 10.0  # seconds, per HTTP attempt
    download_retries: int = 2  # extra attempts after the first, for timeouts, connection errors, 5xx
    # digits: which samples are held out; scenes: which attribute triples are held out, and each
    # sample's position and jitter (train on scenes shards with the data.split_seed you evaluate with)
    split_seed: int = 0
    caption_seed: int = 0  # digits, scenes: the template per sample is drawn from (caption_seed, sample index)
    # digits, scenes: each image appears this many times, each time with another training template (what
    # the in-memory stream does by drawing a template per epoch); 1 = one fixed caption per image
    captions_per_image: int = 1
    num_samples: int = 0  # scenes: images in the split (0: the split's default, scenes.DEFAULT_SAMPLES)

    def validate(self) -> None:
        if self.num_samples < 0:
            raise ValueError(f"num_samples={self.num_samples} must be >= 0 (0: the split's default)")
        if self.captions_per_image < 1:
            raise ValueError(f"captions_per_image={self.captions_per_image} must be >= 1")
        if self.download_timeout <= 0:
            raise ValueError(f"download_timeout={self.download_timeout} must be > 0 (seconds)")
        if self.download_retries < 0:
            raise ValueError(f"download_retries={self.download_retries} must be >= 0")


@dataclass
class ImageConfig:
    size: int = 64
    resize_mode: ResizeMode = "center_crop"
    format: ImageFormat = "jpg"
    quality: int = 95  # jpg / webp
    max_pixels: int = DEFAULT_MAX_PIXELS  # declared width x height above this → too_large (decompression bomb)

    def validate(self) -> None:
        if self.size < 1:
            raise ValueError(f"size={self.size} must be >= 1")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality={self.quality} must be in 1..100")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels={self.max_pixels} must be >= 1")


@dataclass
class FilterConfig:
    """Sample filters; each rejection is counted under its reason (see transforms.REASONS)."""

    min_image_size: int = 0  # original min(width, height) below this → too_small (0: off)
    max_aspect_ratio: float = 0.0  # original max(w,h)/min(w,h) above this → bad_aspect (0: off)
    min_caption_length: int = 0  # characters, after stripping; below → caption_length (0: off)
    max_caption_length: int = 0  # characters; above → caption_length (0: off)
    allow_empty_caption: bool = False  # empty captions → empty_caption unless allowed
    dedup: bool = True  # exact dedup on the sha256 of the stored image bytes, across all shards
    scorer: str | None = None  # "module:callable", called as fn(image, sample, **scorer_options) -> float
    scorer_options: dict[str, Any] = field(default_factory=dict)
    min_score: float = 0.0  # samples scoring below → low_score

    def validate(self) -> None:
        if self.min_image_size < 0 or self.max_aspect_ratio < 0:
            raise ValueError("min_image_size and max_aspect_ratio must be >= 0 (0 turns them off)")
        if self.max_aspect_ratio and self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio={self.max_aspect_ratio} must be >= 1 (or 0: off)")
        if self.max_caption_length and self.max_caption_length < self.min_caption_length:
            raise ValueError(f"max_caption_length={self.max_caption_length} < min_caption_length={self.min_caption_length}")
        if self.scorer is not None and ":" not in self.scorer:
            raise ValueError(f"scorer={self.scorer!r} must be 'module:callable'")


@dataclass
class RunOptions:
    """How the work is spread; never changes a byte of output."""

    num_workers: int = 0  # CPUs of a local Ray (0: all of this machine's); ignored when joining a cluster
    max_in_flight: int = 0  # units submitted but not yet committed (memory bound; 0: 2 x cluster CPUs)
    threads_per_worker: int = 0  # threads inside one task (0: 16 for URL tables, which wait on the network; else 1)
    verify_sha256: bool = False  # on resume, re-hash existing shards (reads them all) instead of checking sizes

    def validate(self) -> None:
        if self.num_workers < 0 or self.max_in_flight < 0 or self.threads_per_worker < 0:
            raise ValueError("num_workers and max_in_flight must be >= 0 (0: automatic)")


@dataclass
class ShardConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    samples_per_shard: int = 1000  # input items per work unit = per shard (fewer kept after filters)
    prefix: str = "part"  # shards are {prefix}-{index:06d}.tar
    run: RunOptions = field(default_factory=RunOptions)

    def validate(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={self.samples_per_shard} must be >= 1")
        if not self.prefix or "/" in self.prefix:
            raise ValueError(f"prefix={self.prefix!r} must be a non-empty name without '/'")


def content_dict(config: ShardConfig) -> dict[str, Any]:
    """The sections that decide the output bytes (no ``run``), as plain JSON-able data."""
    record = dataclasses.asdict(config)
    record.pop("run")
    return record


# Content fields added after shards were first made, with the value that reproduces the older output.
# At that value they are left out of the fingerprint, so existing outputs still resume.
_LATER_FIELDS: dict[tuple[str, str], Any] = {("source", "num_samples"): 0}


def fingerprint(config: ShardConfig) -> str:
    """sha256 of the content sections: shards from different fingerprints must never be mixed."""
    record = content_dict(config)
    for (section, name), neutral in _LATER_FIELDS.items():
        if record[section].get(name) == neutral:
            del record[section][name]
    text = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
