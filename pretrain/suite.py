"""Evaluation suites: a YAML list of tasks run on one checkpoint (``diffdis eval --suite``, the watcher).

Task kinds (``TaskConfig.kind``):

- ``zeroshot``: top-1/top-5 and mean per-class recall of the image-conditioned query chain (METHOD.md
  "Inference") against CLIP prompt ensembles, on ``data: heldout`` (the run's own held-out digits or
  scenes) or a local CLIP_benchmark webdataset / ImageFolder set (``pretrain.eval_data``).
- ``retrieval``: recall@1/5/10 both ways, on ``heldout`` or local captioned shards.
- ``samples``: a fixed-seed grid for fixed prompts (one row per prompt), saved as PNG.
- ``digits_frechet``: the Fréchet distance between held-out real digits and samples generated from
  prompts naming each digit, in the pooled features of the small digits judge (``pretrain.judge``,
  trained reproducibly on the real training digits). It is **not FID**: the network, the feature
  space and hence the scale differ; compare it only with itself. Reported beside it: the same
  distance between real training and real held-out digits (the floor a perfect generator reaches at
  this sample size) and the judge's prompt-following accuracy on the samples.

- ``denoising``: the generation task's validation loss, L_IG on fixed (t_z, ε) draws per image
  (``pretrain.denoising``): conditional, with the null context, and per noise band, on ``heldout``
  (images with their captions) or local captioned shards. Unlike the training log's one-batch
  ``loss_gen``, it is comparable across checkpoints and models to a few parts in a thousand.
- ``fid``: FID proper, from a local Inception-v3 weights file (``weights:``; torch-fidelity's FID
  Inception, ``pretrain.fid``; nothing is downloaded): real images of ``data`` (``heldout`` or a
  local folder/shards, ``limit`` first ones) against images generated with a fixed seed from
  ``prompts`` (each ``per_prompt`` times) or, without prompts, from the real set's captions.

The demo's default suite is ``configs/eval/digits.yaml``. A :class:`SuiteRunner` caches what does not
depend on the checkpoint (data read from disk, the fitted judge), so a watcher pays for it once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pretrain.config import CONFIGS_DIR
from pretrain.config_io import load_config
from pretrain.eval_data import (
    CaptionedImages, LabelledImages, read_captioned_shards, read_clip_benchmark, read_image_folder,
)
from pretrain.eval_metrics import classification_metrics, frechet_distance, frechet_distance_spectral, retrieval_metrics
from pretrain.evaluate import LoadedCheckpoint, evaluate, heldout_data, image_grid
from pretrain.inference import class_queries, encode_captions, image_queries, sample_images

log = logging.getLogger("diffdis.evaluator")

DEFAULT_SUITE = CONFIGS_DIR / "eval" / "digits.yaml"
TaskKind = Literal["zeroshot", "retrieval", "samples", "digits_frechet", "fid", "denoising"]
GENERATION_KINDS = ("samples", "digits_frechet", "fid", "denoising")  # skipped for a CLIP baseline


@dataclass
class TaskConfig:
    kind: TaskKind
    name: str = ""  # the metrics' prefix (``eval/<name>/<metric>``); default: the kind
    # "heldout": the run's own held-out set (data.eval_set); else a local folder
    data: str = "heldout"
    # how to read ``data``; auto: CLIP_benchmark when it has classnames.txt and SPLIT/*.tar, shards when
    # it holds *.tar, else ImageFolder
    format: Literal["auto", "clip_benchmark", "imagefolder", "shards"] = "auto"
    split: str = "test"  # CLIP_benchmark split folder
    classnames: str | None = None  # one name per line, in class-index order
    templates: str | None = None  # one prompt template per line, {c} for the class name
    limit: int | None = None  # use the first N images only (quick checks)
    steps: int | None = None  # DDIM steps; default the run's eval.ddim_steps (generation: eval.sample_steps)
    guidance: float | None = None  # default the run's eval.guidance (generation: eval.sample_guidance)
    seed: int = 0
    prompts: list[str] = field(default_factory=list)  # samples: one grid row per prompt; fid: what to generate
    per_prompt: int = 4  # samples, fid: images per prompt
    per_class: int = 20  # digits_frechet: generated images per digit
    weights: str | None = None  # fid: local Inception-v3 weights file (pretrain/fid.py says which)
    draws: int = 8  # denoising: fixed (t_z, ε) draws per image

    def repeated_prompts(self) -> list[str]:
        """Every prompt ``per_prompt`` times in a row: what samples and fid generate."""
        return [prompt for prompt in self.prompts for _ in range(self.per_prompt)]

    def __post_init__(self) -> None:
        self.name = self.name or self.kind

    def validate(self) -> None:
        if self.kind == "samples" and not self.prompts:
            raise ValueError(f"task {self.name}: a samples task needs prompts")
        if self.kind == "digits_frechet" and self.data != "heldout":
            raise ValueError(f"task {self.name}: digits_frechet uses the built-in digits (data: heldout)")
        if self.kind == "fid" and not self.weights:
            raise ValueError(f"task {self.name}: a fid task needs weights: (a local Inception-v3 weights file; "
                             "pretrain/fid.py says which)")
        if self.kind == "denoising" and self.draws < 1:
            raise ValueError(f"task {self.name}: draws must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"task {self.name}: limit must be >= 1")


@dataclass
class SuiteConfig:
    tasks: list[TaskConfig] = field(default_factory=list)
    use_ema: bool = True  # evaluate model-ema/ when the run kept EMA weights

    def validate(self) -> None:
        if not self.tasks:
            raise ValueError("a suite needs at least one task")
        names = [t.name for t in self.tasks]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"task names must be unique (they prefix the metrics): {duplicated} repeat; set name:")


def load_suite(path: str | Path | None = None) -> SuiteConfig:
    """A suite from YAML (default: the digits suite)."""
    return load_config(SuiteConfig, path or DEFAULT_SUITE)


@dataclass
class SuiteResult:
    step: int | None
    metrics: dict[str, dict[str, float]]  # task name -> metric -> value
    images: dict[str, str]  # task name -> PNG path


def judge_features(judge, pixels: torch.Tensor) -> np.ndarray:
    """Pooled convolutional features (the input of the first head's linear layer) of pixels in [-1, 1],
    quantised to uint8 first exactly as the judge sees images."""
    from pretrain.judge import pixels_to_uint8, uint8_to_pixels  # noqa: PLC0415

    with torch.no_grad():
        return judge.networks[0].eval().features(uint8_to_pixels(pixels_to_uint8(pixels))).mean(dim=(2, 3)).numpy()


class SuiteRunner:
    """Runs a suite on checkpoints one after another; caches data and the judge across them."""

    def __init__(self, suite: SuiteConfig, image_dir: str | Path):
        self.suite = suite
        self.image_dir = Path(image_dir)
        self._data: dict[tuple, object] = {}
        self._judges: dict[tuple, tuple] = {}
        self._queries: dict[tuple, torch.Tensor] = {}
        self._inceptions: dict[str, tuple[torch.nn.Module, dict]] = {}  # weights path -> network, real features

    def run(self, loaded: LoadedCheckpoint) -> SuiteResult:
        metrics, images = {}, {}
        self._queries = {}  # this checkpoint's image queries: zero-shot and retrieval on one set share them
        for task in self.suite.tasks:
            if loaded.model.config.family == "clip" and task.kind in GENERATION_KINDS:
                log.info("task %s skipped: a CLIP baseline cannot generate images", task.name)
                continue
            result = getattr(self, f"_{task.kind}")(task, loaded)
            if isinstance(result, Path):
                images[task.name] = str(result)
            else:
                metrics[task.name] = result
        return SuiteResult(loaded.step, metrics, images)

    # -- data --------------------------------------------------------------------------------------
    def _read(self, task: TaskConfig, size: int, captioned: bool | None) -> LabelledImages | CaptionedImages:
        """``task.data`` read at ``size``; ``captioned`` True/False insists on captions/labels, None takes either."""
        key = (task.data, task.format, task.split, task.classnames, task.templates, task.limit, size, captioned)
        if key not in self._data:
            root = Path(task.data)
            if not root.exists():
                raise FileNotFoundError(f"task {task.name}: data {root} does not exist")
            kind = task.format
            if kind == "auto":
                if root.is_dir() and (root / "classnames.txt").is_file() and any((root / task.split).glob("*.tar")):
                    kind = "clip_benchmark"
                elif root.is_file() or any(root.glob("*.tar")):
                    kind = "shards"
                else:
                    kind = "imagefolder"
            if captioned is not None and captioned != (kind == "shards"):
                raise ValueError(f"task {task.name} ({task.kind}): {root} reads as {kind}, which "
                                 f"{'has no captions' if captioned else 'has no class labels'}")
            if kind == "clip_benchmark":
                data = read_clip_benchmark(root, size, task.split, task.limit, task.classnames, task.templates)
            elif kind == "imagefolder":
                data = read_image_folder(root, size, task.limit, task.classnames, task.templates)
            else:
                data = read_captioned_shards(root, size, task.limit)
            log.info("task %s: %d images from %s (%s)", task.name, len(data.pixels), root, kind)
            self._data[key] = data
        return self._data[key]

    def _heldout(self, loaded: LoadedCheckpoint, limit: int | None):
        config = loaded.config
        key = ("heldout", config.data.resolved_eval_set(), config.model.image_size, config.data.split_seed,
               config.data.heldout_fraction)
        if key not in self._data:
            self._data[key] = heldout_data(config)
        pixels, labels, captions = self._data[key]
        return pixels[:limit], labels[:limit], captions[:limit]

    # -- tasks -------------------------------------------------------------------------------------
    def _chain(self, task: TaskConfig, loaded: LoadedCheckpoint) -> dict:
        eval_config = loaded.config.eval
        return dict(diffusion=loaded.config.diffusion, steps=eval_config.ddim_steps if task.steps is None else task.steps,
                    guidance=eval_config.guidance if task.guidance is None else task.guidance, seed=task.seed)

    @staticmethod
    def _sampling(task: TaskConfig, loaded: LoadedCheckpoint) -> dict:
        """Steps and guidance of the image sampler: the task's, else the run's ``eval.sample_*``."""
        eval_config = loaded.config.eval
        return dict(steps=eval_config.sample_steps if task.steps is None else task.steps,
                    guidance=eval_config.sample_guidance if task.guidance is None else task.guidance)

    def _image_queries(self, task: TaskConfig, loaded: LoadedCheckpoint, pixels: torch.Tensor, chain: dict) -> torch.Tensor:
        """ê_0 of every image (one reverse chain each: the expensive part), shared by tasks on the same
        images with the same chain settings."""
        key = (task.data, task.format, task.split, task.limit, len(pixels), chain["steps"], chain["guidance"], chain["seed"])
        if key not in self._queries:
            self._queries[key] = image_queries(loaded.model, pixels, chain["diffusion"], chain["steps"], chain["guidance"],
                                               batch_size=loaded.config.eval.batch_size, seed=chain["seed"])
        return self._queries[key]

    def _zeroshot(self, task: TaskConfig, loaded: LoadedCheckpoint) -> dict[str, float]:
        chain = self._chain(task, loaded)
        if task.data == "heldout":
            if loaded.config.data.resolved_eval_set() == "scenes":  # several attribute tasks: evaluate() knows them
                result = evaluate(loaded, "zeroshot", steps=chain["steps"], guidance=chain["guidance"])
                return {k: v for k, v in result.items()
                        if isinstance(v, (int, float)) and k not in ("checkpoint_step", "guidance")}
            from data_pipeline.digits import class_prompts  # noqa: PLC0415

            pixels, labels, _ = self._heldout(loaded, task.limit)
            prompts = class_prompts()
        else:
            data = self._read(task, loaded.config.model.image_size, captioned=False)
            pixels, labels, prompts = data.pixels, data.labels, data.prompts_per_class()
        queries = self._image_queries(task, loaded, pixels, chain)
        scores = queries @ class_queries(loaded.model, loaded.tokenizer, prompts).T.to(queries.device)
        return {**classification_metrics(scores, labels), "ddim_steps": chain["steps"]}

    def _retrieval(self, task: TaskConfig, loaded: LoadedCheckpoint) -> dict[str, float]:
        chain = self._chain(task, loaded)
        if task.data == "heldout":
            pixels, _, captions = self._heldout(loaded, task.limit)
            owner = None
        else:
            data = self._read(task, loaded.config.model.image_size, captioned=True)
            pixels, captions, owner = data.pixels, data.captions, data.owner
        queries = self._image_queries(task, loaded, pixels, chain)
        _, text = encode_captions(loaded.model, loaded.tokenizer, captions)
        return {**retrieval_metrics(queries @ text.to(queries.device).T, owner), "ddim_steps": chain["steps"]}

    def _samples(self, task: TaskConfig, loaded: LoadedCheckpoint) -> Path:
        pixels = sample_images(
            loaded.model, loaded.tokenizer, task.repeated_prompts(), loaded.config.diffusion,
            **self._sampling(task, loaded), generator=torch.Generator().manual_seed(task.seed),
        )
        step = "final" if loaded.step is None else f"step-{loaded.step:09d}"
        out = self.image_dir / f"{task.name}-{step}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        image_grid(pixels, columns=task.per_prompt).save(out)
        return out

    def _judge(self, loaded: LoadedCheckpoint, per_class: int):
        """The digits judge at the run's image size and split, its real held-out features, and the
        real-vs-real floor; fitted once per process (seeded, so every process fits the same one)."""
        from pretrain.judge import fit_judge, generation_task, uint8_to_pixels  # noqa: PLC0415

        config = loaded.config
        key = (config.model.image_size, config.data.split_seed, config.data.heldout_fraction)
        if key not in self._judges:
            task = generation_task("digits", config, per_class)
            judge = fit_judge(task.train_images, task.train_labels, seed=0)
            real = judge_features(judge, uint8_to_pixels(task.heldout_images))
            train = judge_features(judge, uint8_to_pixels(task.train_images))
            self._judges[key] = (task, judge, real, frechet_distance(train, real))
        return self._judges[key]

    def _digits_frechet(self, task: TaskConfig, loaded: LoadedCheckpoint) -> dict[str, float]:
        from pretrain.judge import generate_for_classes, judged_accuracy  # noqa: PLC0415

        digits, judge, real, floor = self._judge(loaded, task.per_class)
        pixels, classes = generate_for_classes(
            loaded, digits.prompt_sets["train_style"], per_class=task.per_class, **self._sampling(task, loaded),
            seed=task.seed)
        return {"frechet_distance": frechet_distance(judge_features(judge, pixels), real),
                "real_floor": floor, "prompt_following": judged_accuracy(judge, pixels, classes)["all"],
                "n_generated": int(len(pixels)), "n_real": int(len(real))}

    def _denoising(self, task: TaskConfig, loaded: LoadedCheckpoint) -> dict[str, float]:
        from pretrain.denoising import denoising_loss  # noqa: PLC0415

        if task.data == "heldout":
            pixels, _, captions = self._heldout(loaded, task.limit)
        else:  # every caption with its own image
            data = self._read(task, loaded.config.model.image_size, captioned=True)
            pixels, captions = data.pixels[torch.as_tensor(data.owner, dtype=torch.long)], data.captions
        return denoising_loss(loaded.model, loaded.tokenizer, pixels, captions, loaded.config.diffusion,
                              draws=task.draws, seed=task.seed, batch_size=loaded.config.eval.batch_size).as_metrics()

    def _fid(self, task: TaskConfig, loaded: LoadedCheckpoint) -> dict[str, float]:
        from pretrain.fid import inception_features, load_inception  # noqa: PLC0415

        weights = str(Path(task.weights).expanduser())
        if weights not in self._inceptions:  # loaded once per process; real features cached per data source
            self._inceptions[weights] = (load_inception(weights), {})
        network, real_features = self._inceptions[weights]
        network.to(next(loaded.model.parameters()).device)
        if task.data == "heldout":
            real, _, captions = self._heldout(loaded, task.limit)
            data = loaded.config.data
            source = ("heldout", data.resolved_eval_set(), loaded.config.model.image_size, data.split_seed,
                      data.heldout_fraction, task.limit)
        else:
            data = self._read(task, loaded.config.model.image_size, captioned=None)
            real, captions = data.pixels, getattr(data, "captions", [])
            source = (task.data, task.format, task.split, task.limit, loaded.config.model.image_size)
        prompts = task.repeated_prompts() or captions
        if not prompts:
            raise ValueError(f"task {task.name}: {task.data} has no captions to generate from; give prompts:")
        batch_size = loaded.config.eval.batch_size
        if source not in real_features:
            real_features[source] = inception_features(network, real)
        sampling = self._sampling(task, loaded)
        generator = torch.Generator().manual_seed(task.seed)  # one seeded generator for the whole set
        fake = torch.cat([
            sample_images(loaded.model, loaded.tokenizer, prompts[start : start + batch_size], loaded.config.diffusion,
                          **sampling, generator=generator)
            for start in range(0, len(prompts), batch_size)])
        return {"fid": frechet_distance_spectral(inception_features(network, fake), real_features[source]),
                "n_generated": int(len(fake)), "n_real": int(len(real))}
