"""The trainer's view of data: the training stream and the tokenizer for the configured source.

The stream implements ``data_pipeline.dataset.ImageTextStream`` (resumable position); the shard
loader will implement the same interface."""

from __future__ import annotations

from pathlib import Path

from data_pipeline.dataset import InMemoryImageTextStream, make_digits_stream
from data_pipeline.digits import TRAIN_TEMPLATES, caption_for
from pretrain.config import RunConfig
from pretrain.model.tokenizer import load_tokenizer, train_tokenizer

TOKENIZER_DIR = "tokenizer"


def make_train_stream(config: RunConfig, rank: int, world_size: int) -> InMemoryImageTextStream:
    return make_digits_stream(
        "train", config.model.image_size, seed=config.train.seed, rank=rank, world_size=world_size,
        split_seed=config.data.split_seed,
    )


def training_captions(config: RunConfig) -> list[str]:
    """Every caption the training source can produce (the tokenizer's training corpus)."""
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
        tokenizer = train_tokenizer(training_captions(config), vocab_size=text.tokenizer_vocab_size, max_length=text.max_length)
    tokenizer.save_pretrained(str(saved))
    return tokenizer
