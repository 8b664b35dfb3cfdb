"""The training loop: build → (resume) → step → log → checkpoint (torchtitan's shape).

Everything task-specific is in small methods (:meth:`Trainer.next_batch`, :meth:`Trainer.train_step`)
that a subclass can override; the loop itself is one screen.

Distributed runs: one process per device (``diffdis train --nproc N``, torchrun, srun); the global
batch ``train.batch_size`` = micro batch x ``train.grad_accum`` x world size. A preemption signal
(SIGTERM/SIGUSR1) makes every rank finish the same step, checkpoint, and stop with
:data:`cluster.preemption.REQUEUE_EXIT_CODE` (the CLI's exit code).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from cluster.env import read_dist_env
from cluster.preemption import PreemptionWatcher
from data_pipeline.progress import progress
from pretrain.checkpoint import Checkpointer, RNGState, read_marker
from pretrain.checkpoint_store import CheckpointStore
from pretrain.config import RunConfig
from pretrain.config_io import dump_yaml
from pretrain.data import make_batch, make_train_stream, prepare_tokenizer
from pretrain.diffusion import DiffDisObjective
from pretrain.ema import EMA, full_state_dict
from pretrain.engine import detect_runtime, initialize_engine, micro_batch_size
from pretrain.model import DiffDisModel, TokenizerSpec
from pretrain.model.diffdis import WEIGHTS_NAME
from pretrain.model.tokenizer import special_token_ids
from pretrain.monitor import Monitor

log = logging.getLogger("diffdis.train")
EMA_FOLDER = "model-ema"


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


def checkpoint_source(resume: str | None, store: CheckpointStore) -> tuple[CheckpointStore, str] | None:
    """``auto`` → the newest complete checkpoint of ``store`` (None if there is none); otherwise a
    checkpoint directory (path or URL) → its parent store and tag."""
    if resume is None:
        return None
    if resume == "auto":
        tags = store.complete_tags()
        return (store, tags[-1]) if tags else None
    parent, _, tag = str(resume).rstrip("/").rpartition("/")
    return CheckpointStore(parent or "."), tag


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
        self.store = CheckpointStore(config.train.checkpoint_dir or self.run_dir / "checkpoints")
        # Decided before the engine exists: a checkpoint from another world size is read in DeepSpeed's
        # universal form, which is a DeepSpeed config switch.
        self.resume_source = checkpoint_source(resume, self.store)
        saved_world = read_marker(*self.resume_source)["world_size"] if self.resume_source else self.dist.world_size
        self.tokenizer = prepare_tokenizer(config, self.run_dir)
        model = DiffDisModel(config.model, tokenizer_spec(self.tokenizer))
        model.unet.gradient_checkpointing = config.train.activation_checkpointing
        objective = DiffDisObjective(model, config.diffusion, config.loss, self.dist.rank, self.dist.world_size)
        self.engine = initialize_engine(objective, config, self.dist, self.runtime,
                                        load_universal=saved_world != self.dist.world_size)
        self.ema = EMA(self.model, config.train.ema_decay, keep=self.dist.is_main) if config.train.ema_decay > 0 else None
        self.stream = make_train_stream(config, self.dist.rank, self.dist.world_size)
        self.batches = iter(self.stream)
        self.counter = StepCounter()
        stateful = {"trainer": self.counter, "data": self.stream, "rng": RNGState(config.train.seed)}
        if self.ema is not None:
            stateful["ema"] = self.ema
        staging = config.train.checkpoint_staging_dir or (None if self.store.local else self.run_dir / ".checkpoint-staging")
        self.checkpointer = Checkpointer(
            self.store, self.engine, stateful, self.dist.rank, self.dist.world_size, config.train.keep_last,
            local_rank=self.dist.local_rank, staging_dir=staging, cache_dir=self.run_dir / ".checkpoint-cache",
            async_save=config.train.async_checkpoint,
        )
        self.monitor = Monitor(self.run_dir, self.dist.is_main)
        self.metrics_file = self.monitor.metrics_file
        self.preemption = PreemptionWatcher()
        self.preempted = False

    @property
    def model(self) -> DiffDisModel:
        return self.engine.module.model

    @property
    def micro_batch(self) -> int:
        return micro_batch_size(self.config.train.batch_size, self.config.train.grad_accum, self.dist.world_size)

    # -- overridable pieces ------------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        return make_batch([next(self.batches) for _ in range(self.micro_batch)], self.tokenizer, self.config, self.runtime)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One micro batch: forward, backward, and ``engine.step`` (DeepSpeed steps the optimizer and
        LR schedule only at the end of each ``grad_accum`` group)."""
        batch = {k: v.to(self.runtime.device) for k, v in batch.items()}
        losses = self.engine(**batch)
        self.engine.backward(losses["loss"])
        self.engine.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    def optimizer_step(self) -> tuple[dict[str, float], float]:
        """``grad_accum`` micro batches = one optimizer step; returns the mean losses and the seconds
        spent waiting for data."""
        totals: dict[str, float] = {}
        waited = 0.0
        for _ in range(self.config.train.grad_accum):
            started = time.perf_counter()
            batch = self.next_batch()
            waited += time.perf_counter() - started
            for name, value in self.train_step(batch).items():
                totals[name] = totals.get(name, 0.0) + value / self.config.train.grad_accum
        if self.ema is not None:
            self.ema.update()
        return totals, waited

    def save_extras(self, directory: Path):
        """Inside every checkpoint: inference weights (safetensors; the EMA weights beside them) and
        the resolved config. Every rank calls it (ZeRO-3 weights are gathered, a collective); it takes
        CPU snapshots now and returns the function that writes them (rank 0; None elsewhere), which
        the checkpointer runs in its background thread in async mode, so training is not blocked by
        the safetensors writes."""
        weights = full_state_dict(self.model, keep=self.dist.is_main)  # CPU copies
        if not self.dist.is_main:
            return None
        ema_weights = None
        if self.ema is not None:  # copies: the shadow keeps changing in place while the thread writes
            ema_weights = self.ema.weights(weights, copy=True)
        def write() -> None:
            self.model.save_pretrained(directory / "model", state_dict=weights)
            self.tokenizer.save_pretrained(str(directory / "model" / "tokenizer"))
            if ema_weights is not None:
                self.model.save_pretrained(directory / EMA_FOLDER, state_dict=ema_weights)
                self.tokenizer.save_pretrained(str(directory / EMA_FOLDER / "tokenizer"))
            dump_yaml(self.config, directory / "config.yaml")

        return write

    def log_metrics(self, record: dict) -> None:
        self.monitor.log(record)

    def _reduce_max(self, value: int) -> int:
        flag = torch.tensor([value], dtype=torch.int32, device=self.runtime.device if self.runtime.backend == "nccl" else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def should_stop(self) -> bool:
        """Every rank, every step: did any rank get a preemption signal?"""
        return self.preemption.agreed(self._reduce_max if self.dist.world_size > 1 else None)

    # -- the loop ----------------------------------------------------------------------------------
    def maybe_resume(self) -> None:
        if self.resume is None:
            return
        if self.resume_source is None:
            log.info("no complete checkpoint under %s: starting from scratch", self.store.display())
            return
        store, tag = self.resume_source
        restored = self.checkpointer.load(store, tag)
        self.counter.step = restored.step
        if self.ema is not None:
            ema_file = restored.directory / EMA_FOLDER / WEIGHTS_NAME
            if self.dist.is_main:
                if not ema_file.is_file():
                    raise FileNotFoundError(f"{store.display(tag, EMA_FOLDER, WEIGHTS_NAME)} is missing: "
                                            "the checkpoint was written without EMA (set train.ema_decay=0)")
                self.ema.load_weights(load_file(str(ema_file)), str(ema_file))
        log.info("resumed from %s (step %d, saved by %d processes)", store.display(tag), restored.step,
                 restored.marker["world_size"])

    def train(self) -> str | None:
        """Train to ``train.steps``; returns the last checkpoint written. After a preemption signal it
        returns early with :attr:`preempted` set (the CLI then exits with the requeue code)."""
        self.maybe_resume()
        total = self.config.train.steps
        bar = progress(total, "train", unit="step", initial=self.counter.step, disable=not self.dist.is_main)
        last_saved = None
        try:
            while self.counter.step < total:
                started = time.perf_counter()
                metrics, waited = self.optimizer_step()
                self.counter.step += 1
                elapsed = time.perf_counter() - started
                step = self.counter.step
                stop = self.should_stop()
                blocked = None
                if step % self.config.train.checkpoint_every == 0 or step == total or stop:
                    last_saved = self.checkpointer.save(step, self.save_extras)
                    blocked = self.checkpointer.last_blocked_s
                if step % self.config.train.log_every == 0 or step == total or stop or blocked is not None:
                    grad_norm = self.engine.get_global_grad_norm()
                    record = {"step": step, **metrics, "lr": self.engine.get_lr()[0],
                              "grad_norm": None if grad_norm is None else float(grad_norm),
                              "samples_per_s": self.config.train.batch_size / elapsed, "step_time_s": elapsed,
                              "loader_wait_s": waited}
                    if blocked is not None:
                        record["checkpoint_blocked_s"] = blocked
                    self.log_metrics(record)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", gen=f"{metrics['loss_gen']:.3f}", align=f"{metrics['loss_align']:.3f}")
                bar.update(1)
                if stop:
                    self.preempted = True
                    log.warning("preemption signal: stopped after step %d, checkpoint %s", step, last_saved)
                    break
            self.checkpointer.close()
        finally:
            bar.close()
            self.monitor.close()
            self.preemption.close()
        if last_saved is None:
            complete = self.store.complete_tags()
            last_saved = self.store.display(complete[-1]) if complete else None
        return last_saved
