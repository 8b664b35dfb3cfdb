"""The sample-stream interface the trainer consumes, and an in-memory implementation.

The trainer only ever calls ``next(stream)`` and saves/restores ``state_dict()``, so the
built-in datasets (digits, scenes) and a shard-streaming loader are interchangeable behind
``ImageTextStream``. Everything random (epoch order, caption choice) is derived from
seeds and the position, so a restored stream yields exactly the samples the saved one
would have yielded: resuming a run does not repeat or skip data.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from data_pipeline import scenes
from data_pipeline.digits import TRAIN_TEMPLATES, SplitName, caption_for, load_digits_split

CaptionFn = Callable[[int, np.random.Generator], str]


@runtime_checkable
class ImageTextStream(Protocol):
    """Infinite, resumable iterator of samples.

    ``next(stream)`` returns a dict with keys ``'key'`` (str), ``'image'`` (np.ndarray
    uint8 HxWx3), ``'caption'`` (str) and ``'label'`` (int, -1 when unknown).
    """

    def __iter__(self) -> Iterator[dict]: ...

    def state_dict(self) -> dict: ...  # JSON-serialisable position

    def load_state_dict(self, state: dict) -> None: ...


class InMemoryImageTextStream:
    """``ImageTextStream`` over arrays held in memory, sharded across data-parallel ranks.

    Each epoch is a permutation drawn from ``default_rng([seed, epoch])``; the tail that
    does not divide by ``world_size`` is dropped so every rank yields the same number of
    samples per epoch (unequal counts would desynchronise collective ops). Rank ``r``
    takes positions ``r, r + world_size, ...`` of the kept permutation. A sample's
    caption is drawn from ``default_rng([seed, epoch, index])``, so it depends only on
    the position, never on how many samples were drawn before.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        keys: Sequence[str],
        caption_fn: CaptionFn,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not len(images) == len(labels) == len(keys):
            raise ValueError(
                f"images, labels and keys differ in length: {len(images)}, {len(labels)}, {len(keys)}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.samples_per_epoch = len(keys) // world_size
        if self.samples_per_epoch == 0:
            raise ValueError(f"{len(keys)} samples cannot feed {world_size} ranks")
        self.images = images
        self.labels = labels
        self.keys = list(keys)
        self.caption_fn = caption_fn
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.offset = 0
        self._epoch_indices = self._indices_for(self.epoch)

    def _indices_for(self, epoch: int) -> np.ndarray:
        permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.keys))
        kept = permutation[: self.samples_per_epoch * self.world_size]
        return kept[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.offset == self.samples_per_epoch:
            self.epoch += 1
            self.offset = 0
            self._epoch_indices = self._indices_for(self.epoch)
        index = int(self._epoch_indices[self.offset])
        self.offset += 1
        label = int(self.labels[index])
        caption_rng = np.random.default_rng([self.seed, self.epoch, index])
        return {
            "key": self.keys[index],
            "image": self.images[index],
            "caption": self.caption_fn(label, caption_rng),
            "label": label,
        }

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset <= self.samples_per_epoch:
            raise ValueError(f"invalid stream position {state} for {self.samples_per_epoch} samples/epoch")
        self.epoch, self.offset = epoch, offset
        self._epoch_indices = self._indices_for(epoch)

    def reshard_state(self, rank_states: Sequence[dict], new_rank: int, new_world: int) -> dict:
        """The position for rank ``new_rank`` of ``new_world`` that continues where the saved ranks
        (``rank_states``, one per old rank, in rank order) stopped, on this stream's own sharding.

        Old rank r had taken positions r, r + W, ... of epoch e's permutation, so together the W ranks
        consumed the first ``offset x W`` positions (ranks step in lockstep: equal offsets). The new
        ranks continue at position ``ceil(offset x W / W')`` x W' of that same permutation (the
        permutation depends only on (seed, epoch), not on the world size). When the global batch is
        unchanged, ``offset x W`` is a multiple of W' and nothing is skipped or repeated; otherwise at
        most W' - 1 samples are skipped (never repeated). Past the end of the epoch's kept samples at
        the new world size, the stream moves on to the next epoch."""
        epochs = {int(s["epoch"]) for s in rank_states}
        offsets = {int(s["offset"]) for s in rank_states}
        if len(epochs) != 1 or len(offsets) != 1:
            raise ValueError(f"saved ranks are at different stream positions {list(rank_states)}: cannot reshard")
        epoch, offset = epochs.pop(), offsets.pop()
        consumed = offset * len(rank_states)
        new_offset = -(-consumed // new_world)  # ceil: skip rather than repeat
        per_rank = len(self.keys) // new_world
        if new_offset >= per_rank:
            return {"epoch": epoch + 1, "offset": 0}
        return {"epoch": epoch, "offset": new_offset}


def random_train_caption(label: int, rng: np.random.Generator) -> str:
    """Caption from a uniformly chosen training template (the digits ``caption_fn``)."""
    return caption_for(label, int(rng.integers(len(TRAIN_TEMPLATES))))


def make_digits_stream(
    split: SplitName,
    image_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    split_seed: int = 0,
) -> InMemoryImageTextStream:
    """Stream over a digits split with captions from random training templates."""
    data = load_digits_split(split, image_size=image_size, split_seed=split_seed)
    return InMemoryImageTextStream(
        data.images, data.labels, data.keys, random_train_caption, seed, rank, world_size
    )


def random_scene_caption(label: int, rng: np.random.Generator) -> str:
    """Caption of packed scene ``label`` from a uniformly chosen training template (the scenes ``caption_fn``)."""
    return scenes.caption_for(label, int(rng.integers(len(scenes.TRAIN_TEMPLATES))))


def make_scenes_stream(
    split: SplitName,
    image_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    split_seed: int = 0,
    num_samples: int | None = None,
) -> InMemoryImageTextStream:
    """Stream over a scenes split; each sample's training template is drawn from (seed, epoch, index)."""
    data = scenes.load_scenes_split(split, image_size=image_size, num_samples=num_samples, split_seed=split_seed)
    return InMemoryImageTextStream(
        data.images, data.labels, data.keys, random_scene_caption, seed, rank, world_size
    )


def collate_images(samples: Sequence[dict]) -> torch.Tensor:
    """Stack sample images into a float32 Bx3xHxW batch scaled to [-1, 1] (the VAE's range)."""
    batch = torch.from_numpy(np.stack([s["image"] for s in samples]))
    return batch.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()
