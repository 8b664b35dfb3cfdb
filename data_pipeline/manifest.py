"""``manifest.json``: the contract between the shard writer and every reader.

Written last, after every shard it lists is whole, so a reader that finds a manifest never sees
half a dataset. Shard names are relative to the manifest's directory, so a dataset can be copied
between stores (``file://`` → ``s3://``) unchanged. The pipeline config recorded here is redacted
(:func:`data_pipeline.storage.redact`): no credentials.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from data_pipeline.storage import join, read_bytes, write_whole

MANIFEST_NAME = "manifest.json"
FORMAT = "diffdis-shards"
VERSION = 1


class ManifestError(ValueError):
    """A manifest is missing, unreadable or inconsistent; the message names the URL and field."""


@dataclass
class ShardEntry:
    name: str  # relative to the manifest's directory, e.g. "part-000003.tar"
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    shards: list[ShardEntry]
    counts: dict[str, int] = field(default_factory=dict)  # per-reason sample counts: ok, failed_decode, ...
    config: dict[str, Any] = field(default_factory=dict)  # the (redacted) pipeline config that made the shards
    kind: str = "pixels"  # "pixels" (images + captions) or "features" (precomputed latents / text states)
    features: dict[str, Any] = field(default_factory=dict)  # for kind="features": what each key holds
    format: str = FORMAT
    version: int = VERSION

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def shard_urls(self, directory: str) -> list[str]:
        return [join(directory, s.name) for s in self.shards]

    def to_json(self) -> bytes:
        record = asdict(self)
        record["total_samples"] = self.total_samples
        record["total_bytes"] = self.total_bytes
        return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, source: str = "<manifest>") -> "Manifest":
        try:
            record = json.loads(data)
        except json.JSONDecodeError as error:
            raise ManifestError(f"{source}: not valid JSON ({error})") from None
        if record.get("format") != FORMAT:
            raise ManifestError(f"{source}: field 'format' is {record.get('format')!r}, expected {FORMAT!r}")
        if int(record.get("version", -1)) > VERSION:
            raise ManifestError(f"{source}: version {record['version']} is newer than this reader ({VERSION})")
        try:
            shards = [ShardEntry(**entry) for entry in record["shards"]]
        except (KeyError, TypeError) as error:
            raise ManifestError(f"{source}: field 'shards' is malformed ({error})") from None
        return cls(
            shards=shards, counts=dict(record.get("counts", {})), config=dict(record.get("config", {})),
            kind=record.get("kind", "pixels"), features=dict(record.get("features", {})),
            format=record["format"], version=int(record["version"]),
        )


def manifest_url(directory: str) -> str:
    return join(directory, MANIFEST_NAME)


def write_manifest(directory: str, manifest: Manifest, storage_options: dict | None = None) -> str:
    url = manifest_url(directory)
    write_whole(url, manifest.to_json(), storage_options)
    return url


def read_manifest(url: str, storage_options: dict | None = None) -> Manifest:
    """Read a manifest from its URL (``.../manifest.json``) or its directory."""
    if not url.endswith(".json"):
        url = manifest_url(url)
    try:
        data = read_bytes(url, storage_options)
    except FileNotFoundError:
        raise ManifestError(f"{url}: no manifest (was the shard job finished? it writes the manifest last)") from None
    return Manifest.from_json(data, source=url)
