"""The training loop: build → (resume) → step → log → checkpoint (torchtitan's shape).

Everything task-specific is in small methods (:meth:`Trainer.next_batch`, :meth:`Trainer.train_step`)
that a subclass can override; the loop itself is one screen.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cluster.env import read_dist_env
from data_pipeline.dataset import collate_images
from pretrain.checkpoint import Checkpointer, RNGState, latest_complete
from pretrain.config import RunConfig
from pretrain.config_io import dump_yaml
from pretrain.data import make_train_stream, prepare_tokenizer
from pretrain.diffusion import DiffDisObjective
from pretrain.engine import detect_runtime, initialize_engine
from pretrain.model import DiffDisModel, TokenizerSpec
from pretrain.model.tokenizer import special_token_ids, tokenize

log = logging.getLogger("diffdis.train")


class StepCounter:
    """The trainer's own position, checkpointed like everything else."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tokenizer_spec(tokenizer) -> TokenizerSpec:
    ids = special_token_ids(tokenizer)
    return TokenizerSpec(len(tokenizer), ids["bos"], ids["eos"], ids["pad"])


class Trainer:
    def __init__(self, config: RunConfig, run_dir: str | Path, resume: str | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.dist = read_dist_env()
        self.runtime = detect_runtime(self.dist, config.train.precision)
        seed_everything(config.train.seed + self.dist.rank)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            dump_yaml(config, self.run_dir / "config.yaml")
        self.tokenizer = prepare_tokenizer(config, self.run_dir)
        model = DiffDisModel(config.model, tokenizer_spec(self.tokenizer))
        objective = DiffDisObjective(model, config.diffusion, config.loss, self.dist.rank, self.dist.world_size)
        self.engine = initialize_engine(objective, config, self.dist, self.runtime)
        self.stream = make_train_stream(config, self.dist.rank, self.dist.world_size)
        self.batches = iter(self.stream)
        self.counter = StepCounter()
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints", self.engine,
            {"trainer": self.counter, "data": self.stream, "rng": RNGState()},
            self.dist.rank, self.dist.world_size, config.train.keep_last,
        )
        self.metrics_file = self.run_dir / "metrics.jsonl"

    @property
    def micro_batch(self) -> int:
        return self.config.train.batch_size // self.dist.world_size

    # -- overridable pieces ------------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        from pretrain.data import make_batch  # noqa: PLC0415 - lead: move to the module imports at merge

        return make_batch([next(self.batches) for _ in range(self.micro_batch)], self.tokenizer, self.config, self.runtime)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        batch = {k: v.to(self.runtime.device) for k, v in batch.items()}
        losses = self.engine(**batch)
        self.engine.backward(losses["loss"])
        self.engine.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    def save_extras(self, directory: Path) -> None:
        """Rank 0, inside every checkpoint: inference weights (safetensors) and the resolved config."""
        if self.config.deepspeed.zero_stage < 3:
            self.engine.module.model.save_pretrained(directory / "model")
            self.tokenizer.save_pretrained(str(directory / "model" / "tokenizer"))
        dump_yaml(self.config, directory / "config.yaml")

    def log_metrics(self, record: dict) -> None:
        if self.dist.is_main:
            with self.metrics_file.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    # -- the loop ----------------------------------------------------------------------------------
    def maybe_resume(self) -> None:
        if self.resume is None:
            return
        source = latest_complete(self.run_dir / "checkpoints") if self.resume == "auto" else Path(self.resume)
        if source is None:
            log.info("no complete checkpoint under %s: starting from scratch", self.run_dir / "checkpoints")
            return
        self.counter.step = self.checkpointer.load(source)
        log.info("resumed from %s (step %d)", source, self.counter.step)

    def train(self) -> Path | None:
        self.maybe_resume()
        total = self.config.train.steps
        bar = tqdm(total=total, initial=self.counter.step, desc="train", disable=not self.dist.is_main, dynamic_ncols=True)
        last_saved = None
        while self.counter.step < total:
            started = time.perf_counter()
            batch = self.next_batch()
            metrics = self.train_step(batch)
            self.counter.step += 1
            elapsed = time.perf_counter() - started
            step = self.counter.step
            if step % self.config.train.log_every == 0 or step == total:
                record = {"step": step, **metrics, "lr": self.engine.get_lr()[0],
                          "samples_per_s": self.config.train.batch_size / elapsed, "step_time_s": elapsed}
                self.log_metrics(record)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", gen=f"{metrics['loss_gen']:.3f}", align=f"{metrics['loss_align']:.3f}")
            bar.update(1)
            if step % self.config.train.checkpoint_every == 0 or step == total:
                last_saved = self.checkpointer.save(step, self.save_extras)
        bar.close()
        return last_saved or latest_complete(self.run_dir / "checkpoints")
