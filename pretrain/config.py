"""The run's typed config tree: one dataclass per component, filled from YAML + dotted overrides.

``RunConfig()`` with no file is the embedded default (the tiny model on built-in digits); the YAML
files in ``configs/`` only state what differs. The resolved tree is saved in every run and checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kernels.config import KernelsConfig
from pretrain.config_io import load_config
from pretrain.diagnostics import HealthConfig
from pretrain.diffusion import DiffusionConfig, LossConfig
from pretrain.guard import GuardConfig
from pretrain.model.config import ModelConfig

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class DataConfig:
    """Where training pairs come from.

    ``digits``: scikit-learn's bundled digits, rendered at ``model.image_size`` with template captions;
    a fixed held-out split by ``split_seed``. ``scenes``: procedural captioned shapes
    (``data_pipeline.scenes``) at ``model.image_size``; ``split_seed`` fixes the (shape, colour, size)
    triples held out of training. ``shards``: WebDataset shards (ours or img2dataset's) read
    by ``data_pipeline.loader.ShardStream`` from ``shards`` (a manifest URL or directory, a glob, a
    brace pattern ``.../part-{000000..000009}.tar``; any fsspec URL, credentials from the environment).
    Images are resized/cropped to ``model.image_size``. ``precomputed``: the shards hold latents from
    ``diffdis precompute`` (the autoencoder is skipped in training).

    ``eval_set`` is the held-out data ``diffdis eval`` scores: ``auto`` is scenes when ``source`` is
    scenes, else digits; a run trained from scenes *shards* sets ``scenes`` (with the shards' split_seed).
    """

    source: Literal["digits", "scenes", "shards"] = "digits"
    eval_set: Literal["auto", "digits", "scenes"] = "auto"
    split_seed: int = 0
    heldout_fraction: float = 0.2  # digits
    scenes_train_samples: int = 4160  # scenes: images in the in-memory train split (40 per train triple)
    scenes_heldout_samples: int = 480  # scenes: held-out images scored by eval (20 per held-out triple)
    shards: str | None = None
    num_workers: int = 2  # DataLoader processes decoding shards (0: in the trainer's process)
    shuffle_buffer: int = 1000  # per-shard shuffle buffer (samples); 0 or 1 keeps tar order
    resampled: bool = False  # draw shards with replacement per rank (multi-node); no epochs
    precomputed: bool = False
    tokenizer_captions: int = 10000  # captions read from the shards to train the offline tokenizer
    # Training captions only: each word token becomes the word tokenizer's <|unk|> with this probability
    # (word dropout). Why: every prompt word the captions never used is one <|unk|>, which training
    # otherwise never shows, so how the text encoder reads it is left to the seed (scenes, design notes
    # "The class prompts' unknown words"). Needs model.text_encoder.tokenizer_kind=word; 0 disables.
    # configs/demo.yaml ships 0.1 with the two fields below (alignment pass only, from a third of training):
    # in both passes from the start, at 0.1 on scenes it closed that gap but cost generation (stop 24).
    caption_unk_rate: float = 0.0
    # With caption_unk_rate > 0: drop words in the captions the alignment pass reads (its query e) only;
    # the generation pass reads the clean captions, so generation never sees <|unk|> (the text encoder
    # runs twice per step). Why: dropping words in L_IG's captions is what cost generation (stop 24).
    caption_unk_alignment_only: bool = False
    # With caption_unk_rate > 0: word dropout starts at this fraction of train.steps (0 = from the first
    # step). Why a late start: the query structure forms in the first few hundred steps, when few in-batch
    # negatives separate a two-class attribute (scenes size); noise in the captions then can settle the
    # text queries on ignoring it. Started later, dropout only teaches reading prompts with unknown words.
    caption_unk_start_fraction: float = 0.0

    def validate(self) -> None:
        if self.source == "shards" and not self.shards:
            raise ValueError("data.source=shards needs data.shards (a manifest URL/dir, glob or brace pattern)")
        if self.precomputed and self.source != "shards":
            raise ValueError("data.precomputed=true needs data.source=shards (feature shards from `diffdis precompute`)")
        for name in ("num_workers", "shuffle_buffer", "tokenizer_captions"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= 0")
        for name in ("scenes_train_samples", "scenes_heldout_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= 1")
        if not 0.0 <= self.caption_unk_rate < 1.0:
            raise ValueError(f"data.caption_unk_rate={self.caption_unk_rate} must be in [0, 1)")
        if self.caption_unk_alignment_only and self.caption_unk_rate == 0.0:
            raise ValueError("data.caption_unk_alignment_only=true does nothing with data.caption_unk_rate=0; "
                             "set a rate (e.g. 0.1) or drop the flag")
        if not 0.0 <= self.caption_unk_start_fraction < 1.0:
            raise ValueError(f"data.caption_unk_start_fraction={self.caption_unk_start_fraction} must be in [0, 1)")
        if self.caption_unk_start_fraction > 0.0 and self.caption_unk_rate == 0.0:
            raise ValueError(f"data.caption_unk_start_fraction={self.caption_unk_start_fraction} does nothing with "
                             "data.caption_unk_rate=0; set a rate (e.g. 0.1) or drop the start fraction")

    def resolved_eval_set(self) -> str:
        """``eval_set`` with ``auto`` resolved: scenes when training on scenes, else digits."""
        if self.eval_set != "auto":
            return self.eval_set
        return "scenes" if self.source == "scenes" else "digits"


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    # AdamW decay of the text encoder's matrices; None = weight_decay. For studying the two towers apart:
    # 0.01 here under weight_decay 0.2 did not keep scenes size on the seed that lost it (stop 30)
    text_encoder_weight_decay: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at train.steps
    grad_clip: float = 1.0  # 0 disables (DeepSpeed's own default would be 1.0: we always set it)
    temperature_lr: float | None = None  # own LR for the InfoNCE temperature; None = optim.lr


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    # global batch per optimizer step = micro batch x grad_accum x world size
    batch_size: int = 64
    grad_accum: int = 1  # micro batches per optimizer step (DeepSpeed gradient_accumulation_steps)
    seed: int = 0
    # The seed of the weight initialisation alone; None (default): train.seed seeds it with everything
    # else. Set, the model is built under init_seed and every random draw of training (data order, noise,
    # timesteps, word dropout) still follows train.seed, so a seed-dependent result can be split into
    # "which weights it started from" and "which data it saw in which order" (design notes, point 13).
    init_seed: int | None = None
    checkpoint_every: int = 100
    keep_last: int = 3  # complete checkpoints kept; 0 keeps all
    log_every: int = 10
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    ema_decay: float = 0.0  # EMA of the weights, used by eval/export; 0 = off (e.g. 0.9999 on big runs)
    activation_checkpointing: bool = False  # recompute UNet block activations in backward (torch.utils.checkpoint)
    # where checkpoints go: a local path or an fsspec URL (s3://bucket/prefix); default RUN/checkpoints
    checkpoint_dir: str | None = None
    # local directory DeepSpeed writes to before files are moved/uploaded (default: beside the target
    # for local paths, RUN/.checkpoint-staging for object stores); fast local disk makes saves cheap
    checkpoint_staging_dir: str | None = None
    async_checkpoint: bool = False  # move/upload in a background thread; training resumes after the local write
    guard: GuardConfig = field(default_factory=GuardConfig)  # NaN / loss-spike guard (pretrain/guard.py)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must lie in [0, 1) (0 turns EMA off)")


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 1


@dataclass
class EvalConfig:
    ddim_steps: int = 10  # text-query chain length for zero-shot and retrieval
    guidance: float = 0.0  # CFG weight w against the null latent in the query chain
    sample_steps: int = 25
    sample_guidance: float = 3.0
    batch_size: int = 256
    seed: int = 0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)  # attention backend, fused Triton kernels

    def validate(self) -> None:
        self.health.check_timesteps(self.diffusion.num_train_timesteps)
        if self.data.caption_unk_rate and self.model.text_encoder.tokenizer_kind != "word":
            raise ValueError(f"data.caption_unk_rate={self.data.caption_unk_rate} needs a word-level tokenizer "
                             f"(model.text_encoder.tokenizer_kind=word), got {self.model.text_encoder.tokenizer_kind!r}")


PRESET_GROUPS = ("deepspeed",)  # ``deepspeed=zero2`` stands for the contents of configs/deepspeed/zero2.yaml


def expand_presets(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Turn ``GROUP=NAME`` (a shipped preset, e.g. ``deepspeed=zero2``) into the dotted overrides of
    ``configs/GROUP/NAME.yaml``; other overrides pass through in order, so later ones still win."""
    from pretrain.config_io import ConfigError, load_yaml_tree  # noqa: PLC0415

    expanded: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() in PRESET_GROUPS and "." not in value and "{" not in value:
            group, name = key.strip(), value.strip()
            preset = CONFIGS_DIR / group / f"{name}.yaml"
            if not preset.is_file():
                choices = sorted(p.stem for p in (CONFIGS_DIR / group).glob("*.yaml"))
                raise ConfigError(f"{group}={name}: no preset {preset} (choices: {', '.join(choices)})")
            expanded.extend(_dotted(load_yaml_tree(preset)))
        else:
            expanded.append(item)
    return expanded


def _dotted(tree: dict, prefix: str = "") -> list[str]:
    import json  # noqa: PLC0415

    items = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        items.extend(_dotted(value, f"{path}.") if isinstance(value, dict) else [f"{path}={json.dumps(value)}"])
    return items


def load_run_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults ← YAML at ``path`` (with ``_base_`` includes) ← dotted overrides; strictly typed.
    ``deepspeed=zero3`` selects a shipped preset (:func:`expand_presets`)."""
    return load_config(RunConfig, path, expand_presets(list(overrides)))
