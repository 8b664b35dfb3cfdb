"""The attention entry point agrees with its plain PyTorch reference on every available backend."""

from __future__ import annotations

import pytest
import torch

from kernels import attention, attention_backend, reference_attention


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_attention_matches_reference(backend, monkeypatch):
    monkeypatch.setenv("DIFFDIS_ATTENTION", backend)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 65, 32, generator=generator) for _ in range(3))
    k = k[:, :, :17]
    v = v[:, :, :17]
    torch.testing.assert_close(attention(q, k, v), reference_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_backend_follows_the_device(monkeypatch):
    monkeypatch.delenv("DIFFDIS_ATTENTION", raising=False)
    assert attention_backend(torch.device("cpu")) == "sdpa"
    monkeypatch.setenv("DIFFDIS_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="DIFFDIS_ATTENTION"):
        attention_backend(torch.device("cpu"))
