"""Compute kernels: one attention entry point and (later) fused Triton kernels.

Every kernel here has a plain PyTorch reference it is tested against and a flag that falls back to it.
"""

from kernels.attention import attention, attention_backend, reference_attention

__all__ = ["attention", "attention_backend", "reference_attention"]
