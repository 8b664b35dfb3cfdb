"""The frozen image autoencoder: pixels in [-1, 1] ↔ diffusion latents."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn

from pretrain.model.config import AutoencoderConfig


class IdentityAutoencoder(nn.Module):
    """Pixel-space diffusion for the smallest configs: the latent is the image."""

    def __init__(self, channels: int):
        super().__init__()
        self.latent_channels = channels
        self.downscale = 1

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


class KLAutoencoder(nn.Module):
    """diffusers' AutoencoderKL with SD's latent scaling. Encoding takes the posterior mean, so the
    latent of an image is deterministic (precomputed feature shards and live encoding then agree)."""

    def __init__(self, vae: AutoencoderKL, scaling_factor: float):
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor
        self.latent_channels = vae.config.latent_channels
        self.downscale = 2 ** (len(vae.config.block_out_channels) - 1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        # contiguous: the posterior mean is a strided view (channels-last-like), and randn_like follows
        # strides, so live latents would get other noise than the same latents loaded from feature shards
        return (self.vae.encode(pixels).latent_dist.mean * self.scaling_factor).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample


def kl_vae_config(config: AutoencoderConfig, image_channels: int) -> dict:
    levels = len(config.block_out_channels)
    return dict(
        in_channels=image_channels,
        out_channels=image_channels,
        latent_channels=config.latent_channels,
        block_out_channels=tuple(config.block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=config.norm_num_groups,
        layers_per_block=2 if levels > 2 else 1,
    )


def build_autoencoder(config: AutoencoderConfig, image_channels: int, vae_config: dict | None = None) -> nn.Module:
    """The autoencoder for ``config``, frozen. ``vae_config`` (a diffusers config dict) rebuilds the
    architecture of a saved model without its original pretrained path."""
    if config.kind == "identity":
        module: nn.Module = IdentityAutoencoder(image_channels)
    elif vae_config is not None:
        module = KLAutoencoder(AutoencoderKL.from_config(vae_config), config.scaling_factor)
    elif config.pretrained_path:
        vae = AutoencoderKL.from_pretrained(config.pretrained_path, local_files_only=True, use_safetensors=True)
        module = KLAutoencoder(vae, config.scaling_factor)
    else:
        module = KLAutoencoder(AutoencoderKL(**kl_vae_config(config, image_channels)), config.scaling_factor)
    module.requires_grad_(False)
    return module.eval()
