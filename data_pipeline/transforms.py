"""Per-sample transforms: caption filters, decode + verify, resize, encode, the scorer hook.

Every rejection has a named reason (``REASONS``) so a job's summary says exactly what was
dropped and why. All functions here are pure given their inputs (Pillow's encoders are
deterministic for a fixed Pillow version), which is what makes a shard a pure function of its
inputs and the config.

The content hash used for exact dedup is the sha256 of the **stored (encoded) image bytes**,
not of the source bytes: two sources that decode and resize to the same picture at the same
settings are duplicates in the dataset even if their files differ (re-encoded copies,
different metadata), and the hash can be checked against the shard's own bytes later.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image, ImageOps, UnidentifiedImageError

from data_pipeline.shard_config import FilterConfig, ImageConfig

REASONS = (
    "ok", "failed_download", "failed_decode", "too_small", "too_large", "bad_aspect",
    "empty_caption", "caption_length", "duplicate", "low_score",
)

PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}

Scorer = Callable[..., float]


class Rejected(Exception):
    """A sample is dropped; ``reason`` is one of ``REASONS`` and ``detail`` says why (for debugging)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS and reason != "ok", reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class RawSample:
    """What a source hands over: encoded bytes to decode, or an image already in memory (digits)."""

    caption: str
    meta: dict[str, Any]  # source kind, url/path, label, ... (goes into {key}.json)
    data: bytes | None = None
    image: Image.Image | None = None


@dataclass
class EncodedSample:
    """One sample ready for the tar: ``{key}.{ext}``, ``{key}.txt``, ``{key}.json``."""

    key: str
    ext: str
    image_bytes: bytes
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return self.meta["sha256"]

    def tar_record(self) -> dict[str, Any]:
        """The dict ``webdataset.TarWriter.write`` takes; every value already bytes (no encoder magic)."""
        meta = json.dumps(self.meta, sort_keys=True, ensure_ascii=False).encode()
        return {"__key__": self.key, self.ext: self.image_bytes, "txt": self.caption.encode(), "json": meta}


def check_caption(caption: str, filters: FilterConfig) -> None:
    """Caption filters run first: they are free, and save a download or a decode."""
    length = len(caption.strip())
    if length == 0 and not filters.allow_empty_caption:
        raise Rejected("empty_caption")
    if filters.min_caption_length and length < filters.min_caption_length:
        raise Rejected("caption_length", f"{length} < {filters.min_caption_length} characters")
    if filters.max_caption_length and length > filters.max_caption_length:
        raise Rejected("caption_length", f"{length} > {filters.max_caption_length} characters")


def decode(data: bytes, image: ImageConfig) -> Image.Image:
    """Open, check declared dimensions against ``max_pixels`` *before* decoding, then decode fully.

    Pillow's own bomb guard (``Image.MAX_IMAGE_PIXELS``) is process-global; we check the
    configured limit per call instead, so one job's setting never leaks into another's worker.
    JPEGs are decoded with ``draft`` (libjpeg's DCT scaling to the smallest power-of-two
    reduction still >= the target), which is most of the speed on large photos.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise Rejected("too_large", str(error)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise Rejected("failed_decode", f"{type(error).__name__}: {error}") from None
    width, height = opened.size
    if width * height > image.max_pixels:
        raise Rejected("too_large", f"{width}x{height} > max_pixels {image.max_pixels}")
    opened.info["original_size"] = (width, height)
    try:
        if opened.format == "JPEG":
            opened.draft("RGB", (image.size, image.size))
        opened.load()
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for broken data
        raise Rejected("failed_decode", f"{type(error).__name__}: {error}") from None
    opened.info["original_size"] = (width, height)
    return opened


def check_size(width: int, height: int, filters: FilterConfig) -> None:
    if filters.min_image_size and min(width, height) < filters.min_image_size:
        raise Rejected("too_small", f"{width}x{height} < {filters.min_image_size}")
    if filters.max_aspect_ratio and max(width, height) / max(1, min(width, height)) > filters.max_aspect_ratio:
        raise Rejected("bad_aspect", f"{width}x{height} exceeds aspect ratio {filters.max_aspect_ratio}")


def to_rgb(picture: Image.Image) -> Image.Image:
    """RGB; transparent pixels composited onto white (dropping alpha would expose arbitrary colours)."""
    if picture.mode == "RGB":
        return picture
    if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
        rgba = picture.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return picture.convert("RGB")


def resize(picture: Image.Image, size: int, mode: str) -> Image.Image:
    """Same semantics as img2dataset's resize modes, so shards are comparable:

    - ``center_crop``: shorter side to ``size``, then the centre ``size x size`` (as ``ImageOps.fit``)
    - ``keep_ratio``: shorter side to ``size``, aspect ratio kept (output not square)
    - ``pad``: longer side to ``size``, black borders to ``size x size`` (``ImageOps.pad``; img2dataset "border")
    """
    resample = Image.Resampling.LANCZOS
    if mode == "center_crop":
        if picture.size == (size, size):
            return picture
        # ImageOps.fit's centre box, resized with reducing_gap (fit does not expose it): much faster on big photos
        width, height = picture.size
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        return picture.resize((size, size), resample, box=(left, top, left + side, top + side), reducing_gap=3.0)
    if mode == "pad":
        if picture.size == (size, size):
            return picture
        return ImageOps.pad(picture, (size, size), method=resample, color=(0, 0, 0))
    if mode == "keep_ratio":
        width, height = picture.size
        scale = size / min(width, height)
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        return picture if target == picture.size else picture.resize(target, resample, reducing_gap=3.0)
    raise ValueError(f"unknown resize_mode {mode!r}; expected center_crop, keep_ratio or pad")


def encode(picture: Image.Image, image: ImageConfig) -> bytes:
    buffer = io.BytesIO()
    if image.format == "png":
        picture.save(buffer, "PNG")
    else:
        picture.save(buffer, PIL_FORMATS[image.format], quality=image.quality)
    return buffer.getvalue()


def load_scorer(path: str | None) -> Scorer | None:
    """``"package.module:callable"`` → the callable; the error names the path when it is not there."""
    if not path:
        return None
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"filters.scorer={path!r}: cannot import module {module_name!r} ({error})") from None
    scorer = getattr(module, attribute, None)
    if not callable(scorer):
        raise ValueError(f"filters.scorer={path!r}: {module_name!r} has no callable {attribute!r}")
    return scorer


def transform(raw: RawSample, key: str, image: ImageConfig, filters: FilterConfig,
              scorer: Scorer | None = None) -> EncodedSample:
    """Caption is checked by the caller (before any download); this decodes → filters → resizes →
    scores → encodes, raising ``Rejected`` with the reason on any failure."""
    if raw.image is not None:
        picture = raw.image
        width, height = picture.size
        if width * height > image.max_pixels:
            raise Rejected("too_large", f"{width}x{height} > max_pixels {image.max_pixels}")
    else:
        picture = decode(raw.data or b"", image)
        width, height = picture.info["original_size"]
    check_size(width, height, filters)
    picture = resize(to_rgb(picture), image.size, image.resize_mode)
    meta = {**raw.meta, "key": key, "caption": raw.caption, "original_width": width, "original_height": height,
            "width": picture.width, "height": picture.height}
    if raw.data is not None:
        meta["source_sha256"] = hashlib.sha256(raw.data).hexdigest()
    if scorer is not None:
        score = float(scorer(picture, {"key": key, "caption": raw.caption, "meta": raw.meta}, **filters.scorer_options))
        meta["score"] = score
        if score < filters.min_score:
            raise Rejected("low_score", f"{score} < {filters.min_score}")
    data = encode(picture, image)
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    return EncodedSample(key=key, ext=image.format, image_bytes=data, caption=raw.caption, meta=meta)
