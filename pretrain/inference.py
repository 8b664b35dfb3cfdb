"""Inference with a trained DiffDis model (METHOD.md "Inference"; paper Algs. 2-3).

- Text → image: DDIM on z from N(0, I) with classifier-free guidance ε̂ = (1+w)·Φ(z_t,t,c) − w·Φ(z_t,t).
- Image → text query: DDIM on e from N(0, I) conditioned on the clean image latent (guidance against the
  null latent), the final ê_0 normalised. One reverse chain per image, whatever the number of classes.
- Zero-shot classification scores ê_0 against per-class prompt-ensemble queries; retrieval ranks
  ê_0 against every caption's query both ways.
The CLIP baseline (``model.family=clip``, :class:`ClipModel`) goes through the same functions: its image
queries are the image tower's unit embeddings (no chain; ``steps``/``guidance`` are ignored), and it
cannot sample images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pretrain.diffusion import DiffusionConfig, ddim_sampler, query_to_diffusion_space
from pretrain.model import ClipModel, DiffDisModel
from pretrain.model.tokenizer import tokenize


def _guided(conditional: torch.Tensor, unconditional: torch.Tensor | None, guidance: float) -> torch.Tensor:
    return conditional if unconditional is None else (1 + guidance) * conditional - guidance * unconditional


def _device(model: DiffDisModel | ClipModel) -> torch.device:
    return next(model.parameters()).device


def _is_clip(model: DiffDisModel | ClipModel) -> bool:
    return model.config.family == "clip"


@torch.no_grad()
def encode_captions(model: DiffDisModel | ClipModel, tokenizer, captions: Sequence[str], batch_size: int = 256):
    """Text features (condition c, unit query e) of ``captions``, batched."""
    device = _device(model)
    conditions, queries = [], []
    for start in range(0, len(captions), batch_size):
        tokens = tokenize(tokenizer, list(captions[start : start + batch_size]), model.config.text_encoder.max_length)
        features = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        conditions.append(features.condition)
        queries.append(features.query)
    return torch.cat(conditions), torch.cat(queries)


@torch.no_grad()
def sample_images(
    model: DiffDisModel,
    tokenizer,
    prompts: Sequence[str],
    diffusion: DiffusionConfig,
    steps: int = 25,
    guidance: float = 3.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Generate one image per prompt; pixels in [-1, 1], shape (B, C, H, W)."""
    if _is_clip(model):
        raise ValueError("this model is a CLIP baseline (model.family=clip): it has no image generator to "
                         "sample from; evaluate it with `diffdis eval --task zeroshot` or `--task retrieval`")
    device = _device(model)
    condition, _ = encode_captions(model, tokenizer, prompts)
    batch = condition.shape[0]
    shape = (batch, model.latent_channels, model.latent_size, model.latent_size)
    latents = torch.randn(shape, generator=generator, device="cpu").to(device)
    scheduler = ddim_sampler(diffusion, "epsilon")
    scheduler.set_timesteps(steps)
    null = model.unet.null_context.expand_as(condition)
    for t in scheduler.timesteps:
        timesteps = t.to(device).expand(batch)
        if guidance:
            both = model(latents.repeat(2, 1, 1, 1), timesteps.repeat(2), torch.cat([condition, null])).noise_pred
            noise = _guided(*both.chunk(2), guidance)
        else:
            noise = model(latents, timesteps, condition).noise_pred
        latents = scheduler.step(noise, t, latents).prev_sample
    return model.decode_latents(latents)


@torch.no_grad()
def predict_queries(
    model: DiffDisModel,
    latents: torch.Tensor,
    diffusion: DiffusionConfig,
    steps: int = 10,
    guidance: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The image-conditioned text-query chain: unit ê_0 of shape (B, d) for clean ``latents``."""
    device = latents.device
    batch = latents.shape[0]
    query = torch.randn((batch, model.query_dim), generator=generator, device="cpu").to(device)
    scheduler = ddim_sampler(diffusion, "sample")
    scheduler.set_timesteps(steps)
    zero_t = torch.zeros(batch, dtype=torch.long, device=device)
    clean = query
    for t in scheduler.timesteps:
        query_t = t.to(device).expand(batch)
        if guidance:
            images = torch.cat([latents, torch.zeros_like(latents)])
            both = model(images, zero_t.repeat(2), None, query=query.repeat(2, 1), query_timesteps=query_t.repeat(2),
                         run_decoder=False).query_pred
            prediction = _guided(*both.chunk(2), guidance)
        else:
            prediction = model(latents, zero_t, None, query=query, query_timesteps=query_t, run_decoder=False).query_pred
        clean = query_to_diffusion_space(prediction, diffusion)
        query = scheduler.step(clean, t, query).prev_sample
    return F.normalize(clean, dim=-1)


@torch.no_grad()
def image_queries(
    model: DiffDisModel | ClipModel,
    pixels: torch.Tensor,
    diffusion: DiffusionConfig,
    steps: int = 10,
    guidance: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    """ê_0 for every image in ``pixels`` (N, C, H, W) in [-1, 1], batched, seeded. For a CLIP model:
    the image tower's unit embeddings (deterministic; no chain, so ``steps``/``guidance`` are unused)."""
    device = _device(model)
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for start in range(0, pixels.shape[0], batch_size):
        if _is_clip(model):
            outputs.append(model.embed_images(pixels[start : start + batch_size].to(device)))
            continue
        latents = model.encode_images(pixels[start : start + batch_size].to(device))
        outputs.append(predict_queries(model, latents, diffusion, steps, guidance, generator))
    return torch.cat(outputs)


@torch.no_grad()
def class_queries(model: DiffDisModel | ClipModel, tokenizer, prompts_per_class: Sequence[Sequence[str]]) -> torch.Tensor:
    """One unit query per class: the mean of its prompts' queries (CLIP prompt ensembling), renormalised."""
    flat = [prompt for prompts in prompts_per_class for prompt in prompts]
    _, queries = encode_captions(model, tokenizer, flat)
    sizes = [len(prompts) for prompts in prompts_per_class]
    return F.normalize(torch.stack([chunk.mean(0) for chunk in queries.split(sizes)]), dim=-1)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose true label is among the k highest scores."""
    k = min(k, scores.shape[1])
    return (scores.topk(k, dim=1).indices == labels.view(-1, 1)).any(dim=1).float().mean().item()


def recall_at_k(similarity: torch.Tensor, k: int) -> float:
    """Fraction of rows i whose match (column i) ranks within the top k of row i."""
    return topk_accuracy(similarity, torch.arange(similarity.shape[0], device=similarity.device), k)


@torch.no_grad()
def zero_shot_classify(
    model: DiffDisModel | ClipModel,
    tokenizer,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    prompts_per_class: Sequence[Sequence[str]],
    diffusion: DiffusionConfig,
    steps: int = 10,
    guidance: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Top-1/top-5 zero-shot accuracy of ê_0 against the class prompt ensembles."""
    queries = image_queries(model, pixels, diffusion, steps, guidance, seed=seed)
    scores = queries @ class_queries(model, tokenizer, prompts_per_class).T.to(queries.device)
    labels = labels.to(scores.device)
    return {"top1": topk_accuracy(scores, labels, 1), "top5": topk_accuracy(scores, labels, 5), "n": len(labels)}


@torch.no_grad()
def retrieval(
    model: DiffDisModel | ClipModel,
    tokenizer,
    pixels: torch.Tensor,
    captions: Sequence[str],
    diffusion: DiffusionConfig,
    steps: int = 10,
    guidance: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Image→text and text→image recall@{1,5,10} where caption i belongs to image i."""
    queries = image_queries(model, pixels, diffusion, steps, guidance, seed=seed)
    _, text = encode_captions(model, tokenizer, captions)
    similarity = queries @ text.to(queries.device).T
    metrics: dict[str, float] = {"n": len(captions)}
    for k in (1, 5, 10):
        metrics[f"i2t_r{k}"] = recall_at_k(similarity, k)
        metrics[f"t2i_r{k}"] = recall_at_k(similarity.T, k)
    return metrics
