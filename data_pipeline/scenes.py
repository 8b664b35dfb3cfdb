"""The second built-in offline dataset: procedural captioned scenes (one coloured shape on black).

Every image shows one object described by four attributes: a shape (8), a colour (8), a size (2)
and a position (5 anchors, with jitter). Images are drawn with Pillow at 8x the target resolution
and box-filtered down, so edges are anti-aliased and a shape stays recognisable at the default
16x16 (8 and 32 work too). Everything is seeded: the same arguments give byte-identical arrays.

**Held-out combinations.** ``heldout_combinations(split_seed)`` fixes a set of (shape, colour, size)
triples that never occur in the ``train`` split; the ``heldout`` split draws *only* from them. With
a seeded colour permutation ``p``:

- ``(shape s, colour p[s])`` at both sizes: the pair never occurs in training at all;
- ``(shape s, colour p[s+1])`` at one seeded size: the pair is seen in training, at the other size only.

Each shape and each colour is held out in exactly one pair of each kind, so every single attribute
value still occurs in training: held-out accuracy measures composition of known attribute words, not
recognition of unseen ones. 24 of the 128 triples are held out; 104 remain for training.

Captions come from two disjoint template families, as in ``data_pipeline.digits``: training
captions use ``TRAIN_TEMPLATES`` (varied subsets of the attributes); zero-shot prompts use the
per-task ``EVAL_TEMPLATES``, whose words (apart from the attribute word) never occur in any training
caption, so zero-shot accuracy measures the attribute words, not a memorised caption string.

A sample's ``label`` packs all four attributes into one int (:func:`encode_label`), so the in-memory
stream's ``caption_fn(label, rng)`` can caption it; :func:`decode_label` unpacks it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star", "ring", "heart")
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
# Well apart in RGB (>= 90 between any two) so the colour jitter below never changes the nearest name.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35), "orange": (245, 140, 20), "yellow": (235, 225, 40), "green": (40, 190, 60),
    "cyan": (40, 215, 225), "blue": (45, 80, 235), "purple": (150, 50, 215), "white": (235, 235, 235),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("centre", "top left", "top right", "bottom left", "bottom right")
TASKS: tuple[str, ...] = ("shape", "colour", "size")  # the zero-shot tasks; position is caption-only
TASK_CLASSES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}

# Placeholders: {shape} {colour} {size} {position}. "a" before a vowel becomes "an" (see caption_for).
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape}",
    "a {colour} {shape}",
    "a {size} {shape}",
    "a {shape}",
    "{colour} {shape}",
    "the {shape} is {colour}",
    "a {colour} {shape} in the {position}",
    "a {size} {colour} {shape} on a black background",
    "{size} {shape}, {colour}, {position}",
    "a {shape} coloured {colour}",
    "the {size} {colour} {shape} at the {position}",
    "one {colour} {shape}, {size}",
)

PAIR_TEMPLATE_INDEX = TRAIN_TEMPLATES.index("a {colour} {shape}")  # the shape-colour caption of pretrain.evaluate.pair_caption_queries

# Per task; `{word}` is the attribute word. No other word occurs in a training caption (a test checks).
EVAL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape": ("picture showing {word}", "here we see {word}", "{word} drawn by hand", "something shaped like {word}"),
    "colour": ("picture showing something {word}", "here we see {word} stuff", "{word} thing", "painted {word}"),
    "size": ("picture showing something {word}", "here we see {word} stuff", "{word} thing", "{word} object drawn"),
}

# Two-attribute prompts (eval words only, like EVAL_TEMPLATES) for the joint zero-shot reading of shape and
# colour (pretrain.evaluate.zero_shot_scenes, ``joint_*``): the best-scoring (colour, shape) prompt names both.
EVAL_PAIR_TEMPLATES: tuple[str, ...] = (
    "picture showing {colour} {shape}", "here we see {colour} {shape}", "{colour} {shape} drawn by hand",
    "painted {colour} {shape}",
)

SplitName = Literal["train", "heldout"]
_SPLIT_CODES = {"train": 0, "heldout": 1}
DEFAULT_SAMPLES: dict[str, int] = {"train": 4160, "heldout": 480}  # 40 per train triple, 20 per held-out triple
_HOLDOUT_SALT = 7_919  # separates the held-out draw from the per-sample draws of the same split_seed

_SUPERSAMPLE = 8  # drawn at 8x then box-filtered: exact area coverage, i.e. anti-aliased edges
_RADIUS = {"small": 0.2, "large": 0.38}  # half-extent of the object as a fraction of the image side
_SIZE_JITTER = 0.08  # radius x U(1 - j, 1 + j)
_COLOUR_JITTER = 12  # per channel, U(-j, j)
_ANCHORS = {"centre": (0, 0), "top left": (-1, -1), "top right": (1, -1), "bottom left": (-1, 1), "bottom right": (1, 1)}

Combination = tuple[int, int, int]  # (shape, colour, size) indices


@dataclass(frozen=True)
class SceneAttributes:
    shape: int
    colour: int
    size: int
    position: int

    def names(self) -> dict[str, str]:
        return {"shape": SHAPES[self.shape], "colour": COLOURS[self.colour], "size": SIZES[self.size],
                "position": POSITIONS[self.position]}


def encode_label(shape: int, colour: int, size: int, position: int) -> int:
    """All four attribute indices packed into one int (what the streams and shards call ``label``)."""
    return ((shape * len(COLOURS) + colour) * len(SIZES) + size) * len(POSITIONS) + position


def decode_label(label: int) -> SceneAttributes:
    rest, position = divmod(int(label), len(POSITIONS))
    rest, size = divmod(rest, len(SIZES))
    shape, colour = divmod(rest, len(COLOURS))
    if not 0 <= shape < len(SHAPES):
        raise ValueError(f"scene label {label} is out of range (max {encode_label(len(SHAPES) - 1, 7, 1, 4)})")
    return SceneAttributes(shape, colour, size, position)


def task_labels(labels: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Per-task class indices (``{"shape": ..., "colour": ..., "size": ...}``) of packed labels."""
    decoded = [decode_label(int(label)) for label in labels]
    return {task: np.array([getattr(a, task) for a in decoded], dtype=np.int64) for task in TASKS}


@dataclass(frozen=True)
class ScenesSplit:
    """One split: rendered RGB images, packed labels (:func:`decode_label`) and stable sample ids."""

    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64, packed attributes
    keys: list[str]  # "scenes-train-000123": split and index

    def __len__(self) -> int:
        return len(self.keys)

    def attributes(self, index: int) -> SceneAttributes:
        return decode_label(int(self.labels[index]))


# --------------------------------------------------------------------------------------------
# Held-out combinations


@lru_cache(maxsize=8)
def heldout_combinations(split_seed: int = 0) -> frozenset[Combination]:
    """The (shape, colour, size) triples excluded from training (module docstring)."""
    rng = np.random.default_rng([split_seed, _HOLDOUT_SALT])
    colours = rng.permutation(len(COLOURS))
    one_size = rng.integers(len(SIZES), size=len(SHAPES))
    held: set[Combination] = set()
    for shape in range(len(SHAPES)):
        unseen_pair = int(colours[shape % len(COLOURS)])
        held.update((shape, unseen_pair, size) for size in range(len(SIZES)))
        held.add((shape, int(colours[(shape + 1) % len(COLOURS)]), int(one_size[shape])))
    return frozenset(held)


def split_combinations(split: SplitName, split_seed: int = 0) -> list[Combination]:
    """Sorted triples a split draws from: the held-out set, or every other triple for ``train``."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    held = heldout_combinations(split_seed)
    every = [(s, c, z) for s in range(len(SHAPES)) for c in range(len(COLOURS)) for z in range(len(SIZES))]
    return sorted(held) if split == "heldout" else [combo for combo in every if combo not in held]


# --------------------------------------------------------------------------------------------
# Rendering


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    return [((1.0 if k % 2 == 0 else inner) * math.cos(-math.pi / 2 + k * math.pi / points),
             (1.0 if k % 2 == 0 else inner) * math.sin(-math.pi / 2 + k * math.pi / points)) for k in range(2 * points)]


def _heart(steps: int = 64) -> list[tuple[float, float]]:
    """The classic parametric heart, scaled to the unit box."""
    ts = np.linspace(0, 2 * np.pi, steps, endpoint=False)
    x = 16 * np.sin(ts) ** 3
    y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
    x, y = x / 16.0, (y - (y.max() + y.min()) / 2) / ((y.max() - y.min()) / 2)
    return list(zip(x.tolist(), y.tolist()))


_ARM = 0.34
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0.0, -0.8), (0.92, 0.8), (-0.92, 0.8)],
    "diamond": [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)],
    "cross": [(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1), (-_ARM, 1),
              (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)],
    "star": [(x, y + 0.1) for x, y in _star()],  # shifted so the star's box is centred
    "heart": _heart(),
}


def render_mask(shape: str, image_size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    """Coverage in [0, 1] of ``shape`` (unit-box geometry scaled by ``radius`` pixels, at ``centre`` in
    pixel coordinates), shape (image_size, image_size) float64. Drawn at 8x and box-filtered."""
    scale = _SUPERSAMPLE
    canvas = Image.new("L", (image_size * scale, image_size * scale), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = centre[0] * scale, centre[1] * scale, radius * scale

    def box(fraction: float) -> list[float]:
        return [cx - fraction * r, cy - fraction * r, cx + fraction * r, cy + fraction * r]

    if shape in ("circle", "ring"):
        draw.ellipse(box(1.0), fill=255)
        if shape == "ring":
            draw.ellipse(box(0.55), fill=0)
    elif shape in _POLYGONS:
        draw.polygon([(cx + x * r, cy + y * r) for x, y in _POLYGONS[shape]], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")
    small = canvas.resize((image_size, image_size), Image.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def render_scene(attributes: SceneAttributes, image_size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """One ``image_size`` x ``image_size`` RGB uint8 image of ``attributes`` on black.

    ``rng`` draws the jitter (radius, position within the anchor's region, colour); ``None`` renders
    the undisturbed object. The object always lies wholly inside the image: the anchor moves it 3/4
    of the free travel towards its corner, the jitter at most 1/4 more either way."""
    names = attributes.names()
    jitter = (lambda low, high: float(rng.uniform(low, high))) if rng is not None else (lambda low, high: 0.0)
    radius = _RADIUS[names["size"]] * image_size * (1.0 + jitter(-_SIZE_JITTER, _SIZE_JITTER))
    travel = max(image_size / 2 - radius - 0.5, 0.0)
    anchor = _ANCHORS[names["position"]]
    centre = tuple(image_size / 2 + a * 0.75 * travel + jitter(-0.25, 0.25) * travel for a in anchor)
    colour = np.array(PALETTE[names["colour"]], dtype=np.float64)
    colour = np.clip(colour + np.array([jitter(-_COLOUR_JITTER, _COLOUR_JITTER) for _ in range(3)]), 0, 255)
    mask = render_mask(names["shape"], image_size, centre, radius)
    return np.clip(np.rint(mask[:, :, None] * colour), 0, 255).astype(np.uint8)


@lru_cache(maxsize=4)
def _rendered_split(split: SplitName, image_size: int, num_samples: int, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    combos = split_combinations(split, split_seed)
    images = np.empty((num_samples, image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty(num_samples, dtype=np.int64)
    for index in range(num_samples):
        # Sample i takes the split's triples in turn (balanced classes); its position and jitter come
        # from its own generator, so a sample does not depend on how many others were drawn.
        rng = np.random.default_rng([split_seed, _SPLIT_CODES[split], index])
        shape, colour, size = combos[index % len(combos)]
        attributes = SceneAttributes(shape, colour, size, int(rng.integers(len(POSITIONS))))
        images[index] = render_scene(attributes, image_size, rng)
        labels[index] = encode_label(shape, colour, size, attributes.position)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_scenes_split(
    split: SplitName,
    image_size: int = 16,
    num_samples: int | None = None,
    split_seed: int = 0,
) -> ScenesSplit:
    """Load one split; the same arguments always give byte-identical images in the same order.
    ``num_samples`` defaults to ``DEFAULT_SAMPLES[split]``; ``split_seed`` fixes the held-out triples
    and every sample's position and jitter."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    num_samples = DEFAULT_SAMPLES[split] if num_samples is None else int(num_samples)
    if num_samples < 1 or image_size < 4:
        raise ValueError(f"scenes need num_samples >= 1 and image_size >= 4, got {num_samples}, {image_size}")
    images, labels = _rendered_split(split, image_size, num_samples, split_seed)
    return ScenesSplit(images=images, labels=labels, keys=[f"scenes-{split}-{i:06d}" for i in range(num_samples)])


# --------------------------------------------------------------------------------------------
# Captions


def _fill(template: str, **words: str) -> str:
    text = template.format(**words)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "a orange circle" -> "an orange circle"


def caption_for(label: int, template_index: int, templates: Sequence[str] = TRAIN_TEMPLATES) -> str:
    """Caption for packed ``label`` using ``templates[template_index]``."""
    return _fill(templates[template_index], **decode_label(label).names())


def class_prompts(task: str, templates: Sequence[str] | None = None) -> list[list[str]]:
    """Zero-shot prompts for ``task`` ("shape", "colour" or "size"): ``result[c]`` lists one prompt per
    template (default ``EVAL_TEMPLATES[task]``) for class ``c`` of ``TASK_CLASSES[task]``."""
    if task not in TASK_CLASSES:
        raise ValueError(f"unknown scenes task {task!r}: expected one of {', '.join(TASKS)}")
    templates = EVAL_TEMPLATES[task] if templates is None else templates
    return [[_fill(t, word=word) for t in templates] for word in TASK_CLASSES[task]]


def pair_prompts(templates: Sequence[str] = EVAL_PAIR_TEMPLATES) -> list[list[str]]:
    """Prompt ensembles of every (shape, colour) pair, shape-major: entry ``shape * len(COLOURS) + colour``."""
    return [[_fill(t, shape=shape, colour=colour) for t in templates] for shape in SHAPES for colour in COLOURS]


def all_training_captions(split_seed: int = 0) -> list[str]:
    """Every caption the train split can carry (each train triple x position x template): the
    offline tokenizer's corpus."""
    return [
        caption_for(encode_label(shape, colour, size, position), t)
        for shape, colour, size in split_combinations("train", split_seed)
        for position in range(len(POSITIONS))
        for t in range(len(TRAIN_TEMPLATES))
    ]


# Templates naming shape, colour and size: retrieval captions identify every scored attribute.
FULL_TEMPLATE_INDICES: tuple[int, ...] = tuple(
    i for i, t in enumerate(TRAIN_TEMPLATES) if all(f"{{{task}}}" in t for task in TASKS)
)


def retrieval_caption(label: int, index: int) -> str:
    """The one deterministic caption of held-out sample ``index`` for retrieval."""
    return caption_for(label, FULL_TEMPLATE_INDICES[index % len(FULL_TEMPLATE_INDICES)])
