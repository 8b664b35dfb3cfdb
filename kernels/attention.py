"""The one attention function every model block calls.

The backend is chosen from the tensors' device, never by editing model code: PyTorch SDPA on CPU (and
as the universal fallback), xformers' memory-efficient kernel on CUDA when it is installed. Setting
``DIFFDIS_ATTENTION=reference|sdpa|xformers`` forces one, which is how tests compare them.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

import torch
import torch.nn.functional as F

_BACKENDS = ("reference", "sdpa", "xformers")


@lru_cache(maxsize=1)
def _xformers_ops():
    try:
        import xformers.ops as xops  # noqa: PLC0415 - optional, heavy import
    except Exception:  # ImportError, or a build that does not match this torch
        return None
    return xops


def attention_backend(device: torch.device) -> str:
    """Name of the backend :func:`attention` uses for tensors on ``device``."""
    forced = os.environ.get("DIFFDIS_ATTENTION", "").strip().lower()
    if forced:
        if forced not in _BACKENDS:
            raise ValueError(f"DIFFDIS_ATTENTION={forced!r}: expected one of {', '.join(_BACKENDS)}")
        return forced
    if device.type == "cuda" and _xformers_ops() is not None:
        return "xformers"
    return "sdpa"


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v in plain PyTorch; q, k, v are (batch, heads, tokens, head_dim)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.float().softmax(dim=-1).to(q.dtype) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention without a mask; q, k, v are (batch, heads, tokens, head_dim)."""
    backend = attention_backend(q.device)
    if backend == "xformers":
        xops = _xformers_ops()
        if xops is None:
            raise RuntimeError("DIFFDIS_ATTENTION=xformers but xformers is not importable")
        # xformers wants (batch, tokens, heads, head_dim)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "reference":
        return reference_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
