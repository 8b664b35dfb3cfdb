"""The one attention function every model block calls.

The backend comes from the tensors' device, never from model code: PyTorch SDPA on CPU (and as the
universal fallback), xformers' memory-efficient kernel on CUDA when it is installed (``pip install
-e .[cuda]``), and the naive reference for tests. Precedence, highest first:

1. ``DIFFDIS_ATTENTION=reference|sdpa|xformers`` in the environment (switch a job without editing
   its saved config; how tests compare backends);
2. the run config's ``kernels.attention`` (set once per process by :func:`configure_attention`);
3. ``auto``: xformers on CUDA when it imports, else SDPA.

The backend in use is logged once per process (again only if it changes, e.g. evaluation on another
device). A key-padding mask (``True`` = a real key, as in a tokenizer's ``attention_mask``) means
the same on every path: masked keys get zero weight. Each sample must keep at least one key (a
caption always keeps its BOS/EOS); a row with every key masked is undefined (NaN on the reference).
"""

from __future__ import annotations

import logging
import math
import os
from functools import lru_cache

import torch
import torch.nn.functional as F

BACKENDS = ("reference", "sdpa", "xformers")
ENV_VAR = "DIFFDIS_ATTENTION"

log = logging.getLogger("kernels.attention")
_configured = "auto"  # kernels.attention of the run config; see configure_attention
_logged: set[tuple[str, str, str]] = set()


@lru_cache(maxsize=1)
def _xformers_ops():
    try:
        import xformers.ops as xops  # noqa: PLC0415 - optional (the cuda extra), heavy import
    except Exception:  # ImportError, or a build that does not match this torch
        return None
    return xops


def configure_attention(backend: str = "auto") -> None:
    """Set the process-wide choice from the run config (``kernels.attention``); ``auto`` restores the default."""
    global _configured
    backend = backend.strip().lower()
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"kernels.attention={backend!r}: expected auto or one of {', '.join(BACKENDS)}")
    _configured = backend


def _choose(device: torch.device) -> tuple[str, str]:
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={forced!r}: expected one of {', '.join(BACKENDS)}")
        return forced, f"environment {ENV_VAR}"
    if _configured != "auto":
        return _configured, "config kernels.attention"
    if device.type == "cuda" and _xformers_ops() is not None:
        return "xformers", "auto (CUDA, xformers importable)"
    return "sdpa", f"auto ({device.type}{'' if device.type != 'cuda' else ', xformers not importable'})"


def attention_backend(device: torch.device) -> str:
    """Name of the backend :func:`attention` uses for tensors on ``device``."""
    return _choose(device)[0]


def _log_choice(backend: str, source: str, device: torch.device) -> None:
    key = (backend, source, device.type)
    if key not in _logged:
        _logged.add(key)
        log.info("attention backend: %s on %s (chosen by %s)", backend, device.type, source)


def _check_mask(key_padding_mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    if key_padding_mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected (batch, keys) = "
            f"({k.shape[0]}, {k.shape[2]})"
        )
    return key_padding_mask.to(device=k.device, dtype=torch.bool)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q kᵀ / √d) v in plain PyTorch; q, k, v are (batch, heads, tokens, head_dim);
    masked keys (``key_padding_mask`` False) get score -inf."""
    scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        keep = _check_mask(key_padding_mask, k)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1).to(q.dtype) @ v


def xformers_bias(key_padding_mask: torch.Tensor, q: torch.Tensor, heads: int) -> torch.Tensor:
    """The additive ``attn_bias`` (batch, heads, queries, keys) xformers takes for a key-padding mask.

    xformers reads the bias with a row stride that must be a multiple of 8 elements, so the tensor is
    cut from one whose key axis is padded to a multiple of 8 (its documented workaround)."""
    batch, queries = q.shape[0], q.shape[2]
    keys = key_padding_mask.shape[1]
    padded = -(-keys // 8) * 8
    bias = torch.zeros(batch, heads, queries, padded, dtype=q.dtype, device=q.device)[..., :keys]
    return bias.masked_fill_(~key_padding_mask.bool()[:, None, None, :], float("-inf"))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Scaled dot-product attention; q, k, v are (batch, heads, tokens, head_dim).

    ``key_padding_mask``: optional (batch, keys) bool/0-1 tensor, True = attend to this key."""
    backend, source = _choose(q.device)
    _log_choice(backend, source, q.device)
    keep = None if key_padding_mask is None else _check_mask(key_padding_mask, k)
    if backend == "xformers":
        xops = _xformers_ops()
        if xops is None:
            raise RuntimeError(f"attention backend xformers ({source}) but xformers is not importable: "
                               "pip install -e .[cuda] on a CUDA machine, or choose sdpa")
        bias = None if keep is None else xformers_bias(keep, q, q.shape[1])
        # xformers wants (batch, tokens, heads, head_dim)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
        return out.transpose(1, 2)
    if backend == "reference":
        return reference_attention(q, k, v, keep)
    mask = None if keep is None else keep[:, None, None, :]  # bool: True takes part, as SDPA defines it
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
