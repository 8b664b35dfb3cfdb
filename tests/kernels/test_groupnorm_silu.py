"""Fused GroupNorm+SiLU (Triton, interpreted on CPU) against F.silu(F.group_norm(...)).

fp32 tolerances: values rtol/atol 1e-5; input gradient rtol 1e-4 / atol 1e-5; weight and bias
gradients rtol 1e-4 / atol 5e-5 (sums over batch × pixels, in another order than PyTorch's).
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

import kernels.groupnorm_silu as G
from kernels.groupnorm_silu import FusedGroupNormSiLU, SiLULinear, groupnorm_silu, reference_groupnorm_silu, use_fused_groupnorm_silu

VALUE_TOL = {"rtol": 1e-5, "atol": 1e-5}
GRAD_TOL = {"x": {"rtol": 1e-4, "atol": 1e-5}, "weight": {"rtol": 1e-4, "atol": 5e-5}, "bias": {"rtol": 1e-4, "atol": 5e-5}}

# (shape, groups, channels_last): pixels not a multiple of the 16-wide tile, odd group counts (3, 5),
# one channel per group, batch 1, a group wider than one tile row (BLOCK_C 16 × 256 pixels, 3 tiles)
CASES = [
    ((2, 12, 5, 7), 3, False),
    ((1, 20, 9, 11), 5, False),
    ((3, 6, 3, 3), 6, False),
    ((1, 32, 8, 8), 8, True),
    ((2, 16, 23, 29), 1, False),
]


@pytest.mark.parametrize("shape,groups,channels_last", CASES)
def test_fused_matches_the_reference_in_values_and_gradients(shape, groups, channels_last, monkeypatch):
    launches = []
    real_launch = G.launch
    monkeypatch.setattr(G, "launch", lambda *a, **k: (launches.append(a[0].__name__), real_launch(*a, **k)))
    x = torch.randn(shape) * 3 + 1.5  # a mean far from 0 tests the two-pass variance
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(shape[1], requires_grad=True)
    bias = torch.randn(shape[1], requires_grad=True)
    grad_out = torch.randn(shape)
    fused = groupnorm_silu(x, groups, weight, bias, 1e-6)
    fused_grads = torch.autograd.grad(fused, (x, weight, bias), grad_out)
    reference = reference_groupnorm_silu(x, groups, weight, bias, 1e-6)
    reference_grads = torch.autograd.grad(reference, (x, weight, bias), grad_out)
    assert launches == ["gn_silu_forward_kernel", "gn_silu_backward_kernel"]
    torch.testing.assert_close(fused, reference, **VALUE_TOL)
    for name, got, want in zip(("x", "weight", "bias"), fused_grads, reference_grads):
        torch.testing.assert_close(got, want, **GRAD_TOL[name], msg=lambda m, name=name: f"grad of {name}: {m}")
    assert fused.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert fused_grads[0].is_contiguous(memory_format=torch.channels_last) == channels_last


def test_bf16_channels_last_matches_the_fp32_reference_within_bf16_rounding():
    """The GPU configuration (bf16 activations, channels-last, fp32 parameters): statistics in fp32,
    output and input gradient rounded to bf16 (2 ulp: rtol 2⁻⁶, atol 1e-2), parameter gradients fp32."""
    x = (torch.randn(2, 12, 5, 7) * 3 + 1.5).bfloat16().to(memory_format=torch.channels_last).requires_grad_()
    weight, bias = torch.randn(12, requires_grad=True), torch.randn(12, requires_grad=True)
    grad_out = torch.randn(2, 12, 5, 7).bfloat16()
    fused = groupnorm_silu(x, 3, weight, bias, 1e-6)
    fused_grads = torch.autograd.grad(fused, (x, weight, bias), grad_out)
    reference = reference_groupnorm_silu(x.float(), 3, weight, bias, 1e-6)
    reference_grads = torch.autograd.grad(reference, (x, weight, bias), grad_out.float())
    assert fused.dtype == fused_grads[0].dtype == torch.bfloat16 and fused_grads[1].dtype == torch.float32
    torch.testing.assert_close(fused.float(), reference, rtol=2**-6, atol=1e-2)
    torch.testing.assert_close(fused_grads[0].float(), reference_grads[0].float(), rtol=2**-6, atol=1e-2)
    for got, want in zip(fused_grads[1:], reference_grads[1:]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)


def test_without_the_interpreter_cpu_uses_pytorch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(G, "launch", lambda *a, **k: pytest.fail("Triton launched on CPU without TRITON_INTERPRET=1"))
    x, weight, bias = torch.randn(2, 8, 4, 4), torch.randn(8), torch.randn(8)
    torch.testing.assert_close(groupnorm_silu(x, 4, weight, bias, 1e-5), reference_groupnorm_silu(x, 4, weight, bias, 1e-5),
                               rtol=0, atol=0)


def _block():
    return ResnetBlock2D(in_channels=12, out_channels=24, temb_channels=16, groups=3)


def test_patched_resnet_block_computes_the_same_with_the_same_parameters():
    block = _block()
    patched = copy.deepcopy(block)
    assert use_fused_groupnorm_silu(patched) == 1
    assert isinstance(patched.norm1, FusedGroupNormSiLU) and isinstance(patched.time_emb_proj, SiLULinear)
    assert list(patched.state_dict()) == list(block.state_dict())
    assert [p.data_ptr() for p in patched.parameters()] != [p.data_ptr() for p in block.parameters()]  # deepcopy
    shared = copy.deepcopy(block)
    params_before = [id(p) for p in shared.parameters()]
    use_fused_groupnorm_silu(shared)
    assert [id(p) for p in shared.parameters()] == params_before  # the same Parameter objects, same order

    x, temb = torch.randn(2, 12, 5, 6, requires_grad=True), torch.randn(2, 16)
    want = block(x, temb)
    want_grads = torch.autograd.grad(want.square().sum(), [x, *block.parameters()])
    got = patched(x, temb)
    got_grads = torch.autograd.grad(got.square().sum(), [x, *patched.parameters()])
    torch.testing.assert_close(got, want, **VALUE_TOL)
    for (name, _), g, w in zip([("x", None), *block.named_parameters()], got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=5e-5, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_blocks_that_do_not_fit_are_left_alone():
    scale_shift = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=4, groups=2, time_embedding_norm="scale_shift")
    gelu = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=4, groups=2, non_linearity="gelu")
    model = torch.nn.Sequential(scale_shift, gelu)
    assert use_fused_groupnorm_silu(model) == 0
    assert type(scale_shift.norm1) is torch.nn.GroupNorm and type(gelu.norm2) is torch.nn.GroupNorm
