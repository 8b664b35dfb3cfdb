"""Fused GroupNorm + SiLU (one Triton kernel each way) for the UNet's ResNet blocks, and its reference.

Every diffusers ``ResnetBlock2D`` runs ``silu(norm1(x))`` and ``silu(norm2(h))``: in eager PyTorch each
is two kernels and an extra activation-sized tensor written and read. :func:`use_fused_groupnorm_silu`
plugs the fused op into existing blocks without forking diffusers' class: ``norm1``/``norm2`` become
:class:`FusedGroupNormSiLU` (holding the *same* weight and bias parameters, so state dicts, optimizer
state and checkpoints are unchanged), the block's ``nonlinearity`` becomes the identity, and the SiLU
it also applied to the timestep embedding moves into ``time_emb_proj`` (:class:`SiLULinear`, same
parameters).

Triton runs on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (tests); otherwise the module computes
:func:`reference_groupnorm_silu`, so a config with the kernel on still runs anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels._triton import launch, triton_runs_on

MAX_CHANNELS_PER_GROUP = 1024  # one program holds a group's channels in one tile; wider groups use PyTorch


def reference_groupnorm_silu(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """SiLU(GroupNorm(x)) in plain PyTorch (what a diffusers ResNet block computes)."""
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


def _tiles(chans_per_group: int, hw: int) -> tuple[int, int]:
    block_c = 1 << (chans_per_group - 1).bit_length()
    block_hw = max(16, min(1 << (hw - 1).bit_length(), 4096 // block_c))
    return block_c, block_hw


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


class GroupNormSiLUFunction(torch.autograd.Function):
    """y = SiLU(GroupNorm(x; G, γ, β, eps)) for x of shape (N, C, H, W) in any memory layout; saves x
    and one (mean, rstd) per (sample, group)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float):
        from kernels import _groupnorm_silu_triton as K  # noqa: PLC0415 - imports triton

        batch, channels, height, width = x.shape
        cpg = channels // num_groups
        block_c, block_hw = _tiles(cpg, height * width)
        y = torch.empty_like(x)  # keeps x's memory format (channels-last stays channels-last)
        mean = x.new_empty(batch * num_groups, dtype=torch.float32)
        rstd = x.new_empty(batch * num_groups, dtype=torch.float32)
        launch(K.gn_silu_forward_kernel, (batch * num_groups,), x.device, x, weight, bias, y, mean, rstd,
               num_groups, cpg, height * width, width, eps, *_strides4(x), *_strides4(y),
               BLOCK_C=block_c, BLOCK_HW=block_hw)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups = num_groups
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        from kernels import _groupnorm_silu_triton as K  # noqa: PLC0415

        x, weight, bias, mean, rstd = ctx.saved_tensors
        batch, channels, height, width = x.shape
        groups = ctx.num_groups
        cpg = channels // groups
        block_c, block_hw = _tiles(cpg, height * width)
        grad_x = torch.empty_like(x)
        dw = x.new_empty((batch, channels), dtype=torch.float32)
        db = x.new_empty((batch, channels), dtype=torch.float32)
        launch(K.gn_silu_backward_kernel, (batch * groups,), x.device, x, weight, bias, grad_y, mean, rstd,
               grad_x, dw, db, groups, cpg, channels, height * width, width,
               *_strides4(x), *_strides4(grad_y), *_strides4(grad_x), BLOCK_C=block_c, BLOCK_HW=block_hw)
        return grad_x, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype), None, None


def groupnorm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """SiLU(GroupNorm(x)): the Triton kernel where it can run on ``x``, else the PyTorch reference."""
    fits = x.dim() == 4 and x.shape[1] % num_groups == 0 and x.shape[1] // num_groups <= MAX_CHANNELS_PER_GROUP
    if fits and weight is not None and bias is not None and triton_runs_on(x):
        return GroupNormSiLUFunction.apply(x, weight, bias, num_groups, eps)
    return reference_groupnorm_silu(x, num_groups, weight, bias, eps)


class FusedGroupNormSiLU(nn.GroupNorm):
    """An ``nn.GroupNorm`` whose output is already passed through SiLU (same parameters and state dict keys)."""

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm) -> FusedGroupNormSiLU:
        fused = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine)
        fused.weight, fused.bias = norm.weight, norm.bias  # the same Parameter objects
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return groupnorm_silu(x, self.num_groups, self.weight, self.bias, self.eps)


class SiLULinear(nn.Linear):
    """``linear(silu(x))``: where a fused block's SiLU on the timestep embedding moves to."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SiLULinear:
        moved = cls.__new__(cls)
        nn.Module.__init__(moved)
        moved.in_features, moved.out_features = linear.in_features, linear.out_features
        moved.weight, moved.bias = linear.weight, linear.bias
        return moved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.silu(x))


def _fusable(block: nn.Module) -> bool:
    """A diffusers ResnetBlock2D whose norms are plain affine GroupNorms followed by SiLU."""
    return (
        type(block).__name__ == "ResnetBlock2D"
        and getattr(block, "time_embedding_norm", None) == "default"
        and isinstance(getattr(block, "nonlinearity", None), nn.SiLU)
        and all(type(getattr(block, name, None)) is nn.GroupNorm and getattr(block, name).affine for name in ("norm1", "norm2"))
    )


def use_fused_groupnorm_silu(model: nn.Module) -> int:
    """Switch every fusable ResNet block in ``model`` to the fused GroupNorm+SiLU; returns how many.

    Parameters are shared, not copied, so this may run before or after an optimizer is built."""
    count = 0
    for block in model.modules():
        if not _fusable(block):
            continue
        block.norm1 = FusedGroupNormSiLU.from_group_norm(block.norm1)
        block.norm2 = FusedGroupNormSiLU.from_group_norm(block.norm2)
        if block.time_emb_proj is not None and not block.skip_time_act:
            block.time_emb_proj = SiLULinear.from_linear(block.time_emb_proj)
        block.nonlinearity = nn.Identity()
        count += 1
    return count
