"""Held-out L_IG on fixed draws: the generation task's validation loss.

The training log's ``loss_gen`` is one batch at one random draw of (t_z, ε) per image: its noise is as
large as the differences between models people want to compare (DiffDis vs gen-only differ by ~10% of
L_IG on digits, while one logged value moves by ~15% from step to step). Here every image gets the
same ``draws`` pairs (t_z, ε) for every checkpoint and every model of the same latent shape, drawn from
one seeded generator before batching, so two checkpoints differ only by their weights, and the batch
size does not change the figure.

Reported: the conditional loss (captions as c; the expectation L_IG trains, with uniform t_z), the same
with the null context (what the caption is worth: ``loss_uncond - loss``), and the conditional loss per
noise band (the bands' edges as fractions of the schedule's T), because a gap between two models is
rarely spread evenly over t.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pretrain.diffusion import DiffusionConfig, add_noise, train_scheduler
from pretrain.inference import encode_captions
from pretrain.model import DiffDisModel

# band edges as fractions of T: with T = 1000, t in [0, 50), [50, 200), [200, 500), [500, 1000)
NOISE_BAND_EDGES: tuple[float, ...] = (0.0, 0.05, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class DenoisingLoss:
    loss: float  # mean ‖ε − ε̂‖² over images × draws, captions as c
    loss_uncond: float  # the same draws with the null context
    by_band: dict[str, float]  # "t0-49" -> conditional loss of the draws whose t_z falls in that band
    images: int
    draws: int

    def as_metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "loss_uncond": self.loss_uncond, "caption_gain": self.loss_uncond - self.loss,
                **{f"loss_{band}": value for band, value in self.by_band.items()},
                "n_images": self.images, "draws": self.draws}


def band_names(num_train_timesteps: int, edges: Sequence[float] = NOISE_BAND_EDGES) -> list[tuple[str, int, int]]:
    """``(name, low, high)`` per band, ``low <= t < high``; names like ``t0-49``."""
    bounds = [round(edge * num_train_timesteps) for edge in edges]
    return [(f"t{low}-{high - 1}", low, high) for low, high in zip(bounds, bounds[1:])]


@torch.no_grad()
def denoising_loss(
    model: DiffDisModel,
    tokenizer,
    pixels: torch.Tensor,
    captions: Sequence[str],
    diffusion: DiffusionConfig,
    draws: int = 8,
    seed: int = 0,
    batch_size: int = 256,
) -> DenoisingLoss:
    """L_IG of ``model`` on ``pixels`` (in [-1, 1]) with their ``captions``, at ``draws`` fixed (t_z, ε)
    per image (see the module docstring). No CFG dropout: the conditional figure is the caption's."""
    if len(pixels) != len(captions):
        raise ValueError(f"{len(pixels)} images but {len(captions)} captions")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    device = next(model.parameters()).device
    alphas_cumprod = train_scheduler(diffusion).alphas_cumprod.float().to(device)
    shape = (len(pixels), model.latent_channels, model.latent_size, model.latent_size)
    generator = torch.Generator().manual_seed(seed)  # CPU draws: the same numbers on every device
    noise = torch.randn((draws, *shape), generator=generator)
    timesteps = torch.randint(0, diffusion.num_train_timesteps, (draws, len(pixels)), generator=generator)
    conditional = torch.empty(draws, len(pixels))
    unconditional = torch.empty(draws, len(pixels))
    for start in range(0, len(pixels), batch_size):
        stop = min(start + batch_size, len(pixels))
        latents = model.encode_images(pixels[start:stop].to(device))
        condition, _ = encode_captions(model, tokenizer, captions[start:stop], batch_size=batch_size)
        null = model.unet.mask_context(condition, torch.ones(stop - start, dtype=torch.bool, device=device))
        for draw in range(draws):
            eps = noise[draw, start:stop].to(device)
            t = timesteps[draw, start:stop].to(device)
            noisy = add_noise(latents, eps, t, alphas_cumprod)
            for context, out in ((condition, conditional), (null, unconditional)):
                predicted = model(noisy, t, context).noise_pred.float()
                out[draw, start:stop] = (predicted - eps).pow(2).flatten(1).mean(1).cpu()
    by_band = {}
    for name, low, high in band_names(diffusion.num_train_timesteps):
        in_band = (timesteps >= low) & (timesteps < high)
        if in_band.any():
            by_band[name] = conditional[in_band].mean().item()
    return DenoisingLoss(conditional.mean().item(), unconditional.mean().item(), by_band, len(pixels), draws)
