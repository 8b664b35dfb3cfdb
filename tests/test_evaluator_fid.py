"""The ``fid`` suite task: torch-fidelity's FID Inception-v3 from a local weights file, nothing downloaded.

No real Inception weights exist offline, so the tests write a random-init state dict in the library's
format (its own module, He-initialised so the 2048-d features are not ~0 after 90 layers). The real
file changes the numbers, not the code path: the same strict ``load_state_dict`` reads both.
Every test here runs under a socket guard: a connection attempt (torch.hub's download included) raises
and is recorded, and the test asserts there was none.
"""

from __future__ import annotations

import re
import socket

import numpy as np
import pytest
import torch

from pretrain.eval_metrics import frechet_distance_spectral
from pretrain.fid import inception_class, inception_features, load_inception
from pretrain.model import DiffDisModel
from pretrain.trainer import tokenizer_spec
from tests.evaluator_helpers import checkpointer, save_step


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connect and name lookup raises; the attempts are kept for the test to assert on."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError(f"test_evaluator_fid: network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert attempts == [], f"something tried to reach the network: {attempts}"


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random-init FID Inception state dict saved as torch-fidelity expects (``torch.save``)."""
    directory = tmp_path_factory.mktemp("inception")
    empty = directory / "empty.pt"
    torch.save({}, empty)

    class Unloaded(inception_class()):  # the library's own layers, without loading (or downloading) weights
        def load_state_dict(self, *args, **kwargs):
            return None

    torch.manual_seed(0)
    network = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = directory / "weights-inception-2015-12-05-random.pth"
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def model(tiny_config, tokenizer):
    torch.manual_seed(0)
    return DiffDisModel(tiny_config.model, tokenizer_spec(tokenizer)).eval()


def test_fid_is_zero_on_itself_and_grows_with_noise(inception_weights, tiny_config, no_network):
    from safetensors.torch import save_file  # noqa: PLC0415

    from data_pipeline.digits import load_digits_split  # noqa: PLC0415
    from pretrain.judge import uint8_to_pixels  # noqa: PLC0415

    split = load_digits_split("heldout", image_size=tiny_config.model.image_size,
                              heldout_fraction=tiny_config.data.heldout_fraction, split_seed=tiny_config.data.split_seed)
    pixels = uint8_to_pixels(split.images[:10])
    network = load_inception(inception_weights)
    real = inception_features(network, pixels)
    assert real.shape == (10, 2048)
    # with itself: zero to rounding, 1e-9 of the features' total variance Tr Σ (the noisy sets score > 1e-3 of it)
    total_variance = np.trace(np.cov(real, rowvar=False))
    assert abs(frechet_distance_spectral(real, real)) <= 1e-9 * total_variance
    noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0))
    scores = [frechet_distance_spectral(inception_features(network, pixels + s * noise), real) for s in (0.1, 0.4, 1.0)]
    assert 1e-3 * total_variance < scores[0] < scores[1] < scores[2], (scores, total_variance)

    # the same tensors as safetensors load to the same network
    as_safetensors = inception_weights.parent / "inception.safetensors"
    save_file(torch.load(inception_weights, weights_only=True), str(as_safetensors))
    assert (inception_features(load_inception(as_safetensors), pixels[:4]) == real[:4]).all()


def test_fid_task_runs_from_a_yaml_suite(tmp_path, inception_weights, model, tokenizer, tiny_config, no_network):
    from pretrain.evaluate import load_checkpoint  # noqa: PLC0415
    from pretrain.config_io import from_dict  # noqa: PLC0415
    from pretrain.suite import SuiteConfig, SuiteRunner, load_suite  # noqa: PLC0415

    root = tmp_path / "ckpts"
    save_step(checkpointer(str(root), tmp_path / "staging"), 1, model, tokenizer, tiny_config)
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(
        "tasks:\n"
        f"  - {{kind: fid, name: fid_prompts, weights: {inception_weights}, data: heldout, limit: 6,\n"
        "     prompts: [a handwritten digit zero, a handwritten digit seven], per_prompt: 3, steps: 2, seed: 0}\n"
        f"  - {{kind: fid, name: fid_captions, weights: {inception_weights}, limit: 4, steps: 2}}\n"
    )
    runner = SuiteRunner(load_suite(suite_file), tmp_path / "img")
    loaded = load_checkpoint(root / "step-000000001")
    metrics = runner.run(loaded).metrics
    assert metrics["fid_prompts"]["n_generated"] == 6 and metrics["fid_prompts"]["n_real"] == 6
    assert metrics["fid_captions"]["n_generated"] == 4 and metrics["fid_captions"]["n_real"] == 4  # one per caption
    assert metrics["fid_prompts"]["fid"] > 0 and metrics["fid_captions"]["fid"] > 0
    assert len(runner._inceptions) == 1  # one network for both tasks (same weights file)
    again = runner.run(loaded).metrics  # fixed seed: the same samples, the same score
    assert again["fid_prompts"]["fid"] == metrics["fid_prompts"]["fid"]

    missing = tmp_path / "no-such-weights.pth"  # named before any image is read or generated
    bad = from_dict(SuiteConfig, {"tasks": [{"kind": "fid", "weights": str(missing), "limit": 4, "steps": 2}]})
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        SuiteRunner(bad, tmp_path / "img").run(loaded)


def test_fid_weights_missing_or_unsafe_are_named(tmp_path, no_network):
    from pretrain.config_io import from_dict  # noqa: PLC0415
    from pretrain.suite import SuiteConfig  # noqa: PLC0415

    missing = tmp_path / "nowhere" / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_inception(missing)
    with pytest.raises(ValueError, match="a fid task needs weights"):
        from_dict(SuiteConfig, {"tasks": [{"kind": "fid"}]})

    pickled = tmp_path / "code.pth"  # not a plain state dict: weights_only refuses to unpickle it
    torch.save({"conv": torch.nn.Conv2d(1, 1, 1)}, pickled)
    with pytest.raises(ValueError, match=re.escape(str(pickled)) + ".*weights-only"):
        load_inception(pickled)
    wrong = tmp_path / "other.pth"  # tensors, but not the Inception's
    torch.save({"weight": torch.zeros(2)}, wrong)
    with pytest.raises(ValueError, match=re.escape(str(wrong)) + " do not fit"):
        load_inception(wrong)


def test_the_socket_guard_catches_the_library_download(tmp_path, monkeypatch, no_network):
    """The guard is real: without a weights path torch-fidelity would download (torch.hub), and that is
    refused and recorded here, so the empty record in the other tests means no attempt was made."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached copy to find
    with pytest.raises(OSError):
        inception_class()("inception-v3-compat", ["2048"])
    assert no_network, "the download was not seen by the guard"
    no_network.clear()
