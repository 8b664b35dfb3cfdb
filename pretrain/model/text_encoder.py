"""Text encoder T: caption → condition c (token states, L×d) and query e (pooled EOS, projected, L2-normalised)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from pretrain.model.config import TextEncoderConfig


@dataclass(frozen=True)
class TokenizerSpec:
    """What the embedding table must agree on with the tokenizer."""

    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int


@dataclass
class TextFeatures:
    condition: torch.Tensor  # c: (B, L, hidden)
    query: torch.Tensor  # e: (B, projection_dim), unit norm


def clip_text_config(config: TextEncoderConfig, tokens: TokenizerSpec) -> CLIPTextConfig:
    """A randomly initialisable CLIP text config; EOS pooling uses our tokenizer's EOS id."""
    return CLIPTextConfig(
        vocab_size=tokens.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_length,
        projection_dim=config.projection_dim,
        bos_token_id=tokens.bos_token_id,
        eos_token_id=tokens.eos_token_id,
        pad_token_id=tokens.pad_token_id,
    )


class TextEncoder(nn.Module):
    def __init__(self, hf_config: CLIPTextConfig):
        super().__init__()
        hf_config._attn_implementation = "sdpa"
        self.model = CLIPTextModelWithProjection(hf_config)

    @classmethod
    def build(cls, config: TextEncoderConfig, tokens: TokenizerSpec) -> TextEncoder:
        """Random init from the config, or the weights at ``config.pretrained_path`` (local only)."""
        if config.pretrained_path:
            encoder = cls(CLIPTextConfig.from_pretrained(config.pretrained_path, local_files_only=True))
            encoder.model = CLIPTextModelWithProjection.from_pretrained(
                config.pretrained_path, local_files_only=True, use_safetensors=True
            )
            return encoder
        return cls(clip_text_config(config, tokens))

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def query_dim(self) -> int:
        return self.model.config.projection_dim

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, query_grad_to_encoder: float = 1.0
    ) -> TextFeatures:
        """c and e for a batch of token ids. ``query_grad_to_encoder`` scales the gradient that reaches the
        transformer through e (0: none, so only the projection to e learns from a loss on e); the value of
        e and everything that reaches the transformer through c are unchanged."""
        out = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask)
        pooled = out.pooler_output  # the EOS state, as CLIPTextModelWithProjection pools it
        if query_grad_to_encoder != 1.0:
            frozen = pooled.detach()
            pooled = frozen if query_grad_to_encoder == 0.0 else frozen + query_grad_to_encoder * (pooled - frozen)
        query = self.model.text_projection(pooled)
        return TextFeatures(condition=out.last_hidden_state, query=F.normalize(query, dim=-1))
