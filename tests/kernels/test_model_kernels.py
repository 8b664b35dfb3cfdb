"""The tiny DiffDis objective with every kernel switched on (run config ``kernels.*``) gives the same
loss and gradients as with them off, on CPU under Triton's interpreter.

fp32 tolerances: losses rtol 1e-5 / atol 1e-6; every parameter's gradient rtol 1e-3 and atol 1e-5 ×
the largest gradient element of the model (measured: largest 0.58, largest difference 1.5e-6, in the
text embeddings; an absolute floor is needed because some gradients are exactly zero in theory, e.g.
the key biases of softmax attention, and hold only rounding noise on both paths).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import replace

import torch

from kernels import KernelsConfig, apply_kernels
from kernels.groupnorm_silu import FusedGroupNormSiLU
from pretrain.config import load_run_config
from pretrain.objectives import build_objective

CAPTIONS = ["a handwritten 7", "a handwritten 3", "digit 5 (five)"]  # batch 3: odd, below every tile


def _loss_and_grads(objective, tokens, pixels):
    objective.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same timesteps, noise and CFG drops on both runs
    out = objective(**tokens, pixels=pixels)
    out["loss"].backward()
    return out, {name: p.grad.clone() for name, p in objective.named_parameters() if p.grad is not None}


def test_tiny_objective_with_kernels_on_matches_kernels_off(make_model, encode, tiny_config, monkeypatch):
    import kernels.groupnorm_silu as G  # noqa: PLC0415
    import kernels.infonce as I  # noqa: PLC0415

    launched = Counter()
    for module in (G, I):
        real = module.launch
        monkeypatch.setattr(module, "launch", lambda fn, *a, real=real, **k: (launched.update([fn.__name__]), real(fn, *a, **k)))

    off_config = load_run_config(None, [])
    on_config = load_run_config(None, ["kernels.fused_infonce=true", "kernels.fused_groupnorm_silu=true"])
    # 2 groups instead of the tiny config's 8: the interpreter's cost is per (sample, group) program;
    # odd group counts and tile edges are covered by test_groupnorm_silu.py
    model = make_model(unet=replace(tiny_config.model.unet, norm_groups=2))
    fused_model = copy.deepcopy(model)
    apply_kernels(model, off_config.kernels)
    apply_kernels(fused_model, on_config.kernels)
    assert sum(isinstance(m, FusedGroupNormSiLU) for m in fused_model.modules()) > 0
    off = build_objective(model, off_config)
    on = build_objective(fused_model, on_config)
    on.load_state_dict(off.state_dict())  # the same temperature too

    tokens = encode(CAPTIONS)
    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    want, want_grads = _loss_and_grads(off, tokens, pixels)
    assert not launched
    got, got_grads = _loss_and_grads(on, tokens, pixels)

    # the Triton kernels really ran, forward and backward
    assert set(launched) == {"gn_silu_forward_kernel", "gn_silu_backward_kernel", "lse_rows_kernel",
                             "grad_rows_kernel", "grad_cols_kernel"}, launched
    for key in ("loss", "loss_gen", "loss_align"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    assert got_grads.keys() == want_grads.keys()
    largest = max(g.abs().max() for g in want_grads.values())
    for name, want_grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], want_grad, rtol=1e-3, atol=1e-5 * largest.item(),
                                   msg=lambda m, name=name: f"grad of {name}: {m}")
    apply_kernels(model, KernelsConfig())  # leave the process-wide attention choice at auto
