"""Tests for the built-in digits dataset and the in-memory sample stream."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from data_pipeline.dataset import (
    ImageTextStream,
    InMemoryImageTextStream,
    collate_images,
    make_digits_stream,
)
from data_pipeline.digits import (
    CLASS_NAMES,
    EVAL_TEMPLATES,
    TRAIN_TEMPLATES,
    caption_for,
    class_prompts,
    load_digits_split,
    render_digit,
)

NUM_DIGITS = 1797


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


# --- split -----------------------------------------------------------------------------


def test_splits_partition_all_digits_deterministically() -> None:
    train = load_digits_split("train", image_size=16)
    heldout = load_digits_split("heldout", image_size=16)
    assert len(heldout) == round(NUM_DIGITS * 0.2) == 359
    assert len(train) == NUM_DIGITS - 359 == 1438
    assert set(train.keys).isdisjoint(heldout.keys)
    assert len(set(train.keys) | set(heldout.keys)) == NUM_DIGITS
    again = load_digits_split("train", image_size=16)
    assert again.keys == train.keys
    np.testing.assert_array_equal(again.labels, train.labels)
    np.testing.assert_array_equal(again.images, train.images)
    other_seed = load_digits_split("heldout", image_size=16, split_seed=1)
    assert other_seed.keys != heldout.keys


def test_split_arrays_have_documented_types() -> None:
    data = load_digits_split("heldout", image_size=24, heldout_fraction=0.1)
    assert len(data) == round(NUM_DIGITS * 0.1)
    assert data.images.shape == (len(data), 24, 24, 3) and data.images.dtype == np.uint8
    assert data.labels.shape == (len(data),) and data.labels.dtype == np.int64
    assert set(np.unique(data.labels)) <= set(range(10))
    assert all(re.fullmatch(r"digits-\d{6}", k) for k in data.keys)


def test_split_labels_match_sklearn_by_key() -> None:
    from sklearn.datasets import load_digits

    target = load_digits().target
    data = load_digits_split("train", image_size=8)
    indices = [int(k.split("-")[1]) for k in data.keys]
    np.testing.assert_array_equal(data.labels, target[indices])


def test_invalid_split_arguments_raise() -> None:
    with pytest.raises(ValueError):
        load_digits_split("test")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        load_digits_split("train", heldout_fraction=1.0)


# --- rendering -------------------------------------------------------------------------


def test_render_digit_white_ink_on_black() -> None:
    pixels = np.zeros((8, 8))
    pixels[2:6, 3:5] = 16
    image = render_digit(pixels, 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert image.min() == 0 and image.max() == 255
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    assert image[0, 0, 0] == 0  # background corner stays black
    assert image[16, 16, 0] == 255  # centre of the stroke is full ink


def test_render_digit_constant_maps_linearly() -> None:
    image = render_digit(np.full((8, 8), 8.0), 20)
    assert image.shape == (20, 20, 3)
    assert np.all(image == 128)  # 8/16 * 255 = 127.5 -> 128


# --- captions --------------------------------------------------------------------------


def test_templates_counts_and_placeholders() -> None:
    assert len(CLASS_NAMES) == 10 and CLASS_NAMES[7] == "seven"
    assert 6 <= len(TRAIN_TEMPLATES) <= 10 and 4 <= len(EVAL_TEMPLATES) <= 6
    assert all("{word}" in t for t in EVAL_TEMPLATES)
    assert all("{digit}" not in t for t in EVAL_TEMPLATES)
    assert caption_for(7, 0) == "a photo of the number seven"
    assert caption_for(3, 1) == "a handwritten 3"


def test_eval_template_words_never_occur_in_training_captions() -> None:
    train_vocab = set().union(
        *(_words(caption_for(label, t)) for label in range(10) for t in range(len(TRAIN_TEMPLATES)))
    )
    assert set(CLASS_NAMES) <= train_vocab
    for template in EVAL_TEMPLATES:
        non_class_words = _words(template.replace("{word}", " "))
        assert non_class_words, template
        assert non_class_words.isdisjoint(train_vocab), (template, non_class_words & train_vocab)


def test_class_prompts_layout() -> None:
    prompts = class_prompts()
    assert len(prompts) == 10
    assert all(len(p) == len(EVAL_TEMPLATES) for p in prompts)
    for label, per_class in enumerate(prompts):
        assert all(CLASS_NAMES[label] in _words(p) for p in per_class)
    assert class_prompts(("{word}",)) == [[name] for name in CLASS_NAMES]


# --- stream ----------------------------------------------------------------------------


def _toy_stream(n: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> InMemoryImageTextStream:
    images = np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3)
    labels = np.arange(n) % 10
    keys = [f"s{i}" for i in range(n)]

    def caption_fn(label: int, rng: np.random.Generator) -> str:
        return f"{label}-{rng.integers(1_000_000)}"

    return InMemoryImageTextStream(images, labels, keys, caption_fn, seed, rank, world_size)


def _take(stream: InMemoryImageTextStream, count: int) -> list[dict]:
    return [next(stream) for _ in range(count)]


def test_stream_yields_documented_sample_dicts() -> None:
    stream = make_digits_stream("heldout", image_size=16, seed=3)
    assert isinstance(stream, ImageTextStream)
    sample = next(iter(stream))
    assert set(sample) == {"key", "image", "caption", "label"}
    assert isinstance(sample["key"], str) and isinstance(sample["caption"], str)
    assert type(sample["label"]) is int and 0 <= sample["label"] <= 9
    assert sample["image"].shape == (16, 16, 3) and sample["image"].dtype == np.uint8
    allowed = {caption_for(sample["label"], t) for t in range(len(TRAIN_TEMPLATES))}
    assert sample["caption"] in allowed


def test_stream_resume_is_exact_across_epoch_boundary() -> None:
    stream = _toy_stream(7, seed=5)  # 25 samples cross three epoch boundaries
    _take(stream, 25)
    state = json.loads(json.dumps(stream.state_dict()))
    assert state == {"epoch": 3, "offset": 4}
    expected = _take(stream, 10)
    restored = _toy_stream(7, seed=5)
    restored.load_state_dict(state)
    got = _take(restored, 10)
    assert [s["key"] for s in got] == [s["key"] for s in expected]
    assert [s["caption"] for s in got] == [s["caption"] for s in expected]
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_digits_stream_resume_is_exact() -> None:
    stream = make_digits_stream("train", image_size=8, seed=11)
    _take(stream, 25)
    state = stream.state_dict()
    expected = [(s["key"], s["caption"], s["label"]) for s in _take(stream, 10)]
    restored = make_digits_stream("train", image_size=8, seed=11)
    restored.load_state_dict(state)
    assert [(s["key"], s["caption"], s["label"]) for s in _take(restored, 10)] == expected


def test_each_epoch_is_a_full_permutation() -> None:
    stream = _toy_stream(10, seed=1)
    first, second = _take(stream, 10), _take(stream, 10)
    assert sorted(s["key"] for s in first) == sorted(f"s{i}" for i in range(10))
    assert sorted(s["key"] for s in second) == sorted(f"s{i}" for i in range(10))
    assert [s["key"] for s in first] != [s["key"] for s in second]


def test_two_ranks_cover_epoch_exactly_once_and_disjointly() -> None:
    ranks = [make_digits_stream("train", image_size=8, seed=2, rank=r, world_size=2) for r in range(2)]
    per_rank = 1438 // 2
    keys = [[s["key"] for s in _take(stream, per_rank)] for stream in ranks]
    assert all(len(set(k)) == per_rank for k in keys)
    assert set(keys[0]).isdisjoint(keys[1])
    assert set(keys[0]) | set(keys[1]) == set(load_digits_split("train", image_size=8).keys)
    assert all(stream.state_dict() == {"epoch": 0, "offset": per_rank} for stream in ranks)


def test_uneven_tail_is_dropped_so_ranks_stay_equal() -> None:
    ranks = [_toy_stream(11, seed=4, rank=r, world_size=2) for r in range(2)]
    epochs = [[s["key"] for s in _take(stream, 5)] for stream in ranks]
    assert set(epochs[0]).isdisjoint(epochs[1])
    assert len(set(epochs[0]) | set(epochs[1])) == 10
    assert all(stream.state_dict() == {"epoch": 0, "offset": 5} for stream in ranks)
    next(ranks[0])
    assert ranks[0].state_dict() == {"epoch": 1, "offset": 1}


def test_captions_reproducible_and_seed_dependent() -> None:
    a = [s["caption"] for s in _take(_toy_stream(20, seed=9), 40)]
    b = [s["caption"] for s in _take(_toy_stream(20, seed=9), 40)]
    c = [s["caption"] for s in _take(_toy_stream(20, seed=10), 40)]
    assert a == b
    assert a != c
    # The caption depends on (seed, epoch, index), so the same sample gets a fresh draw each epoch.
    stream = _toy_stream(20, seed=9)
    epoch0 = {s["key"]: s["caption"] for s in _take(stream, 20)}
    epoch1 = {s["key"]: s["caption"] for s in _take(stream, 20)}
    assert sum(epoch0[k] != epoch1[k] for k in epoch0) > 15


def test_digits_captions_use_every_training_template() -> None:
    stream = make_digits_stream("train", image_size=8, seed=0)
    captions = [(s["label"], s["caption"]) for s in _take(stream, 400)]
    used = {
        t
        for label, caption in captions
        for t in range(len(TRAIN_TEMPLATES))
        if caption == caption_for(label, t)
    }
    assert used == set(range(len(TRAIN_TEMPLATES)))


def test_invalid_stream_arguments_raise() -> None:
    with pytest.raises(ValueError):
        _toy_stream(5, rank=2, world_size=2)
    with pytest.raises(ValueError):
        _toy_stream(1, rank=0, world_size=2)
    with pytest.raises(ValueError):
        _toy_stream(5).load_state_dict({"epoch": 0, "offset": 6})


# --- collate ---------------------------------------------------------------------------


def test_collate_images_scales_to_unit_range() -> None:
    black = np.zeros((4, 6, 3), dtype=np.uint8)
    white = np.full((4, 6, 3), 255, dtype=np.uint8)
    white[0, 0] = (0, 255, 128)
    batch = collate_images([{"image": black}, {"image": white}])
    assert batch.shape == (2, 3, 4, 6) and batch.dtype == torch.float32
    assert torch.all(batch[0] == -1.0)
    assert batch[1, :, 1, 1].tolist() == [1.0, 1.0, 1.0]
    assert batch[1, :, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1.0], abs=1e-6)
