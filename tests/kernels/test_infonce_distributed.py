"""The fused InfoNCE over a real gathered batch: 2 gloo processes (Triton interpreted in each), each
scoring its half against the gathered features, give the 1-process eager loss on the whole batch
and, after averaging gradients over ranks, the same gradients (fp32: atol 1e-5, rtol 1e-4).

Batch 22 over 2 ranks: 11 rows per rank, not a multiple of any tile; the labels are offset by r·11.
The child processes inherit ``TRITON_INTERPRET=1`` from the environment, so triton imports in
interpreter mode there too.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster.env import free_port
from pretrain.losses import symmetric_info_nce
from tests.contrastive_inputs import seeded_encoders_and_batch

pytestmark = [pytest.mark.integration, pytest.mark.multiprocess]
BATCH, DIM, WORLD = 22, 12, 2


def loss_and_grads(rank: int, world: int, fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    image_encoder, text_encoder, images, texts, log_scale = seeded_encoders_and_batch(BATCH, DIM, log_scale=3.0)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    loss = symmetric_info_nce(image_encoder(images[rows]), text_encoder(texts[rows]), log_scale.exp(), rank, world,
                              fused=fused)
    loss.backward()
    return loss.detach(), [p.grad for p in (*image_encoder.parameters(), *text_encoder.parameters(), log_scale)]


def worker(rank: int, port: int, out_dir: str) -> None:
    from kernels._triton import interpreter_ready  # noqa: PLC0415

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        loss, grads = loss_and_grads(rank, WORLD, fused=True)
        dist.all_reduce(loss)
        loss /= WORLD
        for grad in grads:
            dist.all_reduce(grad)
            grad /= WORLD
        torch.save({"loss": loss, "grads": grads, "triton": interpreter_ready()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fused_loss_over_two_processes_matches_the_eager_loss_on_the_whole_batch(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    expected_loss, expected_grads = loss_and_grads(0, 1, fused=False)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["triton"], f"rank {rank} ran the PyTorch fallback, not the interpreted Triton kernels"
        torch.testing.assert_close(got["loss"], expected_loss, rtol=1e-5, atol=1e-6)
        for got_grad, expected_grad in zip(got["grads"], expected_grads, strict=True):
            torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-5)
    assert expected_grads[-1].abs() > 0
