"""Triton kernels of the chunked cross-entropy over s·A Bᵀ (imported only when Triton runs).

Row i of the logits is s·a_i·b_j over all j; its loss is lse_i − s·a_i·b_{i+offset}. The kernels walk
the columns in tiles of BLOCK_N and keep a running max and sum of exponentials per row (the online
softmax of FlashAttention), so nothing of size rows × columns is ever stored: the forward saves one
log-sum-exp per row, and the backward recomputes each logits tile from A, B and that lse.

The functions are undecorated; ``kernels._triton.launch`` wraps them (compiled or interpreted).
Each program holds a full embedding row (BLOCK_D = next power of two ≥ D) so A's tile is loaded once.
Inputs are fp32 (``kernels.infonce`` upcasts); PRECISION is the ``tl.dot`` input precision ("ieee").
"""

from __future__ import annotations

import triton.language as tl


def lse_rows_kernel(
    a_ptr, b_ptr, scale_ptr, lse_ptr, diag_ptr,
    n_rows, n_cols, dim, offset,
    stride_a, stride_b,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per row: lse_i = log Σ_j exp(s·a_i·b_j) and diag_i = s·a_i·b_{i+offset}."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    a = tl.load(a_ptr + rows[:, None] * stride_a + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < dim), other=0.0)
    scale = tl.load(scale_ptr).to(tl.float32)
    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    diag = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        b = tl.load(b_ptr + cols[:, None] * stride_b + dims[None, :], mask=col_ok[:, None] & (dims[None, :] < dim), other=0.0)
        logits = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max
        diag += tl.sum(tl.where(cols[None, :] == rows[:, None] + offset, logits, 0.0), axis=1)
    tl.store(lse_ptr + rows, run_max + tl.log(run_sum), mask=row_ok)
    tl.store(diag_ptr + rows, diag, mask=row_ok)


def grad_rows_kernel(
    a_ptr, b_ptr, scale_ptr, lse_ptr, grad_a_ptr, grad_scale_ptr,
    n_rows, n_cols, dim, offset,
    stride_a, stride_b, stride_ga,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per row block: Σ_j g_ij b_j and Σ_j g_ij a_i·b_j, with g_ij = softmax_ij − [j = i+offset]."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    dim_ok = dims < dim
    a = tl.load(a_ptr + rows[:, None] * stride_a + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr).to(tl.float32)
    grad_a = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    grad_scale = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        b = tl.load(b_ptr + cols[:, None] * stride_b + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        dots = tl.dot(a, tl.trans(b), input_precision=PRECISION)
        prob = tl.where(col_ok[None, :], tl.exp(dots * scale - lse[:, None]), 0.0)
        g = prob - tl.where(cols[None, :] == rows[:, None] + offset, 1.0, 0.0)
        g = tl.where(row_ok[:, None], g, 0.0)
        grad_a += tl.dot(g, b, input_precision=PRECISION)
        grad_scale += tl.sum(g * dots, axis=1)
    tl.store(grad_a_ptr + rows[:, None] * stride_ga + dims[None, :], grad_a, mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(grad_scale_ptr + rows, grad_scale, mask=row_ok)


def grad_cols_kernel(
    a_ptr, b_ptr, scale_ptr, lse_ptr, grad_b_ptr,
    n_rows, n_cols, dim, offset,
    stride_a, stride_b, stride_gb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per column block: Σ_i g_ij a_i (the same g as :func:`grad_rows_kernel`, walked by rows)."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < n_cols
    dim_ok = dims < dim
    b = tl.load(b_ptr + cols[:, None] * stride_b + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
    scale = tl.load(scale_ptr).to(tl.float32)
    grad_b = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, n_rows, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        a = tl.load(a_ptr + rows[:, None] * stride_a + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        dots = tl.dot(b, tl.trans(a), input_precision=PRECISION)  # (columns, rows): the transposed tile
        prob = tl.where(row_ok[None, :] & col_ok[:, None], tl.exp(dots * scale - lse[None, :]), 0.0)
        g = prob - tl.where(cols[:, None] == rows[None, :] + offset, 1.0, 0.0)
        g = tl.where(row_ok[None, :], g, 0.0)
        grad_b += tl.dot(g, a, input_precision=PRECISION)
    tl.store(grad_b_ptr + cols[:, None] * stride_gb + dims[None, :], grad_b, mask=col_ok[:, None] & dim_ok[None, :])
