"""Sources: enumerate items in a deterministic order, and load one item's caption and bytes.

A source is split in two so that Ray tasks stay light:

- ``Source`` (driver side) lists every item once, in a fixed order (sorted paths, table row
  order, shard order then member order, digits/scenes index order). Work unit ``i`` is items
  ``[i*S, (i+1)*S)``: shard ``i`` is therefore a pure function of the inputs and the config.
- ``ItemLoader`` (worker side, picklable, small) turns one item into its caption and a
  ``RawSample``. Captions come first so caption filters can skip a download.

Kinds: ``folder`` (images + same-stem ``.txt`` captions), ``table`` (CSV/TSV/Parquet/JSONL with
url and caption columns, as img2dataset reads), ``shards`` (existing WebDataset tars, ours or
img2dataset's: ``jpg|png|webp`` + ``txt`` + ``json``), ``digits`` (the bundled digits), ``scenes``
(procedural captioned shapes, ``data_pipeline.scenes``).
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from data_pipeline.shard_config import SourceConfig
from data_pipeline.storage import filesystem, is_local
from data_pipeline.transforms import RawSample, Rejected
from data_pipeline.wds_io import ShardRead, ShardRef, ShardSourceError, raw_samples

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TABLE_EXTENSIONS = (".csv", ".tsv", ".parquet", ".jsonl", ".json")


class SourceError(ValueError):
    """The source cannot be read as configured; the message names the file, column or URL."""


# --------------------------------------------------------------------------------------------
# Worker side: loaders


class ItemLoader:
    """Loads items on a worker. ``prepare`` is called once per unit with that unit's items."""

    def prepare(self, items: Sequence[Any]) -> None:  # noqa: B027 - optional hook
        pass

    def caption(self, item: Any) -> str:
        raise NotImplementedError

    def fetch(self, item: Any, caption: str) -> RawSample:
        raise NotImplementedError


def _read_url_bytes(url: str, storage_options: dict | None) -> bytes:
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as handle:
        return handle.read()


@dataclass
class FolderLoader(ItemLoader):
    """Items are ``(relative path, image URL, caption URL or None)``."""

    storage_options: dict = field(default_factory=dict)

    def caption(self, item) -> str:
        _, _, caption_url = item
        if caption_url is None:
            return ""
        return _read_url_bytes(caption_url, self.storage_options).decode("utf-8", errors="replace").strip()

    def fetch(self, item, caption: str) -> RawSample:
        relative, image_url, _ = item
        try:
            data = _read_url_bytes(image_url, self.storage_options)
        except OSError as error:
            raise Rejected("failed_download", f"{image_url}: {error}") from None
        return RawSample(caption=caption, meta={"source": "folder", "path": relative}, data=data)


_pools: dict = {}  # per worker process, see TableLoader._pool
USER_AGENT = "diffdis-shard/0.1 (+https://github.com/; image-text dataset builder)"


@dataclass
class TableLoader(ItemLoader):
    """Items are ``(row, url, caption)``; ``url`` is http(s), file:// or a path (relative: to the table's folder)."""

    base_dir: str
    timeout: float
    retries: int
    storage_options: dict = field(default_factory=dict)

    def caption(self, item) -> str:
        return item[2]

    def _pool(self):
        """One ``urllib3.PoolManager`` per worker process (thread-safe, keeps connections alive).

        urllib3 is the transport under ``requests``; used directly it costs about half the CPU per
        small download (measured on loopback: 2.5 ms vs 4.5 ms), which is most of a URL table's cost.
        Retries (connect/read errors, 429/5xx, exponential backoff) and timeouts are urllib3's own."""
        key = (self.timeout, self.retries)
        pool = _pools.get(key)
        if pool is None:
            import urllib3  # noqa: PLC0415

            retry = urllib3.Retry(total=self.retries, connect=self.retries, read=self.retries, status=self.retries,
                                  backoff_factor=0.1, status_forcelist=(429, 500, 502, 503, 504),
                                  raise_on_status=False, redirect=5)
            pool = _pools[key] = urllib3.PoolManager(num_pools=64, maxsize=32, retries=retry,
                                                     timeout=urllib3.Timeout(total=self.timeout))
        return pool

    def fetch(self, item, caption: str) -> RawSample:
        row, url, _ = item
        meta = {"source": "table", "url": url, "row": row}
        if not url:
            raise Rejected("failed_download", f"row {row}: empty url")
        if url.startswith(("http://", "https://")):
            import urllib3  # noqa: PLC0415

            try:
                response = self._pool().request("GET", url, headers={"User-Agent": USER_AGENT})
            except urllib3.exceptions.HTTPError as error:
                raise Rejected("failed_download", f"{url}: {type(error).__name__}: {error}") from None
            if response.status >= 400:
                raise Rejected("failed_download", f"{url}: HTTP {response.status}")
            data = response.data
        else:
            target = url if "://" in url or posixpath.isabs(url) else posixpath.join(self.base_dir, url)
            try:
                data = _read_url_bytes(target, self.storage_options)
            except OSError as error:
                raise Rejected("failed_download", f"{url}: {error}") from None
        return RawSample(caption=caption, meta=meta, data=data)


@dataclass
class ShardLoader(ItemLoader):
    """Items are ``(shard URL, key)``. ``prepare`` reads each shard the unit touches once, whole."""

    storage_options: dict = field(default_factory=dict)
    _members: dict = field(default_factory=dict, repr=False)

    def prepare(self, items) -> None:
        self._members = {}
        for shard_url in dict.fromkeys(url for url, _ in items):
            samples, _ = read_shard(shard_url, self.storage_options)  # the driver already reported truncation
            self._members.update({(shard_url, key): members for key, members in samples.items()})

    def caption(self, item) -> str:
        members = self._members.get(item, {})
        if "txt" in members:
            return members["txt"].decode("utf-8", errors="replace").strip()
        meta = self._json(item)
        return str(meta.get("caption") or "").strip()

    def _json(self, item) -> dict:
        raw = self._members.get(item, {}).get("json")
        try:
            return json.loads(raw) if raw else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}

    def fetch(self, item, caption: str) -> RawSample:
        shard_url, key = item
        members = self._members.get(item, {})
        image_key = next((k for k in SHARD_IMAGE_KEYS if k in members), None)
        if image_key is None:
            raise Rejected("failed_download", f"{shard_url}: sample {key!r} has no image member")
        original = self._json(item)
        meta: dict[str, Any] = {"source": "shards", "shard": shard_url, "original_key": key}
        for name in ("url", "label", "shape", "colour", "size", "position"):
            if name in original:
                meta[name] = original[name]
        return RawSample(caption=caption, meta=meta, data=members[image_key])


def _shard_ref(shard_url: str) -> ShardRef:
    return ShardRef(shard_url.rstrip("/").rsplit("/", 1)[-1], shard_url)


def read_shard(shard_url: str, storage_options: dict | None) -> tuple[dict[str, dict[str, bytes]], ShardRead]:
    """``{key: {ext: bytes}}`` of one input shard, in tar order, and what reading it found.

    One tar reader for every shard we read (``wds_io.raw_samples``: webdataset's key splitting, so keys
    match its loaders, and the tail check that tells a shard cut between members from a whole one). A
    truncated shard gives the samples before the break (the one being read is dropped) and its
    :class:`ShardRead` names the error; one that cannot be opened raises, naming it."""
    ref = _shard_ref(shard_url)
    read = ShardRead(ref)
    samples = {}
    try:
        for raw in raw_samples(ref, storage_options, read):
            samples[raw["__key__"]] = {ext.lower(): data for ext, data in raw.items() if not ext.startswith("__")}
    except ShardSourceError as error:
        raise SourceError(str(error)) from None
    return samples, read


@lru_cache(maxsize=2)
def _digits_split(split: str, image_size: int, split_seed: int):
    from data_pipeline.digits import load_digits_split  # noqa: PLC0415 - sklearn import only when used

    return load_digits_split(split, image_size=image_size, split_seed=split_seed)


@dataclass
class DigitsLoader(ItemLoader):
    """Item ``j`` is image ``j % N`` of the split (N images) with caption variant ``j // N``, so the
    split is repeated ``captions_per_image`` times, every copy in the same image order (a shard never
    holds two captions of one image, which would be false negatives in one contrastive batch).
    Variant 0's template is drawn from ``default_rng([caption_seed, original index])``; variant v
    takes the v-th next template, so an image's copies all have different captions."""

    split: str
    image_size: int
    split_seed: int
    caption_seed: int
    images: int = 0  # N, the split's size (0: captions_per_image is 1 and items are positions)

    def _sample(self, item: int):
        data = _digits_split(self.split, self.image_size, self.split_seed)
        position = item % len(data) if self.images else item
        return data.keys[position], int(data.labels[position]), data.images[position]

    def caption(self, item) -> str:
        from data_pipeline.digits import TRAIN_TEMPLATES, caption_for  # noqa: PLC0415

        key, label, _ = self._sample(item)
        index = int(key.rsplit("-", 1)[1])
        first = int(np.random.default_rng([self.caption_seed, index]).integers(len(TRAIN_TEMPLATES)))
        variant = item // self.images if self.images else 0
        return caption_for(label, (first + variant) % len(TRAIN_TEMPLATES))

    def fetch(self, item, caption: str) -> RawSample:
        from PIL import Image  # noqa: PLC0415

        key, label, pixels = self._sample(item)
        meta = {"source": "digits", "split": self.split, "original_key": key, "label": label}
        if self.images:
            meta["caption_variant"] = item // self.images
        return RawSample(caption=caption, meta=meta, image=Image.fromarray(pixels, mode="RGB"))


@lru_cache(maxsize=2)
def _scenes_split(split: str, image_size: int, num_samples: int, split_seed: int):
    from data_pipeline.scenes import load_scenes_split  # noqa: PLC0415

    return load_scenes_split(split, image_size=image_size, num_samples=num_samples or None, split_seed=split_seed)


@dataclass
class ScenesLoader(ItemLoader):
    """The scenes split as items, exactly as ``DigitsLoader`` does the digits: item ``j`` is image
    ``j % N`` with caption variant ``j // N``; variant 0's training template is drawn from
    ``default_rng([caption_seed, index])``, variant v takes the v-th next. The json carries the
    attribute names (shape, colour, size, position) and the packed ``label``."""

    split: str
    image_size: int
    num_samples: int
    split_seed: int
    caption_seed: int
    images: int = 0  # N when captions_per_image > 1, else 0 (items are positions)

    def _sample(self, item: int):
        data = _scenes_split(self.split, self.image_size, self.num_samples, self.split_seed)
        position = item % len(data) if self.images else item
        return position, data.keys[position], int(data.labels[position]), data.images[position]

    def caption(self, item) -> str:
        from data_pipeline.scenes import TRAIN_TEMPLATES, caption_for  # noqa: PLC0415

        position, _, label, _ = self._sample(item)
        first = int(np.random.default_rng([self.caption_seed, position]).integers(len(TRAIN_TEMPLATES)))
        variant = item // self.images if self.images else 0
        return caption_for(label, (first + variant) % len(TRAIN_TEMPLATES))

    def fetch(self, item, caption: str) -> RawSample:
        from PIL import Image  # noqa: PLC0415

        from data_pipeline.scenes import decode_label  # noqa: PLC0415

        _, key, label, pixels = self._sample(item)
        meta = {"source": "scenes", "split": self.split, "original_key": key, "label": label,
                **decode_label(label).names()}
        if self.images:
            meta["caption_variant"] = item // self.images
        return RawSample(caption=caption, meta=meta, image=Image.fromarray(pixels, mode="RGB"))


# --------------------------------------------------------------------------------------------
# Driver side: enumeration


@dataclass
class Source:
    """The enumerated items of a source plus the loader that workers use on them."""

    kind: str
    description: str
    items: list
    loader: ItemLoader
    problems: list[str] = field(default_factory=list)  # inputs read only in part (truncated shards)

    def __len__(self) -> int:
        return len(self.items)

    def num_units(self, samples_per_shard: int) -> int:
        return -(-len(self.items) // samples_per_shard)

    def unit_items(self, unit: int, samples_per_shard: int) -> list:
        return self.items[unit * samples_per_shard:(unit + 1) * samples_per_shard]


def resolve_kind(config: SourceConfig, storage_options: dict | None = None) -> str:
    """``config.kind``, or for ``auto`` the kind ``config.path`` looks like (see ``SourceConfig``)."""
    if config.kind != "auto":
        return config.kind
    path = config.path
    if not path:
        raise SourceError("source.path is empty: give a folder, a table file, shard URLs, 'digits' or 'scenes'")
    for builtin in ("digits", "scenes"):
        if path == builtin or path.startswith(f"{builtin}:"):
            return builtin
    lowered = path.lower()
    if lowered.endswith(TABLE_EXTENSIONS):
        return "table"
    if lowered.endswith(".tar") or "{" in path:
        return "shards"
    fs, inner = filesystem(path, storage_options)
    if not fs.exists(inner):
        raise FileNotFoundError(f"source path {path} does not exist")
    if not fs.isdir(inner):
        raise SourceError(f"source path {path}: cannot tell its kind from the name; set source.kind "
                          "(folder, table, shards, digits or scenes)")
    names = [posixpath.basename(p) for p in fs.ls(inner, detail=False)]
    if "manifest.json" in names or any(n.endswith(".tar") for n in names):
        return "shards"
    return "folder"


def open_source(config: SourceConfig, image_size: int, storage_options: dict | None = None) -> Source:
    """Enumerate ``config``'s items; errors name the path, file or column at fault."""
    options = dict(storage_options or {})
    kind = resolve_kind(config, options)
    if kind == "digits":
        return _open_digits(config, image_size)
    if kind == "scenes":
        return _open_scenes(config, image_size)
    if kind == "folder":
        return _open_folder(config.path, options)
    if kind == "table":
        return _open_table(config, options)
    if kind == "shards":
        return _open_shards(config.path, options)
    raise SourceError(f"source.kind={kind!r} is unknown")


def _open_digits(config: SourceConfig, image_size: int) -> Source:
    split = "train"
    if config.path.startswith("digits:"):
        split = config.path.partition(":")[2]
    if split not in ("train", "heldout"):
        raise SourceError(f"source.path={config.path!r}: digits split must be 'train' or 'heldout'")
    data = _digits_split(split, image_size, config.split_seed)
    copies = config.captions_per_image
    loader = DigitsLoader(split, image_size, config.split_seed, config.caption_seed, len(data) if copies > 1 else 0)
    described = f"digits {split} split ({len(data)} images, {image_size}px" + (f", {copies} captions each)" if copies > 1 else ")")
    return Source("digits", described, list(range(len(data) * copies)), loader)


def _open_scenes(config: SourceConfig, image_size: int) -> Source:
    split = config.path.partition(":")[2] if config.path.startswith("scenes:") else "train"
    if split not in ("train", "heldout"):
        raise SourceError(f"source.path={config.path!r}: scenes split must be 'train' or 'heldout'")
    data = _scenes_split(split, image_size, config.num_samples, config.split_seed)
    copies = config.captions_per_image
    loader = ScenesLoader(split, image_size, config.num_samples, config.split_seed, config.caption_seed,
                          len(data) if copies > 1 else 0)
    described = f"scenes {split} split ({len(data)} images, {image_size}px" + (f", {copies} captions each)" if copies > 1 else ")")
    return Source("scenes", described, list(range(len(data) * copies)), loader)


def _open_folder(path: str, options: dict) -> Source:
    fs, root = filesystem(path, options)
    if not fs.isdir(root):
        raise FileNotFoundError(f"source folder {path} does not exist or is not a folder")
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    files = sorted(fs.find(root))
    captions = {posixpath.splitext(f)[0]: f for f in files if f.endswith(".txt")}

    def url(p: str) -> str:
        return p if is_local(fs) else f"{protocol}://{p}"

    items = []
    for name in files:
        stem, ext = posixpath.splitext(name)
        if ext.lower().lstrip(".") in IMAGE_EXTENSIONS:
            caption = captions.get(stem)
            items.append((posixpath.relpath(name, root), url(name), url(caption) if caption else None))
    if not items:
        raise SourceError(f"source folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return Source("folder", f"folder {path} ({len(items)} images)", items, FolderLoader(options))


def _read_table(path: str, options: dict):
    import pyarrow.csv as pacsv  # noqa: PLC0415
    import pyarrow.json as pajson  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    fs, inner = filesystem(path, options)
    if not fs.exists(inner):
        raise FileNotFoundError(f"table {path} does not exist")
    lowered = path.lower()
    try:
        with fs.open(inner, "rb") as handle:
            if lowered.endswith(".parquet"):
                return pq.read_table(handle)
            if lowered.endswith((".jsonl", ".json")):
                return pajson.read_json(handle)
            delimiter = "\t" if lowered.endswith(".tsv") else ","
            return pacsv.read_csv(handle, parse_options=pacsv.ParseOptions(delimiter=delimiter),
                                  convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    except Exception as error:  # noqa: BLE001 - pyarrow raises ArrowInvalid and friends
        raise SourceError(f"table {path}: cannot be read ({type(error).__name__}: {error})") from None


def _open_table(config: SourceConfig, options: dict) -> Source:
    table = _read_table(config.path, options)
    for role, column in (("url_column", config.url_column), ("caption_column", config.caption_column)):
        if column not in table.column_names:
            raise SourceError(f"table {config.path}: no column {column!r} (source.{role}); "
                              f"columns are {', '.join(table.column_names)}")
    urls = table.column(config.url_column).to_pylist()
    captions = table.column(config.caption_column).to_pylist()
    items = [(row, "" if u is None else str(u), "" if c is None else str(c)) for row, (u, c) in enumerate(zip(urls, captions))]
    base_dir = posixpath.dirname(config.path) or "."
    loader = TableLoader(base_dir, config.download_timeout, config.download_retries, options)
    return Source("table", f"table {config.path} ({len(items)} rows)", items, loader)


def shard_urls(path: str, options: dict) -> list[str]:
    """Brace pattern (``part-{000000..000009}.tar``), a single tar, a folder of tars, or a manifest's folder."""
    from braceexpand import braceexpand  # noqa: PLC0415 - a webdataset dependency

    if "{" in path:
        return list(braceexpand(path))
    fs, inner = filesystem(path, options)
    if not fs.exists(inner):
        raise FileNotFoundError(f"shard source {path} does not exist")
    if not fs.isdir(inner):
        return [path]
    base = path.rstrip("/")
    names = sorted(posixpath.basename(p) for p in fs.ls(inner, detail=False))
    if "manifest.json" in names:
        from data_pipeline.manifest import read_manifest  # noqa: PLC0415

        return read_manifest(base, options).shard_urls(base)
    tars = [f"{base}/{n}" for n in names if n.endswith(".tar")]
    if not tars:
        raise SourceError(f"shard source {path} holds no .tar files")
    return tars


def _open_shards(path: str, options: dict) -> Source:
    """Reads every input shard once on the driver, to number its samples globally. A truncated shard
    contributes the samples before the break and is reported (a warning naming it, and
    :attr:`Source.problems`, which the pipeline's summary and manifest carry)."""
    items, problems = [], []
    for url in shard_urls(path, options):
        samples, read = read_shard(url, options)
        items.extend((url, key) for key, members in samples.items() if set(members) & set(SHARD_IMAGE_KEYS))
        if read.error is not None:
            problems.append(f"input shard {url} is truncated or corrupt ({read.error}): {read.samples} whole "
                            f"sample(s) used" + (f", {read.dropped!r} dropped" if read.dropped else ""))
            log.warning("%s", problems[-1])
    return Source("shards", f"shards {path} ({len(items)} samples)", items, ShardLoader(options), problems)
