"""Deterministic encoders and a global batch for the multi-process InfoNCE tests: every process
builds the identical tensors from one seed, so ranks can score their slices of the same batch."""

from __future__ import annotations

import torch

IMAGE_FEATURES, TEXT_FEATURES = 5, 4


def seeded_encoders_and_batch(batch: int, dim: int, log_scale: float):
    """(image_encoder, text_encoder, images, texts, log_scale) with a learnable ``log_scale``."""
    generator = torch.Generator().manual_seed(0)
    image_encoder, text_encoder = torch.nn.Linear(IMAGE_FEATURES, dim), torch.nn.Linear(TEXT_FEATURES, dim)
    with torch.no_grad():
        for layer in (image_encoder, text_encoder):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator))
    images = torch.randn(batch, IMAGE_FEATURES, generator=generator)
    texts = torch.randn(batch, TEXT_FEATURES, generator=generator)
    return image_encoder, text_encoder, images, texts, torch.tensor(log_scale, requires_grad=True)
