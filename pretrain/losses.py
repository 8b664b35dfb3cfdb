"""Losses of the unified objective: ε-MSE for generation, symmetric InfoNCE for alignment.

Like open_clip's ``ClipLoss``, the contrastive loss takes ``rank``/``world_size`` explicitly and the
gather is a free function, so the distributed loss is testable in one process.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kernels.infonce import fused_symmetric_info_nce


def gather_with_grad(features: torch.Tensor, world_size: int) -> torch.Tensor:
    """All ranks' ``features`` concatenated in rank order, differentiable w.r.t. every rank's slice.

    The backward reduce-scatters (sums) the gradient of the gathered tensor, so rank r's features
    receive the gradient of every rank's loss terms that used them. All ranks must pass the same
    shape (the micro batch is the same on every rank).
    """
    if world_size == 1:
        return features
    actual = dist.get_world_size()
    if world_size != actual:
        raise ValueError(f"gather_with_grad: world_size={world_size} but the default process group has {actual} ranks")
    return _GatherRows.apply(features)


# torch 2.13 renamed the single-tensor collectives (the old names warn); the bootstrap pins 2.13
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 on the default group; backward: reduce-scatter with SUM.

    Replaces ``torch.distributed.nn.functional.all_gather`` (deprecated), which, imported after
    ``init_process_group``, pins the default group in its ``group=group.WORLD`` defaults: then
    ``destroy_process_group`` cannot free it and gloo's worker threads outlive the interpreter (see
    ``pretrain.engine.shutdown_distributed`` for why that aborts processes). This holds no group,
    and its backward is one reduce-scatter instead of gloo's emulated all-to-all.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 - autograd's signature
        features = features.contiguous()
        gathered = features.new_empty((dist.get_world_size() * features.shape[0], *features.shape[1:]))
        _all_gather_single(gathered, features)
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        grad = grad.contiguous()
        local = grad.new_empty((grad.shape[0] // dist.get_world_size(), *grad.shape[1:]))
        _reduce_scatter_single(local, grad, op=dist.ReduceOp.SUM)
        return local


def symmetric_info_nce(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    logit_scale: torch.Tensor,
    rank: int = 0,
    world_size: int = 1,
    fused: bool = False,
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy on s_ij = scale·cos(ê_0,i, e_j) over the *global* batch.

    Each rank scores its own rows against all gathered columns (and vice versa); the mean over ranks
    of these local losses equals the single-process loss on the concatenated batch, and so do the
    averaged gradients. ``fused`` (config ``kernels.fused_infonce``) computes the same value without
    the rows × global-batch logits (``kernels.infonce``: memory linear in the global batch).
    """
    predictions = F.normalize(predictions, dim=-1)
    targets = F.normalize(targets, dim=-1)
    all_predictions = gather_with_grad(predictions, world_size)
    all_targets = gather_with_grad(targets, world_size)
    offset = rank * predictions.shape[0]
    if fused:
        return fused_symmetric_info_nce(predictions, targets, all_predictions, all_targets, logit_scale, offset)
    labels = torch.arange(predictions.shape[0], device=predictions.device) + offset
    logits_pred_to_text = logit_scale * predictions @ all_targets.T
    logits_text_to_pred = logit_scale * targets @ all_predictions.T
    return 0.5 * (F.cross_entropy(logits_pred_to_text, labels) + F.cross_entropy(logits_text_to_pred, labels))


class LearnableTemperature(nn.Module):
    """log(1/τ) as a parameter, initialised to 1/0.07 (CLIP); the scale exp(·) is clamped at ``max_scale``."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0, learnable: bool = True):
        super().__init__()
        # shape (1,), not a 0-dim scalar: DeepSpeed's parameter broadcast cannot view 0-dim tensors
        self.log_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)), requires_grad=learnable)
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale).squeeze(0)


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
