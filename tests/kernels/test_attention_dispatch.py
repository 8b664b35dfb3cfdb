"""Attention dispatch: which backend runs, who chose it, that it is logged once, and that a key-padding
mask means the same on every path (checked against the reference; fp32, atol/rtol 1e-5)."""

from __future__ import annotations

import importlib
import logging
import math

import pytest
import torch

from kernels import KernelsConfig, apply_kernels, attention, attention_backend, configure_attention, reference_attention
from pretrain.model.attention import MultiHeadAttention

A = importlib.import_module("kernels.attention")  # the package's ``attention`` is the function
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _qkv(batch=2, heads=3, queries=19, keys=13, dim=16):
    return (torch.randn(batch, heads, queries, dim), torch.randn(batch, heads, keys, dim), torch.randn(batch, heads, keys, dim))


def _padding(batch, keys, lengths):
    return torch.arange(keys)[None, :] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("batch,lengths", [(1, [5]), (3, [13, 1, 8])])
def test_masked_attention_matches_the_reference_and_ignores_padded_keys(backend, batch, lengths, monkeypatch):
    monkeypatch.setenv("DIFFDIS_ATTENTION", backend)
    q, k, v = _qkv(batch=batch)
    mask = _padding(batch, 13, lengths)
    out = attention(q, k, v, mask)
    torch.testing.assert_close(out, reference_attention(q, k, v, mask), **TOL)
    # what the padded keys hold must not matter ...
    k2 = torch.where(mask[:, None, :, None], k, torch.randn_like(k) * 100)
    v2 = torch.where(mask[:, None, :, None], v, torch.randn_like(v) * 100)
    torch.testing.assert_close(attention(q, k2, v2, mask), out, **TOL)
    # ... and each sample equals attention over its real keys only
    for i, length in enumerate(lengths):
        torch.testing.assert_close(out[i:i + 1], reference_attention(q[i:i + 1], k[i:i + 1, :, :length], v[i:i + 1, :, :length]), **TOL)


def test_an_int_mask_means_the_same_as_a_bool_mask(monkeypatch):
    q, k, v = _qkv()
    mask = _padding(2, 13, [4, 9])
    torch.testing.assert_close(attention(q, k, v, mask.long()), attention(q, k, v, mask), rtol=0, atol=0)
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        attention(q, k, v, mask[:, :5])


def test_precedence_environment_over_config_over_auto(monkeypatch):
    cpu = torch.device("cpu")
    assert attention_backend(cpu) == "sdpa"  # auto on CPU
    configure_attention("reference")
    assert attention_backend(cpu) == "reference"
    monkeypatch.setenv("DIFFDIS_ATTENTION", "sdpa")
    assert attention_backend(cpu) == "sdpa"
    monkeypatch.setenv("DIFFDIS_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="DIFFDIS_ATTENTION"):
        attention_backend(cpu)
    with pytest.raises(ValueError, match="kernels.attention"):
        configure_attention("flash")


def test_apply_kernels_sets_the_backend_from_the_run_config():
    from pretrain.config import load_run_config  # noqa: PLC0415

    config = load_run_config(None, ["kernels.attention=reference"])
    apply_kernels(torch.nn.Linear(2, 2), config.kernels)
    assert attention_backend(torch.device("cpu")) == "reference"
    apply_kernels(torch.nn.Linear(2, 2), KernelsConfig())
    assert attention_backend(torch.device("cpu")) == "sdpa"


def test_the_backend_is_logged_once_per_choice(caplog, monkeypatch):
    q, k, v = _qkv()
    with caplog.at_level(logging.INFO, logger="kernels.attention"):
        for _ in range(3):
            attention(q, k, v)
        monkeypatch.setenv("DIFFDIS_ATTENTION", "reference")
        attention(q, k, v)
        attention(q, k, v)
    messages = [r.getMessage() for r in caplog.records if r.name == "kernels.attention"]
    assert messages == [
        "attention backend: sdpa on cpu (chosen by auto (cpu))",
        "attention backend: reference on cpu (chosen by environment DIFFDIS_ATTENTION)",
    ]


class _FakeXformers:
    """xformers.ops' documented contract in plain PyTorch: (batch, tokens, heads, dim) tensors and an
    additive attn_bias of (batch, heads, queries, keys) whose rows are 8-element aligned."""

    def __init__(self):
        self.calls = 0

    def memory_efficient_attention(self, q, k, v, attn_bias=None):
        self.calls += 1
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        if attn_bias is not None:
            assert attn_bias.stride(-2) % 8 == 0, "xformers needs the bias rows aligned to 8 elements"
            assert attn_bias.dtype == q.dtype
            scores = scores + attn_bias
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def test_xformers_path_layout_and_mask_bias_match_the_reference(monkeypatch):
    fake = _FakeXformers()
    monkeypatch.setattr(A, "_xformers_ops", lambda: fake)
    monkeypatch.setenv("DIFFDIS_ATTENTION", "xformers")
    q, k, v = _qkv(batch=3)
    mask = _padding(3, 13, [13, 2, 7])
    torch.testing.assert_close(attention(q, k, v, mask), reference_attention(q, k, v, mask), **TOL)
    torch.testing.assert_close(attention(q, k, v), reference_attention(q, k, v), **TOL)
    assert fake.calls == 2


def test_auto_picks_xformers_on_cuda_when_it_imports(monkeypatch):
    monkeypatch.setattr(A, "_xformers_ops", lambda: object())
    assert attention_backend(torch.device("cuda")) == "xformers"
    monkeypatch.setattr(A, "_xformers_ops", lambda: None)
    assert attention_backend(torch.device("cuda")) == "sdpa"
    monkeypatch.setenv("DIFFDIS_ATTENTION", "xformers")
    with pytest.raises(RuntimeError, match="xformers is not importable"):
        attention(*_qkv())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here): real xformers dispatch not run")
def test_real_xformers_on_cuda_matches_the_reference():
    pytest.importorskip("xformers.ops", reason="xformers not installed: pip install -e .[cuda]")
    assert attention_backend(torch.device("cuda")) == "xformers"
    q, k, v = (t.cuda() for t in _qkv(batch=2, keys=77, dim=64))
    mask = _padding(2, 77, [77, 9]).cuda()
    torch.testing.assert_close(attention(q, k, v, mask), reference_attention(q, k, v, mask), rtol=2e-3, atol=2e-3)
    bf16 = [t.bfloat16() for t in (q, k, v)]
    torch.testing.assert_close(attention(*bf16, mask).float(), reference_attention(*bf16, mask).float(), rtol=3e-2, atol=3e-2)


def test_cross_attention_with_padded_captions_equals_attention_to_the_unpadded_ones():
    block = MultiHeadAttention(dim=32, head_dim=8, context_dim=24)
    x, context = torch.randn(2, 10, 32), torch.randn(2, 6, 24)
    mask = _padding(2, 6, [6, 3])
    out = block(x, context, key_padding_mask=mask)
    torch.testing.assert_close(out[1:], block(x[1:], context[1:, :3]), **TOL)
    torch.testing.assert_close(out[:1], block(x[:1], context[:1]), **TOL)
