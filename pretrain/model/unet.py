"""The dual-stream UNet Φ_θ: ε̂_z for the generation task and ê_0 for the alignment task.

Encoder path + middle block form the joint stream shared by both tasks; the decoder path is
generation-only; the discrimination head reads the middle features and the text token. ResBlocks,
samplers and timestep embeddings are diffusers' own; the fusion blocks are what DiffDis adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from pretrain.model.blocks import DiscriminationHead, FusionBlock
from pretrain.model.config import UNetConfig


@dataclass
class UNetOutput:
    noise_pred: torch.Tensor | None  # ε̂_z, when the decoder path ran
    query_pred: torch.Tensor | None  # ê_0 (not normalised), when a text query was given


class _Level(nn.Module):
    """ResBlocks (each optionally followed by a fusion block) at one resolution."""

    def __init__(self, resnets: list[nn.Module], fusions: list[nn.Module | None], resample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.fusions = nn.ModuleList(f if f is not None else nn.Identity() for f in fusions)
        self.has_fusion = [f is not None for f in fusions]
        self.resample = resample


class DualStreamUNet(nn.Module):
    def __init__(
        self,
        config: UNetConfig,
        latent_channels: int,
        context_dim: int,
        query_dim: int,
        generation: bool = True,
        discrimination: bool = True,
    ):
        super().__init__()
        self.config = config
        self.generation = generation
        self.discrimination = discrimination
        # Set by the trainer (train.activation_checkpointing): recompute each block in backward instead
        # of keeping its activations. A training-memory switch, so it is not part of the saved config.
        self.gradient_checkpointing = False
        widths = config.block_channels
        temb_dim = 4 * widths[0]
        text_dim = query_dim if discrimination else None

        def resnet(cin: int, cout: int) -> ResnetBlock2D:
            return ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=temb_dim, groups=config.norm_groups)

        def fusion(channels: int, with_text: bool) -> FusionBlock:
            return FusionBlock(
                channels, context_dim, text_dim if with_text else None,
                config.transformer_depth, config.head_dim, config.norm_groups, config.ff_mult,
                config.zero_init_query_in, config.align_adapter_dim,
            )

        self.time_proj = Timesteps(widths[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(widths[0], temb_dim)
        # The context every image token attends to when c is masked or dropped (METHOD: "null").
        self.null_context = nn.Parameter(torch.zeros(1, 1, context_dim))
        self.conv_in = nn.Conv2d(latent_channels, widths[0], kernel_size=3, padding=1)

        self.down_levels = nn.ModuleList()
        skip_widths = [widths[0]]
        cin = widths[0]
        for level, width in enumerate(widths):
            is_last = level == len(widths) - 1
            resnets, fusions = [], []
            for _ in range(config.layers_per_block):
                resnets.append(resnet(cin, width))
                fusions.append(fusion(width, discrimination) if config.attention_levels[level] else None)
                cin = width
                skip_widths.append(width)
            # name="op": diffusers otherwise keeps a legacy alias (Conv2d_0 = conv) that safetensors rejects
            down = None if is_last else Downsample2D(width, use_conv=True, out_channels=width, padding=1, name="op")
            if down is not None:
                skip_widths.append(width)
            self.down_levels.append(_Level(resnets, fusions, down))

        self.mid_resnet_in = resnet(cin, cin)
        self.mid_fusion = fusion(cin, discrimination)
        self.mid_resnet_out = resnet(cin, cin)

        if discrimination:
            self.query_time_proj = Timesteps(query_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.query_time_embedding = TimestepEmbedding(query_dim, query_dim)
            self.head = DiscriminationHead(
                cin, query_dim, config.head_depth, config.head_dim, config.ff_mult, config.zero_init_query_in
            )

        if generation:
            self.up_levels = nn.ModuleList()
            for level, width in reversed(list(enumerate(widths))):
                resnets, fusions = [], []
                for _ in range(config.layers_per_block + 1):
                    resnets.append(resnet(cin + skip_widths.pop(), width))
                    fusions.append(fusion(width, False) if config.attention_levels[level] else None)
                    cin = width
                up = Upsample2D(width, use_conv=True, out_channels=width) if level > 0 else None
                self.up_levels.append(_Level(resnets, fusions, up))
            self.norm_out = nn.GroupNorm(config.norm_groups, widths[0], eps=1e-6)
            self.conv_out = nn.Conv2d(widths[0], latent_channels, kernel_size=3, padding=1)

    def alignment_only_modules(self) -> list[nn.Module]:
        """The modules only the alignment pass runs: the query-timestep embedder, the head, and the text
        path (and adapter) of every fusion block in the joint stream."""
        if not self.discrimination:
            return []
        joint_fusions = [fusion for level in self.down_levels
                         for fusion, has_fusion in zip(level.fusions, level.has_fusion) if has_fusion]
        return [self.query_time_embedding, self.head,
                *(module for fusion in [*joint_fusions, self.mid_fusion] for module in fusion.alignment_only_modules())]

    def generation_only_modules(self) -> list[nn.Module]:
        """The decoder path and output layers, which the alignment pass never runs (``run_decoder=False``)."""
        return [self.up_levels, self.norm_out, self.conv_out] if self.generation else []

    def parameter_roles(self) -> dict[str, str]:
        """Each parameter's name (as in ``named_parameters()``) → the pass that uses it: ``"alignment"``,
        ``"generation"`` or ``"shared"`` (both: the encoder path, middle block, time embedding, null context).
        Derived from the modules, so it follows a renamed or added module without a list to keep in step."""
        role_of = {}
        for role, modules in (("alignment", self.alignment_only_modules()), ("generation", self.generation_only_modules())):
            for module in modules:
                role_of.update((id(parameter), role) for parameter in module.parameters())
        return {name: role_of.get(id(parameter), "shared") for name, parameter in self.named_parameters()}

    def _block(self, block: nn.Module, *args):
        """Run one ResBlock / fusion block, under activation checkpointing when it is switched on.
        Non-reentrant checkpointing handles the None arguments and tuple outputs of fusion blocks."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _context(self, context: torch.Tensor | None, batch: int) -> torch.Tensor:
        return self.null_context.expand(batch, -1, -1) if context is None else context

    def mask_context(self, context: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """Replace the caption states of samples where ``drop`` is True by the null context.

        Attending to L copies of one token equals attending to that token, so the null context is
        broadcast over the caption length."""
        return torch.where(drop.view(-1, 1, 1), self.null_context.to(context.dtype).expand_as(context), context)

    def forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        query: torch.Tensor | None = None,
        query_timesteps: torch.Tensor | None = None,
        run_decoder: bool = True,
    ) -> UNetOutput:
        """One pass of either task.

        Generation: ``latents`` = z_t, ``context`` = c (``None`` = null), ``query=None`` (the text token
        is absent). Alignment: ``latents`` = clean z with ``timesteps`` = 0, ``context=None`` (c masked),
        ``query`` = e_t with ``query_timesteps`` = t_e, ``run_decoder=False``.
        """
        batch = latents.shape[0]
        context = self._context(context, batch)
        temb = self.time_embedding(self.time_proj(timesteps).to(latents.dtype))
        text_base = hidden_text = None
        if query is not None:
            if not self.discrimination:
                raise ValueError("this UNet was built without the text stream (gen-only): it takes no query")
            query_emb = self.query_time_embedding(self.query_time_proj(query_timesteps).to(query.dtype))
            text_base = query + query_emb
            hidden_text = torch.zeros_like(query)

        hidden = self.conv_in(latents)
        skips = [hidden]
        for level in self.down_levels:
            for resnet, fusion, has_fusion in zip(level.resnets, level.fusions, level.has_fusion):
                hidden = self._block(resnet, hidden, temb)
                if has_fusion:
                    hidden, hidden_text = self._block(fusion, hidden, context, text_base, hidden_text)
                skips.append(hidden)
            if level.resample is not None:
                hidden = level.resample(hidden)
                skips.append(hidden)

        hidden = self._block(self.mid_resnet_in, hidden, temb)
        hidden, hidden_text = self._block(self.mid_fusion, hidden, context, text_base, hidden_text)
        hidden = self._block(self.mid_resnet_out, hidden, temb)

        query_pred = None if query is None else self.head(hidden, text_base, hidden_text)
        if not run_decoder:
            return UNetOutput(noise_pred=None, query_pred=query_pred)
        if not self.generation:
            raise ValueError("this UNet was built without the decoder path (dis-only): use run_decoder=False")

        for level in self.up_levels:
            for resnet, fusion, has_fusion in zip(level.resnets, level.fusions, level.has_fusion):
                hidden = self._block(resnet, torch.cat([hidden, skips.pop()], dim=1), temb)
                if has_fusion:
                    hidden, _ = self._block(fusion, hidden, context)
            if level.resample is not None:
                hidden = level.resample(hidden)
        noise_pred = self.conv_out(nn.functional.silu(self.norm_out(hidden)))
        return UNetOutput(noise_pred=noise_pred, query_pred=query_pred)
