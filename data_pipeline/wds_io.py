"""Reading WebDataset shards on any fsspec URL: shard lists, byte streams, tar members → samples.

webdataset 1.0.2 opens URLs with its own ``gopen`` (local files, pipes, curl) and has no S3 opener,
so we open every shard with fsspec ourselves (``s3://``, ``file://``, plain paths, anything fsspec
knows, storage options from the environment by default) and feed the open stream to webdataset's
own tar reader (``tar_file_expander`` → ``group_by_keys``), which does the tar parsing and the
``{key}.{ext}`` grouping that img2dataset and open_clip use.

A truncated shard (tar cut mid-member) makes the tar reader raise; the error is recorded on the
:class:`ShardRead` (with the count of samples read before it) instead of ending the stream, so the
loader can report it and carry on. A shard that cannot be opened at all is an error naming its URL.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import braceexpand
import fsspec
import numpy as np
from PIL import Image
from webdataset import tariterators

from data_pipeline.manifest import MANIFEST_NAME, Manifest, read_manifest
from data_pipeline.storage import exists, filesystem, join

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "caption")
LATENT_EXTENSION = "latent.npy"
_GLOB_CHARS = re.compile(r"[*?\[]")


class ShardSourceError(ValueError):
    """The shard specification resolves to nothing, or names a shard that cannot be read."""


@dataclass(frozen=True)
class ShardRef:
    """One shard: ``name`` is its stable identity in loader positions (relative to the manifest, or
    the file name), ``url`` where it is read from, ``expected`` the manifest's sample count if known."""

    name: str
    url: str
    expected: int | None = None


@dataclass
class ShardSet:
    source: str
    shards: list[ShardRef]
    manifest: Manifest | None = None

    @property
    def kind(self) -> str | None:
        return self.manifest.kind if self.manifest is not None else None


def _protocol_of(url: str) -> str | None:
    return url.split("://", 1)[0] if "://" in url else None


def _with_protocol(url: str, path: str) -> str:
    protocol = _protocol_of(url)
    return f"{protocol}://{path}" if protocol and "://" not in path else path


def _expand_one(spec: str, storage_options: dict | None) -> tuple[list[str], Manifest | None, str | None]:
    """URLs for one spec string, plus the manifest (and its directory) when the spec names one."""
    if spec.endswith(".json") or (not spec.endswith(".tar") and "{" not in spec and not _GLOB_CHARS.search(spec)):
        url = spec if spec.endswith(".json") else join(spec, MANIFEST_NAME)
        if spec.endswith(".json") or exists(url, storage_options):
            manifest = read_manifest(url, storage_options)
            directory = url.rsplit("/", 1)[0]
            return manifest.shard_urls(directory), manifest, directory
        fs, path = filesystem(spec, storage_options)
        if fs.isdir(path):
            found = sorted(fs.glob(path.rstrip("/") + "/*.tar"))
            if not found:
                raise ShardSourceError(f"{spec}: a directory with neither {MANIFEST_NAME} nor *.tar shards")
            return [_with_protocol(spec, p) for p in found], None, None
    if "{" in spec:
        return list(braceexpand.braceexpand(spec)), None, None
    if _GLOB_CHARS.search(spec):
        fs, path = filesystem(spec, storage_options)
        found = sorted(fs.glob(path))
        if not found:
            raise ShardSourceError(f"{spec}: the glob matches no shard")
        return [_with_protocol(spec, p) for p in found], None, None
    return [spec], None, None


def resolve_shards(spec: str | Sequence[str], storage_options: dict | None = None) -> ShardSet:
    """The shards named by a manifest (its URL or directory), a directory of tars, a glob, a brace
    pattern (``.../part-{000000..000009}.tar``), a single tar, or a list of any of these.

    Shard names (the keys of loader positions) are the manifest's relative names, else the file
    names; they must be unique so that a position means one thing."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise ShardSourceError("no shard URL given (data.shards is empty)")
    refs: list[ShardRef] = []
    manifest = None
    for one in specs:
        urls, found_manifest, directory = _expand_one(one, storage_options)
        if found_manifest is not None:
            manifest = found_manifest if manifest is None else manifest
            refs += [ShardRef(e.name, join(directory, e.name), e.samples) for e in found_manifest.shards]
        else:
            refs += [ShardRef(url.rstrip("/").rsplit("/", 1)[-1], url) for url in urls]
    names = [r.name for r in refs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ShardSourceError(f"{specs}: shard names must be unique, repeated: {duplicates[:5]}")
    if not refs:
        raise ShardSourceError(f"{specs}: no shards")
    source = specs[0] if len(specs) == 1 else f"{specs[0]} (+{len(specs) - 1} more)"
    return ShardSet(source, refs, manifest)


@dataclass
class ShardRead:
    """What reading one shard found: whole samples read and, for a truncated shard, the error and the
    key of the sample that was being read when it broke (dropped: it may lack members)."""

    ref: ShardRef
    samples: int = 0
    error: str | None = None
    errors: list[str] = field(default_factory=list)
    dropped: str | None = None  # key of the incomplete last sample of a truncated shard


def open_shard(ref: ShardRef, storage_options: dict | None = None):
    """An open binary stream over a shard; a missing or unreachable shard is an error naming it."""
    try:
        return fsspec.open(ref.url, "rb", **(storage_options or {})).open()
    except FileNotFoundError:
        raise FileNotFoundError(f"shard {ref.name} not found at {ref.url}") from None
    except Exception as error:  # noqa: BLE001 - re-raised naming the shard
        raise ShardSourceError(f"cannot open shard {ref.name} at {ref.url}: {type(error).__name__}: {error}") from error


def raw_samples(ref: ShardRef, storage_options: dict | None = None, read: ShardRead | None = None) -> Iterator[dict]:
    """Grouped raw samples of one shard (``{'__key__': ..., 'jpg': bytes, 'txt': bytes, ...}``), in
    tar order. A read error (truncation) ends the shard and is recorded in ``read``."""
    read = read if read is not None else ShardRead(ref)

    def record(error: Exception) -> bool:
        message = str(error.args[0]) if error.args else type(error).__name__
        read.errors.append(f"{type(error).__name__}: {message}")
        read.error = read.error or read.errors[-1]
        return False  # stop reading this shard: what follows a broken tar member is not trustworthy

    stream = TailReader(open_shard(ref, storage_options))
    try:
        files = tariterators.tar_file_expander([{"url": ref.url, "stream": stream}], handler=record)
        held = None  # a sample is passed on once the next one starts: only then is it known to be whole
        for sample in tariterators.group_by_keys(files, handler=record):
            if held is not None:
                read.samples += 1
                yield held
            held = sample
        if read.error is None and not stream.ends_like_a_tar():
            read.error = "tar ends without its end-of-archive blocks: truncated at a member boundary"
            read.errors.append(read.error)
        if held is not None and read.error is None:
            read.samples += 1
            yield held
        elif held is not None:
            read.dropped = held["__key__"]  # the sample being read when the shard broke may lack members
    finally:
        stream.close()


class TailReader:
    """A read-only stream that remembers its last 1 KiB. Why: Python's ``tarfile`` (which webdataset
    uses) raises on a member cut short, but takes a tar cut in a header or between members for a
    complete one; a POSIX tar ends with two zero blocks, so the tail tells the two apart."""

    END_BLOCKS = 2 * 512

    def __init__(self, stream):
        self.stream = stream
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.tail = (self.tail + data)[-self.END_BLOCKS :]
        return data

    def ends_like_a_tar(self, limit: int = 1 << 20) -> bool:
        """Drain what the tar reader left (record padding, at most ``limit`` bytes) and check the tail."""
        left = self.read(limit)
        if len(left) == limit:
            return False  # more than padding after the end marker: not a tar ending we recognise
        return len(self.tail) == self.END_BLOCKS and not any(self.tail)

    def close(self) -> None:
        self.stream.close()


def _caption(raw: dict) -> str | None:
    for ext in CAPTION_EXTENSIONS:
        if ext in raw:
            text = raw[ext].decode("utf-8").strip()
            return text or None
    return None


def _label(raw: dict) -> int:
    if "cls" in raw:
        return int(raw["cls"].decode().strip())
    if "json" in raw:
        meta = json.loads(raw["json"])
        if isinstance(meta, dict) and isinstance(meta.get("label"), int):
            return int(meta["label"])
    return -1


def fit_image(image: Image.Image, size: int | None) -> np.ndarray:
    """RGB uint8 HxWx3; with ``size``, the shorter side resized to ``size`` (bicubic) and the centre
    cropped square (the usual CLIP/SD preprocessing). Images already ``size``×``size`` are untouched."""
    image = image.convert("RGB")
    if size is not None and image.size != (size, size):
        width, height = image.size
        scale = size / min(width, height)
        resized = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(resized, Image.BICUBIC)
        left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def decode_sample(raw: dict, image_size: int | None) -> tuple[dict | None, str | None]:
    """``(sample, None)`` for a usable raw sample, ``(None, reason)`` otherwise. Pixel shards give
    ``image``; feature shards (``diffdis precompute``) give ``latent`` instead."""
    caption = _caption(raw)
    if caption is None:
        return None, "missing_caption"
    sample: dict[str, Any] = {"key": raw["__key__"], "caption": caption}
    try:
        sample["label"] = _label(raw)
    except (ValueError, UnicodeDecodeError):
        return None, "bad_metadata"
    if LATENT_EXTENSION in raw:
        try:
            sample["latent"] = np.load(io.BytesIO(raw[LATENT_EXTENSION]), allow_pickle=False)
        except (ValueError, OSError):
            return None, "decode_error"
        return sample, None
    data = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if data is None:
        return None, "missing_image"
    try:
        with Image.open(io.BytesIO(data)) as image:
            sample["image"] = fit_image(image, image_size)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None, "decode_error"
    return sample, None


def read_captions(spec: str | Sequence[str], limit: int, storage_options: dict | None = None) -> list[str]:
    """Up to ``limit`` captions from the first shards in listed order (the offline tokenizer's corpus)."""
    captions: list[str] = []
    for ref in resolve_shards(spec, storage_options).shards:
        for raw in raw_samples(ref, storage_options):
            caption = _caption(raw)
            if caption is not None:
                captions.append(caption)
            if len(captions) >= limit:
                return captions
    if not captions:
        raise ShardSourceError(f"{spec}: no captions ('.txt' members) found to train a tokenizer on")
    return captions
