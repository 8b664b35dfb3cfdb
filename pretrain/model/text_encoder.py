"""Text encoder T: caption → condition c (token states, L×d) and query e (pooled EOS, projected, L2-normalised)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection
from transformers.masking_utils import create_causal_mask
from transformers.models.clip.modeling_clip import CLIPEncoder

from pretrain.model.config import TextEncoderConfig


@dataclass(frozen=True)
class TokenizerSpec:
    """What the embedding table must agree on with the tokenizer."""

    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    # the word-level tokenizer's <|unk|> (None for byte-level BPE, which has none); its embedding row is
    # zero-initialised when TextEncoderConfig.zero_init_unknown_token says so
    unk_token_id: int | None = None


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


def eos_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Where CLIPTextTransformer pools: the first EOS of each row (the highest id for legacy id 2)."""
    ids = input_ids.to(torch.int)
    return ids.argmax(dim=-1) if eos_token_id == 2 else (ids == eos_token_id).int().argmax(dim=-1)


class TextEncoder(nn.Module):
    def __init__(self, hf_config: CLIPTextConfig, query_head_layers: int = 0):
        super().__init__()
        hf_config._attn_implementation = "sdpa"
        self.model = CLIPTextModelWithProjection(hf_config)
        # the query's own causal transformer layers over the token states, then its own final norm
        # (TextEncoderConfig.query_head_layers): capacity that only the alignment task trains
        self.query_head: CLIPEncoder | None = None
        if query_head_layers:
            head_config = CLIPTextConfig.from_dict({**hf_config.to_dict(), "num_hidden_layers": query_head_layers})
            head_config._attn_implementation = "sdpa"
            self.query_head = CLIPEncoder(head_config)
            self.query_head_norm = nn.LayerNorm(hf_config.hidden_size, eps=hf_config.layer_norm_eps)
            self.query_head.apply(self.model._init_weights)

    @classmethod
    def build(cls, config: TextEncoderConfig, tokens: TokenizerSpec) -> TextEncoder:
        """Random init from the config, or the weights at ``config.pretrained_path`` (local only)."""
        if config.pretrained_path:
            encoder = cls(CLIPTextConfig.from_pretrained(config.pretrained_path, local_files_only=True),
                          config.query_head_layers)
            encoder.model = CLIPTextModelWithProjection.from_pretrained(
                config.pretrained_path, local_files_only=True, use_safetensors=True
            )
            return encoder
        encoder = cls(clip_text_config(config, tokens), config.query_head_layers)
        if config.zero_init_unknown_token and tokens.unk_token_id is not None:
            encoder.zero_token_embedding(tokens.unk_token_id)
        return encoder

    @torch.no_grad()
    def zero_token_embedding(self, token_id: int) -> None:
        """Set one row of the token embedding table to zero: the token then enters the encoder as its
        position embedding alone. For ``<|unk|>``, which no training caption holds (unless word dropout
        puts it there), the row gets no gradient and keeps its init, so a random init would be a
        seed-dependent vector added to every unseen prompt word (design notes, point 10)."""
        self.model.text_model.embeddings.token_embedding.weight[token_id].zero_()

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
        if self.query_head is None:
            pooled = _scale_grad(out.pooler_output, query_grad_to_encoder)  # the EOS state, as CLIP pools it
        else:
            states = _scale_grad(out.last_hidden_state, query_grad_to_encoder)
            mask = create_causal_mask(config=self.query_head.config, inputs_embeds=states, attention_mask=attention_mask,
                                      cache=None)
            states = self.query_head_norm(self.query_head(inputs_embeds=states, attention_mask=mask, is_causal=True)
                                          .last_hidden_state)
            rows = torch.arange(states.shape[0], device=states.device)
            pooled = states[rows, eos_positions(input_ids, self.model.config.eos_token_id).to(states.device)]
        query = self.model.text_projection(pooled)
        return TextFeatures(condition=out.last_hidden_state, query=F.normalize(query, dim=-1))


def _scale_grad(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """``tensor``'s value with ``scale`` times its gradient (0: detached)."""
    if scale == 1.0:
        return tensor
    frozen = tensor.detach()
    return frozen if scale == 0.0 else frozen + scale * (tensor - frozen)
