"""Shared fixtures: the tiny config, a tokenizer trained on digits captions, seeded tiny models."""

from __future__ import annotations

import os

# First, before anything imports triton (DeepSpeed does, with pretrain): Triton picks compiled or
# interpreted mode for its own library at import, and the kernel tests (tests/kernels) run our Triton
# kernels on CPU under its interpreter. Production code reads this only to allow Triton on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch

from pretrain.config import CONFIGS_DIR, RunConfig, load_run_config
from pretrain.data import training_captions
from pretrain.model import DiffDisModel
from pretrain.model.tokenizer import tokenize, train_tokenizer
from pretrain.trainer import tokenizer_spec


@pytest.fixture(scope="session")
def tiny_config() -> RunConfig:
    return load_run_config(CONFIGS_DIR / "tiny.yaml")


@pytest.fixture(scope="session")
def tokenizer(tiny_config):
    text = tiny_config.model.text_encoder
    return train_tokenizer(training_captions(tiny_config), vocab_size=text.tokenizer_vocab_size,
                           max_length=text.max_length, kind=text.tokenizer_kind)


@pytest.fixture
def make_model(tiny_config, tokenizer):
    """Build a seeded tiny model, optionally with ModelConfig fields replaced."""

    def build(seed: int = 0, **fields) -> DiffDisModel:
        from dataclasses import replace  # noqa: PLC0415

        torch.manual_seed(seed)
        return DiffDisModel(replace(tiny_config.model, **fields), tokenizer_spec(tokenizer)).eval()

    return build


@pytest.fixture
def encode(tokenizer, tiny_config):
    """Token ids for a list of captions, at the tiny config's max length."""

    def run(captions: list[str]) -> dict[str, torch.Tensor]:
        return tokenize(tokenizer, captions, tiny_config.model.text_encoder.max_length)

    return run


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A real S3 HTTP endpoint (moto's server) on 127.0.0.1 with bucket ``diffdis-test``.

    Clients find it through ``AWS_ENDPOINT_URL`` (botocore, s3fs and subprocesses all read it) with
    throwaway credentials. Yields an object with ``url`` (the endpoint), ``bucket`` and ``stop()`` /
    ``start()`` so tests can take the endpoint away mid-run."""
    from moto.server import ThreadedMotoServer  # noqa: PLC0415

    from tests.s3 import S3Endpoint  # noqa: PLC0415

    endpoint = S3Endpoint(ThreadedMotoServer)
    endpoint.start()
    for name, value in endpoint.environment().items():
        monkeypatch.setenv(name, value)
    endpoint.create_bucket()
    yield endpoint
    endpoint.reset()
    endpoint.stop()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (``ray.init`` costs seconds); ``run_pipeline`` and
    ``precompute_features`` reuse a running Ray instead of starting their own."""
    import os  # noqa: PLC0415

    import ray  # noqa: PLC0415

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        # workers import this checkout's packages even when it is not the installed one
        env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env} if env else None)
    yield ray
    if started:
        ray.shutdown()
