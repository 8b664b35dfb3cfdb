"""Compute kernels: one attention entry point, fused Triton kernels, and the PyTorch reference of each.

Every kernel here has a plain PyTorch reference it is tested against and a config switch
(``kernels.*``, :class:`KernelsConfig`) that falls back to it. Triton is imported only when a fused
kernel actually runs, so the package imports on machines without it.
"""

from __future__ import annotations

import logging

from torch import nn

from kernels.attention import attention, attention_backend, configure_attention, reference_attention
from kernels.config import KernelsConfig

log = logging.getLogger("kernels")

__all__ = [
    "KernelsConfig", "apply_kernels", "attention", "attention_backend", "configure_attention", "reference_attention",
]


def apply_kernels(model: nn.Module, config: KernelsConfig) -> None:
    """Apply the run config's kernel choices: the process-wide attention backend, and the fused
    GroupNorm+SiLU in ``model``'s ResNet blocks (parameters shared, state dict unchanged).
    ``kernels.fused_infonce`` is read by the loss (``pretrain.objectives.build_objective``)."""
    configure_attention(config.attention)
    if config.fused_groupnorm_silu:
        from kernels.groupnorm_silu import use_fused_groupnorm_silu  # noqa: PLC0415

        count = use_fused_groupnorm_silu(model)
        log.info("fused GroupNorm+SiLU in %d ResNet blocks (Triton on CUDA or TRITON_INTERPRET=1, "
                 "else PyTorch)", count)
    if config.fused_infonce:
        log.info("fused chunked InfoNCE on (memory linear in the global batch)")
