"""``run_pipeline``: source → Ray tasks (load, filter, transform, encode per unit) → shards → manifest.

How the pieces keep the output a pure function of (inputs, content config):

- Items are enumerated in a fixed order; unit ``i`` is items ``[i*S, (i+1)*S)`` and becomes shard
  ``i``; sample keys are ``{unit:05d}{position:04d}`` (img2dataset's layout) from the *input*
  position, so filtering never renames a sample.
- Ray tasks run units in any order on any number of workers; the driver **commits units in index
  order**, and only there applies cross-shard exact dedup (a hash already kept by an earlier unit
  is a ``duplicate``). On resume, the kept hashes of finished units come from their stats
  sidecars, so a resumed job drops exactly what an uninterrupted one would have.
- At most ``max_in_flight`` units are submitted-but-uncommitted at any time (memory bound), and at
  most two committed shards wait for their upload.
- Each tar is written whole, then its sidecar; ``manifest.json`` last (``data_pipeline.manifest``).
  Already-finished units are skipped, so a rerun after a crash writes only what is missing, and a
  rerun of a finished job writes nothing.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from data_pipeline.manifest import Manifest, ShardEntry, manifest_url, write_manifest
from data_pipeline.progress import progress as progress_bar
from data_pipeline.ray_runtime import start_ray
from data_pipeline.shard_config import ShardConfig, content_dict, fingerprint
from data_pipeline.shard_writer import ShardStats, existing_shards, shard_name, write_shard
from data_pipeline.sources import ItemLoader, Source, TableLoader, open_source
from data_pipeline.storage import filesystem, read_bytes, redact
from data_pipeline.transforms import REASONS, EncodedSample, Rejected, check_caption, load_scorer, transform

log = logging.getLogger(__name__)

MAX_PENDING_WRITES = 2


def sample_key(unit: int, position: int, samples_per_shard: int) -> str:
    """img2dataset-style ``{unit:05d}{position:04d}``; the position field widens for shards > 10,000."""
    width = max(4, len(str(samples_per_shard - 1)))
    return f"{unit:05d}{position:0{width}d}"


@dataclass
class UnitResult:
    """What one Ray task returns: kept samples in key order and per-reason counts of the unit."""

    index: int
    items: int
    samples: list[EncodedSample]
    counts: dict[str, int]


def _threads_for(loader: ItemLoader, config: ShardConfig) -> int:
    """Downloads wait on the network, so URL tables use many threads per worker; the rest are CPU-bound."""
    if config.run.threads_per_worker:
        return config.run.threads_per_worker
    return 16 if isinstance(loader, TableLoader) else 1


def process_unit(index: int, items: list, loader: ItemLoader, config: ShardConfig) -> UnitResult:
    """Load → caption filters → decode/filters/resize/score/encode, for every item of one unit."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    scorer = load_scorer(config.filters.scorer)
    loader.prepare(items)

    def one(position: int) -> tuple[str, EncodedSample | None]:
        key = sample_key(index, position, config.samples_per_shard)
        item = items[position]
        try:
            try:
                caption = loader.caption(item)
            except OSError as error:
                raise Rejected("failed_download", f"caption of {item!r}: {error}") from None
            check_caption(caption, config.filters)
            raw = loader.fetch(item, caption)
            return "ok", transform(raw, key, config.image, config.filters, scorer)
        except Rejected as rejected:
            log.debug("%s rejected: %s", key, rejected)
            return rejected.reason, None

    threads = min(_threads_for(loader, config), max(1, len(items)))
    if threads == 1:
        outcomes = [one(p) for p in range(len(items))]
    else:
        with ThreadPoolExecutor(threads) as pool:
            outcomes = list(pool.map(one, range(len(items))))
    counts = Counter(reason for reason, _ in outcomes)
    return UnitResult(index, len(items), [s for _, s in outcomes if s is not None], dict(counts))


def commit_unit(result: UnitResult, seen: set[str], dedup: bool) -> tuple[list[EncodedSample], dict[str, int]]:
    """Cross-shard exact dedup, applied in unit order by the driver (deterministic whatever ran first)."""
    counts = Counter(result.counts)
    kept = []
    for sample in result.samples:
        if dedup and sample.sha256 in seen:
            counts["ok"] -= 1
            counts["duplicate"] += 1
            continue
        seen.add(sample.sha256)
        kept.append(sample)
    return kept, {reason: n for reason, n in counts.items() if n}


@dataclass
class PipelinePlan:
    """What a run would do (``--dry-run``): no Ray, nothing written."""

    source: str
    kind: str
    items: int
    units: int
    samples_per_shard: int
    output_url: str
    done_units: list[int]
    todo_units: list[int]
    first_shards: list[str]
    config: dict[str, Any]


@dataclass
class PipelineSummary:
    output_url: str
    manifest_url: str
    shards: int  # tars listed in the manifest
    units: int
    units_written: int  # this run
    units_reused: int  # already complete from an earlier run
    items: int  # input items of the whole source
    items_processed: int  # input items processed by this run
    samples: int  # kept samples in the whole dataset
    bytes: int
    counts: dict[str, int]
    wall_s: float  # the whole call: listing, Ray start, processing, manifest
    process_s: float  # first unit submitted → last shard written (the throughput's denominator)
    cpus: int
    nothing_to_do: bool = False
    manifest_written: bool = True
    input_problems: list[str] = field(default_factory=list)  # inputs read only in part (truncated shards)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def items_per_s(self) -> float:
        return self.items_processed / self.process_s if self.process_s > 0 else 0.0

    @property
    def items_per_s_per_core(self) -> float:
        return self.items_per_s / max(1, self.cpus)

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict  # noqa: PLC0415

        record = asdict(self)
        record["items_per_s"] = round(self.items_per_s, 2)
        record["items_per_s_per_core"] = round(self.items_per_s_per_core, 2)
        return record


def _open(config: ShardConfig, storage_options: dict | None, output_url: str) -> tuple[Source, int]:
    try:
        filesystem(output_url, storage_options)
    except (ValueError, ImportError, TypeError) as error:  # unknown protocol, bad option names
        raise ValueError(f"output URL {output_url}: {error}") from None
    source = open_source(config.source, config.image.size, storage_options)
    return source, source.num_units(config.samples_per_shard)


def plan_pipeline(config: ShardConfig, output_url: str, storage_options: dict | None = None) -> PipelinePlan:
    source, units = _open(config, storage_options, output_url)
    done = existing_shards(output_url, config.prefix, units, fingerprint(config), storage_options,
                           config.run.verify_sha256)
    return PipelinePlan(
        source=source.description, kind=source.kind, items=len(source), units=units,
        samples_per_shard=config.samples_per_shard, output_url=output_url, done_units=sorted(done),
        todo_units=[i for i in range(units) if i not in done],
        first_shards=[shard_name(config.prefix, i) for i in range(min(units, 3))],
        config=redact(content_dict(config)),
    )


def build_manifest(stats: list[ShardStats], config: ShardConfig, truncated_inputs: int = 0) -> Manifest:
    counts: Counter = Counter()
    for unit in stats:
        counts.update(unit.counts)
    ordered = {reason: counts[reason] for reason in REASONS if counts.get(reason)}
    ordered.update({r: n for r, n in sorted(counts.items()) if r not in ordered and n})
    if truncated_inputs:
        ordered["truncated_input_shards"] = truncated_inputs
    shards = [ShardEntry(s.name, s.samples, s.bytes, s.sha256) for s in stats if s.name is not None]
    return Manifest(shards=shards, counts=ordered, config=redact(content_dict(config)))


_remote_process_unit = None


def _remote():
    global _remote_process_unit  # noqa: PLW0603 - one remote function per process
    if _remote_process_unit is None:
        import ray  # noqa: PLC0415

        # max_retries: a unit whose worker died (OOM, node loss, kill) is redone; results are pure.
        _remote_process_unit = ray.remote(num_cpus=1, max_retries=3)(process_unit)
    return _remote_process_unit


def run_pipeline(config: ShardConfig, output_url: str, storage_options: dict | None = None,
                 ray_address: str | None = None, progress: bool = True) -> PipelineSummary:
    """Shard ``config.source`` into ``output_url``; resumable, idempotent, byte-reproducible."""
    options = dict(storage_options or {})
    started = time.perf_counter()
    source, units = _open(config, options, output_url)
    if units == 0:
        raise ValueError(f"source {config.source.path!r} has no items")
    fp = fingerprint(config)
    done = existing_shards(output_url, config.prefix, units, fp, options, config.run.verify_sha256)
    todo = [i for i in range(units) if i not in done]
    stats: dict[int, ShardStats] = dict(done)
    cpus, process_s = 0, 0.0
    if todo:
        cpus, process_s = _run_units(config, source, units, todo, stats, output_url, options, ray_address, progress)
    ordered = [stats[i] for i in range(units)]
    manifest = build_manifest(ordered, config, truncated_inputs=len(source.problems))
    data = manifest.to_json()
    url = manifest_url(output_url)
    try:
        unchanged = read_bytes(url, options) == data
    except FileNotFoundError:
        unchanged = False
    if not unchanged:
        write_manifest(output_url, manifest, options)
    wall = time.perf_counter() - started
    return PipelineSummary(
        output_url=output_url, manifest_url=url, shards=len(manifest.shards), units=units,
        units_written=len(todo), units_reused=len(done), items=len(source),
        items_processed=sum(stats[i].items for i in todo), samples=manifest.total_samples,
        bytes=manifest.total_bytes, counts=dict(manifest.counts), wall_s=wall, process_s=process_s, cpus=cpus,
        nothing_to_do=not todo and unchanged, manifest_written=not unchanged, input_problems=list(source.problems),
    )


def _run_units(config: ShardConfig, source: Source, units: int, todo: list[int], stats: dict[int, ShardStats],
               output_url: str, options: dict, ray_address: str | None, progress: bool) -> tuple[int, float]:
    """Submit ``todo`` units to Ray within the in-flight window, commit in order, write shards."""
    import ray  # noqa: PLC0415

    load_scorer(config.filters.scorer)  # fail fast, on the driver, with the path named
    we_started = start_ray(ray_address, config.run.num_workers)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    window = config.run.max_in_flight or 2 * cpus
    fp = fingerprint(config)
    loader_ref = ray.put(source.loader)
    remote = _remote()
    pending: dict[Any, int] = {}
    results: dict[int, UnitResult] = {}
    writes: list[tuple[int, Future]] = []
    seen: set[str] = set()
    queue = iter(todo)
    upcoming = next(queue, None)
    bar = progress_bar(len(source), "shard", unit="img", initial=sum(s.items for s in stats.values()),
                       disable=not progress, smoothing=0.1)
    kept_this_run = 0
    begin = time.perf_counter()
    writer = ThreadPoolExecutor(MAX_PENDING_WRITES, thread_name_prefix="shard-writer")
    try:
        next_commit = 0
        while next_commit < units:
            if next_commit in stats:  # finished by an earlier run: only its hashes matter
                seen.update(stats[next_commit].hashes)
                next_commit += 1
                continue
            while upcoming is not None and len(pending) + len(results) < window:
                ref = remote.remote(upcoming, source.unit_items(upcoming, config.samples_per_shard), loader_ref, config)
                pending[ref] = upcoming
                upcoming = next(queue, None)
            if next_commit in results:
                result = results.pop(next_commit)
                kept, counts = commit_unit(result, seen, config.filters.dedup)
                _raise_failed_writes(writes, wait_for_room=True)
                future = writer.submit(write_shard, output_url, config.prefix, next_commit, kept, result.items,
                                       counts, fp, options)
                writes.append((next_commit, future))
                kept_this_run += len(kept)
                bar.update(result.items)
                bar.set_postfix(kept_per_s=f"{kept_this_run / max(1e-9, time.perf_counter() - begin):.0f}")
                next_commit += 1
                continue
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                results[pending.pop(ref)] = ray.get(ref)
        for index, future in writes:
            stats[index] = future.result()
        process_s = time.perf_counter() - begin
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        writer.shutdown(wait=True, cancel_futures=True)
        _raise_failed_writes(writes, wait_for_room=False)  # a storage error explains more than what followed
        raise
    finally:
        writer.shutdown(wait=True)
        bar.close()
        if we_started:
            ray.shutdown()
    return cpus, process_s


def _raise_failed_writes(writes: list[tuple[int, Future]], wait_for_room: bool) -> None:
    """Surface the lowest-index failed write; with ``wait_for_room`` also block until a write slot frees."""
    for _, future in writes:
        if future.done() and not future.cancelled() and future.exception() is not None:
            raise future.exception()
    if wait_for_room:
        running = [f for _, f in writes if not f.done()]
        while len(running) >= MAX_PENDING_WRITES:
            running[0].result()  # raises the storage error if that write failed
            running = [f for _, f in writes if not f.done()]
