"""Typed configuration of the DiffDis model and the CLIP baseline (architecture only; nothing about training)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class AutoencoderConfig:
    """The frozen image autoencoder V/D that maps pixels to the diffusion latent.

    ``identity`` diffuses in pixel space (the tiny CPU configs); ``kl`` is diffusers' AutoencoderKL,
    loaded from ``pretrained_path`` when given, else randomly initialised from the fields below (only
    useful for shape and throughput tests: a random frozen VAE cannot reconstruct).
    """

    kind: Literal["identity", "kl"] = "identity"
    pretrained_path: str | None = None
    latent_channels: int = 4
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    def validate(self) -> None:
        if self.kind == "kl" and not self.pretrained_path and len(self.block_out_channels) < 1:
            raise ValueError("autoencoder.block_out_channels must list at least one width")


@dataclass
class TextEncoderConfig:
    """CLIP-style text transformer producing the condition c (token states) and query e (pooled EOS)."""

    pretrained_path: str | None = None
    tokenizer_path: str | None = None
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 256
    projection_dim: int = 64
    max_length: int = 32
    tokenizer_vocab_size: int = 1000
    # What is trained when no tokenizer_path is given: "bpe" (byte-level, for large caption corpora) or
    # "word" (one token per word, <|unk|> for unseen ones; for small closed caption sets such as the
    # built-in digits and scenes, where BPE spells unseen prompt words out in untrained byte pieces).
    tokenizer_kind: str = "bpe"
    trainable: bool = True
    # Causal transformer layers of the text query's own (0: e is the projected EOS state of the shared
    # encoder, METHOD). With N > 0, e is read by N more layers over the encoder's token states, which
    # only a loss on e trains: with loss.align_grad_to_text < 1 they give the alignment task text-side
    # capacity of its own, as model.unet.align_adapter_dim does on the image side.
    query_head_layers: int = 0
    # Zero-initialise the embedding of the word tokenizer's <|unk|> (no-op for BPE or pretrained weights).
    # No training caption holds <|unk|>, so its row never learns; left at its random init it adds one
    # seed-dependent vector per unseen word of a zero-shot prompt, which the encoder reads as content.
    zero_init_unknown_token: bool = True

    def validate(self) -> None:
        if self.tokenizer_kind not in ("bpe", "word"):
            raise ValueError(f"model.text_encoder.tokenizer_kind={self.tokenizer_kind!r}: expected bpe or word")
        if self.query_head_layers < 0:
            raise ValueError(f"model.text_encoder.query_head_layers={self.query_head_layers} must be >= 0")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")


@dataclass
class UNetConfig:
    """The dual-stream UNet: joint stream (encoder path + middle block), decoder path, discrimination head.

    ``attention_levels[i]`` puts a dual-stream deep-fusion block after every ResBlock of encoder level i
    (and a cross-attention block in the matching decoder level); the middle block always has one.
    ``transformer_depth`` is K (joint layers per fusion block), ``head_depth`` is M.
    """

    block_channels: list[int] = field(default_factory=lambda: [32, 64])
    attention_levels: list[bool] = field(default_factory=lambda: [False, True])
    layers_per_block: int = 1
    head_dim: int = 32
    transformer_depth: int = 1
    head_depth: int = 2
    norm_groups: int = 8
    ff_mult: int = 4
    # Zero-initialise every projection of the noisy text query into the image stream (``text_in`` of
    # the fusion blocks and the head; adaLN-Zero / ControlNet style). Without it, at init ê_0 depends
    # almost only on e_t (it runs through the residual stream) and barely on the image, InfoNCE then
    # pulls all queries to their mean and the run may never escape (docs/design-notes.md).
    zero_init_query_in: bool = True
    # Width of an alignment-only adapter in every fusion block that carries the text token: a
    # zero-initialised bottleneck MLP on the image tokens, run only in the alignment pass (0 = none).
    # It gives the alignment task image-stream capacity of its own, so that with
    # ``loss.align_grad_to_shared`` < 1 it can still shape the features it reads (docs/design-notes.md).
    align_adapter_dim: int = 0

    def validate(self) -> None:
        if self.align_adapter_dim < 0:
            raise ValueError(f"align_adapter_dim={self.align_adapter_dim} must be >= 0 (0 = no adapter)")
        if len(self.attention_levels) != len(self.block_channels):
            raise ValueError(
                f"attention_levels has {len(self.attention_levels)} entries but block_channels has "
                f"{len(self.block_channels)}: give one flag per level"
            )
        for width in self.block_channels:
            if width % self.norm_groups:
                raise ValueError(f"block_channels entry {width} is not divisible by norm_groups={self.norm_groups}")
            if width % self.head_dim and width > self.head_dim:
                raise ValueError(f"block_channels entry {width} is not divisible by head_dim={self.head_dim}")


@dataclass
class ClipVisionConfig:
    """The image tower of the CLIP baseline (``model.family=clip``): transformers' ViT
    (``CLIPVisionModelWithProjection``, random init) on pixels, projected to the text query width.

    The defaults (width 128, 4 layers, 4 heads of 32, MLP 448) give ~0.74M parameters, about the
    0.73M of the tiny DiffDis model's discriminative path (joint stream + text stream + head), so the
    comparison is at a like-for-like budget. ``patch_size`` must divide ``model.image_size``; 2 keeps
    16 patches at 8x8 and 64 at 16x16.
    """

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 448
    patch_size: int = 2

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.clip.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.clip.{name}={getattr(self, name)} must be >= 1")


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network. ``generation``/``discrimination`` select the streams:
    both for DiffDis, ``discrimination=False`` for the gen-only baseline (no text stream, no head),
    ``generation=False`` for the dis-only baseline (no decoder path).

    ``family`` selects the network: ``diffdis`` (autoencoder + text encoder + dual-stream UNet) or
    ``clip``, the contrastive baseline (the same text encoder + the ViT of ``clip``; ``unet``,
    ``autoencoder``, ``generation`` and ``discrimination`` are then unused)."""

    family: Literal["diffdis", "clip"] = "diffdis"
    image_size: int = 16
    image_channels: int = 3
    generation: bool = True
    discrimination: bool = True
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    clip: ClipVisionConfig = field(default_factory=ClipVisionConfig)

    def validate(self) -> None:
        if not (self.generation or self.discrimination):
            raise ValueError("at least one of model.generation / model.discrimination must be true")
        if self.family == "clip" and self.image_size % self.clip.patch_size:
            raise ValueError(
                f"model.clip.patch_size={self.clip.patch_size} does not divide model.image_size={self.image_size}"
            )


def model_config_from_dict(data: dict) -> ModelConfig:
    """Rebuild a saved ModelConfig (the model package reads no config files; the run config loader
    with its strict checks lives in ``pretrain.config_io``)."""
    return ModelConfig(
        **{k: v for k, v in data.items() if k not in ("autoencoder", "text_encoder", "unet", "clip")},
        autoencoder=AutoencoderConfig(**data.get("autoencoder", {})),
        text_encoder=TextEncoderConfig(**data.get("text_encoder", {})),
        unet=UNetConfig(**data.get("unet", {})),
        clip=ClipVisionConfig(**data.get("clip", {})),
    )
