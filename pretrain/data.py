"""The trainer's view of data: the training stream, the tokenizer for the configured source, and
the batch a training step consumes.

The stream implements ``data_pipeline.dataset.ImageTextStream`` (resumable position): the in-memory
digits or scenes stream, or the shard loader (``data_pipeline.loader.ShardStream``)."""

from __future__ import annotations

from pathlib import Path

from typing import Sequence

import numpy as np
import torch

from data_pipeline import scenes
from data_pipeline.dataset import ImageTextStream, collate_images, make_digits_stream, make_scenes_stream
from data_pipeline.digits import TRAIN_TEMPLATES, caption_for
from data_pipeline.loader import ShardStream
from data_pipeline.wds_io import read_captions
from pretrain.config import RunConfig
from pretrain.model.tokenizer import load_tokenizer, special_token_ids, tokenize, train_tokenizer

TOKENIZER_DIR = "tokenizer"


def make_train_stream(config: RunConfig, rank: int, world_size: int) -> ImageTextStream:
    data = config.data
    if data.source == "shards":
        return ShardStream(
            data.shards, seed=config.train.seed, rank=rank, world_size=world_size, num_workers=data.num_workers,
            shuffle_buffer=data.shuffle_buffer, resampled=data.resampled,
            image_size=None if data.precomputed else config.model.image_size,
            expect="features" if data.precomputed else "pixels",
        )
    if data.source == "scenes":
        return make_scenes_stream(
            "train", config.model.image_size, seed=config.train.seed, rank=rank, world_size=world_size,
            split_seed=data.split_seed, num_samples=data.scenes_train_samples,
        )
    return make_digits_stream(
        "train", config.model.image_size, seed=config.train.seed, rank=rank, world_size=world_size,
        split_seed=data.split_seed,
    )


def caption_rng_for_step(config: RunConfig, rank: int, step: int) -> torch.Generator | None:
    """The generator of optimizer step ``step``'s word-dropout draws on ``rank``, or None where no word
    is dropped (``data.caption_unk_rate`` 0, or before ``data.caption_unk_start_fraction`` of
    ``train.steps``). Seeded from (train.seed, rank, step) alone, so a resumed run repeats the draws."""
    data = config.data
    if data.caption_unk_rate == 0 or step < round(data.caption_unk_start_fraction * config.train.steps):
        return None
    step_seed = np.random.SeedSequence([config.train.seed, rank, step]).generate_state(1)
    return torch.Generator().manual_seed(int(step_seed[0]))


def unknown_word_ids(tokens: dict[str, torch.Tensor], tokenizer, rate: float, generator: torch.Generator) -> torch.Tensor:
    """``input_ids`` with each word token (not BOS, EOS or padding) replaced by the tokenizer's unknown
    token with probability ``rate``, drawn from ``generator`` (word dropout, ``data.caption_unk_rate``)."""
    ids = tokens["input_ids"]
    if tokenizer.unk_token_id is None:
        raise ValueError("data.caption_unk_rate > 0 needs a tokenizer with an unknown token (tokenizer_kind=word)")
    special = torch.tensor([i for i in special_token_ids(tokenizer).values() if i is not None])
    words = tokens["attention_mask"].bool() & ~torch.isin(ids, special)
    drawn = torch.rand(ids.shape, generator=generator) < rate
    return torch.where(words & drawn, torch.full_like(ids, tokenizer.unk_token_id), ids)


def make_batch(samples: Sequence[dict], tokenizer, config: RunConfig, runtime,
               caption_rng: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Token ids + ``pixels`` (Bx3xHxW in [-1, 1]) or, for feature shards, ``latents`` (the
    precomputed autoencoder output), in bf16 when the run is. With ``caption_rng`` (the trainer's) and
    ``data.caption_unk_rate`` > 0, caption words are replaced by the unknown token (:func:`unknown_word_ids`):
    in ``input_ids``, or with ``data.caption_unk_alignment_only`` in a separate ``align_input_ids`` that
    only the alignment pass reads (same attention mask: a dropped word keeps its position)."""
    tokens = tokenize(tokenizer, [s["caption"] for s in samples], config.model.text_encoder.max_length)
    if caption_rng is not None and config.data.caption_unk_rate > 0:
        dropped = unknown_word_ids(tokens, tokenizer, config.data.caption_unk_rate, caption_rng)
        tokens["align_input_ids" if config.data.caption_unk_alignment_only else "input_ids"] = dropped
    if "latent" in samples[0]:
        images = torch.from_numpy(np.stack([s["latent"] for s in samples])).float()
        name = "latents"
    else:
        images, name = collate_images(samples), "pixels"
    if runtime.bf16:
        images = images.to(torch.bfloat16)
    return {name: images, **tokens}


def training_captions(config: RunConfig) -> list[str]:
    """The tokenizer's training corpus: every caption the digits or scenes source can produce, or the
    first ``data.tokenizer_captions`` captions of the shards."""
    if config.data.source == "shards":
        return read_captions(config.data.shards, config.data.tokenizer_captions)
    if config.data.source == "scenes":
        return scenes.all_training_captions(config.data.split_seed)
    return [caption_for(label, index) for label in range(10) for index in range(len(TRAIN_TEMPLATES))]


def prepare_tokenizer(config: RunConfig, run_dir: Path):
    """The run's tokenizer: the one saved in the run (resume), a local pretrained one, or one trained
    offline on the training captions and saved into the run. Never downloaded."""
    saved = run_dir / TOKENIZER_DIR
    text = config.model.text_encoder
    if (saved / "tokenizer.json").is_file():
        return load_tokenizer(saved)
    if text.tokenizer_path:
        tokenizer = load_tokenizer(text.tokenizer_path)
    else:
        tokenizer = train_tokenizer(training_captions(config), vocab_size=text.tokenizer_vocab_size,
                                    max_length=text.max_length, kind=text.tokenizer_kind)
    tokenizer.save_pretrained(str(saved))
    return tokenizer
