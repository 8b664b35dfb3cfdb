"""Suite metrics on constructed cases with known answers, and users' data layouts read back."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pretrain.eval_data import fill_template, read_captioned_shards, read_clip_benchmark, read_image_folder
from pretrain.eval_metrics import (
    classification_metrics, frechet_distance, frechet_distance_spectral, linear_probe_accuracy, mean_per_class_recall,
    retrieval_metrics,
)


def test_identical_embeddings_give_perfect_recall():
    embeddings = F.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    metrics = retrieval_metrics(embeddings @ embeddings.T)
    assert all(metrics[f"{d}_r{k}"] == 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10))


def test_known_permutation_gives_expected_recall():
    """For 10 of 100 images a wrong caption (i+1) outscores the true one, which ranks 2nd: R@1 = 0.9,
    R@5 = 1, both ways."""
    count = 100
    similarity = torch.eye(count)
    moved = torch.arange(10)
    # images 0..9: a wrong caption (i+1) scores 2, the true one 1, everything else 0
    similarity[moved, moved + 1] = 2.0
    metrics = retrieval_metrics(similarity)
    assert metrics["i2t_r1"] == pytest.approx(0.90)
    assert metrics["i2t_r5"] == 1.0
    # text->image: captions 1..10 now rank image i-1 first (2 > 1): 10 captions miss at R@1
    assert metrics["t2i_r1"] == pytest.approx(0.90)
    assert metrics["t2i_r5"] == 1.0
    # every true pair ranked last of 100: recall@10 = 0
    reverse = -torch.eye(count)
    assert retrieval_metrics(reverse)["i2t_r10"] == 0.0


def test_several_captions_per_image():
    """Image 0 has captions 0 and 1, image 1 has caption 2. Image 0 ranks caption 1 first (its own):
    an i2t hit; caption 0 ranks image 1 first: a t2i miss at R@1."""
    similarity = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.0, 1.0]])
    metrics = retrieval_metrics(similarity, owner=torch.tensor([0, 0, 1]))
    assert metrics["i2t_r1"] == 1.0
    assert metrics["t2i_r1"] == pytest.approx(2 / 3)
    assert metrics["t2i_r5"] == 1.0 and metrics["n_captions"] == 3


def test_hand_built_scorer_gives_known_accuracy():
    """Class 0 has 8 rows, all right; class 1 has 2 rows, one right (its other row's truth is 3rd).
    top-1 = 9/10, mean per-class recall = (1 + 0.5) / 2, top-5 over 3 classes = 1."""
    labels = torch.tensor([0] * 8 + [1, 1])
    scores = torch.zeros(10, 3)
    scores[:8, 0] = 1.0
    scores[8, 1] = 1.0
    scores[9] = torch.tensor([0.9, 0.1, 0.5])
    metrics = classification_metrics(scores, labels)
    assert metrics["top1"] == pytest.approx(0.9)
    assert metrics["mean_per_class_recall"] == pytest.approx(0.75)
    assert metrics["top5"] == 1.0
    assert mean_per_class_recall(scores, labels) != metrics["top1"]  # unbalanced: the two differ


def test_linear_probe_reads_a_direction_that_norms_hide_and_not_noise():
    """Class c lies along direction c with a random length: the probe normalises rows, so the lengths
    cannot help or hurt, and it separates the classes on unseen rows; labels drawn apart from the
    features leave it near chance (1/4)."""
    rng = np.random.default_rng(0)
    centres = np.eye(4, 16)

    def draw(n):
        labels = rng.integers(0, 4, n)
        features = centres[labels] * rng.uniform(0.1, 10.0, (n, 1)) + 0.05 * rng.standard_normal((n, 16))
        return features, labels

    (train_x, train_y), (test_x, test_y) = draw(200), draw(200)
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y) == 1.0
    noise_x = rng.standard_normal((400, 16))
    assert linear_probe_accuracy(noise_x[:200], train_y, noise_x[200:], test_y) < 0.4


def test_frechet_distance_zero_on_itself_and_growing_with_noise():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 8))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    distances = [frechet_distance(features, features + rng.normal(scale=s, size=features.shape)) for s in (0.1, 0.5, 1.0)]
    assert distances[0] < distances[1] < distances[2]
    # a pure mean shift by (1, 0, ..., 0) adds exactly |Δμ|² = 1
    shifted = features + np.eye(8)[0]
    assert frechet_distance(features, shifted) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("samples", [(500, 400), (30, 20)])  # more samples than dimensions, and fewer (singular Σ)
def test_frechet_distance_spectral_equals_the_sqrtm_one(samples):
    """FID's eigenvalue form gives scipy sqrtm's number (the reference implementations' way), on both
    of its branches; on a set with itself it is zero to rounding."""
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(64, 64))
    a = rng.normal(size=(samples[0], 64)) @ mixing
    b = rng.normal(size=(samples[1], 64)) @ mixing * 1.3 + 0.5
    assert frechet_distance_spectral(a, b) == pytest.approx(frechet_distance(a, b), rel=1e-6)
    assert frechet_distance_spectral(a, a) == pytest.approx(0.0, abs=1e-9 * np.trace(np.cov(a, rowvar=False)))
    assert frechet_distance_spectral(a, a + np.eye(64)[0]) == pytest.approx(1.0, rel=1e-9)


def _png(colour: tuple[int, int, int], size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size + 4), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


COLOURS = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255)}


def test_clip_benchmark_layout_is_read_with_its_classnames_and_templates(tmp_path):
    """What ``clip_benchmark_export_wds`` writes: test/0.tar, test/1.tar, ... (numeric order), an image
    and a cls per sample, classnames.txt and zeroshot_classification_templates.txt with {c}."""
    root = tmp_path / "wds_colours"
    labels = [0, 1, 2, 1, 0, 2, 2, 1, 0, 0, 1]
    for shard in range(11):  # 11 shards: "10.tar" must come after "9.tar", not after "1.tar"
        label = labels[shard]
        _write_tar(root / "test" / f"{shard}.tar", [{"__key__": f"s{shard:04d}", "webp" if shard % 2 else "png":
                                                     _png(COLOURS[label]), "cls": str(label).encode()}])
    (root / "test" / "nshards.txt").write_text("11\n")
    (root / "classnames.txt").write_text("red\ngreen\nblue\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c} square.\n")
    data = read_clip_benchmark(root, size=8)
    assert data.labels.tolist() == labels
    assert data.classnames == ["red", "green", "blue"]
    assert data.prompts_per_class()[1] == ["a photo of a green.", "a green square."]
    assert data.pixels.shape == (11, 3, 8, 8)
    # the pixels are the label's colour: red images have R = +1, G = B = -1
    red = data.pixels[data.labels == 0]
    assert torch.allclose(red[:, 0], torch.ones_like(red[:, 0]), atol=0.02)
    assert torch.allclose(red[:, 1:], -torch.ones_like(red[:, 1:]), atol=0.02)
    assert len(read_clip_benchmark(root, size=8, limit=4).labels) == 4


def test_image_folder_with_classnames_and_templates_files(tmp_path):
    root = tmp_path / "folder"
    for folder, label, count in (("a_red", 0, 3), ("b_green", 1, 1)):
        (root / folder).mkdir(parents=True)
        for index in range(count):
            (root / folder / f"{index}.png").write_bytes(_png(COLOURS[label]))
    names = tmp_path / "names.txt"
    names.write_text("red thing\ngreen thing\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("{c}\n")
    data = read_image_folder(root, size=8, classnames=str(names), templates=str(templates))
    assert data.labels.tolist() == [0, 0, 0, 1]
    assert data.classnames == ["red thing", "green thing"]
    limited = read_image_folder(root, size=8, limit=2, classnames=str(names), templates=str(templates))
    assert sorted(limited.labels.tolist()) == [0, 1]  # round-robin: every class keeps a share
    with pytest.raises(ValueError, match="has 1 class names but .* has 2 class folders"):
        names.write_text("only one\n")
        read_image_folder(root, size=8, classnames=str(names), templates=str(templates))


def test_captioned_shards_with_one_or_several_captions(tmp_path):
    _write_tar(tmp_path / "shards" / "heldout-000000.tar", [
        {"__key__": "000000000", "jpg": _png(COLOURS[0]), "txt": b"a red square", "json": b"{}"},
        {"__key__": "000000001", "png": _png(COLOURS[1]), "txt": b"a green square\nsomething green"},
        {"__key__": "000000002", "json": b"{}"},  # img2dataset's failed sample: no image, no caption
    ])
    data = read_captioned_shards(tmp_path / "shards", size=8)
    assert data.captions == ["a red square", "a green square", "something green"]
    assert data.owner == [0, 1, 1]
    assert data.pixels.shape == (2, 3, 8, 8)
    assert fill_template("a photo of {}", "cat") == "a photo of cat"
