"""Fused chunked InfoNCE (Triton, interpreted on CPU) against the materialised-logits reference.

fp32 tolerances: loss rtol 1e-5 / atol 1e-6; gradients rtol 1e-4 / atol 2e-5 (the kernels sum
exponentials tile by tile in another order than PyTorch's logsumexp; at the scale clamp, 100, a
logit error of 1 ulp is ~1e-5 absolute). bf16 inputs are scored in fp32; their gradients, rounded
to bf16 on both paths, agree within one bf16 ulp (rtol 2⁻⁷).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels.infonce as I
from kernels.infonce import (
    chunked_rows_ce_torch, fused_symmetric_info_nce, reference_rows_ce, reference_symmetric_info_nce, rows_cross_entropy,
)
from pretrain.losses import LearnableTemperature, symmetric_info_nce

LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}
GRAD_TOL = {"rtol": 1e-4, "atol": 2e-5}


def _unit(rows, dim):
    return F.normalize(torch.randn(rows, dim), dim=-1).requires_grad_()


def _loss_and_grads(fn, *inputs):
    for t in inputs:
        t.grad = None
    loss = fn()
    loss.backward()
    return loss.detach(), [t.grad.clone() for t in inputs]


# (rows, columns, dim, label offset, scale): N not a multiple of the 64/32-row tiles, batch 1,
# a rank's rows inside a gathered batch (offset), D not a power of two, the temperature clamp (100)
CASES = [
    (37, 37, 24, 0, 14.3),
    (130, 130, 64, 0, 100.0),
    (1, 1, 8, 0, 100.0),
    (5, 15, 64, 5, 1 / 0.07),
    (7, 21, 33, 14, 100.0),
]


@pytest.mark.parametrize("rows,cols,dim,offset,scale", CASES)
def test_rows_cross_entropy_matches_the_reference(rows, cols, dim, offset, scale):
    a, b = _unit(rows, dim), _unit(cols, dim)
    s = torch.tensor(scale, requires_grad=True)
    fused, fused_grads = _loss_and_grads(lambda: rows_cross_entropy(a, b, s, offset), a, b, s)
    ref, ref_grads = _loss_and_grads(lambda: reference_rows_ce(a, b, s, offset), a, b, s)
    torch.testing.assert_close(fused, ref, **LOSS_TOL)
    for name, got, want in zip(("rows", "columns", "scale"), fused_grads, ref_grads):
        torch.testing.assert_close(got, want, **GRAD_TOL, msg=lambda m, name=name: f"grad of {name}: {m}")
    assert fused_grads[2].shape == s.shape


@pytest.mark.parametrize("init_temperature", [0.07, 0.001])  # 0.001 sits at the clamp (scale 100)
def test_symmetric_loss_with_the_learnable_temperature_matches_the_eager_loss(init_temperature):
    predictions = torch.randn(45, 32, requires_grad=True)  # not unit: the loss normalises
    targets = torch.randn(45, 32, requires_grad=True)
    temperature = LearnableTemperature(init_temperature, max_scale=100.0)
    inputs = (predictions, targets, temperature.log_scale)
    fused, fused_grads = _loss_and_grads(lambda: symmetric_info_nce(predictions, targets, temperature(), fused=True), *inputs)
    eager, eager_grads = _loss_and_grads(lambda: symmetric_info_nce(predictions, targets, temperature()), *inputs)
    torch.testing.assert_close(fused, eager, **LOSS_TOL)
    for got, want in zip(fused_grads, eager_grads):
        torch.testing.assert_close(got, want, **GRAD_TOL)
    at_clamp = init_temperature == 0.001
    assert (eager_grads[2].abs().item() == 0.0) == at_clamp  # the clamp stops the temperature's gradient


def test_ranks_of_a_gathered_batch_sum_to_the_single_process_loss():
    """What each of 2 ranks computes from its rows and the gathered columns (offset r·n) averages to
    the loss over the whole batch, as the distributed gather relies on."""
    predictions, targets, scale = _unit(22, 16), _unit(22, 16), torch.tensor(30.0)
    whole = fused_symmetric_info_nce(predictions, targets, predictions, targets, scale)
    per_rank = [fused_symmetric_info_nce(predictions[r * 11:(r + 1) * 11], targets[r * 11:(r + 1) * 11],
                                         predictions, targets, scale, offset=r * 11) for r in range(2)]
    torch.testing.assert_close(sum(per_rank) / 2, whole, **LOSS_TOL)
    torch.testing.assert_close(whole, reference_symmetric_info_nce(predictions, targets, predictions, targets, scale), **LOSS_TOL)


def _saved_numels(fn) -> list[int]:
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def test_backward_keeps_no_rows_by_columns_tensor():
    """Memory linear in N: what autograd keeps for backward is O(N·D), never N×N (the eager loss keeps
    its N×N logits, which shows the check can see them)."""
    n, dim = 150, 16
    a, b, s = _unit(n, dim), _unit(n, dim), torch.tensor(20.0, requires_grad=True)
    fused = _saved_numels(lambda: fused_symmetric_info_nce(a, b, a, b, s))
    eager = _saved_numels(lambda: reference_symmetric_info_nce(a, b, a, b, s))
    assert max(fused) <= n * dim < n * n
    assert max(eager) >= n * n


def test_without_the_interpreter_cpu_uses_the_chunked_pytorch_loop(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(I, "CHUNK", 7)  # several chunks, the last one partial
    monkeypatch.setattr(I, "launch", lambda *a, **k: pytest.fail("Triton launched on CPU without TRITON_INTERPRET=1"))
    a, b, s = _unit(9, 8), _unit(27, 8), torch.tensor(100.0, requires_grad=True)
    got, got_grads = _loss_and_grads(lambda: rows_cross_entropy(a, b, s, 18), a, b, s)
    want, want_grads = _loss_and_grads(lambda: reference_rows_ce(a, b, s, 18), a, b, s)
    torch.testing.assert_close(got, want, **LOSS_TOL)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **GRAD_TOL)
    torch.testing.assert_close(chunked_rows_ce_torch(a, b, s, 18), want, **LOSS_TOL)


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16])
def test_bf16_inputs_are_scored_in_fp32(target_dtype):
    """bf16 predictions (a UNet under autocast) against fp32 or bf16 text queries: the same loss and
    gradients as the fp32 reference on the same (bf16-rounded) values, gradients in the inputs' dtypes."""
    predictions = _unit(19, 16).detach().bfloat16().requires_grad_()
    targets, s = _unit(19, 16).detach().to(target_dtype).requires_grad_(), torch.tensor(50.0, requires_grad=True)
    got, got_grads = _loss_and_grads(lambda: fused_symmetric_info_nce(predictions, targets, predictions, targets, s),
                                     predictions, targets, s)
    want, want_grads = _loss_and_grads(
        lambda: reference_symmetric_info_nce(predictions, targets, predictions, targets, s), predictions, targets, s)
    torch.testing.assert_close(got, want, **LOSS_TOL)
    assert got_grads[0].dtype == torch.bfloat16 and got_grads[1].dtype == target_dtype
    for g, w in zip(got_grads, want_grads):  # both round the same fp32 gradient: within one bf16 ulp
        torch.testing.assert_close(g.float(), w.float(), rtol=2**-7, atol=2e-5)


def test_bad_offsets_are_refused():
    a, b = _unit(4, 8), _unit(6, 8)
    with pytest.raises(ValueError, match="label offset 3"):
        rows_cross_entropy(a, b, torch.tensor(1.0), 3)
