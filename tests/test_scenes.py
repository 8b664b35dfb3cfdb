"""The procedural scenes dataset: determinism, held-out triples, captions that match the pixels,
sharding, and a short training run evaluated per attribute task."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import scenes
from data_pipeline.dataset import make_scenes_stream
from data_pipeline.scenes import (
    COLOURS,
    EVAL_TEMPLATES,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    TASKS,
    TRAIN_TEMPLATES,
    SceneAttributes,
    caption_for,
    class_prompts,
    decode_label,
    encode_label,
    heldout_combinations,
    load_scenes_split,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_COLOUR_MIN = 0.25  # 2x chance; the 30-step tiny run below measured 0.34 (shape 0.18, size 0.91)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _triple(label: int) -> tuple[int, int, int]:
    a = decode_label(label)
    return a.shape, a.colour, a.size


def _digest(split: str, size: int, samples: int, seed: int = 0) -> str:
    data = load_scenes_split(split, image_size=size, num_samples=samples, split_seed=seed)
    return hashlib.sha256(data.images.tobytes() + data.labels.tobytes()).hexdigest()


# --- determinism ---------------------------------------------------------------------------


def test_same_arguments_give_byte_identical_arrays_in_any_process():
    digests = {size: _digest("heldout", size, 48) for size in (8, 16, 32)}
    scenes._rendered_split.cache_clear()  # re-render rather than hand back the cached arrays
    assert {size: _digest("heldout", size, 48) for size in (8, 16, 32)} == digests
    code = ("import hashlib; from data_pipeline.scenes import load_scenes_split as load; d = load('heldout', 16, 48); "
            "print(hashlib.sha256(d.images.tobytes() + d.labels.tobytes()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": ROOT}
    other = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == digests[16]
    assert _digest("heldout", 16, 48, seed=1) != digests[16]
    for size in (8, 16, 32):
        data = load_scenes_split("heldout", image_size=size, num_samples=48)
        assert data.images.shape == (48, size, size, 3) and data.images.dtype == np.uint8
        assert data.labels.dtype == np.int64 and data.keys[7] == "scenes-heldout-000007"
    assert len(load_scenes_split("train")) == 4160 and len(load_scenes_split("heldout")) == 480


def test_stream_captions_depend_only_on_seed_epoch_and_index():
    first = make_scenes_stream("train", 8, seed=3, num_samples=104)
    second = make_scenes_stream("train", 8, seed=3, num_samples=104)
    a = [next(first) for _ in range(208)]  # two epochs
    b = [next(second) for _ in range(208)]
    assert [(s["key"], s["caption"]) for s in a] == [(s["key"], s["caption"]) for s in b]
    by_epoch = [{s["key"]: s["caption"] for s in a[e * 104:(e + 1) * 104]} for e in (0, 1)]
    changed = sum(by_epoch[0][k] != by_epoch[1][k] for k in by_epoch[0])
    assert changed > 104 * 0.7  # 12 templates: a new draw per epoch differs ~92% of the time
    resumed = make_scenes_stream("train", 8, seed=3, num_samples=104)
    resumed.load_state_dict({"epoch": 1, "offset": 10})
    assert [next(resumed)["caption"] for _ in range(5)] == [s["caption"] for s in a[114:119]]


def test_label_packing_round_trips():
    labels = [encode_label(s, c, z, p) for s in range(len(SHAPES)) for c in range(len(COLOURS))
              for z in range(len(SIZES)) for p in range(len(POSITIONS))]
    assert labels == list(range(len(labels)))
    assert decode_label(encode_label(5, 2, 1, 3)) == SceneAttributes(5, 2, 1, 3)
    with pytest.raises(ValueError, match="out of range"):
        decode_label(len(labels))


# --- held-out combinations -----------------------------------------------------------------


def test_heldout_triples_never_occur_in_training():
    held = heldout_combinations(0)
    assert len(held) == 24 and len(SHAPES) >= 6 and len(COLOURS) >= 6 and len(SIZES) == 2
    train = load_scenes_split("train")
    heldout = load_scenes_split("heldout")
    train_triples = [_triple(label) for label in train.labels]
    assert not any(t in held for t in train_triples)  # every train sample checked
    assert {_triple(label) for label in heldout.labels} == held  # held-out draws only (and all) of them
    seen = set(train_triples)
    assert {s for s, _, _ in seen} == set(range(len(SHAPES)))  # single attributes all still trained
    assert {c for _, c, _ in seen} == set(range(len(COLOURS)))
    assert {z for _, _, z in seen} == set(range(len(SIZES)))
    seen_pairs = {(s, c) for s, c, _ in seen}
    unseen_pairs = {(s, c) for s, c, _ in held} - seen_pairs
    assert len(unseen_pairs) == len(SHAPES)  # one (shape, colour) pair per shape never trained at any size
    assert len({c for _, c in unseen_pairs}) == len(COLOURS)
    assert heldout_combinations(1) != held


# --- captions and pixels --------------------------------------------------------------------


def _parse(caption: str) -> dict[str, str]:
    """Attribute words found in ``caption``; fails if a category is named twice."""
    words = re.findall(r"[a-z]+", caption)
    found: dict[str, list[str]] = {
        "shape": [w for w in words if w in SHAPES],
        "colour": [w for w in words if w in COLOURS],
        "size": [w for w in words if w in SIZES],
        "position": [p for p in POSITIONS if re.search(rf"\b{p}\b", caption)],
    }
    assert all(len(v) <= 1 for v in found.values()), caption
    return {k: v[0] for k, v in found.items() if v}


def test_every_caption_names_its_image_attributes():
    train = load_scenes_split("train")
    mentioned = {task: 0 for task in ("shape", "colour", "size", "position")}
    for index, label in enumerate(train.labels):
        truth = decode_label(int(label)).names()
        for template in range(len(TRAIN_TEMPLATES)) if index < 520 else [index % len(TRAIN_TEMPLATES)]:
            parsed = _parse(caption_for(int(label), template))
            assert parsed and all(truth[k] == v for k, v in parsed.items()), (caption_for(int(label), template), truth)
            for k in parsed:
                mentioned[k] += 1
    assert min(mentioned.values()) > 1000, mentioned
    assert caption_for(encode_label(0, COLOURS.index("orange"), 0, 0), 1) == "an orange circle"


def _colour_name(image: np.ndarray) -> str:
    """Nearest palette colour (by direction in RGB, which anti-aliasing against black preserves) of the
    mean of the pixels at least half as bright as the brightest."""
    brightness = image.astype(np.float64).sum(-1)
    mean = image[brightness >= 0.5 * brightness.max()].astype(np.float64).mean(0)
    unit = {name: np.array(rgb) / np.linalg.norm(rgb) for name, rgb in PALETTE.items()}
    return max(unit, key=lambda name: float(mean @ unit[name]) / np.linalg.norm(mean))


@pytest.mark.parametrize("size", [8, 16, 32])
def test_pixels_show_the_named_colour_size_and_position(size):
    data = load_scenes_split("train", image_size=size, num_samples=4160 if size == 16 else 1040)
    areas: dict[tuple[int, int], list[float]] = {}
    for image, label in zip(data.images, data.labels):
        a = decode_label(int(label))
        names = a.names()
        assert (image == 0).all(-1).mean() > 0.15  # on black
        assert _colour_name(image) == names["colour"], names
        palette = np.array(PALETTE[names["colour"]], dtype=np.float64)
        coverage = image.astype(np.float64) @ palette / float(palette @ palette)
        # wholly inside: at most the inner half of a border pixel is covered (a quarter of a corner)
        assert coverage[[0, -1], :].max() <= 0.55 and coverage[:, [0, -1]].max() <= 0.55
        assert coverage[[0, 0, -1, -1], [0, -1, 0, -1]].max() <= 0.3
        if names["size"] == "large":  # large objects have fully covered pixels: the colour itself
            brightest = image.reshape(-1, 3)[image.astype(int).sum(-1).argmax()].astype(np.float64)
            nearest = min(PALETTE, key=lambda n: float(np.linalg.norm(brightest - np.array(PALETTE[n]))))
            assert nearest == names["colour"] and np.abs(brightest - palette).max() <= 13
        areas.setdefault((a.shape, a.size), []).append(float(coverage.sum()))
        if names["size"] == "small" and size >= 16:
            ys, xs = np.nonzero(coverage >= 0.5)
            dx, dy = (xs.min() + xs.max() + 1) / 2 - size / 2, (ys.min() + ys.max() + 1) / 2 - size / 2
            scale = size / 16
            if names["position"] == "centre":
                assert max(abs(dx), abs(dy)) <= 1.7 * scale, (names, dx, dy)
            else:
                want_x = -1 if "left" in names["position"] else 1
                want_y = -1 if "top" in names["position"] else 1
                assert dx * want_x >= 1.0 * scale and dy * want_y >= 1.0 * scale, (names, dx, dy)
    for shape in range(len(SHAPES)):
        small, large = areas[(shape, 0)], areas[(shape, 1)]
        assert min(large) > 2.0 * max(small), (SHAPES[shape], size, max(small), min(large))
    # the shapes stay distinct at 16x16: undisturbed large prototypes differ in >= 10% of coverage
    masks = [scenes.render_mask(s, 16, (8.0, 8.0), 0.38 * 16) for s in SHAPES]
    gaps = [np.abs(masks[i] - masks[j]).mean() for i in range(len(SHAPES)) for j in range(i)]
    assert min(gaps) > 0.06, min(gaps)


# --- templates -------------------------------------------------------------------------------


def test_eval_templates_share_only_attribute_words_with_training_captions():
    train_vocab = set().union(*(_words(c) for c in scenes.all_training_captions()))
    attribute_words = set(SHAPES) | set(COLOURS) | set(SIZES) | set().union(*(_words(p) for p in POSITIONS))
    assert attribute_words <= train_vocab
    for task in TASKS:
        assert len(EVAL_TEMPLATES[task]) >= 3
        for template in EVAL_TEMPLATES[task]:
            others = _words(template.replace("{word}", " "))
            assert others and others.isdisjoint(train_vocab), (task, template, others & train_vocab)
        prompts = class_prompts(task)
        assert len(prompts) == len(scenes.TASK_CLASSES[task])
        for word, per_class in zip(scenes.TASK_CLASSES[task], prompts):
            assert len(per_class) == len(EVAL_TEMPLATES[task]) and all(word in _words(p) for p in per_class)
            assert all(_words(p) & attribute_words == {word} for p in per_class)  # only the task's attribute
    assert len(TRAIN_TEMPLATES) >= 8 and len(set(scenes.all_training_captions())) > 1000
    for template in scenes.EVAL_PAIR_TEMPLATES:
        others = _words(template.replace("{colour}", " ").replace("{shape}", " "))
        assert others and others.isdisjoint(train_vocab), (template, others & train_vocab)
    pairs = scenes.pair_prompts()
    assert len(pairs) == len(SHAPES) * len(COLOURS)
    for index, per_pair in enumerate(pairs):
        shape, colour = SHAPES[index // len(COLOURS)], COLOURS[index % len(COLOURS)]
        assert all(_words(p) & attribute_words == {shape, colour} for p in per_pair), per_pair


# --- sharding -------------------------------------------------------------------------------


def test_scenes_source_items_captions_and_errors():
    from data_pipeline.shard_config import ShardConfig, SourceConfig, fingerprint  # noqa: PLC0415
    from data_pipeline.sources import SourceError, open_source, resolve_kind  # noqa: PLC0415

    assert resolve_kind(SourceConfig(path="scenes:heldout")) == resolve_kind(SourceConfig(path="scenes")) == "scenes"
    source = open_source(SourceConfig(path="scenes:heldout", num_samples=48, captions_per_image=3), 16)
    assert source.kind == "scenes" and len(source) == 144
    split = load_scenes_split("heldout", image_size=16, num_samples=48)
    for position in (0, 13, 47):
        raws = [source.loader.fetch(item, source.loader.caption(item)) for item in (position, position + 48, position + 96)]
        assert {r.meta["original_key"] for r in raws} == {split.keys[position]}
        assert len({r.caption for r in raws}) == 3  # the same image under three different templates
        names = decode_label(int(split.labels[position])).names()
        assert all({k: r.meta[k] for k in names} == names for r in raws)
        assert all(all(names[k] == v for k, v in _parse(r.caption).items()) for r in raws)
        np.testing.assert_array_equal(np.asarray(raws[0].image), split.images[position])
    with pytest.raises(SourceError, match="scenes:test"):
        open_source(SourceConfig(path="scenes:test"), 16)
    # source.num_samples left at 0 keeps the fingerprint of shards made before the field existed
    assert fingerprint(ShardConfig()) == "9bc4e4a41f5e2b7bac11b32c545cd879371c57a9a97cc44a398e84f5dd5488d1"
    assert fingerprint(ShardConfig(source=SourceConfig(num_samples=48))) != fingerprint(ShardConfig())


@pytest.mark.integration
def test_sharding_scenes_train_round_trips_labels(ray_local, tmp_path):
    import webdataset as wds  # noqa: PLC0415

    from data_pipeline.manifest import read_manifest  # noqa: PLC0415
    from data_pipeline.pipeline import run_pipeline  # noqa: PLC0415
    from data_pipeline.shard_config import ShardConfig  # noqa: PLC0415
    from pretrain.config import CONFIGS_DIR  # noqa: PLC0415
    from pretrain.config_io import load_config  # noqa: PLC0415

    config = load_config(ShardConfig, CONFIGS_DIR / "data" / "scenes.yaml",
                         ["source.path=scenes", "source.num_samples=208", "samples_per_shard=100"])
    summary = run_pipeline(config, str(tmp_path / "scenes"), progress=False)
    assert summary.samples == 208 and summary.shards == 3 and summary.counts == {"ok": 208}
    urls = read_manifest(str(tmp_path / "scenes")).shard_urls(str(tmp_path / "scenes"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    split = load_scenes_split("train", image_size=16, num_samples=208)
    assert [s["json"]["label"] for s in samples] == split.labels.tolist()
    np.testing.assert_array_equal(np.stack([s["png"] for s in samples]), split.images)  # png is lossless
    held = heldout_combinations(0)
    for sample in samples:
        meta = sample["json"]
        names = decode_label(meta["label"]).names()
        assert {k: meta[k] for k in names} == names and meta["source"] == "scenes"
        assert all(names[k] == v for k, v in _parse(sample["txt"]).items())
        assert _triple(meta["label"]) not in held
    assert len({s["txt"] for s in samples}) > 50


# --- training + evaluation ------------------------------------------------------------------


def test_eval_set_resolution():
    from pretrain.config import DataConfig  # noqa: PLC0415

    assert DataConfig(source="scenes").resolved_eval_set() == "scenes"
    assert DataConfig().resolved_eval_set() == "digits"
    assert DataConfig(source="shards", shards="x").resolved_eval_set() == "digits"
    assert DataConfig(source="shards", shards="x", eval_set="scenes").resolved_eval_set() == "scenes"
    with pytest.raises(ValueError, match="scenes_heldout_samples"):
        DataConfig(scenes_heldout_samples=0).validate()


@pytest.mark.integration
def test_tiny_training_on_scenes_evaluates_per_attribute(tmp_path):
    import json  # noqa: PLC0415

    from pretrain.config import CONFIGS_DIR, load_run_config  # noqa: PLC0415
    from pretrain.evaluate import evaluate, heldout_data, load_checkpoint, pair_caption_queries, probe_queries  # noqa: PLC0415
    from pretrain.trainer import Trainer  # noqa: PLC0415

    config = load_run_config(CONFIGS_DIR / "tiny.yaml", [
        "data.source=scenes", "data.scenes_train_samples=520", "data.scenes_heldout_samples=96",
        "model.image_size=8", "train.steps=30", "train.batch_size=8", "train.checkpoint_every=30", "train.log_every=1",
    ])
    run_dir = tmp_path / "run"
    trainer = Trainer(config, run_dir)
    assert len(trainer.tokenizer.tokenize("circle")) == 1  # the tokenizer was trained on scene captions
    trainer.train()
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and all(np.isfinite(losses))
    loaded = load_checkpoint(run_dir)
    _, labels, captions = heldout_data(loaded.config)
    assert len(captions) == 96 and {_triple(int(label)) for label in labels} <= heldout_combinations(0)
    result = evaluate(loaded, "zeroshot", steps=1)
    assert result["eval_set"] == "scenes" and result["n"] == 96
    per_task = [result[f"top1_{task}"] for task in TASKS]
    assert result["top1"] == pytest.approx(sum(per_task) / 3)
    assert result["top5"] == pytest.approx((result["top5_shape"] + result["top5_colour"]) / 2)
    assert "top5_size" not in result and all(0.0 <= v <= 1.0 for v in per_task)
    retrieval = evaluate(loaded, "retrieval", steps=1)
    assert retrieval["n"] == 96 and retrieval["i2t_r10"] >= retrieval["i2t_r1"]
    probe = probe_queries(loaded, train_samples=256)
    assert sorted(probe) == ["probe_colour", "probe_shape", "probe_size"], probe
    # colour is nearly linear in the pixels and ê_0 reads the image from the first step (zero-init
    # query path): far above chance (1/8) even after 30 steps
    assert probe["probe_colour"] >= PROBE_COLOUR_MIN, probe
    assert all(0.0 <= result[f"joint_{task}"] <= 1.0 for task in ("shape", "colour")), result
    pairs = pair_caption_queries(loaded)
    assert sorted(pairs) == ["marginal_colour", "marginal_shape", "pair_colour", "pair_shape"]
    assert all(0.0 <= v <= 1.0 for v in pairs.values()), pairs


def test_pair_caption_scores_place_a_miss_on_composition_or_on_one_attribute():
    """Image queries at their own pair's caption score 1 on every figure; queries at the caption of the
    pair that shares the shape and has the next colour (a composition miss) keep shape and lose colour
    on both figures."""
    import torch  # noqa: PLC0415

    from pretrain.evaluate import pair_caption_scores  # noqa: PLC0415

    generator = torch.Generator().manual_seed(0)
    shapes, colours, dim = len(scenes.SHAPES), len(scenes.COLOURS), 96
    shape_axis, colour_axis = torch.randn(shapes, dim, generator=generator), torch.randn(colours, dim, generator=generator)
    grid = shape_axis[:, None] + colour_axis[None] + 0.3 * torch.randn(shapes, colours, dim, generator=generator)
    shape = torch.arange(shapes).repeat_interleave(colours)
    colour = torch.arange(colours).repeat(shapes)
    labels = {"shape": shape.numpy(), "colour": colour.numpy()}
    right = pair_caption_scores(grid[shape, colour], grid, labels)
    assert right == {"pair_shape": 1.0, "marginal_shape": 1.0, "pair_colour": 1.0, "marginal_colour": 1.0}
    leaning = pair_caption_scores(grid[shape, (colour + 1) % colours], grid, labels)
    assert leaning["pair_shape"] == leaning["marginal_shape"] == 1.0
    assert leaning["pair_colour"] == leaning["marginal_colour"] == 0.0


def test_joint_attributes_are_read_off_the_best_pair_shape_major():
    import torch  # noqa: PLC0415

    from pretrain.evaluate import joint_attribute_accuracy  # noqa: PLC0415

    colours = len(COLOURS)
    truth = {"shape": np.array([0, 2, 7]), "colour": np.array([1, 5, 7])}
    scores = torch.zeros(3, len(SHAPES) * colours)
    scores[0, 0 * colours + 1] = 1.0  # both right
    scores[1, 2 * colours + 4] = 1.0  # shape right, colour wrong
    scores[2, 6 * colours + 7] = 1.0  # colour right, shape wrong
    assert joint_attribute_accuracy(scores, truth) == {"joint_shape": pytest.approx(2 / 3), "joint_colour": pytest.approx(2 / 3)}
    scores[1, 2 * colours + 5] = 2.0
    scores[2, 7 * colours + 7] = 2.0
    assert joint_attribute_accuracy(scores, truth) == {"joint_shape": 1.0, "joint_colour": 1.0}
