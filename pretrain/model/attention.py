"""Multi-head attention projections around the single kernel entry point in ``kernels``."""

from __future__ import annotations

import torch
from torch import nn

from kernels import attention


class MultiHeadAttention(nn.Module):
    """Self-attention (``context=None``) or cross-attention to ``context`` with ``dim // head_dim`` heads.

    Written here rather than taken from diffusers' ``Attention`` so that every call goes through
    ``kernels.attention`` (SDPA / xformers / reference chosen by device and config) without processor
    plumbing. ``key_padding_mask`` (batch, context tokens), True = a real token, masks padded caption
    tokens identically on every backend.
    """

    def __init__(self, dim: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        self.heads = max(1, dim // head_dim)
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        return x.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        source = x if context is None else context
        q, k, v = (self._split_heads(proj(inp)) for proj, inp in ((self.to_q, x), (self.to_k, source), (self.to_v, source)))
        out = attention(q, k, v, key_padding_mask)
        return self.to_out(out.transpose(1, 2).flatten(2))
