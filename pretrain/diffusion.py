"""Both diffusion tasks of DiffDis and the unified training objective (METHOD.md; paper Alg. 1).

- Generation: z_t = √ᾱ z + √(1−ᾱ) ε, the UNet predicts ε from (z_t, t_z, c); the text token is absent.
- Alignment: e_t = γ·√ᾱ·(s·e_0) + √(1−ᾱ)·ε_e with e_0 unit-norm and s = √d, the UNet predicts the clean
  query ê_0 from (e_t, t_e, z) with the caption condition masked and the latent clean (t_z = 0).
- L = L_IG + λ·L_ITA, both passes on every batch, t_z and t_e drawn independently.
The schedule is diffusers' (SD's scaled-linear β); this module owns noising and masking, not the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from pretrain.losses import LearnableTemperature, symmetric_info_nce
from pretrain.model import DiffDisModel, DualStreamUNet, TextFeatures


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    query_gamma: float = 1.0  # γ ∈ (0, 1]
    query_scale_sqrt_dim: bool = True  # multiply the unit query by √d before noising
    cfg_dropout: float = 0.1  # drop c (generation) / z (alignment) with this probability
    # t_e = T·(1 − (1 − u)^p), u ~ U(0, 1): p = 1 is uniform (METHOD); p > 1 favours high noise, where
    # the query must come from the image (a small-data recipe found it learns faster; see RESULTS.md)
    query_timestep_power: float = 1.0

    def validate(self) -> None:
        if not 0.0 < self.query_gamma <= 1.0:
            raise ValueError(f"query_gamma={self.query_gamma} must lie in (0, 1]")
        if self.query_timestep_power < 1.0:
            raise ValueError(f"query_timestep_power={self.query_timestep_power} must be >= 1 (1 = uniform)")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout={self.cfg_dropout} must lie in [0, 1)")


@dataclass
class LossConfig:
    align_weight: float = 1.0  # λ
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    learn_temperature: bool = True
    # Whether L_IG also trains the text encoder through the caption states c. Off (default): c is
    # detached in the generation pass, so the text encoder is the contrastive one (as CLIP's is for
    # Stable Diffusion) and the UNet learns to read it. With fixed image-caption pairs, L_IG otherwise
    # rewards caption-specific text features and queries of unseen phrasings fall off their class
    # (docs/design-notes.md, "Why L_IG does not train the text encoder"). A model without the
    # alignment task (gen-only) always trains its text encoder through L_IG: it has nothing else.
    text_grad_from_generation: bool = False
    # The optimizer step from which text_grad_from_generation applies (0 = from the start). Set by the
    # trainer before each step from the step count, so a resumed run takes the same setting. Measured
    # at λ = 0.05 (start 100): it avoids the early query collapse but kept little of the generation gain
    # on scenes; the demo recipe balances the text encoder with λ = 1 instead and leaves this at 0
    # (benchmarks/RESULTS.md, "L_IG trains the text encoder at METHOD's λ = 1").
    text_grad_from_generation_start: int = 0
    # λ at the last step; None (default): λ is align_weight throughout. With a value, λ falls from
    # align_weight to it along a half cosine over train.steps (set by the trainer before each step, from
    # the step count alone, so a resumed run takes the same λ). Why: on scenes λ = 0.05 lets alignment
    # learn colour and size and 0.01 lets generation match gen-only, but neither does both
    # (benchmarks/RESULTS.md, "λ = 0.01"); a falling λ gives the shared stream to alignment while its
    # features form and back to generation later. Not yet measured; no shipped config sets it.
    align_weight_final: float | None = None
    # How much of L_ITA's gradient reaches the UNet parameters the alignment pass shares with generation
    # (encoder path, middle block, time embedding, null context): 1 (default) = all of it, 0 = none (the
    # alignment pass reads them as constants, and only the text stream, the head, the alignment
    # adapters and the text encoder learn from L_ITA). The value of every parameter is unchanged, only
    # its gradient is scaled. Why: under AdamW, λ sets both how much alignment moves the shared stream
    # and nothing else, so it cannot protect generation without starving alignment of shared features
    # (docs/design-notes.md). Not with ZeRO-3 or activation checkpointing (the trainer says so).
    align_grad_to_shared: float = 1.0
    # How much of L_ITA's gradient reaches the text encoder's transformer through the text query e: 1
    # (default) = all of it, 0 = none (the projection from the pooled EOS state to e still learns from
    # L_ITA; the transformer learns from L_IG alone, when text_grad_from_generation is on). With
    # align_grad_to_shared = 0 as well, nothing generation uses learns from L_ITA.
    align_grad_to_text: float = 1.0

    def __post_init__(self) -> None:
        for name in ("align_weight", "align_weight_final"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"loss.{name}={value} must be >= 0")
        for name in ("align_grad_to_shared", "align_grad_to_text"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"loss.{name}={getattr(self, name)} must lie in [0, 1]")
        if self.text_grad_from_generation_start < 0:
            raise ValueError(f"loss.text_grad_from_generation_start={self.text_grad_from_generation_start} must be >= 0")

    def text_grad_from_generation_at(self, step: int) -> bool:
        """Whether L_IG trains the text encoder at optimizer step ``step`` (a model with alignment)."""
        return self.text_grad_from_generation and step >= self.text_grad_from_generation_start

    def align_weight_at(self, progress: float) -> float:
        """λ at ``progress`` (0 at the first step, 1 at the last; clamped to [0, 1])."""
        if self.align_weight_final is None:
            return self.align_weight
        fraction = min(max(progress, 0.0), 1.0)
        span = self.align_weight - self.align_weight_final
        return self.align_weight_final + span * 0.5 * (1.0 + math.cos(math.pi * fraction))


def train_scheduler(config: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
    )


def ddim_sampler(config: DiffusionConfig, prediction_type: str) -> DDIMScheduler:
    """DDIM over the training schedule with "trailing" spacing, so that even a one-step chain starts
    at t = T−1 (pure noise) as in Lin et al. 2024, "Common Diffusion Noise Schedules … are Flawed".
    ``prediction_type`` is "epsilon" for images and "sample" (x0) for the text query."""
    return DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="trailing",
    )


def query_to_diffusion_space(query: torch.Tensor, config: DiffusionConfig) -> torch.Tensor:
    """The clean diffusion variable of the alignment task: γ·s·e/‖e‖ with s = √d (or 1).

    Only the direction of ê_0 is scored by the loss, so predictions are mapped back onto this sphere
    before a DDIM step as well."""
    scale = math.sqrt(query.shape[-1]) if config.query_scale_sqrt_dim else 1.0
    return config.query_gamma * scale * F.normalize(query, dim=-1)


def add_noise(clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (DDPM, Ho et al. 2020, eq. 4), broadcast over any trailing dims."""
    abar = alphas_cumprod[timesteps].to(clean.dtype).view(-1, *([1] * (clean.dim() - 1)))
    return abar.sqrt() * clean + (1 - abar).sqrt() * noise


def drop_mask(batch: int, probability: float, device: torch.device) -> torch.Tensor:
    """Per-sample classifier-free-guidance dropout mask (True = drop)."""
    return torch.rand(batch, device=device) < probability


def predict_clean_query(
    model: DiffDisModel,
    latents: torch.Tensor,
    query: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    config: DiffusionConfig,
    drop: torch.Tensor | None = None,
    shared_grad: float = 1.0,
) -> torch.Tensor:
    """The alignment task's forward: ê_0 = Φ_θ(e_t, t_e, z) with e_t = add_noise(γ·s·e, noise, t_e).

    The caption condition c is masked (null context), the image latent is clean (t_z = 0) and replaced
    by the null latent (zeros) where ``drop`` is True. The noised input is built from a detached e: the
    encoder learns e only through the loss's targets. One function for the training pass and the
    health diagnostics (``pretrain.diagnostics``), so both see the same masking. ``shared_grad`` scales
    the gradient that reaches the UNet parameters shared with generation (``LossConfig.align_grad_to_shared``)."""
    batch = latents.shape[0]
    clean = query_to_diffusion_space(query.detach(), config)
    noisy = add_noise(clean, noise.to(clean.dtype), timesteps, alphas_cumprod)
    image = latents
    if drop is not None:
        image = torch.where(drop.view(-1, *([1] * (latents.dim() - 1))), torch.zeros_like(latents), latents)
    zero_t = torch.zeros(batch, dtype=torch.long, device=latents.device)
    args, kwargs = (image, zero_t, None), {"query": noisy, "query_timesteps": timesteps, "run_decoder": False}
    if shared_grad == 1.0:
        return model.unet(*args, **kwargs).query_pred
    parameters = shared_parameters_with_grad_scale(model.unet, shared_grad)
    return torch.func.functional_call(model.unet, parameters, args, kwargs, strict=False).query_pred


def shared_parameters_with_grad_scale(unet: DualStreamUNet, scale: float) -> dict[str, torch.Tensor]:
    """The UNet's parameters that both passes use, each as a tensor with the parameter's value and
    ``scale`` times its gradient (``scale`` = 0: detached). For ``torch.func.functional_call``, which
    takes every other parameter (alignment-only ones, and the decoder the pass never runs) as it is."""
    parameters = dict(unet.named_parameters())
    scaled = {}
    for name, role in unet.parameter_roles().items():
        if role != "shared":
            continue
        frozen = parameters[name].detach()
        scaled[name] = frozen if scale == 0.0 else frozen + scale * (parameters[name] - frozen)
    return scaled


class DiffDisObjective(nn.Module):
    """The module the trainer optimises: runs both passes on a batch and returns the losses.

    It owns the learnable temperature (a training-only parameter) and the schedule constants; the
    model it wraps stays free of training logic. ``rank``/``world_size`` select the global-batch negatives.
    """

    def __init__(
        self,
        model: DiffDisModel,
        diffusion: DiffusionConfig,
        loss: LossConfig,
        rank: int = 0,
        world_size: int = 1,
        fused_infonce: bool = False,
    ):
        super().__init__()
        self.model = model
        self.diffusion = diffusion
        self.fused_infonce = fused_infonce  # kernels.fused_infonce: chunked InfoNCE, memory linear in N
        self.loss_config = loss
        self.align_weight = loss.align_weight  # λ of the current step (set_progress)
        self.text_grad_from_generation = loss.text_grad_from_generation_at(0)  # of the current step (set_progress)
        self.rank, self.world_size = rank, world_size
        self.temperature = LearnableTemperature(loss.init_temperature, loss.max_logit_scale, loss.learn_temperature)
        self.register_buffer(
            "alphas_cumprod", train_scheduler(diffusion).alphas_cumprod.clone().float(), persistent=False
        )

    @property
    def has_generation(self) -> bool:
        return self.model.config.generation

    @property
    def has_alignment(self) -> bool:
        return self.model.config.discrimination

    def set_progress(self, step: int, total_steps: int) -> None:
        """Called by the trainer before each optimizer step: λ follows ``loss.align_weight_final``'s
        schedule and L_IG starts training the text encoder at ``loss.text_grad_from_generation_start``."""
        self.align_weight = self.loss_config.align_weight_at(step / max(1, total_steps - 1))
        self.text_grad_from_generation = self.loss_config.text_grad_from_generation_at(step)

    def _random_timesteps(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.randint(0, self.diffusion.num_train_timesteps, (batch,), device=device)

    def _query_timesteps(self, batch: int, device: torch.device) -> torch.Tensor:
        power = self.diffusion.query_timestep_power
        if power == 1.0:
            return self._random_timesteps(batch, device)
        skewed = 1 - (1 - torch.rand(batch, device=device)) ** power
        return (skewed * self.diffusion.num_train_timesteps).long().clamp(max=self.diffusion.num_train_timesteps - 1)

    def generation_pass(self, latents: torch.Tensor, text: TextFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, ε) at a random t_z. The text query is masked out (absent from the network); c is dropped
        to the null context with probability cfg_dropout."""
        batch = latents.shape[0]
        noise = torch.randn_like(latents)
        timesteps = self._random_timesteps(batch, latents.device)
        noisy = add_noise(latents, noise, timesteps, self.alphas_cumprod)
        drop = drop_mask(batch, self.diffusion.cfg_dropout, latents.device)
        trains_text = self.text_grad_from_generation or not self.has_alignment
        condition = text.condition if trains_text else text.condition.detach()
        context = self.model.unet.mask_context(condition, drop)
        return self.model(noisy, timesteps, context).noise_pred, noise

    def alignment_pass(self, latents: torch.Tensor, text: TextFeatures) -> torch.Tensor:
        """ê_0 from the noisy query at a random t_e (:func:`predict_clean_query`), the image dropped to
        the null latent with probability cfg_dropout."""
        batch = latents.shape[0]
        timesteps = self._query_timesteps(batch, latents.device)
        noise = torch.randn_like(text.query)
        drop = drop_mask(batch, self.diffusion.cfg_dropout, latents.device)
        return predict_clean_query(self.model, latents, text.query, timesteps, noise, self.alphas_cumprod,
                                   self.diffusion, drop, self.loss_config.align_grad_to_shared)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        align_input_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Both passes on the same pairs (not alternating tasks). Give ``pixels`` or precomputed ``latents``.
        ``align_input_ids`` (alignment-only word dropout, ``data.caption_unk_alignment_only``): the captions
        whose query e the alignment pass noises and scores; the generation pass reads ``input_ids``."""
        if latents is None:
            if pixels is None:
                raise ValueError("the batch has neither 'pixels' nor 'latents'")
            latents = self.model.encode_images(pixels)
        text = self.model.encode_text(input_ids, attention_mask, self.loss_config.align_grad_to_text)
        align_text = text
        if align_input_ids is not None and self.has_alignment:
            align_text = self.model.encode_text(align_input_ids, attention_mask, self.loss_config.align_grad_to_text)
        zero = latents.new_zeros(())
        loss_gen = loss_align = zero
        if self.has_generation:
            prediction, noise = self.generation_pass(latents, text)
            loss_gen = F.mse_loss(prediction.float(), noise.float())  # L_IG
        if self.has_alignment:
            prediction = self.alignment_pass(latents, align_text)
            loss_align = symmetric_info_nce(prediction, align_text.query, self.temperature(), self.rank, self.world_size,
                                            self.fused_infonce)
        loss = loss_gen + self.align_weight * loss_align
        losses = {"loss": loss, "loss_gen": loss_gen.detach(), "loss_align": loss_align.detach(),
                  "logit_scale": self.temperature().detach()}
        if self.loss_config.align_weight_final is not None:  # a scheduled λ is logged beside the losses
            losses["align_weight"] = loss.new_tensor(self.align_weight)
        return losses
