"""Typed switches of the compute kernels (``kernels.*`` in the run config).

Every switch falls back to a plain PyTorch path, so a config that turns a kernel on still runs on a
machine where the kernel cannot (a CPU without Triton's interpreter, a GPU without xformers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class KernelsConfig:
    """``attention``: ``auto`` picks xformers on CUDA when it imports and PyTorch SDPA elsewhere;
    ``reference`` is the naive softmax(qkᵀ/√d)v. ``DIFFDIS_ATTENTION`` in the environment overrides
    this field (so a job can be switched without editing its saved config).

    ``fused_infonce``: the chunked Triton symmetric InfoNCE (memory linear in the global batch) instead
    of materialising the N×N logits. ``fused_groupnorm_silu``: one Triton kernel for GroupNorm+SiLU in
    the UNet's ResNet blocks. Both run Triton on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (tests);
    otherwise the PyTorch reference runs. Off by default until measured on a GPU (kernels/README.md).
    """

    attention: Literal["auto", "reference", "sdpa", "xformers"] = "auto"
    fused_infonce: bool = False
    fused_groupnorm_silu: bool = False
