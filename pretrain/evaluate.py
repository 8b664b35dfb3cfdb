"""Evaluate one checkpoint: zero-shot classification, retrieval, samples (``diffdis eval``/``sample``).

Inference reads only what a checkpoint's ``model/`` folder holds (safetensors weights, config, tokenizer)
and the run config beside it; no DeepSpeed, nothing downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline import scenes
from data_pipeline.dataset import collate_images
from data_pipeline.digits import TRAIN_TEMPLATES, caption_for, class_prompts, load_digits_split
from pretrain.checkpoint import COMPLETE, is_complete, latest_complete, step_of
from pretrain.config import RunConfig
from pretrain.config_io import load_config
from pretrain.eval_metrics import linear_probe_accuracy
from pretrain.inference import class_queries, image_queries, retrieval, sample_images, topk_accuracy, zero_shot_classify
from pretrain.model import ClipModel, DiffDisModel, load_pretrained
from pretrain.model.tokenizer import load_tokenizer


@dataclass
class LoadedCheckpoint:
    model: DiffDisModel | ClipModel
    tokenizer: object
    config: RunConfig
    step: int | None
    path: Path


EMA_FOLDER = "model-ema"


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory → its newest complete checkpoint; a checkpoint directory → itself if complete;
    an exported folder (``model/`` + ``config.yaml``, or ``diffdis export``'s flat folder) → itself."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a run directory or a checkpoint directory")
    if (path / "checkpoints").is_dir():
        found = latest_complete(path / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"{path / 'checkpoints'} holds no complete checkpoint (none has a {COMPLETE} marker)")
        return found
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path  # diffdis export's folder
    if step_of(path) is not None and not is_complete(path):
        raise FileNotFoundError(f"{path} has no {COMPLETE} marker: the save was interrupted, use an earlier checkpoint")
    if not (path / "model" / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'model'} is missing: {path} is neither a run nor a checkpoint directory")
    return path


def model_folder(directory: Path, use_ema: bool = True) -> Path:
    """The inference weights of a checkpoint: its EMA folder when the run kept one (and ``use_ema``),
    else the trained weights; an exported folder is its own model folder."""
    if (directory / "model.safetensors").is_file():
        return directory
    if use_ema and (directory / EMA_FOLDER / "config.json").is_file():
        return directory / EMA_FOLDER
    return directory / "model"


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> LoadedCheckpoint:
    directory = resolve_checkpoint(path)
    config_file = directory / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing from checkpoint {directory}")
    folder = model_folder(directory, use_ema)
    model = load_pretrained(folder, map_location=device).eval()  # DiffDis or CLIP, from its config.json
    tokenizer = load_tokenizer(folder / "tokenizer")
    return LoadedCheckpoint(model, tokenizer, load_config(RunConfig, config_file), step_of(directory), directory)


def _split(config: RunConfig, split: str, limit: int | None = None) -> tuple[list, np.ndarray]:
    """Images and raw labels of the ``train`` or ``heldout`` split of ``data.eval_set``, the first ``limit``
    (scenes labels are packed attributes, ``data_pipeline.scenes.decode_label``; the held-out scenes
    split is ``data.scenes_heldout_samples`` long unless ``limit`` says otherwise)."""
    if config.data.resolved_eval_set() == "scenes":
        count = config.data.scenes_heldout_samples if split == "heldout" else None
        data = scenes.load_scenes_split(split, image_size=config.model.image_size,
                                        num_samples=count if limit is None else limit, split_seed=config.data.split_seed)
        return data.images, np.asarray(data.labels)
    data = load_digits_split(split, image_size=config.model.image_size,
                             heldout_fraction=config.data.heldout_fraction, split_seed=config.data.split_seed)
    return data.images[:limit], np.asarray(data.labels[:limit])


def heldout_data(config: RunConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Held-out images (pixels in [-1, 1]), labels, and one deterministic caption per image, from the
    run's ``data.eval_set``: held-out digits (labels are digits), or the scenes held-out split (labels
    are packed attributes, ``data_pipeline.scenes.decode_label``; only held-out triples)."""
    images, labels = _split(config, "heldout")
    if config.data.resolved_eval_set() == "scenes":
        captions = [scenes.retrieval_caption(int(label), i) for i, label in enumerate(labels)]
    else:
        captions = [caption_for(int(label), i % len(TRAIN_TEMPLATES)) for i, label in enumerate(labels)]
    return collate_images([{"image": image} for image in images]), torch.tensor(labels), captions


@torch.no_grad()
def zero_shot_scenes(model, tokenizer, pixels: torch.Tensor, labels: torch.Tensor, diffusion, steps: int = 10,
                     guidance: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Zero-shot shape, colour and size of scenes: one query chain per image (``image_queries``), scored
    against each task's prompt ensembles (``scenes.class_prompts(task)``, eval templates only).

    Keys: ``top1_{task}`` for every task, ``top5_{task}`` for tasks with more than 5 classes (shape,
    colour; top-5 of size's 2 classes is always 1), and ``top1``/``top5`` as their means over those
    tasks, so callers written for one-task digits keep working; ``joint_shape``/``joint_colour`` from
    two-attribute prompts (:func:`joint_attribute_accuracy`), not part of those means."""
    queries = image_queries(model, pixels, diffusion, steps, guidance, seed=seed)
    truth = scenes.task_labels(labels.tolist())
    metrics: dict[str, float] = {}
    for task in scenes.TASKS:
        scores = queries @ class_queries(model, tokenizer, scenes.class_prompts(task)).T.to(queries.device)
        target = torch.as_tensor(truth[task], device=scores.device)
        metrics[f"top1_{task}"] = topk_accuracy(scores, target, 1)
        if scores.shape[1] > 5:
            metrics[f"top5_{task}"] = topk_accuracy(scores, target, 5)
    for k in ("top1", "top5"):
        values = [v for name, v in metrics.items() if name.startswith(f"{k}_")]
        metrics[k] = sum(values) / len(values)
    pair_scores = queries @ class_queries(model, tokenizer, scenes.pair_prompts()).T.to(queries.device)
    metrics.update(joint_attribute_accuracy(pair_scores, truth))
    return {**metrics, "n": len(labels)}


def joint_attribute_accuracy(pair_scores: torch.Tensor, truth: dict[str, np.ndarray], prefix: str = "joint") -> dict[str, float]:
    """``{prefix}_shape``/``{prefix}_colour``: the attributes of each image's best-scoring (shape, colour)
    prompt ensemble. ``pair_scores`` is (N, shapes x colours), shape-major as ``scenes.pair_prompts``.

    Beside ``top1_*``, not instead of it: a one-attribute prompt asks the text encoder to place "painted
    white" where every white object's queries lie, which it can only learn from captions that always
    name a shape too; the joint reading asks only that an image's query be nearest its own pair's
    (design notes 14)."""
    best = pair_scores.argmax(1).cpu().numpy()
    colours = len(scenes.COLOURS)
    return {f"{prefix}_shape": float((best // colours == truth["shape"]).mean()),
            f"{prefix}_colour": float((best % colours == truth["colour"]).mean())}


def labelled_images(config: RunConfig, split: str, limit: int | None = None) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Pixels in [-1, 1] and per-task class labels of the ``train`` or ``heldout`` split of
    ``data.eval_set`` (digits: ``{"digit": ...}``; scenes: shape, colour and size), the first ``limit``."""
    images, labels = _split(config, split, limit)
    by_task = scenes.task_labels(labels) if config.data.resolved_eval_set() == "scenes" else {"digit": labels}
    return collate_images([{"image": image} for image in images]), by_task


def probe_queries(loaded: LoadedCheckpoint, train_samples: int = 2080) -> dict[str, float]:
    """``probe_{task}``: held-out accuracy of a linear probe on the image queries (ê_0, or a CLIP model's
    image embeddings), fit on ``train_samples`` training images. Compared with ``top1_{task}`` it places a
    zero-shot failure: low probe, the image side lacks the attribute (on scenes, for a held-out
    combination); high probe, low zero-shot, the class prompts' queries miss the images' (text side)."""
    config = loaded.config
    queries = {}
    labels = {}
    for split, limit in (("train", train_samples), ("heldout", None)):
        pixels, labels[split] = labelled_images(config, split, limit)
        queries[split] = image_queries(loaded.model, pixels, config.diffusion, config.eval.ddim_steps,
                                       config.eval.guidance, seed=config.eval.seed).float().cpu().numpy()
    return {f"probe_{task}": linear_probe_accuracy(queries["train"], labels["train"][task], queries["heldout"],
                                                   labels["heldout"][task])
            for task in labels["heldout"]}


@torch.no_grad()
def pair_caption_queries(loaded: LoadedCheckpoint) -> dict[str, float]:
    """Scenes only: where a shape or colour miss comes from, scored with training-style captions.

    Every held-out image query is scored against the 64 captions "a {colour} {shape}" (never-seen pairs
    included; the text encoder composes them from seen words):

    - ``pair_{shape,colour}``: the attribute of the nearest such caption is right. High here, low
      ``top1_*``: the image queries compose the pair, and the miss is in how the one-attribute class
      prompts are read;
    - ``marginal_{shape,colour}``: top-1 against each class's caption queries averaged over the other
      attribute (a colour is "a {colour} {shape}" over all shapes). Low here too: the image queries of a
      never-seen pair lean to the seen pair that shares the shape (or colour), a composition miss that
      no one-attribute prompt can undo.

    An eval-time stop-36 diagnostic; ``{}`` for other eval sets."""
    config = loaded.config
    if config.data.resolved_eval_set() != "scenes":
        return {}
    pixels, labels = labelled_images(config, "heldout")
    queries = image_queries(loaded.model, pixels, config.diffusion, config.eval.ddim_steps, config.eval.guidance,
                            seed=config.eval.seed)
    captions = scenes.pair_prompts((scenes.TRAIN_TEMPLATES[scenes.PAIR_TEMPLATE_INDEX],))
    grid = class_queries(loaded.model, loaded.tokenizer, captions).float().view(len(scenes.SHAPES), len(scenes.COLOURS), -1)
    return pair_caption_scores(queries.float().to(grid.device), grid, labels)


def pair_caption_scores(queries: torch.Tensor, grid: torch.Tensor, labels: dict[str, np.ndarray]) -> dict[str, float]:
    """The figures of :func:`pair_caption_queries` from image ``queries`` (N, d), the caption queries
    ``grid`` (shapes, colours, d) and per-task ``labels`` (``shape`` and ``colour`` class indices)."""
    grid = torch.nn.functional.normalize(grid, dim=-1)
    queries = torch.nn.functional.normalize(queries, dim=-1)
    metrics = joint_attribute_accuracy(queries @ grid.flatten(0, 1).T, labels, prefix="pair")
    marginal = {"shape": grid.mean(1), "colour": grid.mean(0)}
    for task in ("shape", "colour"):
        scores = queries @ torch.nn.functional.normalize(marginal[task], dim=-1).T
        metrics[f"marginal_{task}"] = float((scores.argmax(1).cpu().numpy() == labels[task]).mean())
    return metrics


def evaluate(loaded: LoadedCheckpoint, task: str, steps: int | None = None, guidance: float | None = None) -> dict:
    """One JSON-able dict of metrics for ``task`` ("zeroshot" or "retrieval") on the held-out data of
    ``data.eval_set`` (digits: ``top1``/``top5``; scenes: per-task figures, :func:`zero_shot_scenes`)."""
    config = loaded.config
    steps = config.eval.ddim_steps if steps is None else steps
    guidance = config.eval.guidance if guidance is None else guidance
    pixels, labels, captions = heldout_data(config)
    common = dict(diffusion=config.diffusion, steps=steps, guidance=guidance, seed=config.eval.seed)
    eval_set = config.data.resolved_eval_set()
    if task == "zeroshot" and eval_set == "scenes":
        metrics = zero_shot_scenes(loaded.model, loaded.tokenizer, pixels, labels, **common)
    elif task == "zeroshot":
        metrics = zero_shot_classify(loaded.model, loaded.tokenizer, pixels, labels, class_prompts(), **common)
    elif task == "retrieval":
        metrics = retrieval(loaded.model, loaded.tokenizer, pixels, captions, **common)
    else:
        raise ValueError(f"unknown eval task {task!r}: expected zeroshot or retrieval")
    if loaded.model.config.family == "clip":  # no query chain: the image tower's embeddings are scored
        steps = guidance = None
    return {"task": task, "eval_set": eval_set, **metrics, "ddim_steps": steps, "guidance": guidance, "checkpoint_step": loaded.step,
            "checkpoint": str(loaded.path)}


def image_grid(pixels: torch.Tensor, columns: int, min_cell: int = 64) -> Image.Image:
    """Tile (N, C, H, W) pixels in [-1, 1] into one RGB image; small images are enlarged (nearest)."""
    count, channels, height, width = pixels.shape
    rows = (count + columns - 1) // columns
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    if channels == 1:
        array = np.repeat(array, 3, axis=-1)
    canvas = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for index, image in enumerate(array):
        row, col = divmod(index, columns)
        canvas[row * height : (row + 1) * height, col * width : (col + 1) * width] = image[..., :3]
    grid = Image.fromarray(canvas)
    scale = max(1, min_cell // max(height, width))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST) if scale > 1 else grid


def sample_grid(
    loaded: LoadedCheckpoint, prompts: list[str], out: str | Path, per_prompt: int = 8,
    steps: int | None = None, guidance: float | None = None, seed: int = 0,
) -> Path:
    """Generate ``per_prompt`` images for each prompt (one row each) and save a PNG grid."""
    config = loaded.config
    generator = torch.Generator().manual_seed(seed)
    pixels = sample_images(
        loaded.model, loaded.tokenizer, [p for p in prompts for _ in range(per_prompt)], config.diffusion,
        steps=config.eval.sample_steps if steps is None else steps,
        guidance=config.eval.sample_guidance if guidance is None else guidance, generator=generator,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(pixels, columns=per_prompt).save(out)
    return out
