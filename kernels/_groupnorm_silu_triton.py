"""Triton kernels of y = SiLU(GroupNorm(x)) and its backward (imported only when Triton runs).

One program per (sample, group): it walks the group's channels × pixels in (BLOCK_C, BLOCK_HW) tiles,
addressing elements through the tensor's own strides, so NCHW and channels-last inputs both work
without a copy. Statistics are fp32 and two-pass (mean, then the centred variance, as PyTorch does),
whatever the input dtype. Undecorated; ``kernels._triton.launch`` wraps them.

Group totals reduce a flattened tile in one ``tl.sum`` and SiLU is written with ``tl.exp``: the same
math as ``tl.sum(tl.sum(...))`` and ``tl.sigmoid``, with fewer calls into Triton's library, which is
what costs time under the CPU interpreter.
"""

from __future__ import annotations

import triton.language as tl


def gn_silu_forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
    groups, chans_per_group, hw, width, eps,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // groups
    g = pid % groups
    local = tl.arange(0, BLOCK_C)
    chans = g * chans_per_group + local
    c_ok = local < chans_per_group
    count = chans_per_group * hw
    total = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    for start in range(0, hw, BLOCK_HW):
        pix = start + tl.arange(0, BLOCK_HW)
        ok = c_ok[:, None] & (pix < hw)[None, :]
        off = n * sxn + chans[:, None] * sxc + (pix // width)[None, :] * sxh + (pix % width)[None, :] * sxw
        total += tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(tl.reshape(total, [BLOCK_C * BLOCK_HW]), axis=0) / count
    sq = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    for start in range(0, hw, BLOCK_HW):
        pix = start + tl.arange(0, BLOCK_HW)
        ok = c_ok[:, None] & (pix < hw)[None, :]
        off = n * sxn + chans[:, None] * sxc + (pix // width)[None, :] * sxh + (pix % width)[None, :] * sxw
        d = tl.where(ok, tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32) - mean, 0.0)
        sq += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(tl.reshape(sq, [BLOCK_C * BLOCK_HW]), axis=0) / count + eps)
    w = tl.load(w_ptr + chans, mask=c_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + chans, mask=c_ok, other=0.0).to(tl.float32)
    for start in range(0, hw, BLOCK_HW):
        pix = start + tl.arange(0, BLOCK_HW)
        ok = c_ok[:, None] & (pix < hw)[None, :]
        h_idx = (pix // width)[None, :]
        w_idx = (pix % width)[None, :]
        x = tl.load(x_ptr + n * sxn + chans[:, None] * sxc + h_idx * sxh + w_idx * sxw, mask=ok, other=0.0)
        a = (x.to(tl.float32) - mean) * rstd * w[:, None] + b[:, None]
        y = a / (1.0 + tl.exp(-a))
        tl.store(y_ptr + n * syn + chans[:, None] * syc + h_idx * syh + w_idx * syw, y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)


def gn_silu_backward_kernel(
    x_ptr, w_ptr, b_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr,
    groups, chans_per_group, channels, hw, width,
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, son, soc, soh, sow,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """dx of the group, and this sample's partial dweight/dbias (summed over samples by the caller)."""
    pid = tl.program_id(0)
    n = pid // groups
    g = pid % groups
    local = tl.arange(0, BLOCK_C)
    chans = g * chans_per_group + local
    c_ok = local < chans_per_group
    count = chans_per_group * hw
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    w = tl.load(w_ptr + chans, mask=c_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + chans, mask=c_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    db_acc = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    sum_dxhat = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    sum_dxhat_xhat = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    for start in range(0, hw, BLOCK_HW):
        pix = start + tl.arange(0, BLOCK_HW)
        ok = c_ok[:, None] & (pix < hw)[None, :]
        h_idx = (pix // width)[None, :]
        w_idx = (pix % width)[None, :]
        x = tl.load(x_ptr + n * sxn + chans[:, None] * sxc + h_idx * sxh + w_idx * sxw, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + n * sdn + chans[:, None] * sdc + h_idx * sdh + w_idx * sdw, mask=ok, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        a = xhat * w[:, None] + b[:, None]
        s = 1.0 / (1.0 + tl.exp(-a))
        da = tl.where(ok, dy * s * (1.0 + a * (1.0 - s)), 0.0)  # d SiLU(a) / da = s (1 + a (1 - s))
        dw_acc += da * xhat
        db_acc += da
        dxhat = da * w[:, None]
        sum_dxhat += dxhat
        sum_dxhat_xhat += dxhat * xhat
    tl.store(dw_ptr + n * channels + chans, tl.sum(dw_acc, axis=1), mask=c_ok)
    tl.store(db_ptr + n * channels + chans, tl.sum(db_acc, axis=1), mask=c_ok)
    mean_dxhat = tl.sum(tl.reshape(sum_dxhat, [BLOCK_C * BLOCK_HW]), axis=0) / count
    mean_dxhat_xhat = tl.sum(tl.reshape(sum_dxhat_xhat, [BLOCK_C * BLOCK_HW]), axis=0) / count
    for start in range(0, hw, BLOCK_HW):
        pix = start + tl.arange(0, BLOCK_HW)
        ok = c_ok[:, None] & (pix < hw)[None, :]
        h_idx = (pix // width)[None, :]
        w_idx = (pix % width)[None, :]
        x = tl.load(x_ptr + n * sxn + chans[:, None] * sxc + h_idx * sxh + w_idx * sxw, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + n * sdn + chans[:, None] * sdc + h_idx * sdh + w_idx * sdw, mask=ok, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        a = xhat * w[:, None] + b[:, None]
        s = 1.0 / (1.0 + tl.exp(-a))
        dxhat = dy * s * (1.0 + a * (1.0 - s)) * w[:, None]
        dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
        tl.store(dx_ptr + n * son + chans[:, None] * soc + h_idx * soh + w_idx * sow, dx.to(dx_ptr.dtype.element_ty), mask=ok)
