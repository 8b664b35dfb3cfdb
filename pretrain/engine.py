"""The one place the model meets DeepSpeed: device/precision/backend from the environment, the
optimizer and LR schedule, ``deepspeed.initialize``, and the teardown of torch.distributed."""

from __future__ import annotations

import gc
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cluster.env import DistEnv, export_dist_env
from pretrain.config import OptimConfig, RunConfig


@dataclass(frozen=True)
class Runtime:
    """What the environment decided: no code edits move a run between CPU and GPU."""

    device: torch.device
    backend: str  # gloo | nccl
    bf16: bool


def detect_runtime(dist_env: DistEnv, precision: str = "auto") -> Runtime:
    if torch.cuda.is_available():
        torch.cuda.set_device(dist_env.local_rank)
        device, backend = torch.device("cuda", dist_env.local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return Runtime(device, backend, bf16)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup_steps``, then cosine decay to ``min_ratio`` at ``total_steps``
    (Loshchilov & Hutter 2017, SGDR eq. 5 without restarts)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(module: nn.Module, weight_decay: float, temperature_lr: float | None = None,
                 text_encoder_weight_decay: float | None = None) -> list[dict]:
    """Decay matrices and convolution kernels; not biases, norms, embeddings' tables or scalars.
    With ``temperature_lr`` the InfoNCE temperature gets its own group at that LR. With
    ``text_encoder_weight_decay`` the text encoder's decayed weights (any parameter under a module
    named ``text_encoder``) get that rate in a group of their own; the rest keep ``weight_decay``."""
    exempt_modules = (nn.Embedding, nn.LayerNorm, nn.GroupNorm)
    exempt_ids = {id(p) for m in module.modules() if isinstance(m, exempt_modules) for p in m.parameters(recurse=False)}
    decay, no_decay, temperature, text_decay = [], [], [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if temperature_lr is not None and name.endswith("temperature.log_scale"):
            temperature.append(param)
            continue
        exempt = param.ndim < 2 or id(param) in exempt_ids or "null_context" in name
        if exempt:
            no_decay.append(param)
        elif text_encoder_weight_decay is not None and "text_encoder" in name.split("."):
            text_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if temperature:
        groups.append({"params": temperature, "weight_decay": 0.0, "lr": temperature_lr})
    if text_decay:
        groups.append({"params": text_decay, "weight_decay": text_encoder_weight_decay})
    return groups


def build_optimizer(module: nn.Module, optim: OptimConfig, total_steps: int):
    """torch AdamW (DeepSpeed's own would JIT-compile an op on CPU) with the warmup+cosine schedule.
    Frozen parts (the autoencoder, a frozen text encoder) are not in the optimizer at all."""
    optimizer = torch.optim.AdamW(
        param_groups(module, optim.weight_decay, optim.temperature_lr, optim.text_encoder_weight_decay),
        lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, optim.warmup_steps, total_steps, optim.min_lr_ratio)
    )
    return optimizer, schedule


def micro_batch_size(batch_size: int, grad_accum: int, world_size: int) -> int:
    """Per-process micro batch so that micro x grad_accum x world_size = the global ``batch_size``."""
    micro, remainder = divmod(batch_size, grad_accum * world_size)
    if remainder or micro == 0:
        raise ValueError(
            f"train.batch_size={batch_size} is not divisible by train.grad_accum={grad_accum} x {world_size} "
            "processes: the global batch must split into equal micro batches"
        )
    return micro


def deepspeed_config(config: RunConfig, world_size: int, runtime: Runtime, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON config, derived from ours. Every knob with a DeepSpeed default that differs
    from ours is set explicitly (``gradient_clipping`` defaults to 1.0 there; ours may be 0 = off).
    ``load_universal`` reads a universal checkpoint (resume at another world size)."""
    micro = micro_batch_size(config.train.batch_size, config.train.grad_accum, world_size)
    return {
        "train_batch_size": config.train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": config.train.grad_accum,
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
        # a non-finite gradient norm skips the step (DeepSpeed's default; the NaN guard relies on it)
        "bf16": {"enabled": runtime.bf16, "check_grad_overflow": True},
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def default_extensions_dir() -> str:
    """Where DeepSpeed's JIT-compiled ops (the CPU shm op, ~47 s to build) are cached: beside the
    interpreter, so every run and every launched process of this environment reuses them."""
    return str(Path(sys.prefix) / "torch_extensions")


def initialize_engine(module: nn.Module, config: RunConfig, dist_env: DistEnv, runtime: Runtime,
                      load_universal: bool = False):
    """Start torch.distributed (gloo/NCCL) and wrap ``module`` in a DeepSpeed engine."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    import deepspeed  # noqa: PLC0415 - heavy import, only for training

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    export_dist_env(dist_env)
    deepspeed.init_distributed(dist_backend=runtime.backend, verbose=False)
    optimizer, schedule = build_optimizer(module, config.optim, config.train.steps)
    engine, _, _, _ = deepspeed.initialize(
        model=module.to(runtime.device),
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=deepspeed_config(config, dist_env.world_size, runtime, load_universal),
    )
    if config.deepspeed.zero_stage == 3:
        register_external_parameters(module)
    return engine


def shutdown_distributed() -> None:
    """Destroy every process group while the interpreter is still fully alive. Call it on every rank
    after a run that ended normally (not after an exception: a rank still inside a collective would
    wait for the others), once the last reference to the engine is dropped.

    Why: gloo frees a process group, and joins its worker threads, only when the last reference to
    it goes. Left to interpreter exit, a worker thread still releasing a finished collective's Python
    tensors takes the GIL during finalisation and kills the process with SIGABRT ("terminate called
    without an active exception"). DeepSpeed holds its groups in the engine (every parameter's
    ``_dp_group``), freed by the garbage collection below, and in module globals, released by
    ``deepspeed.comm.destroy_process_group``. (Under ZeRO-3 DeepSpeed's hooks keep the engine alive,
    so its groups stay, idle, until exit.)
    """
    if not torch.distributed.is_initialized():
        return
    gc.collect()
    import deepspeed.comm  # noqa: PLC0415 - heavy import, only for training

    if deepspeed.comm.is_initialized():  # started by deepspeed.init_distributed (initialize_engine)
        deepspeed.comm.destroy_process_group()
    else:
        torch.distributed.destroy_process_group()
    gc.collect()


def register_external_parameters(objective: nn.Module) -> None:
    """ZeRO-3 materialises a module's own parameters only while *that* module's forward runs. The
    UNet's null context is also read by the objective (CFG dropout swaps caption states for it before
    the UNet runs), so it is registered as an external parameter of the objective. Without this it
    only works while the tensor happens to be whole (small parameters stay whole until a checkpoint
    load re-partitions them: measured, the first backward after a ZeRO-3 resume failed)."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter  # noqa: PLC0415

    unet = getattr(getattr(objective, "model", None), "unet", None)
    if unet is not None:
        register_external_parameter(objective, unet.null_context)
