"""Symmetric InfoNCE without materialising the N×N logits (fused, chunked, Triton) and its reference.

CLIP's loss over a global batch of N pairs builds two N×N logit matrices and keeps them (and their
softmax) for backward: at N = 32k that is 4 GiB per matrix in fp32, per step. Here each of the two
cross-entropies is one :class:`ChunkedRowCrossEntropy`: the forward keeps one log-sum-exp per row
(the running max/sum over column tiles), the backward recomputes each logits tile from the
embeddings, so memory is O(N·D). For rank r of a gathered batch, the rows are that rank's n local
items and the columns the N gathered ones, label of row i = r·n + i; with one process the second
cross-entropy's rows are the first one's columns (its running lse *is* the per-column lse).

The Triton path runs on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (the tests); elsewhere
:func:`fused_symmetric_info_nce` uses the same chunked algorithm in PyTorch (:func:`chunked_rows_ce_torch`),
so turning ``kernels.fused_infonce`` on never changes the numbers beyond fp32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import launch, triton_runs_on

CHUNK = 1024  # columns per step of the PyTorch chunked fallback
# The Triton path scores in fp32 with IEEE products, whatever the inputs' dtype: the N×D embeddings
# are cheap to upcast, and Triton's interpreter computes bf16 ``tl.dot`` wrongly (measured: errors of
# 1e10 on a 16×16 product, triton 3.9.0), so a bf16/TF32 tile path could not be tested on CPU. Faster
# tiles are a tuning option to measure on a GPU.
PRECISION = "ieee"


def reference_rows_ce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """mean_i CE(s·a_i·Bᵀ, label i+offset), materialising the logits: the plain PyTorch reference."""
    labels = torch.arange(a.shape[0], device=a.device) + offset
    return F.cross_entropy(scale * a.float() @ b.float().T, labels)


def reference_symmetric_info_nce(
    predictions: torch.Tensor, targets: torch.Tensor, all_predictions: torch.Tensor, all_targets: torch.Tensor,
    scale: torch.Tensor, offset: int = 0,
) -> torch.Tensor:
    """½ (CE(P Tᵀ_all) + CE(T Pᵀ_all)) on unit embeddings; the local rows are ``offset`` into the gathered ones."""
    return 0.5 * (reference_rows_ce(predictions, all_targets, scale, offset)
                  + reference_rows_ce(targets, all_predictions, scale, offset))


def chunked_rows_ce_torch(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """The fused algorithm in PyTorch (running lse over column chunks); autograd keeps each chunk,
    so only the forward's peak is linear in N. The fallback where Triton cannot run."""
    a32, b32 = a.float(), b.float()
    lse = a32.new_full((a.shape[0],), float("-inf"))
    for start in range(0, b.shape[0], CHUNK):
        lse = torch.logaddexp(lse, torch.logsumexp(scale * a32 @ b32[start:start + CHUNK].T, dim=1))
    rows = torch.arange(a.shape[0], device=a.device)
    diag = scale * (a32 * b32[rows + offset]).sum(dim=1)
    return (lse - diag).mean()


def _tiles(dim: int) -> tuple[int, int, int]:
    block_d = max(16, 1 << (dim - 1).bit_length())
    # keep the per-program (BLOCK, BLOCK_D) tiles within registers as D grows (not tuned on a GPU yet)
    block = 64 if block_d <= 64 else 32 if block_d <= 256 else 16
    return block, block, block_d


class ChunkedRowCrossEntropy(torch.autograd.Function):
    """mean_i [lse_j(s·a_i·b_j) − s·a_i·b_{i+offset}] with Triton kernels; saves A, B, s and one lse per row."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int) -> torch.Tensor:
        from kernels import _infonce_triton as K  # noqa: PLC0415 - imports triton

        a, b = a.contiguous(), b.contiguous()
        if a.dtype != torch.float32 or b.dtype != torch.float32 or a.shape[1] != b.shape[1]:
            raise ValueError(f"rows {tuple(a.shape)} {a.dtype} and columns {tuple(b.shape)} {b.dtype} must be fp32 of one width")
        if not 0 <= offset <= b.shape[0] - a.shape[0]:
            raise ValueError(f"label offset {offset} puts rows 0..{a.shape[0] - 1} outside the {b.shape[0]} columns")
        scale32 = scale.detach().float().reshape(1).contiguous()
        ctx.scale_shape = scale.shape  # 0-dim from LearnableTemperature: its gradient keeps that shape
        n, m, dim = a.shape[0], b.shape[0], a.shape[1]
        block_m, block_n, block_d = _tiles(dim)
        lse = a.new_empty(n, dtype=torch.float32)
        diag = a.new_empty(n, dtype=torch.float32)
        launch(K.lse_rows_kernel, (-(-n // block_m),), a.device, a, b, scale32, lse, diag, n, m, dim, offset,
               a.stride(0), b.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=PRECISION)
        ctx.save_for_backward(a, b, scale32, lse)
        ctx.offset = offset
        return (lse - diag).mean()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        from kernels import _infonce_triton as K  # noqa: PLC0415

        a, b, scale32, lse = ctx.saved_tensors
        n, m, dim = a.shape[0], b.shape[0], a.shape[1]
        block_m, block_n, block_d = _tiles(dim)
        meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "PRECISION": PRECISION}
        grad_a = grad_b = grad_scale = None
        weight = grad_loss.float() / n  # d mean / d row loss
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            raw_a = a.new_empty((n, dim), dtype=torch.float32)
            raw_scale = a.new_empty(n, dtype=torch.float32)
            launch(K.grad_rows_kernel, (-(-n // block_m),), a.device, a, b, scale32, lse, raw_a, raw_scale,
                   n, m, dim, ctx.offset, a.stride(0), b.stride(0), raw_a.stride(0), **meta)
            grad_a = raw_a * (weight * scale32)
            grad_scale = (raw_scale.sum() * weight).reshape(ctx.scale_shape) if ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[1]:
            raw_b = b.new_empty((m, dim), dtype=torch.float32)
            launch(K.grad_cols_kernel, (-(-m // block_n),), b.device, a, b, scale32, lse, raw_b,
                   n, m, dim, ctx.offset, a.stride(0), b.stride(0), raw_b.stride(0), **meta)
            grad_b = raw_b * (weight * scale32)
        return grad_a, grad_b, grad_scale, None


def rows_cross_entropy(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """mean_i CE(s·a_i·Bᵀ, label i+offset) without the rows × columns logits: Triton where it runs,
    else the chunked PyTorch loop. Scored in fp32 (as :func:`reference_rows_ce`), whatever the inputs'
    dtype (under bf16 autocast the predictions may be bf16 and the text queries fp32); gradients
    return in each input's dtype."""
    a, b = a.float(), b.float()
    if triton_runs_on(a):
        return ChunkedRowCrossEntropy.apply(a, b, scale, offset)
    return chunked_rows_ce_torch(a, b, scale, offset)


def fused_symmetric_info_nce(
    predictions: torch.Tensor, targets: torch.Tensor, all_predictions: torch.Tensor, all_targets: torch.Tensor,
    scale: torch.Tensor, offset: int = 0,
) -> torch.Tensor:
    """Drop-in for :func:`reference_symmetric_info_nce` (same arguments, same value), memory linear in N."""
    return 0.5 * (rows_cross_entropy(predictions, all_targets, scale, offset)
                  + rows_cross_entropy(targets, all_predictions, scale, offset))
