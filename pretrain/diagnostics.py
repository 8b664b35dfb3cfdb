"""Training-health diagnostics of the alignment task: numbers that tell a dying run from a learning one
long before a zero-shot evaluation does.

The failure they watch for (RESULTS.md, design notes "Training health"): when ê_0 depends on the noisy
query e_t and barely on the image, the text→prediction half of the InfoNCE can only be lowered by
moving every caption's query e toward one point; the queries collapse to their mean, the loss sits at
ln(batch) and zero-shot stays at chance, while nothing in the loss curve says why. Three measurements
catch it: how alike the queries are, how alike the predictions are, and whether the prediction
listens to the image or to the noise.

Pure functions, torch only, under no_grad. They draw every random number from the ``generator`` they
are given, never from the global RNG, so a run that computes them reproduces one that does not
(exact resume is tested). Every rank must call :func:`training_health` when the model is sharded
(ZeRO-3 gathers parameters inside each module's forward).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pretrain.diffusion import DiffusionConfig, predict_clean_query, train_scheduler
from pretrain.model import DiffDisModel, TextFeatures

PREFIX = "health/"


@dataclass
class HealthConfig:
    """``health.*``: the diagnostics the trainer computes at log steps (alignment runs only).

    Cost: 3 forwards of the alignment pass (no decoder, no grad) per entry of ``timesteps`` (+1 when
    ``spread_timestep`` is not among them) on at most ``max_samples`` samples of the current micro batch:
    6 by default, at log steps only."""

    enabled: bool = True
    every: int | None = None  # only at log steps that are multiples of this; None = at every log step
    max_samples: int = 32  # samples of the micro batch used (cost ∝ this; pairwise means need no more)
    # t_e at which the image/noise sensitivities are measured; the highest also judges "ignores image"
    timesteps: list[int] = field(default_factory=lambda: [999, 500])
    spread_timestep: int | None = None  # t_e for prediction_spread; None = T−1 (pure noise: all from the image)
    collapse_cosine: float = 0.9  # mean pairwise cosine above this = collapsed (queries or predictions)
    # ê_0 ignores the image when, at the highest t_e, sens_image < image_noise_ratio · sens_noise
    image_noise_ratio: float = 0.05
    # the prediction-collapse check starts after this many steps: at init every ê_0 is alike (a random
    # head reads nearly the same token from every image) and that is not yet a failure
    grace_steps: int = 50
    # the query-collapse check starts after this many steps. A random encoder's queries are spread
    # (0.66-0.82), so by default a collapse counts from step 1 (a caption column broken upstream shows at
    # once). A sharp initial temperature (CLIP's 0.07) pulls every query toward the mean prediction while
    # the predictions are still alike (query spread up to 0.99 to step 90 on digits, 0.3-0.7 after;
    # benchmarks/RESULTS.md, stop 33): such recipes set this to ~150 (docs/design-notes.md, Training health)
    query_grace_steps: int = 0

    def validate(self) -> None:
        """Self-contained checks; the upper bound of the timesteps is checked against the diffusion
        config by :meth:`check_timesteps` (``RunConfig.validate``)."""
        if self.every is not None and self.every < 1:
            raise ValueError(f"every={self.every} must be >= 1 (or null: train.log_every)")
        if self.max_samples < 2:
            raise ValueError(f"max_samples={self.max_samples} must be >= 2 (pairwise cosines)")
        if not self.timesteps:
            raise ValueError("timesteps is empty: give at least one t_e, e.g. [999]")
        self.check_timesteps(None)
        if not -1.0 < self.collapse_cosine < 1.0:
            raise ValueError(f"collapse_cosine={self.collapse_cosine} must lie in (-1, 1)")
        if self.image_noise_ratio < 0:
            raise ValueError(f"image_noise_ratio={self.image_noise_ratio} must be >= 0")
        for name in ("grace_steps", "query_grace_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")

    def check_timesteps(self, num_train_timesteps: int | None) -> None:
        limit = "" if num_train_timesteps is None else f", diffusion.num_train_timesteps={num_train_timesteps}"
        for t in [*self.timesteps, *([] if self.spread_timestep is None else [self.spread_timestep])]:
            if t < 0 or (num_train_timesteps is not None and t >= num_train_timesteps):
                raise ValueError(f"health: t_e={t} must lie in [0, T{limit})")


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    """Mean cosine over all pairs i ≠ j of the rows. 1 = every row points the same way (collapsed);
    ~0 = spread out as random directions are. The contrastive loss can only separate pairs whose
    vectors differ, so this is the first number to look at when L_ITA sits at ln(batch)."""
    unit = F.normalize(vectors.float(), dim=-1)
    n = unit.shape[0]
    if n < 2:
        raise ValueError("mean_pairwise_cosine needs at least 2 vectors")
    gram = unit @ unit.T
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def mean_cosine_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of 1 − cos(a_i, b_i): 0 = unchanged direction, 1 = orthogonal, 2 = reversed.
    Only the direction of ê_0 is scored by the loss, so only the direction is compared."""
    return float((1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean())


def query_spread(text: TextFeatures) -> float:
    """Mean pairwise cosine of the text queries e. Near 1: the text encoder maps every caption to one
    vector (the collapse of a dead run); InfoNCE has nothing left to rank."""
    return mean_pairwise_cosine(text.query)


def _noise(shape: torch.Size, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=torch.float32).to(like.dtype)


@torch.no_grad()
def training_health(
    model: DiffDisModel,
    latents: torch.Tensor,
    text: TextFeatures,
    diffusion: DiffusionConfig,
    config: HealthConfig,
    generator: torch.Generator,
    alphas_cumprod: torch.Tensor | None = None,
) -> dict[str, float]:
    """The diagnostics on one batch (clean latents and the caption features), keys ``health/...``:

    - ``query_spread``: :func:`query_spread`.
    - ``prediction_spread``: mean pairwise cosine of ê_0 at t_e = ``spread_timestep`` (T−1: e_t is
      almost pure noise, so whatever tells the predictions apart must come from the image). Near 1
      with diverse queries: the predictions carry no information about their images.
    - ``sens_image_t{t}``: mean (1 − cos) change of ê_0 when each sample gets another sample's image
      (the batch rolled by one) and the same noise. How much the prediction listens to the image.
    - ``sens_noise_t{t}``: the same when the noise ε_e of e_t is redrawn and the image kept. How much
      it listens to the noise; at high t_e a healthy model keeps this well below ``sens_image``. At init
      with ``model.unet.zero_init_query_in`` it is exactly 0 (e_t has no path in yet).

    Images are never dropped to the null latent here (no CFG dropout), and c is masked exactly as in
    training (:func:`pretrain.diffusion.predict_clean_query`)."""
    n = min(latents.shape[0], config.max_samples)
    if n < 2:
        raise ValueError(f"training_health needs a batch of at least 2 samples, got {latents.shape[0]}")
    latents = latents[:n]
    query = text.query[:n]
    if alphas_cumprod is None:
        alphas_cumprod = train_scheduler(diffusion).alphas_cumprod.float()
    alphas_cumprod = alphas_cumprod.to(latents.device)
    spread_t = diffusion.num_train_timesteps - 1 if config.spread_timestep is None else config.spread_timestep
    swapped = latents.roll(1, dims=0)  # a permutation without fixed points: every sample sees another image

    def predict(images: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        timesteps = torch.full((n,), t, dtype=torch.long, device=latents.device)
        return predict_clean_query(model, images, query, timesteps, noise, alphas_cumprod, diffusion)

    metrics = {f"{PREFIX}query_spread": mean_pairwise_cosine(query)}
    base: dict[int, torch.Tensor] = {}
    for t in dict.fromkeys([*config.timesteps, spread_t]):  # ordered, unique
        noise = _noise(query.shape, query, generator)
        base[t] = predict(latents, t, noise)
        if t not in config.timesteps:
            continue
        metrics[f"{PREFIX}sens_image_t{t}"] = mean_cosine_change(base[t], predict(swapped, t, noise))
        metrics[f"{PREFIX}sens_noise_t{t}"] = mean_cosine_change(
            base[t], predict(latents, t, _noise(query.shape, query, generator)))
    metrics[f"{PREFIX}prediction_spread"] = mean_pairwise_cosine(base[spread_t])
    return metrics


def collapse_verdict(metrics: dict[str, float], config: HealthConfig, step: int | None = None) -> tuple[bool, str]:
    """(collapsed, reason) from :func:`training_health`'s numbers; the reason names the number and the
    threshold it crossed ("" when healthy).

    - queries collapsed: ``query_spread`` > ``collapse_cosine`` (from ``query_grace_steps`` on);
    - predictions collapsed: ``prediction_spread`` > ``collapse_cosine`` (from ``grace_steps`` on);
      ``step`` None checks both always;
    - ê_0 ignores the image: at the highest measured t_e, ``sens_image`` < ``image_noise_ratio`` ·
      ``sens_noise`` (the signature measured before zero-init: 0.0064 vs 0.713 at t_e = 999)."""
    reasons = []
    threshold = config.collapse_cosine
    queries = metrics[f"{PREFIX}query_spread"]
    if queries > threshold and (step is None or step >= config.query_grace_steps):
        reasons.append(f"text queries collapsed (query_spread {queries:.3f} > {threshold})")
    predictions = metrics[f"{PREFIX}prediction_spread"]
    if predictions > threshold and (step is None or step >= config.grace_steps):
        reasons.append(f"predictions collapsed (prediction_spread {predictions:.3f} > {threshold})")
    t = max(config.timesteps)
    image, noise = metrics[f"{PREFIX}sens_image_t{t}"], metrics[f"{PREFIX}sens_noise_t{t}"]
    if image < config.image_noise_ratio * noise:
        reasons.append(f"ê_0 ignores the image at t_e={t} (sens_image {image:.4f} < "
                       f"{config.image_noise_ratio} x sens_noise {noise:.4f})")
    return bool(reasons), "; ".join(reasons)
