"""Users' evaluation data, read into memory as pixels at the model's image size.

Three layouts, all common outside this project:

- **CLIP_benchmark webdataset** (``clip_benchmark_export_wds``): ``ROOT/{split}/*.tar`` whose samples hold
  an image (``webp``/``png``/``jpg``) and a ``cls`` (the class index as text), beside
  ``ROOT/classnames.txt`` (one class per line, in index order) and
  ``ROOT/zeroshot_classification_templates.txt`` (one template per line, ``{c}`` for the class name).
- **ImageFolder**: ``ROOT/<class folder>/<image>``, classes in sorted folder order (torchvision's
  convention); display names and templates from files given in the suite (or beside ROOT, as above).
- **Captioned shards** (ours or img2dataset's): ``*.tar`` with ``{key}.jpg|png|webp`` + ``{key}.txt``; a
  caption file with several lines gives the image several captions (CLIP_benchmark's retrieval sets).

Evaluation sets are small (hundreds to tens of thousands of images), so they are read whole and
cached by the suite for every checkpoint the watcher evaluates. Images are resized (shorter side) and
centre-cropped to the model's size, as CLIP_benchmark's preprocessing does.
"""

from __future__ import annotations

import io
import itertools
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".webp", ".png", ".jpg", ".jpeg")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


@dataclass
class LabelledImages:
    pixels: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    labels: torch.Tensor  # (N,) class indices
    classnames: list[str]
    templates: list[str]

    def prompts_per_class(self) -> list[list[str]]:
        """Every template filled with every class name: the prompt ensemble of each class."""
        return [[fill_template(t, name) for t in self.templates] for name in self.classnames]


@dataclass
class CaptionedImages:
    pixels: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    captions: list[str]
    owner: list[int] = field(default_factory=list)  # image index of each caption


def fill_template(template: str, classname: str) -> str:
    """CLIP_benchmark's templates use ``{c}``; plain ``{}`` is accepted as well."""
    return template.replace("{c}", classname).replace("{}", classname)


def read_lines(path: str | Path) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{path} is empty")
    return lines


def to_pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    """RGB, shorter side resized to ``size`` (bicubic), centre crop; stacked in [-1, 1]."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((width, height), Image.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        arrays.append(np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8))
    batch = torch.from_numpy(np.stack(arrays))
    return batch.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def read_tar_samples(path: Path) -> list[dict[str, bytes]]:
    """The samples of one webdataset tar, in file order: ``{"__key__": key, ext: bytes, ...}``."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as archive:
        for member in archive:
            if not member.isfile():
                continue
            name = Path(member.name).name
            key, dot, ext = name.partition(".")
            if not dot:
                continue
            sample = samples.setdefault(f"{Path(member.name).parent}/{key}", {"__key__": key})
            sample[ext.lower()] = archive.extractfile(member).read()
    return list(samples.values())


def _image_of(sample: dict[str, bytes], where: str) -> Image.Image:
    for ext in ("webp", "png", "jpg", "jpeg"):
        if ext in sample:
            return Image.open(io.BytesIO(sample[ext]))
    raise ValueError(f"sample {sample['__key__']} in {where} has no image (webp, png or jpg)")


def _shards(directory: Path) -> list[Path]:
    def order(path: Path):  # CLIP_benchmark numbers shards 0.tar, 1.tar, ... 10.tar: numeric order
        return (0, int(path.stem)) if path.stem.isdigit() else (1, path.name)

    shards = sorted(directory.glob("*.tar"), key=order)
    if not shards:
        raise FileNotFoundError(f"no .tar shards in {directory}")
    return shards


def read_clip_benchmark(root: str | Path, size: int, split: str = "test", limit: int | None = None,
                        classnames: str | None = None, templates: str | None = None) -> LabelledImages:
    """A CLIP_benchmark webdataset classification set (see the module docstring)."""
    root = Path(root)
    names = read_lines(classnames or root / CLASSNAMES_FILE)
    prompts = read_lines(templates or root / TEMPLATES_FILE)
    images, labels = [], []
    for shard in _shards(root / split):
        for sample in read_tar_samples(shard):
            if "cls" not in sample:
                raise ValueError(f"sample {sample['__key__']} in {shard} has no cls label")
            label = int(sample["cls"].decode().strip())
            if not 0 <= label < len(names):
                raise ValueError(f"sample {sample['__key__']} in {shard}: cls {label} but {len(names)} class names")
            images.append(_image_of(sample, str(shard)))
            labels.append(label)
            if limit is not None and len(images) >= limit:
                break
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise ValueError(f"no samples in {root / split}")
    return LabelledImages(to_pixels(images, size), torch.tensor(labels), names, prompts)


def read_image_folder(root: str | Path, size: int, limit: int | None = None, classnames: str | None = None,
                      templates: str | None = None) -> LabelledImages:
    """An ImageFolder set: one folder per class, sorted; ``classnames`` (one line per folder, same order)
    gives display names, else the folder names with ``_`` as spaces."""
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"{root} has no class folders")
    names_file = classnames or (root / CLASSNAMES_FILE if (root / CLASSNAMES_FILE).is_file() else None)
    names = read_lines(names_file) if names_file else [p.name.replace("_", " ") for p in folders]
    if len(names) != len(folders):
        raise ValueError(f"{names_file} has {len(names)} class names but {root} has {len(folders)} class folders")
    templates_file = templates or root / TEMPLATES_FILE
    if not Path(templates_file).is_file():
        raise FileNotFoundError(f"no templates file: give the task's templates (one per line, {{c}} for the class), "
                                f"or put {TEMPLATES_FILE} in {root}")
    per_class = [[(f, label) for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
                 for label, folder in enumerate(folders)]
    if limit is None:
        files = [item for group in per_class for item in group]
    else:  # round-robin over the classes before cutting, so every class keeps a share
        files = [item for row in itertools.zip_longest(*per_class) for item in row if item is not None][:limit]
    images = [Image.open(f) for f, _ in files]
    return LabelledImages(to_pixels(images, size), torch.tensor([l for _, l in files]), names, read_lines(templates_file))


def read_captioned_shards(root: str | Path, size: int, limit: int | None = None) -> CaptionedImages:
    """Image + caption shards (ours, img2dataset's, CLIP_benchmark's retrieval sets); ``root`` is a
    folder of ``*.tar`` or one tar."""
    root = Path(root)
    shards = [root] if root.is_file() else _shards(root)
    images, captions, owner = [], [], []
    for shard in shards:
        for sample in read_tar_samples(shard):
            if "txt" not in sample:
                continue  # img2dataset writes failed samples' json only; skip anything without a caption
            lines = [line.strip() for line in sample["txt"].decode().splitlines() if line.strip()]
            if not lines:
                continue
            owner += [len(images)] * len(lines)
            captions += lines
            images.append(_image_of(sample, str(shard)))
            if limit is not None and len(images) >= limit:
                break
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise ValueError(f"no captioned images in {root}")
    return CaptionedImages(to_pixels(images, size), captions, owner)
