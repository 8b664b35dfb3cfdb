"""The training loop: build → (resume) → step → log → checkpoint (torchtitan's shape).

Everything task-specific is in small methods (:meth:`Trainer.next_batch`, :meth:`Trainer.train_step`)
that a subclass can override; the loop itself is one screen.

Distributed runs: one process per device (``diffdis train --nproc N``, torchrun, srun); the global
batch ``train.batch_size`` = micro batch x ``train.grad_accum`` x world size. A preemption signal
(SIGTERM/SIGUSR1) makes every rank finish the same step, checkpoint, and stop with
:data:`cluster.preemption.REQUEUE_EXIT_CODE` (the CLI's exit code).

The NaN / loss-spike guard (``train.guard``, decisions in :mod:`pretrain.guard`) checks every micro
batch's loss before ``engine.backward`` (:meth:`Trainer.guard_loss`) and books every optimizer step
(:meth:`Trainer.guard_step`): bad steps are skipped, repeated trouble rolls back to the last good
checkpoint, too many rollbacks stop the run (:class:`pretrain.guard.TrainingDivergedError`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from cluster.env import read_dist_env
from cluster.preemption import PreemptionWatcher
from data_pipeline.progress import progress
from kernels import apply_kernels
from pretrain.checkpoint import Checkpointer, Restored, RNGState, read_marker, step_of
from pretrain.checkpoint_store import CheckpointStore
from pretrain.config import RunConfig
from pretrain.config_io import dump_yaml
from pretrain.data import caption_rng_for_step, make_batch, make_train_stream, prepare_tokenizer
from pretrain.diagnostics import collapse_verdict, training_health
from pretrain.diffusion import DiffDisObjective
from pretrain.ema import EMA, full_state_dict
from pretrain.engine import detect_runtime, initialize_engine, micro_batch_size
from pretrain.guard import NONFINITE_GRAD, Event, Fault, FaultInjector, TrainingDivergedError, TrainingGuard, corrupt, poisoned
from pretrain.model import ClipModel, DiffDisModel, TokenizerSpec, build_model
from pretrain.model.persistence import WEIGHTS_NAME
from pretrain.model.factory import set_activation_checkpointing
from pretrain.model.tokenizer import special_token_ids
from pretrain.monitor import Monitor
from pretrain.objectives import build_objective

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
    return TokenizerSpec(len(tokenizer), ids["bos"], ids["eos"], ids["pad"], tokenizer.unk_token_id)


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
        if config.train.guard.enabled and config.deepspeed.zero_stage == 0 and not self.runtime.bf16:
            raise ValueError("train.guard needs DeepSpeed's overflow skip, which ZeRO stage 0 in fp32 lacks: set "
                             "deepspeed.zero_stage>=1 (the default is 1) or train.guard.enabled=false")
        if config.loss.align_grad_to_shared != 1.0 and (config.deepspeed.zero_stage == 3
                                                        or config.train.activation_checkpointing):
            raise ValueError("loss.align_grad_to_shared < 1 swaps the shared UNet parameters for the alignment pass, "
                             "which ZeRO-3's partitioned parameters and activation checkpointing's recompute do not "
                             "see: use deepspeed.zero_stage<=2 and train.activation_checkpointing=false, or set "
                             "loss.align_grad_to_shared=1 with loss.align_weight=0.05 (configs/demo.yaml says why)")
        init_seed = config.train.seed if config.train.init_seed is None else config.train.init_seed
        seed_everything(init_seed + self.dist.rank)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            dump_yaml(config, self.run_dir / "config.yaml")
        self.store = CheckpointStore(config.train.checkpoint_dir or self.run_dir / "checkpoints")
        # Decided before the engine exists: a checkpoint from another world size is read in DeepSpeed's
        # universal form, which is a DeepSpeed config switch.
        self.resume_source = checkpoint_source(resume, self.store)
        saved_world = read_marker(*self.resume_source)["world_size"] if self.resume_source else self.dist.world_size
        self.tokenizer = prepare_tokenizer(config, self.run_dir)
        model = build_model(config.model, tokenizer_spec(self.tokenizer))  # model.family: DiffDis or CLIP
        set_activation_checkpointing(model, config.train.activation_checkpointing)
        apply_kernels(model, config.kernels)  # attention backend, fused GroupNorm+SiLU (before the engine)
        objective = build_objective(model, config, self.dist.rank, self.dist.world_size)
        if config.train.init_seed is not None:  # the weights are drawn; training's draws follow train.seed
            seed_everything(config.train.seed + self.dist.rank)
        self.engine = initialize_engine(objective, config, self.dist, self.runtime,
                                        load_universal=saved_world != self.dist.world_size)
        self.ema = EMA(self.model, config.train.ema_decay, keep=self.dist.is_main) if config.train.ema_decay > 0 else None
        self.stream = make_train_stream(config, self.dist.rank, self.dist.world_size)
        self.batches = iter(self.stream)
        self.counter = StepCounter()
        self.guard = TrainingGuard(config.train.guard)
        self.faults = FaultInjector(config.train.guard.inject_faults, self.dist.rank)  # test hook; empty unless set
        self._step_fault: Fault | None = None  # why the optimizer step in progress is skipped
        self._step_losses: list[float] = []  # its micro batches' losses, averaged over ranks
        stateful = {"trainer": self.counter, "data": self.stream, "rng": RNGState(config.train.seed), "guard": self.guard}
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
        self.last_batch: dict[str, torch.Tensor] | None = None  # the newest micro batch, for health_metrics
        self.caption_rng: torch.Generator | None = None  # set per optimizer step (optimizer_step)
        self.collapsed = False  # the last health verdict: warn once per collapse episode

    @property
    def model(self) -> DiffDisModel | ClipModel:
        return self.engine.module.model

    @property
    def micro_batch(self) -> int:
        return micro_batch_size(self.config.train.batch_size, self.config.train.grad_accum, self.dist.world_size)

    # -- overridable pieces ------------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        return make_batch([next(self.batches) for _ in range(self.micro_batch)], self.tokenizer, self.config, self.runtime,
                          caption_rng=self.caption_rng)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One micro batch: forward, backward, and ``engine.step`` (DeepSpeed steps the optimizer and
        LR schedule only at the end of each ``grad_accum`` group)."""
        batch = {k: v.to(self.runtime.device) for k, v in batch.items()}
        losses = self.engine(**batch)
        self.engine.backward(self.guard_loss(losses))
        self.engine.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    def optimizer_step(self) -> tuple[dict[str, float], float]:
        """``grad_accum`` micro batches = one optimizer step; returns the mean losses and the seconds
        spent waiting for data."""
        totals: dict[str, float] = {}
        waited = 0.0
        objective = self.engine.module
        if hasattr(objective, "set_progress"):  # step-scheduled loss settings: from the step count alone
            objective.set_progress(self.counter.step, self.config.train.steps)
        self.guard.drawn += 1
        self._step_fault, self._step_losses = None, []
        self.caption_rng = caption_rng_for_step(self.config, self.dist.rank, self.counter.step)
        for _ in range(self.config.train.grad_accum):
            started = time.perf_counter()
            batch = self.next_batch()
            waited += time.perf_counter() - started
            self.last_batch = batch
            for name, value in self.train_step(batch).items():
                totals[name] = totals.get(name, 0.0) + value / self.config.train.grad_accum
        if self.ema is not None and self.engine.was_step_applied():  # a skipped step left the weights as they were
            self.ema.update()
        return totals, waited

    # -- the guard (decisions in pretrain/guard.py) ------------------------------------------------
    def guard_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tensor to backpropagate for this micro batch. The test hook corrupts ``losses["loss"]``
        first; then every rank checks the loss averaged over ranks (one all-reduce), so all agree.
        Once a micro batch is bad, the step's remaining ones are backpropagated poisoned, and
        DeepSpeed's overflow path drops the step's gradients and update (:func:`pretrain.guard.poisoned`)."""
        kind = self.faults.kind_at(self.guard.drawn) if self.faults else None
        if kind is not None:
            losses["loss"] = corrupt(losses["loss"], kind)
        if not self.config.train.guard.enabled:
            return losses["loss"]
        mean = self._mean_over_ranks(float(losses["loss"].detach()))
        self._step_losses.append(mean)
        if self._step_fault is None:
            self._step_fault = self.guard.check_loss(mean)
        return losses["loss"] if self._step_fault is None else poisoned(losses["loss"])

    def _mean_over_ranks(self, value: float) -> float:
        """``value`` averaged over ranks; NaN when any rank's is not finite."""
        if self.dist.world_size == 1:
            return value
        finite = math.isfinite(value)
        device = self.runtime.device if self.runtime.backend == "nccl" else "cpu"
        both = torch.tensor([value if finite else 0.0, 0.0 if finite else 1.0], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(both)
        total, bad = both.tolist()
        return float("nan") if bad else total / self.dist.world_size

    def guard_step(self, step: int) -> bool:
        """Book optimizer step ``step`` with the guard and carry out its decision (the same on every
        rank). Returns True after a rollback (the loop continues from the restored step); raises
        :class:`TrainingDivergedError` when the guard stops the run."""
        if not self.config.train.guard.enabled:
            return False
        applied = self.engine.was_step_applied()
        fault = self._step_fault
        if fault is not None and applied:
            raise RuntimeError(f"step {step}: DeepSpeed applied an update although the guard poisoned its gradients "
                               f"({fault.kind}); this engine configuration has no overflow skip")
        if fault is None and not applied:  # the loss was fine, the gradient norm was not: DeepSpeed skipped
            norm = self.engine.get_global_grad_norm()
            fault = Fault(NONFINITE_GRAD, float("inf") if norm is None else float(norm))
        event = self.guard.end_step(step, fault, sum(self._step_losses) / max(1, len(self._step_losses)))
        if event is None:
            return False
        rolled_back = event.action == "rollback" and self.rollback(event)
        self.record_event(event)
        if event.action == "stop":
            guard = self.config.train.guard
            raise TrainingDivergedError(
                f"training diverged at step {step}: {event.kind} (value {event.value}), {guard.max_bad_steps} bad steps "
                f"within {guard.bad_window} steps after {self.guard.rollbacks} rollback(s) (train.guard.max_rollbacks="
                f"{guard.max_rollbacks}){event.detail.get('reason', '')}. Events are in {self.metrics_file}. Lower "
                f"optim.lr or inspect the data near batch {self.guard.drawn}, then rerun with --resume auto")
        return rolled_back

    def rollback(self, event: Event) -> bool:
        """Restore the newest complete checkpoint taken before the trouble began (the resume path),
        keeping the data position: the batches drawn since that checkpoint are skipped. Sets
        ``event.action`` to ``stop`` when there is no such checkpoint."""
        self.checkpointer.close()  # a save in flight lands first, and every rank sees the same COMPLETE markers
        before = self.guard.rollback_before()
        tags = [tag for tag in self.store.complete_tags() if step_of(tag) < before]
        if not tags:
            event.action = "stop"
            event.detail["reason"] = f"; no complete checkpoint before step {before} in {self.store.display()} to roll back to"
            return False
        restored = self.restore(self.store, tags[-1], exclude=("data", "guard"))
        self.guard.rolled_back()
        event.detail.update(to_step=restored.step, batch=self.guard.drawn)
        log.warning("guard: rolled back to %s (step %d); the data stream continues after batch %d",
                    self.store.display(tags[-1]), restored.step, self.guard.drawn)
        return True

    def record_event(self, event: Event) -> None:
        log.warning("guard: %s at step %d (value %s): %s", event.kind, event.step, event.value, event.action)
        self.monitor.event(event.record(), self.guard.totals())

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

    def health_metrics(self, step: int) -> dict[str, float]:
        """Training-health diagnostics on the newest micro batch (``pretrain.diagnostics``; config
        ``health``), for the log record: ``health/*`` numbers and ``health/collapsed`` (0/1). A WARNING
        when a collapse starts, an INFO line when it ends. Every rank runs the forwards (ZeRO-3 gathers
        parameters inside them); the numbers are each rank's own, rank 0's are logged. Random numbers
        come from a generator seeded by the step, never the global RNG, so exact resume is unaffected."""
        health = self.config.health
        objective = self.engine.module  # the CLIP baseline has no query diffusion to diagnose
        if (not health.enabled or self.last_batch is None or not isinstance(objective, DiffDisObjective)
                or not objective.has_alignment
                or (health.every is not None and step % health.every)):
            return {}
        batch = {k: v.to(self.runtime.device) for k, v in self.last_batch.items()}
        generator = torch.Generator(device=self.runtime.device).manual_seed(self.config.train.seed * 1_000_003 + step)
        with torch.no_grad():
            latents = batch["latents"] if "latents" in batch else self.model.encode_images(batch["pixels"])
            text = self.model.encode_text(batch["input_ids"], batch.get("attention_mask"))
            metrics = training_health(self.model, latents, text, self.config.diffusion, health, generator,
                                      self.engine.module.alphas_cumprod)
        collapsed, reason = collapse_verdict(metrics, health, step)
        if self.dist.is_main and collapsed and not self.collapsed:
            log.warning("training health: alignment collapse at step %d: %s. Zero-shot will stay at chance "
                        "unless it recovers (docs/design-notes.md, 'Training health')", step, reason)
        elif self.dist.is_main and self.collapsed and not collapsed:
            log.info("training health: recovered from the collapse at step %d", step)
        self.collapsed = collapsed
        return {**metrics, "health/collapsed": int(collapsed)}

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
        restored = self.restore(store, tag)
        log.info("resumed from %s (step %d, saved by %d processes)", store.display(tag), restored.step,
                 restored.marker["world_size"])

    def restore(self, store: CheckpointStore, tag: str, exclude: tuple[str, ...] = ()) -> Restored:
        """Engine, stateful pieces (but those in ``exclude``), step and EMA weights from a checkpoint."""
        restored = self.checkpointer.load(store, tag, exclude=exclude)
        self.counter.step = restored.step
        if self.ema is not None:
            ema_file = restored.directory / EMA_FOLDER / WEIGHTS_NAME
            if self.dist.is_main:
                if not ema_file.is_file():
                    raise FileNotFoundError(f"{store.display(tag, EMA_FOLDER, WEIGHTS_NAME)} is missing: "
                                            "the checkpoint was written without EMA (set train.ema_decay=0)")
                self.ema.load_weights(load_file(str(ema_file)), str(ema_file))
        return restored

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
                if self.guard_step(self.counter.step):
                    continue  # rolled back: the loop resumes from the restored step
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
                    record.update(self.health_metrics(step))
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
