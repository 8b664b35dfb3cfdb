"""``ShardStream``: the trainer's ``ImageTextStream`` over WebDataset shards, with an exact position.

Reading
    Shards come from a manifest, a directory, a glob, a brace pattern or a list, on any fsspec URL
    (:mod:`data_pipeline.wds_io`). A ``torch.utils.data.DataLoader`` with ``num_workers`` processes
    (0 reads in the trainer's process) decodes them; ranks and workers split the shards.

Order (non-resampled, one epoch at a time)
    - Shard order of epoch ``e``: ``default_rng([seed, e]).permutation(shards)``.
    - Rank ``r`` of ``world`` takes ``order[r::world]``; its logical worker ``w`` of ``W`` takes
      ``rank_shards[w::W]`` and reads them one after the other.
    - Inside a shard, a shuffle buffer (webdataset's ``shuffle``, filled to ``shuffle_buffer`` before
      it yields) is seeded by ``(seed, e, shard name)``: the order of a shard's samples depends on
      nothing else (not on the rank, the worker, or where reading started).
    - The DataLoader hands items over round-robin across workers (a worker leaves the round when it
      runs out), so the rank's sequence is a deterministic function of the shards, seed and layout.

Position (``state_dict``)
    ``{"mode": "epoch", "epoch": e, "consumed": {shard: n}, "done": [shards], "layout": {...},
    "last_worker": w, "samples": total}``: ``consumed[shard] = n`` means the first ``n`` items of that
    shard's shuffled order have reached the trainer (decoded samples and skipped corrupt ones), ``done``
    lists shards whose end has reached it. It is tracked on the consuming side from what the trainer
    actually received: every item carries its shard, its index in the shard and its logical worker, so
    samples prefetched by DataLoader workers but never consumed are not counted.
    Resuming re-reads a partially consumed shard and skips its first ``n`` items; with the same
    ``layout`` (rank, world size, workers) the DataLoader's round-robin is rotated to start after
    ``last_worker``, so the sequence after resume equals the uninterrupted one, sample for sample.

World-size change (:func:`merge_states`)
    The counts are per shard, not per rank, so positions of any world size combine: the merged state
    is the union of ``consumed`` and ``done`` (a shard is read by one rank per epoch). Loaded at a new
    world size, the shards not yet done are split among the new ranks (in the epoch's order, then
    ``[rank::world]``), each resuming at its consumed count: the rest of the epoch is read exactly once.
    Ranks may be in different epochs (epochs are per rank, shard sizes differ): the merged epoch is the
    smallest; the shards of ranks already past it count as done, and what those ranks read of their
    next epoch is read again there (at most one epoch of one rank's head start, logged).

Resampled mode (multi-node)
    Each logical worker of each rank draws shards with replacement from ``default_rng([seed, rank,
    worker, draw])`` forever (webdataset ``ResampledShards``-style, seeded per rank so ranks differ).
    The position is the number of samples drawn plus, per worker, ``[draw, items read of that draw]``;
    resuming with the same layout reproduces the same continuation.

Bad data
    Undecodable images, missing captions or images are skipped, counted in :attr:`ShardStream.stats`
    and logged with their key and shard. A truncated shard (tar cut mid-member) is logged with its name
    and the count of samples read from it, and compared with the manifest's count when there is one.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field
from itertools import count
from typing import Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.wds_io import ShardRead, ShardRef, ShardSet, decode_sample, raw_samples, resolve_shards

log = logging.getLogger("diffdis.data")

STATE_VERSION = 1
SAMPLE, SKIP, END = "sample", "skip", "end"


class NoShardForRankError(ValueError):
    """A rank would get no shard: it would wait forever for data the other ranks have."""


# -- pure planning functions ---------------------------------------------------------------------
def epoch_order(seed: int, epoch: int, count_: int) -> list[int]:
    """Shard indices in the order of epoch ``epoch``."""
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(count_)]


def rank_shards(seed: int, epoch: int, names: Sequence[str], rank: int, world_size: int,
                excluded: Sequence[str] = ()) -> list[int]:
    """Shard indices rank ``rank`` reads in ``epoch``: the epoch order minus ``excluded``, ``[rank::world]``."""
    skip = set(excluded)
    remaining = [i for i in epoch_order(seed, epoch, len(names)) if names[i] not in skip]
    return remaining[rank::world_size]


def shard_rng(seed: int, epoch: int, name: str) -> random.Random:
    """The shuffle buffer's generator for one shard in one epoch (str seeds are hashed by SHA-512)."""
    return random.Random(f"{seed}/{epoch}/{name}")


def merge_states(states: Sequence[dict]) -> dict:
    """One position from the per-rank positions of a run (any world size), to resume at another.

    See the module docstring for the policy. Resampled positions merge to the largest draw count
    (resampled data has no epoch to complete)."""
    if not states:
        raise ValueError("merge_states needs at least one rank state")
    modes = {s.get("mode") for s in states}
    if len(modes) != 1:
        raise ValueError(f"cannot merge positions of different modes: {sorted(map(str, modes))}")
    if modes == {"resampled"}:
        drawn = max(int(s["drawn"]) for s in states)
        return {"version": STATE_VERSION, "mode": "resampled", "drawn": drawn, "layout": None,
                "workers": None, "last_worker": None, "samples": sum(int(s.get("samples", 0)) for s in states),
                "next_draw": max(max((w[0] for w in s["workers"] or [[0, 0]]), default=0) for s in states) + 1}
    epoch = min(int(s["epoch"]) for s in states)
    consumed: dict[str, int] = {}
    done: set[str] = set()
    finished: list[dict] = []
    for state in states:
        if int(state["epoch"]) > epoch:
            layout = state.get("layout")
            if layout is None:
                raise ValueError("a merged position ahead of the others cannot be merged again")
            # its epoch-`epoch` split is taken to be the plain one (no resize happened inside that epoch)
            finished.append({"rank": layout["rank"], "world_size": layout["world_size"], "excluded": []})
            log.warning("rank %s is in epoch %s, ahead of epoch %s: its reads of the later epoch will be repeated",
                        layout["rank"], state["epoch"], epoch)
            continue
        done.update(state.get("done", []))
        finished.extend(state.get("finished", []))
        for name, n in state["consumed"].items():
            if consumed.get(name, 0) and int(n) and consumed[name] != int(n):
                raise ValueError(f"shard {name} was read by two ranks in epoch {epoch} ({consumed[name]} and {n} items): "
                                 "these positions do not come from one run")
            consumed[name] = max(consumed.get(name, 0), int(n))
    return {"version": STATE_VERSION, "mode": "epoch", "epoch": epoch, "consumed": consumed, "done": sorted(done),
            "finished": finished, "layout": None, "last_worker": None,
            "samples": sum(int(s.get("samples", 0)) for s in states)}


# -- the worker side -----------------------------------------------------------------------------
@dataclass
class ReadPlan:
    """What the DataLoader workers read for one pass; pickled into each worker when a pass starts."""

    shards: list[ShardRef]
    seed: int
    epoch: int
    shuffle_buffer: int
    image_size: int | None
    storage_options: dict
    num_logical: int
    rotation: int = 0
    worker_shards: list[list[int]] = field(default_factory=list)  # epoch mode: per logical worker
    skip: dict[str, int] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    resampled: bool = False
    rank: int = 0
    worker_start: list[list[int]] = field(default_factory=list)  # resampled: per logical worker [draw, offset]


def _identity(item):
    return item


class ShardItems(IterableDataset):
    """The DataLoader's dataset: items ``(kind, ...)`` from the shards of this worker's plan."""

    def __init__(self, plan: ReadPlan):
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.plan.num_logical:
            raise RuntimeError(f"plan for {self.plan.num_logical} workers run by {workers}")
        logical = (physical + self.plan.rotation) % workers
        if self.plan.resampled:
            return self._resampled(logical)
        return self._epoch(logical)

    def _epoch(self, logical: int) -> Iterator[dict]:
        plan = self.plan
        for index in plan.worker_shards[logical]:
            ref = plan.shards[index]
            if ref.name in plan.done:
                continue
            rng = shard_rng(plan.seed, plan.epoch, ref.name)
            yield from self._shard_items(ref, rng, plan.skip.get(ref.name, 0), logical, draw=None)

    def _resampled(self, logical: int) -> Iterator[dict]:
        plan = self.plan
        draw, offset = plan.worker_start[logical]
        for number in count(draw):
            index = int(np.random.default_rng([plan.seed, plan.rank, logical, number]).integers(len(plan.shards)))
            ref = plan.shards[index]
            rng = random.Random(f"{plan.seed}/resampled/{plan.rank}/{logical}/{number}")
            yield from self._shard_items(ref, rng, offset if number == draw else 0, logical, draw=number)

    def _shard_items(self, ref: ShardRef, rng: random.Random, skip: int, logical: int, draw: int | None) -> Iterator[dict]:
        """One shard's items in its seeded shuffled order, the first ``skip`` passed over undecoded,
        then an end item (with the raw count and any read error)."""
        read = ShardRead(ref)
        raw = raw_samples(ref, self.plan.storage_options, read)
        buffer = self.plan.shuffle_buffer
        ordered = wds.filters._shuffle(raw, bufsize=buffer, initial=buffer, rng=rng) if buffer > 1 else raw
        base = {"shard": ref.name, "worker": logical, "draw": draw}
        position = -1
        for position, sample in enumerate(ordered):
            if position < skip:
                continue
            decoded, reason = decode_sample(sample, self.plan.image_size)
            if decoded is None:
                yield {**base, "kind": SKIP, "position": position, "key": sample.get("__key__", "?"), "reason": reason}
            else:
                yield {**base, "kind": SAMPLE, "position": position, "sample": decoded}
        yield {**base, "kind": END, "position": position + 1, "read": read.samples, "error": read.error,
               "dropped": read.dropped, "expected": ref.expected}


# -- the consuming side --------------------------------------------------------------------------
@dataclass
class LoaderStats:
    """What the stream has delivered and dropped (consumer side, so counted once however many workers)."""

    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason → count
    skipped_keys: list[str] = field(default_factory=list)  # "shard/key: reason", the first 1000
    shards_finished: int = 0
    truncated: dict[str, int] = field(default_factory=dict)  # shard → samples read before the break
    count_mismatch: dict[str, list[int]] = field(default_factory=dict)  # shard → [read, manifest count]

    def as_dict(self) -> dict:
        return asdict(self)


class ShardStream:
    """Infinite, exactly resumable stream of samples from WebDataset shards (see module docstring).

    ``expect`` ("pixels" / "features") is checked against the manifest's kind when there is one.
    """

    def __init__(
        self,
        shards: str | Sequence[str] | ShardSet,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 100,
        resampled: bool = False,
        image_size: int | None = None,
        storage_options: dict | None = None,
        expect: str | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if num_workers < 0 or shuffle_buffer < 0:
            raise ValueError(f"num_workers={num_workers} and shuffle_buffer={shuffle_buffer} must be >= 0")
        self.storage_options = dict(storage_options or {})
        self.shard_set = shards if isinstance(shards, ShardSet) else resolve_shards(shards, self.storage_options)
        kind = self.shard_set.kind
        if expect is not None and kind is not None and kind != expect:
            raise ValueError(f"{self.shard_set.source}: manifest kind is {kind!r} but {expect!r} shards were expected "
                             "(data.precomputed must match the shards: features come from `diffdis precompute`)")
        self.names = [r.name for r in self.shard_set.shards]
        if not resampled and len(self.names) < world_size:
            raise NoShardForRankError(
                f"{self.shard_set.source}: {len(self.names)} shard(s) cannot feed world size {world_size}: rank "
                f"{rank} would get no shard and the run would hang; write at least {world_size} shards "
                "(or use data.resampled=true)")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.shuffle_buffer, self.resampled = num_workers, shuffle_buffer, resampled
        self.image_size = image_size
        self.logical_workers = max(1, num_workers)
        self.stats = LoaderStats()
        self._items: Iterator[dict] | None = None
        self._loader: DataLoader | None = None
        self._reset_epoch(0)
        self.samples = 0
        self.last_worker: int | None = None
        # resampled position
        self.worker_pos = [[0, 0] for _ in range(self.logical_workers)]

    # -- position --------------------------------------------------------------------------------
    def _reset_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.consumed: dict[str, int] = {}
        self.done: set[str] = set()
        self.excluded: list[str] = []  # shards left out of this epoch's split (done before a resize)
        self.finished_ranks: list[dict] = []
        self._epoch_samples = 0

    def _layout(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "num_workers": self.logical_workers,
                "excluded": list(self.excluded)}

    def state_dict(self) -> dict:
        if self.resampled:
            return {"version": STATE_VERSION, "mode": "resampled", "drawn": self.samples, "samples": self.samples,
                    "workers": [list(p) for p in self.worker_pos], "last_worker": self.last_worker,
                    "layout": {"rank": self.rank, "world_size": self.world_size, "num_workers": self.logical_workers}}
        return {"version": STATE_VERSION, "mode": "epoch", "epoch": self.epoch, "consumed": dict(self.consumed),
                "done": sorted(self.done), "finished": list(self.finished_ranks), "layout": self._layout(),
                "last_worker": self.last_worker, "samples": self.samples}

    def merge_states(self, rank_states: Sequence[dict]) -> dict:
        """The trainer's world-size-change hook (``pretrain.checkpoint.reshard``): one position any
        rank of the new world can load, from every saved rank's position (see :func:`merge_states`)."""
        return merge_states(rank_states)

    def load_state_dict(self, state: dict) -> None:
        mode = "resampled" if self.resampled else "epoch"
        if state.get("mode") != mode:
            raise ValueError(f"position is for mode {state.get('mode')!r} but this stream is {mode!r} "
                             "(data.resampled changed between save and resume?)")
        self.close()
        self.samples = int(state.get("samples", 0))
        layout = state.get("layout")
        same = layout is not None and (layout["rank"], layout["world_size"], layout["num_workers"]) == (
            self.rank, self.world_size, self.logical_workers)
        self.last_worker = state.get("last_worker") if same else None
        if self.resampled:
            if same:
                self.worker_pos = [list(map(int, p)) for p in state["workers"]]
            else:  # another layout: fresh draws past every draw index used before, never repeating one
                start = int(state.get("next_draw", 0)) or max(p[0] for p in state["workers"]) + 1
                self.worker_pos = [[start, 0] for _ in range(self.logical_workers)]
            return
        if layout is not None and not same and layout["world_size"] != self.world_size:
            raise ValueError(
                f"this position was saved by rank {layout['rank']} of {layout['world_size']}, the stream is rank "
                f"{self.rank} of {self.world_size}: merge all ranks' positions with merge_states() first")
        unknown = sorted(set(state["consumed"]) - set(self.names))
        if unknown:
            raise ValueError(f"position names shards not in {self.shard_set.source}: {unknown[:5]}")
        self._reset_epoch(int(state["epoch"]))
        self.consumed = {k: int(v) for k, v in state["consumed"].items()}
        self.done = set(state.get("done", []))
        self.finished_ranks = list(state.get("finished", []))
        if layout is not None and layout["world_size"] == self.world_size:
            self.excluded = list(layout.get("excluded", []))  # the same split as when saved
        else:
            for ranked in self.finished_ranks:  # ranks already past this epoch read all of theirs
                mine = rank_shards(self.seed, self.epoch, self.names, ranked["rank"], ranked["world_size"], ranked["excluded"])
                self.done.update(self.names[i] for i in mine)
            self.excluded = sorted(self.done)
        self._epoch_samples = 1  # a resumed epoch may legitimately have nothing left for this rank

    # -- iteration -------------------------------------------------------------------------------
    def _plan(self) -> ReadPlan:
        rotation = 0 if self.last_worker is None else (self.last_worker + 1) % self.logical_workers
        plan = ReadPlan(self.shard_set.shards, self.seed, self.epoch, self.shuffle_buffer, self.image_size,
                        self.storage_options, self.logical_workers, rotation, resampled=self.resampled, rank=self.rank)
        if self.resampled:
            plan.worker_start = [list(p) for p in self.worker_pos]
        else:
            mine = rank_shards(self.seed, self.epoch, self.names, self.rank, self.world_size, self.excluded)
            plan.worker_shards = [mine[w :: self.logical_workers] for w in range(self.logical_workers)]
            plan.skip, plan.done = dict(self.consumed), set(self.done)
        return plan

    def _start_pass(self) -> None:
        plan = self._plan()
        # an own generator: otherwise every new DataLoader iterator draws its worker base seed from the
        # global torch RNG, and a resumed run (which starts a pass at another step) would see other noise
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 1009 + self.epoch)
        self._loader = DataLoader(ShardItems(plan), batch_size=None, num_workers=self.num_workers,
                                  collate_fn=_identity, persistent_workers=False, generator=generator)
        self._items = iter(self._loader)

    def close(self) -> None:
        """Stop the DataLoader workers of the current pass (they are restarted on the next ``next``)."""
        items, self._items, self._loader = self._items, None, None
        shutdown = getattr(items, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        while True:
            if self._items is None:
                self._start_pass()
            try:
                item = next(self._items)
            except StopIteration:
                self._end_epoch()
                continue
            sample = self._absorb(item)
            if sample is not None:
                return sample

    def _end_epoch(self) -> None:
        self.close()
        if self._epoch_samples == 0:
            raise RuntimeError(
                f"epoch {self.epoch} of rank {self.rank} gave no usable sample from {self.shard_set.source} "
                f"(skipped: {self.stats.skipped}, truncated: {sorted(self.stats.truncated)})")
        self._reset_epoch(self.epoch + 1)
        self.last_worker = None

    def _absorb(self, item: dict) -> dict | None:
        """Account for one item in the position and stats; the sample to hand over, if it is one."""
        shard, worker = item["shard"], item["worker"]
        self.last_worker = worker
        if self.resampled:
            self.worker_pos[worker] = [item["draw"] + 1, 0] if item["kind"] == END else [item["draw"], item["position"] + 1]
        else:
            self.consumed[shard] = item["position"] + (0 if item["kind"] == END else 1)
        if item["kind"] == SAMPLE:
            self.samples += 1
            self._epoch_samples += 1
            self.stats.samples += 1
            return item["sample"]
        if item["kind"] == SKIP:
            reason = item["reason"]
            self.stats.skipped[reason] = self.stats.skipped.get(reason, 0) + 1
            if len(self.stats.skipped_keys) < 1000:
                self.stats.skipped_keys.append(f"{shard}/{item['key']}: {reason}")
            log.warning("skipped sample %r of shard %s: %s", item["key"], shard, reason)
            return None
        self.stats.shards_finished += 1
        if not self.resampled:
            self.done.add(shard)
        read, expected, error = item["read"], item["expected"], item["error"]
        if error is not None:
            self.stats.truncated[shard] = read
            dropped = f"; dropped the incomplete sample {item['dropped']!r}" if item["dropped"] else ""
            log.warning("shard %s is truncated or corrupt after %d sample(s): %s%s", shard, read, error, dropped)
        if expected is not None and read != expected:
            self.stats.count_mismatch[shard] = [read, expected]
            log.warning("shard %s gave %d sample(s), its manifest entry says %d", shard, read, expected)
        return None
