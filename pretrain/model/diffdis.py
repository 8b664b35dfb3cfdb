"""DiffDisModel: autoencoder + text encoder + dual-stream UNet, with a save/load round trip.

The model knows nothing of training: noise schedules, task masking and losses live in
``pretrain.diffusion`` and ``pretrain.losses``.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn
from transformers import CLIPTextConfig

from pretrain.model.autoencoder import build_autoencoder, kl_vae_config
from pretrain.model.config import ModelConfig, model_config_from_dict
from pretrain.model.persistence import CONFIG_NAME, WEIGHTS_NAME, SafetensorsFolderMixin  # names re-exported
from pretrain.model.text_encoder import TextEncoder, TextFeatures, TokenizerSpec
from pretrain.model.unet import DualStreamUNet, UNetOutput



class DiffDisModel(SafetensorsFolderMixin, nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        tokens: TokenizerSpec,
        text_hf_config: CLIPTextConfig | None = None,
        vae_config: dict | None = None,
    ):
        super().__init__()
        if config.family != "diffdis":  # e.g. a CLIP folder: pretrain.model.factory builds either
            raise ValueError(f"DiffDisModel needs model.family=diffdis, got {config.family!r} "
                             "(load it with pretrain.model.factory.load_pretrained)")
        self.config = config
        self.tokens = tokens
        self.autoencoder = build_autoencoder(config.autoencoder, config.image_channels, vae_config)
        if text_hf_config is not None:
            self.text_encoder = TextEncoder(text_hf_config, config.text_encoder.query_head_layers)
        else:
            self.text_encoder = TextEncoder.build(config.text_encoder, tokens)
        self.text_encoder.requires_grad_(config.text_encoder.trainable)
        self.unet = DualStreamUNet(
            config.unet,
            latent_channels=self.autoencoder.latent_channels,
            context_dim=self.text_encoder.hidden_size,
            query_dim=self.text_encoder.query_dim,
            generation=config.generation,
            discrimination=config.discrimination,
        )

    @property
    def latent_size(self) -> int:
        return self.config.image_size // self.autoencoder.downscale

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    @property
    def query_dim(self) -> int:
        return self.text_encoder.query_dim

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] → latents z (the frozen encoder V)."""
        return self.autoencoder.encode(pixels)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → pixels in [-1, 1] (the frozen decoder D)."""
        return self.autoencoder.decode(latents).clamp(-1, 1)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, query_grad_to_encoder: float = 1.0
    ) -> TextFeatures:
        return self.text_encoder(input_ids, attention_mask, query_grad_to_encoder)

    def forward(self, *args, **kwargs) -> UNetOutput:
        """Φ_θ: see :meth:`DualStreamUNet.forward`."""
        return self.unet(*args, **kwargs)

    # -- persistence ---------------------------------------------------------------------------
    def _saved_config(self) -> dict:
        vae = getattr(self.autoencoder, "vae", None)
        return {
            "model": asdict(self.config),
            "tokens": asdict(self.tokens),
            "text_encoder_hf": self.text_encoder.model.config.to_dict(),
            "vae": dict(vae.config) if vae is not None else None,
        }

    @classmethod
    def _from_saved_config(cls, saved: dict) -> DiffDisModel:
        vae = saved.get("vae")
        return cls(
            model_config_from_dict(saved["model"]),
            TokenizerSpec(**saved["tokens"]),
            text_hf_config=CLIPTextConfig.from_dict(saved["text_encoder_hf"]),
            vae_config={k: v for k, v in vae.items() if not k.startswith("_")} if vae else None,
        )


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "DiffDisModel", "TextFeatures", "TokenizerSpec", "UNetOutput", "kl_vae_config"]
