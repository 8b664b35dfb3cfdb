"""FID (Heusel et al. 2017) from a local Inception-v3 weights file, with torch-fidelity's feature extractor.

The network is torch-fidelity's ``FeatureExtractorInceptionV3``: the TensorFlow FID Inception
(``inception-2015-12-05``) ported to PyTorch, with TF1's bilinear resize to 299×299 and its input
scaling, so its 2048-d pool features are those of the reference FID code. Its weights are the file
torch-fidelity names ``weights-inception-2015-12-05-6726825d.pth``; this module never downloads it:
the user gives its path (``fid`` task, ``weights:``). The Fréchet distance of the features is
:func:`pretrain.eval_metrics.frechet_distance_spectral` (the root's trace from eigenvalues, as
torchmetrics computes it; equal to the scipy ``sqrtm`` form of torch-fidelity and pytorch-fid, tested).

Two things are done around the library, and why:

- **Import without torchvision.** ``import torch_fidelity`` imports every extractor it has, and the
  CLIP/VGG/DINOv2 ones import torchvision; no torchvision wheel works beside the project's CPU torch
  2.13.0 (docs/design-notes.md "The evaluator"). The Inception module needs only torch, so where
  torchvision is missing it is imported on its own (:func:`inception_class`).
- **Safe loading.** torch-fidelity reads a weights path with ``torch.load(weights_only=False)``
  (arbitrary unpickling) and downloads when given none. Here the user's file is read with
  safetensors or ``torch.load(weights_only=True)``, and the library is handed a copy of the tensors
  written to a private temporary folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

FEATURES = "2048"  # the pool features FID is defined on
WEIGHTS_HELP = ("FID needs torch-fidelity's Inception-v3 weights file (weights-inception-2015-12-05-6726825d.pth, "
                "the URL in torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3); download it on a "
                "machine with internet access and give its local path as the task's weights:")


def inception_class() -> type:
    """torch-fidelity's ``FeatureExtractorInceptionV3``, imported without torchvision if need be."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: PLC0415
        return FeatureExtractorInceptionV3
    except ModuleNotFoundError as error:
        if error.name != "torchvision":
            raise ModuleNotFoundError("the fid task needs torch-fidelity (scripts/bootstrap.sh installs it: "
                                      "pip install --no-deps torch-fidelity==0.4.0)") from error
    # The package's __init__ imports the torchvision-based extractors too; stand in for it with an empty
    # package object just while the Inception module and its torch-only helpers import, then put back
    # whatever was there (so a later ``import torch_fidelity`` behaves as it would have).
    spec = importlib.util.find_spec("torch_fidelity")
    stub = types.ModuleType("torch_fidelity")
    stub.__path__, stub.__spec__ = list(spec.submodule_search_locations), spec
    previous = sys.modules.get("torch_fidelity")
    sys.modules["torch_fidelity"] = stub
    try:
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3
    finally:
        if previous is None:
            sys.modules.pop("torch_fidelity", None)
        else:
            sys.modules["torch_fidelity"] = previous


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, without unpickling code: safetensors, or a ``torch.save``'d
    state dict read with ``weights_only=True``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {path} do not exist. {WEIGHTS_HELP}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # noqa: PLC0415
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any reader error: name the file
        raise ValueError(f"Inception weights {path} cannot be read as safetensors or a weights-only torch "
                         f"state dict ({type(error).__name__}: {error}). {WEIGHTS_HELP}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"Inception weights {path} hold a {type(state).__name__}, not a state dict of tensors")
    return state


def load_inception(path: str | Path) -> torch.nn.Module:
    """torch-fidelity's FID Inception-v3 with the weights at ``path`` (strict: every key must match),
    returning the 2048-d pool features; eval mode, no gradients, on the CPU."""
    state = read_state_dict(path)
    inception = inception_class()
    with tempfile.TemporaryDirectory(prefix="diffdis-fid-") as scratch:
        copy = Path(scratch) / "inception.pt"
        torch.save(state, copy)  # plain tensors only: what the library then unpickles is what we wrote
        try:
            return inception("inception-v3-compat", [FEATURES], feature_extractor_weights_path=str(copy))
        except RuntimeError as error:  # load_state_dict(strict=True): missing/unexpected keys or shapes
            raise ValueError(f"Inception weights {path} do not fit torch-fidelity's FID Inception-v3 "
                             f"({str(error).splitlines()[0]}...). {WEIGHTS_HELP}") from error


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] → (N, 3, H, W) uint8, as images are saved (rounded; one channel repeated)."""
    images = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images[:, :3]


@torch.no_grad()
def inception_features(network: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """2048-d pool features (float64) of pixels in [-1, 1], computed on the network's device; the
    network resizes to 299×299 itself."""
    images, device = pixels_to_uint8(pixels), next(network.parameters()).device
    batches = [network(images[i : i + batch_size].to(device))[0].cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(batches).double().numpy()
