"""Global-batch InfoNCE: 2 gloo processes, each scoring its half of the batch against the gathered
features, give the 1-process loss on the whole batch and (after averaging gradients over ranks, as
data-parallel training does) the same gradients. And the gather leaves nothing behind that keeps the
process group (and gloo's threads) alive past ``destroy_process_group``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster.env import free_port
from pretrain.losses import symmetric_info_nce
from tests.contrastive_inputs import seeded_encoders_and_batch

pytestmark = [pytest.mark.integration, pytest.mark.multiprocess]
BATCH, DIM, WORLD = 8, 6, 2


def inputs() -> tuple[torch.nn.Linear, torch.nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic encoders and a global batch (identical in every process)."""
    return seeded_encoders_and_batch(BATCH, DIM, log_scale=2.5)


def loss_and_grads(rank: int, world: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    image_encoder, text_encoder, images, texts, log_scale = inputs()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    loss = symmetric_info_nce(image_encoder(images[rows]), text_encoder(texts[rows]), log_scale.exp(), rank, world)
    loss.backward()
    params = [*image_encoder.parameters(), *text_encoder.parameters(), log_scale]
    return loss.detach(), [p.grad for p in params]


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        loss, grads = loss_and_grads(rank, WORLD)
        dist.all_reduce(loss)
        loss /= WORLD  # the reported loss: the mean of the ranks' losses
        for grad in grads:  # data-parallel gradient averaging (DDP / DeepSpeed)
            dist.all_reduce(grad)
            grad /= WORLD
        torch.save({"loss": loss, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    expected_loss, expected_grads = loss_and_grads(0, 1)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], expected_loss, rtol=0, atol=1e-6)
        assert len(got["grads"]) == len(expected_grads) == 5
        for got_grad, expected_grad in zip(got["grads"], expected_grads):
            torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=1e-6)
    assert expected_grads[-1].abs() > 0  # the temperature gets a gradient too


def gloo_threads() -> int:
    """gloo's worker threads in this process (torch names them ``pt_gloo_runloop``)."""
    return sum((task / "comm").read_text().strip() == "pt_gloo_runloop" for task in Path("/proc/self/task").iterdir())


def teardown_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        loss_and_grads(rank, WORLD)  # gathers forward, reduce-scatters backward
        during = gloo_threads()
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"threads{rank}.json").write_text(json.dumps({"during": during, "after": gloo_threads()}))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc (Linux)")
def test_destroy_process_group_joins_gloo_threads_after_the_gather(tmp_path):
    """The deprecated ``torch.distributed.nn`` gather pinned the default group, so gloo's threads lived
    into interpreter exit, where one could abort the process (1 run in ~7 of the test above)."""
    mp.spawn(teardown_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        threads = json.loads((tmp_path / f"threads{rank}.json").read_text())
        assert threads["during"] > 0, threads  # the thread name is still torch's
        assert threads["after"] == 0, threads
