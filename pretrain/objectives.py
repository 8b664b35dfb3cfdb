"""The module the trainer optimises, by ``model.family``: DiffDis's unified objective or CLIP's.

``ClipObjective`` is the contrastive baseline's loss: the symmetric InfoNCE of ``pretrain.losses``
(the same function, temperature module and global-batch gather as DiffDis's alignment loss) between
the image tower's and the text encoder's unit queries. It returns the same keys as
``DiffDisObjective.forward`` so the trainer, the metrics and the DeepSpeed engine are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.config import RunConfig
from pretrain.diffusion import DiffDisObjective, LossConfig
from pretrain.losses import LearnableTemperature, symmetric_info_nce
from pretrain.model import ClipModel, DiffDisModel


class ClipObjective(nn.Module):
    """CLIP's loss on a batch. Owns the learnable temperature (``temperature.log_scale``, so
    ``optim.temperature_lr`` applies to it exactly as for DiffDis); ``rank``/``world_size`` select
    the global-batch negatives. ``loss.align_weight`` is unused (the loss is InfoNCE alone)."""

    def __init__(self, model: ClipModel, loss: LossConfig, rank: int = 0, world_size: int = 1, fused_infonce: bool = False):
        super().__init__()
        self.fused_infonce = fused_infonce
        self.model = model
        self.loss_config = loss
        self.rank, self.world_size = rank, world_size
        self.temperature = LearnableTemperature(loss.init_temperature, loss.max_logit_scale, loss.learn_temperature)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        align_input_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``align_input_ids`` (word-dropped captions, ``data.caption_unk_alignment_only``) replace
        ``input_ids``: CLIP's one pass is its alignment pass."""
        if pixels is None:
            raise ValueError("model.family=clip trains on pixels: the batch has precomputed latents "
                             "(set data.precomputed=false and give pixel shards)" if latents is not None
                             else "the batch has no 'pixels'")
        images = self.model.embed_images(pixels)
        texts = self.model.encode_text(input_ids if align_input_ids is None else align_input_ids, attention_mask).query
        scale = self.temperature()
        loss = symmetric_info_nce(images, texts, scale, self.rank, self.world_size, self.fused_infonce)
        return {"loss": loss, "loss_gen": loss.new_zeros(()), "loss_align": loss.detach(), "logit_scale": scale.detach()}


def build_objective(model: DiffDisModel | ClipModel, config: RunConfig, rank: int = 0, world_size: int = 1) -> nn.Module:
    """The training objective for ``model`` (chosen by ``config.model.family``)."""
    fused = config.kernels.fused_infonce
    if config.model.family == "clip":
        return ClipObjective(model, config.loss, rank, world_size, fused_infonce=fused)
    return DiffDisObjective(model, config.diffusion, config.loss, rank, world_size, fused_infonce=fused)
