"""The DiffDis network and the CLIP baseline. Imports torch, diffusers, transformers and ``kernels`` only."""

from pretrain.model.clip import ClipModel
from pretrain.model.config import (
    AutoencoderConfig, ClipVisionConfig, ModelConfig, TextEncoderConfig, UNetConfig,
)
from pretrain.model.diffdis import DiffDisModel
from pretrain.model.factory import build_model, load_pretrained
from pretrain.model.text_encoder import TextFeatures, TokenizerSpec
from pretrain.model.unet import DualStreamUNet, UNetOutput

__all__ = [
    "AutoencoderConfig", "ClipModel", "ClipVisionConfig", "DiffDisModel", "DualStreamUNet", "ModelConfig",
    "TextEncoderConfig", "TextFeatures", "TokenizerSpec", "UNetConfig", "UNetOutput", "build_model",
    "load_pretrained",
]
