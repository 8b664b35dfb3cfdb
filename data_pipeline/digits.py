"""The built-in offline dataset: scikit-learn's bundled handwritten digits.

scikit-learn ships 1,797 labelled 8x8 digit images inside the wheel, so this dataset
needs no network access and lets every part of the system (training, zero-shot
classification, generation) run end to end on any machine.

Captions come from two disjoint template families. Training captions use
``TRAIN_TEMPLATES``; zero-shot evaluation prompts use ``EVAL_TEMPLATES``, whose words
(apart from the class word) never occur in any training caption. Zero-shot accuracy
with those prompts therefore measures whether the model learnt the *class word*, not
whether it memorised a caption string seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Sequence

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

CLASS_NAMES: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)

# `{word}` is the class name ("seven"), `{digit}` the numeral ("7").
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a photo of the number {word}",
    "a handwritten {digit}",
    "a handwritten digit {word}",
    "the number {word}, written by hand",
    "a scan of a handwritten {word}",
    "{word}",
    "a black and white image of a {digit}",
    "digit {digit} ({word})",
)

# Worded so that no word except `{word}` appears in any training caption (checked by a test).
EVAL_TEMPLATES: tuple[str, ...] = (
    "this is {word}",
    "picture showing {word}",
    "an illustration depicting {word}",
    "{word} drawn on paper",
    "here we see {word}",
)

SplitName = Literal["train", "heldout"]

# sklearn's digit pixels are integers in 0..16, ink high.
_MAX_PIXEL = 16.0


@dataclass(frozen=True)
class DigitsSplit:
    """One split of the digits: rendered RGB images, class labels and stable sample ids."""

    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    keys: list[str]  # "digits-000123": the index in sklearn's original order

    def __len__(self) -> int:
        return len(self.keys)


def render_digit(pixels_8x8: np.ndarray, size: int) -> np.ndarray:
    """Render one 8x8 digit as a ``size x size`` RGB uint8 image, white ink on black.

    Bilinear resizing keeps strokes smooth rather than blocky, which is closer to the
    natural images the diffusion model is meant for.
    """
    pixels = np.asarray(pixels_8x8, dtype=np.float64).reshape(8, 8)
    grey = np.clip(np.rint(pixels * (255.0 / _MAX_PIXEL)), 0, 255).astype(np.uint8)
    resized = Image.fromarray(grey, mode="L").resize((size, size), Image.BILINEAR)
    return np.repeat(np.asarray(resized, dtype=np.uint8)[:, :, None], 3, axis=2)


@lru_cache(maxsize=4)
def _rendered_digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits rendered at ``image_size``; cached because both splits share it."""
    raw = load_digits()
    images = np.stack([render_digit(p, image_size) for p in raw.images])
    images.setflags(write=False)
    labels = raw.target.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


def split_indices(
    split: SplitName, num_samples: int, heldout_fraction: float, split_seed: int
) -> np.ndarray:
    """Sorted original indices of ``split``: a seeded permutation, held-out taken first."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    permutation = np.random.default_rng(split_seed).permutation(num_samples)
    num_heldout = round(num_samples * heldout_fraction)
    chosen = permutation[:num_heldout] if split == "heldout" else permutation[num_heldout:]
    return np.sort(chosen)


def load_digits_split(
    split: SplitName,
    image_size: int = 32,
    heldout_fraction: float = 0.2,
    split_seed: int = 0,
) -> DigitsSplit:
    """Load one fixed split; the same arguments always give the same samples in the same order."""
    images, labels = _rendered_digits(image_size)
    indices = split_indices(split, len(labels), heldout_fraction, split_seed)
    return DigitsSplit(
        images=images[indices],
        labels=labels[indices],
        keys=[f"digits-{i:06d}" for i in indices],
    )


def caption_for(label: int, template_index: int, templates: Sequence[str] = TRAIN_TEMPLATES) -> str:
    """Caption for class ``label`` using ``templates[template_index]``."""
    return templates[template_index].format(word=CLASS_NAMES[label], digit=str(label))


def class_prompts(templates: Sequence[str] = EVAL_TEMPLATES) -> list[list[str]]:
    """Zero-shot prompts: ``result[c]`` lists one prompt per template for class ``c``."""
    return [
        [caption_for(label, t, templates) for t in range(len(templates))]
        for label in range(len(CLASS_NAMES))
    ]
