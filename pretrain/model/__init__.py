"""The DiffDis network. Imports torch, diffusers, transformers and ``kernels`` only."""

from pretrain.model.config import AutoencoderConfig, ModelConfig, TextEncoderConfig, UNetConfig
from pretrain.model.diffdis import DiffDisModel
from pretrain.model.text_encoder import TextFeatures, TokenizerSpec
from pretrain.model.unet import DualStreamUNet, UNetOutput

__all__ = [
    "AutoencoderConfig", "DiffDisModel", "DualStreamUNet", "ModelConfig", "TextEncoderConfig",
    "TextFeatures", "TokenizerSpec", "UNetConfig", "UNetOutput",
]
