"""ClipModel: the contrastive baseline the DiffDis discriminative half is judged against.

The paper's comparison is "CLIP trained on the same data" (METHOD.md), so the baseline is the standard
two-tower CLIP: the *same* text encoder as DiffDis (its query e = projected pooled EOS, normalised) and
a ViT image tower (transformers' ``CLIPVisionModelWithProjection``, i.e. ``CLIPVisionModel`` + a linear
projection to the query width, random init) whose normalised output is the image's query. No
autoencoder, no diffusion: zero-shot classification and retrieval score these embeddings directly.
Imports torch, transformers and safetensors only; the loss lives in ``pretrain.losses``.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

from pretrain.model.config import ModelConfig, model_config_from_dict
from pretrain.model.persistence import SafetensorsFolderMixin
from pretrain.model.text_encoder import TextEncoder, TextFeatures, TokenizerSpec


def clip_vision_config(config: ModelConfig, query_dim: int) -> CLIPVisionConfig:
    """A randomly initialisable ViT for ``config.image_size`` pixels, projecting to ``query_dim``."""
    vision = config.clip
    return CLIPVisionConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_heads,
        num_channels=config.image_channels,
        image_size=config.image_size,
        patch_size=vision.patch_size,
        projection_dim=query_dim,
    )


class ClipModel(SafetensorsFolderMixin, nn.Module):
    """Text encoder + image tower; both give unit queries of width ``query_dim``."""

    def __init__(
        self,
        config: ModelConfig,
        tokens: TokenizerSpec,
        text_hf_config: CLIPTextConfig | None = None,
        vision_hf_config: CLIPVisionConfig | None = None,
    ):
        super().__init__()
        if config.family != "clip":
            raise ValueError(f"ClipModel needs model.family=clip, got {config.family!r}")
        self.config = config
        self.tokens = tokens
        if text_hf_config is not None:
            self.text_encoder = TextEncoder(text_hf_config, config.text_encoder.query_head_layers)
        else:
            self.text_encoder = TextEncoder.build(config.text_encoder, tokens)
        self.text_encoder.requires_grad_(config.text_encoder.trainable)
        vision_hf_config = vision_hf_config or clip_vision_config(config, self.text_encoder.query_dim)
        # transformers' own SDPA path (our code's attention goes through kernels.attention; this is theirs)
        vision_hf_config._attn_implementation = "sdpa"
        self.vision = CLIPVisionModelWithProjection(vision_hf_config)
        if self.vision.config.projection_dim != self.text_encoder.query_dim:
            raise ValueError(
                f"image tower projects to {self.vision.config.projection_dim} but the text query has "
                f"{self.text_encoder.query_dim} dimensions (model.text_encoder.projection_dim)"
            )

    @property
    def query_dim(self) -> int:
        return self.text_encoder.query_dim

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TextFeatures:
        return self.text_encoder(input_ids, attention_mask)

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (B, C, H, W) → unit image queries (B, query_dim), differentiable."""
        return F.normalize(self.vision(pixel_values=pixels).image_embeds, dim=-1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embed_images(pixels)

    def enable_activation_checkpointing(self) -> None:
        """Recompute the ViT layers in backward (transformers' own checkpointing, non-reentrant)."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.vision, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
            self.vision.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.vision.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # -- persistence (the same folder layout as DiffDisModel) ----------------------------------------
    def _saved_config(self) -> dict:
        return {
            "model": asdict(self.config),
            "tokens": asdict(self.tokens),
            "text_encoder_hf": self.text_encoder.model.config.to_dict(),
            "vision_hf": self.vision.config.to_dict(),
        }

    @classmethod
    def _from_saved_config(cls, saved: dict) -> ClipModel:
        return cls(
            model_config_from_dict(saved["model"]),
            TokenizerSpec(**saved["tokens"]),
            text_hf_config=CLIPTextConfig.from_dict(saved["text_encoder_hf"]),
            vision_hf_config=CLIPVisionConfig.from_dict(saved["vision_hf"]),
        )
