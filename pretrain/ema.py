"""Exponential moving average of the trainable weights, for evaluation and export.

θ_ema ← d_t·θ_ema + (1 − d_t)·θ after every optimizer step, with the warm-up
d_t = min(decay, (1 + t)/(10 + t)) (diffusers' ``EMAModel`` with ``use_ema_warmup``'s classic form),
so short runs are not dominated by the initial weights.

Only rank 0 holds the average (fp32, on the parameters' device), as a full, unpartitioned copy: it is
what eval and export need, it does not depend on the world size (resume at another world size needs
nothing special), and it is saved as an ordinary safetensors model folder in every checkpoint.
Under ZeRO-3 the parameters are partitioned, so :meth:`EMA.update` gathers them with
``deepspeed.zero.GatheredParameters`` a chunk at a time (a collective: every rank calls it) and
rank 0 reads the full values. That costs one extra all-gather of the weights per step; the
alternative (each rank averaging its own partition, consolidated at export) saves that traffic but
ties the EMA to the partition layout of one world size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

GATHER_CHUNK_ELEMENTS = 50_000_000  # parameters gathered at once under ZeRO-3 (bounds the peak memory)


def is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """Full values of ZeRO-3-partitioned ``params`` inside the block (a no-op for ordinary tensors).

    Only parameters that are partitioned right now are gathered: small ones ZeRO-3 keeps whole
    (``stage3_param_persistence_threshold``) would be partitioned on leaving ``GatheredParameters``,
    and ZeRO-3 never gathers those again (measured: the next backward fails on a 0-size tensor)."""
    if not any(is_zero3_param(p) for p in params):
        yield
        return
    import deepspeed  # noqa: PLC0415 - only under ZeRO-3
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: PLC0415

    partitioned = [p for p in params if is_zero3_param(p) and p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if not partitioned:
        yield
        return

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def chunks(named: list[tuple[str, nn.Parameter]], limit: int = GATHER_CHUNK_ELEMENTS):
    batch, size = [], 0
    for name, param in named:
        numel = param.ds_numel if is_zero3_param(param) else param.numel()
        if batch and size + numel > limit:
            yield batch
            batch, size = [], 0
        batch.append((name, param))
        size += numel
    if batch:
        yield batch


COPY_GRAIN = 32768  # torch's GRAIN_SIZE: smaller copies run on one thread


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of ``tensor``. Large CPU tensors are copied with numpy (one plain memcpy):
    torch splits such copies over its OpenMP threads, which on a busy CPU waited on each other and made
    checkpoint snapshots 2-10x slower (measured under a load of 20 on 2 cores); small ones, where the
    Python overhead dominates, with torch."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        return tensor.cpu()
    if tensor.numel() < COPY_GRAIN or not tensor.is_contiguous():
        return tensor.clone(memory_format=torch.contiguous_format)
    out = torch.empty_like(tensor)
    np.copyto(out.view(-1).view(torch.uint8).numpy(), tensor.view(-1).view(torch.uint8).numpy())
    return out


def full_state_dict(module: nn.Module, keep: bool) -> dict[str, torch.Tensor] | None:
    """``module.state_dict()`` with ZeRO-3 partitions gathered, as CPU copies, on the ranks where
    ``keep`` (None elsewhere). Every rank must call it under ZeRO-3 (collective)."""
    named = list(module.named_parameters())
    names = {name for name, _ in named}  # copied below, gathered (keys keep state_dict's order)
    state = {k: None if k in names else host_copy(v) for k, v in module.state_dict().items()} if keep else None
    for batch in chunks(named):
        with gathered([p for _, p in batch]):
            if keep:
                for name, param in batch:
                    state[name] = host_copy(param)
    return state


class EMA:
    """EMA of ``module``'s trainable parameters; see the module docstring for placement."""

    def __init__(self, module: nn.Module, decay: float, keep: bool):
        self.module = module
        self.decay = decay
        self.keep = keep  # rank 0
        self.updates = 0
        self.named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.shadow: dict[str, torch.Tensor] = {}
        for batch in chunks(self.named):
            with gathered([p for _, p in batch]):
                if keep:
                    for name, param in batch:
                        self.shadow[name] = param.detach().float().clone()

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average; call after every optimizer step on every rank."""
        decay = self.current_decay()
        for batch in chunks(self.named):
            with gathered([p for _, p in batch]):
                if self.keep:
                    for name, param in batch:
                        self.shadow[name].lerp_(param.detach().float(), 1 - decay)
        self.updates += 1

    def state_dict(self) -> dict:
        """The JSON part (the weights go into the checkpoint's ``model-ema/`` folder)."""
        return {"updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])

    def load_weights(self, weights: dict[str, torch.Tensor], source: str) -> None:
        """Restore the average from a saved folder's weights (rank 0)."""
        if not self.keep:
            return
        missing = [name for name in self.shadow if name not in weights]
        if missing:
            raise KeyError(f"{source} has no EMA weights for {missing[:5]} ({len(missing)} missing)")
        for name, tensor in self.shadow.items():
            tensor.copy_(weights[name].to(tensor.device, torch.float32))

    def weights(self, reference: dict[str, torch.Tensor], copy: bool = False) -> dict[str, torch.Tensor]:
        """A full state dict: ``reference`` (the live weights, for frozen parts and buffers) with every
        trainable tensor replaced by its average, cast to the reference dtype. ``copy``: the averages
        are host copies, never the shadow itself (which :meth:`update` changes in place), so a
        checkpoint can write them in the background; ``reference``'s tensors are passed through."""
        out = {}
        for key, value in reference.items():
            if key not in self.shadow:
                out[key] = value
                continue
            average = self.shadow[key].to(value.dtype)
            shared = average.untyped_storage().data_ptr() == self.shadow[key].untyped_storage().data_ptr()
            out[key] = host_copy(average) if copy and shared else average.cpu()
        return out
