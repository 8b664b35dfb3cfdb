"""Dual-stream deep-fusion blocks (METHOD.md, "The dual-stream network"; paper Figs. 2-3).

A fusion block sits wherever the UNet's joint stream has attention. It lifts the text query into the
block's channel width as one extra token q, runs K joint layers over [q; image tokens], and hands the
text token back at text width as h_e for the next block. Without a text token (the generation pass,
the decoder path, the gen-only baseline) it is an ordinary pre-LayerNorm spatial transformer with
cross-attention to the caption states c, as in diffusers' ``Transformer2DModel``.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from torch import nn

from pretrain.model.attention import MultiHeadAttention


def query_projection(text_dim: int, channels: int, zero_init: bool) -> nn.Linear:
    """FC from the text width (e_t + Emb(t_e) + h_e) to a block's channel width.

    With ``zero_init`` the weight starts at zero (the bias keeps its default init, so the text token
    is a learned constant at step 0): the path from the noisy query into the network opens by
    gradient, and the first gradients flow through the image tokens the text token attends to. With
    a random init, e_t dominates ê_0 at init and the alignment task can collapse (design notes)."""
    projection = nn.Linear(text_dim, channels)
    if zero_init:
        nn.init.zeros_(projection.weight)
    return projection


class AlignmentAdapter(nn.Module):
    """Alignment-only image-token adapter: LayerNorm → Linear(C, r) → GELU → Linear(r, C), added as a
    residual. The output layer starts at zero, so a model with adapters starts as one without."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.down = nn.Linear(channels, width)
        self.up = nn.Linear(width, channels)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image + self.up(nn.functional.gelu(self.down(self.norm(image))))


class JointLayer(nn.Module):
    """One of the K layers: joint self-attention, then per-stream paths.

    Image tokens: cross-attention to c, then the image FFN. Text token: skips cross-attention (no
    caption text may reach the query through it) and has its own FFN.
    """

    def __init__(self, dim: int, context_dim: int, head_dim: int, ff_mult: int, with_text: bool):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, head_dim)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = MultiHeadAttention(dim, head_dim, context_dim=context_dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=ff_mult, activation_fn="geglu")
        self.with_text = with_text
        if with_text:
            self.norm_ff_text = nn.LayerNorm(dim)
            self.ff_text = FeedForward(dim, mult=ff_mult, activation_fn="geglu")

    def text_modules(self) -> list[nn.Module]:
        """The text token's own path (its FFN), which only the alignment pass runs."""
        return [self.norm_ff_text, self.ff_text] if self.with_text else []

    def forward(
        self, image: torch.Tensor, context: torch.Tensor, text: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = image if text is None else torch.cat([text, image], dim=1)
        tokens = tokens + self.self_attn(self.norm_self(tokens))
        if text is not None:
            text, image = tokens[:, :1], tokens[:, 1:]
            text = text + self.ff_text(self.norm_ff_text(text))
        else:
            image = tokens
        image = image + self.cross_attn(self.norm_cross(image), context)
        image = image + self.ff(self.norm_ff(image))
        return image, text


class FusionBlock(nn.Module):
    """Dual-stream deep-fusion block over a feature map (B, C, H, W).

    ``text_base`` is e_t + Emb(t_e) at text width (the same for every block: the skip connection that
    re-injects the noisy query), ``hidden_text`` is h_e from the previous block (zeros at the first).
    Returns the new feature map and the new h_e (``hidden_text`` unchanged when no text token was given).
    """

    def __init__(
        self,
        channels: int,
        context_dim: int,
        text_dim: int | None,
        depth: int,
        head_dim: int,
        norm_groups: int,
        ff_mult: int,
        zero_init_query_in: bool = False,
        align_adapter_dim: int = 0,
    ):
        super().__init__()
        with_text = text_dim is not None
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.layers = nn.ModuleList(
            JointLayer(channels, context_dim, head_dim, ff_mult, with_text) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels)
        if with_text:
            self.text_in = query_projection(text_dim, channels, zero_init_query_in)
            self.text_out = nn.Linear(channels, text_dim)
        self.align_adapter = AlignmentAdapter(channels, align_adapter_dim) if with_text and align_adapter_dim else None

    def alignment_only_modules(self) -> list[nn.Module]:
        """The modules only the alignment pass runs here: the text token's projections and FFNs, and
        the adapter. The image path (norm, proj_in/out, attention, image FFN) is shared with generation."""
        if not hasattr(self, "text_in"):
            return []
        adapter = [] if self.align_adapter is None else [self.align_adapter]
        return [self.text_in, self.text_out, *adapter, *(m for layer in self.layers for m in layer.text_modules())]

    def forward(
        self,
        hidden: torch.Tensor,
        context: torch.Tensor,
        text_base: torch.Tensor | None = None,
        hidden_text: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, channels, height, width = hidden.shape
        image = self.proj_in(self.norm(hidden).flatten(2).transpose(1, 2))
        text = None
        if text_base is not None:
            text = self.text_in(text_base + hidden_text).unsqueeze(1)
        for layer in self.layers:
            image, text = layer(image, context, text)
        if text is not None and self.align_adapter is not None:  # the alignment pass only
            image = self.align_adapter(image)
        image = self.proj_out(image).transpose(1, 2).reshape(batch, channels, height, width)
        new_hidden_text = hidden_text if text is None else self.text_out(text.squeeze(1))
        return hidden + image, new_hidden_text


class HeadLayer(nn.Module):
    """A plain pre-LayerNorm transformer layer (self-attention + FFN) of the discrimination head."""

    def __init__(self, dim: int, head_dim: int, ff_mult: int):
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, head_dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=ff_mult, activation_fn="geglu")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attn(self.norm_attn(tokens))
        return tokens + self.ff(self.norm_ff(tokens))


class DiscriminationHead(nn.Module):
    """M transformer layers over [text token; flattened middle features], then a linear predictor
    on the text token: the clean-query estimate ê_0 at text width."""

    def __init__(
        self, channels: int, text_dim: int, depth: int, head_dim: int, ff_mult: int, zero_init_query_in: bool = False
    ):
        super().__init__()
        self.text_in = query_projection(text_dim, channels, zero_init_query_in)
        self.layers = nn.ModuleList(HeadLayer(channels, head_dim, ff_mult) for _ in range(depth))
        self.norm_out = nn.LayerNorm(channels)
        self.predict = nn.Linear(channels, text_dim)

    def forward(self, middle: torch.Tensor, text_base: torch.Tensor, hidden_text: torch.Tensor) -> torch.Tensor:
        text = self.text_in(text_base + hidden_text).unsqueeze(1)
        tokens = torch.cat([text, middle.flatten(2).transpose(1, 2)], dim=1)
        for layer in self.layers:
            tokens = layer(tokens)
        return self.predict(self.norm_out(tokens[:, 0]))
