"""Shard bytes, stats sidecars, and what an output folder already holds (for resumption).

A shard is built in memory with ``webdataset.TarWriter`` (fixed mtime 0, uid/gid 0, mode 0444,
keys sorted within a sample, samples in key order) so the same samples give the same bytes on
any machine, and written whole with ``storage.write_whole``. Its stats sidecar
``{prefix}-{index:06d}.stats.json`` is written *after* the tar: a sidecar present means the
tar was complete, and a tar whose size or sha256 disagrees with its sidecar is redone.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from data_pipeline.storage import filesystem, join, read_bytes, write_whole
from data_pipeline.transforms import EncodedSample


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def stats_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.stats.json"


def tar_bytes(samples: Sequence[EncodedSample]) -> bytes:
    """A reproducible uncompressed tar of ``samples`` (their order is kept: callers pass key order)."""
    from webdataset import TarWriter  # noqa: PLC0415

    buffer = io.BytesIO()
    with TarWriter(buffer, mtime=0, encoder=False) as writer:
        for sample in samples:
            writer.write(sample.tar_record())
    return buffer.getvalue()


@dataclass
class ShardStats:
    """The sidecar: what the shard holds, why the rest of its unit was dropped, and its kept hashes
    (so a resumed job can rebuild the cross-shard dedup set without reading the tars)."""

    index: int
    name: str | None  # None when every item of the unit was filtered: no tar is written
    samples: int
    bytes: int
    sha256: str
    items: int  # input items in the unit
    counts: dict[str, int]
    hashes: list[str]
    fingerprint: str  # of the content config (shard_config.fingerprint): never mix configs
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, source: str) -> "ShardStats":
        try:
            return cls(**json.loads(data))
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{source}: malformed shard stats ({error})") from None


def write_shard(directory: str, prefix: str, index: int, samples: Sequence[EncodedSample], items: int,
                counts: dict[str, int], fingerprint: str, storage_options: dict | None = None) -> ShardStats:
    """Tar first, then its sidecar. A unit with no kept sample gets only a sidecar."""
    name = None
    data = b""
    if samples:
        name = shard_name(prefix, index)
        data = tar_bytes(samples)
        write_whole(join(directory, name), data, storage_options)
    stats = ShardStats(index=index, name=name, samples=len(samples), bytes=len(data),
                       sha256=hashlib.sha256(data).hexdigest() if samples else "",
                       items=items, counts=dict(sorted(counts.items())), hashes=[s.sha256 for s in samples],
                       fingerprint=fingerprint)
    write_whole(join(directory, stats_name(prefix, index)), stats.to_json(), storage_options)
    return stats


def existing_shards(directory: str, prefix: str, num_units: int, fingerprint: str,
                    storage_options: dict | None = None, verify_sha256: bool = False) -> dict[int, ShardStats]:
    """Units already done in ``directory``: sidecar present and its tar's size (and, if asked, sha256) match.

    Raises ``ValueError`` when a sidecar was made with another content config: mixing shards of
    two configs would silently corrupt the dataset, so the user must pick another output.
    """
    fs, root = filesystem(directory, storage_options)
    try:
        listing = {posixpath.basename(e["name"]): e for e in fs.ls(root, detail=True)} if fs.isdir(root) else {}
    except FileNotFoundError:
        listing = {}
    done: dict[int, ShardStats] = {}
    for index in range(num_units):
        sidecar = stats_name(prefix, index)
        if sidecar not in listing:
            continue
        url = join(directory, sidecar)
        stats = ShardStats.from_json(read_bytes(url, storage_options), url)
        if stats.fingerprint != fingerprint:
            raise ValueError(f"{url} was made with a different shard config (fingerprint {stats.fingerprint[:12]} "
                             f"!= {fingerprint[:12]}); write to another output URL or delete the old shards")
        if stats.name is not None:
            entry = listing.get(stats.name)
            if entry is None or int(entry.get("size", -1)) != stats.bytes:
                continue
            if verify_sha256:
                digest = hashlib.sha256(read_bytes(join(directory, stats.name), storage_options)).hexdigest()
                if digest != stats.sha256:
                    continue
        done[index] = stats
    return done
