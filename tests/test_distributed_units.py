"""Fast pieces of the distributed trainer: presets, batch split, stream resharding, preemption flag,
launcher exit codes, EMA arithmetic, activation checkpointing equivalence, checkpoint store."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch import nn

from cluster.preemption import REQUEUE_EXIT_CODE, PreemptionWatcher
from data_pipeline.dataset import InMemoryImageTextStream
from pretrain.checkpoint import RNGState, reshard
from pretrain.checkpoint_store import CheckpointStore
from pretrain.config import RunConfig, load_run_config
from pretrain.config_io import ConfigError
from pretrain.diffusion import DiffDisObjective
from pretrain.ema import EMA
from pretrain.engine import Runtime, deepspeed_config
from pretrain.launch import combined_exit_code


def test_deepspeed_preset_override_and_dotted_override():
    assert load_run_config(None, ["deepspeed=zero3"]).deepspeed.zero_stage == 3
    assert load_run_config(None, ["deepspeed=zero3", "deepspeed.zero_stage=2"]).deepspeed.zero_stage == 2
    with pytest.raises(ConfigError, match="zero7"):
        load_run_config(None, ["deepspeed=zero7"])


def test_global_batch_is_micro_times_accumulation_times_world():
    config = load_run_config(None, ["train.batch_size=24", "train.grad_accum=3", "optim.grad_clip=0"])
    ds = deepspeed_config(config, world_size=2, runtime=Runtime(torch.device("cpu"), "gloo", False), load_universal=True)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 3, 24)
    assert ds["gradient_clipping"] == 0.0 and ds["checkpoint"] == {"load_universal": True}
    with pytest.raises(ValueError, match="grad_accum"):
        deepspeed_config(config, world_size=5, runtime=Runtime(torch.device("cpu"), "gloo", False))


def _stream(rank, world, n=23):
    import numpy as np  # noqa: PLC0415

    images = np.zeros((n, 2, 2, 3), dtype=np.uint8)
    return InMemoryImageTextStream(images, np.arange(n) % 10, [f"k{i}" for i in range(n)], lambda label, rng: "c", 7, rank, world)


@pytest.mark.parametrize(("old_world", "new_world", "steps", "micro_old"), [(2, 1, 3, 2), (1, 2, 3, 4), (2, 4, 2, 2), (4, 2, 1, 2)])
def test_stream_reshard_continues_without_skips_or_repeats(old_world, new_world, steps, micro_old):
    """The same global batch at another world size: the new ranks together take exactly the samples the
    old ranks would have taken next (same epoch permutation, global position offset x world)."""
    old = [_stream(r, old_world) for r in range(old_world)]
    consumed = [next(s)["key"] for _ in range(steps * micro_old) for s in old]
    global_batch = micro_old * old_world
    expected_next = [next(s)["key"] for _ in range(micro_old) for s in old]  # the uninterrupted run's next batch
    saved = [s.state_dict() for s in old]
    for s, state in zip(old, saved):
        s.load_state_dict({**state, "offset": state["offset"] - micro_old})  # undo the peek
    saved = [s.state_dict() for s in old]
    new = [_stream(r, new_world) for r in range(new_world)]
    for rank, s in enumerate(new):
        s.load_state_dict(reshard("data", s, saved, rank, new_world))
    got_next = [next(s)["key"] for _ in range(global_batch // new_world) for s in new]
    assert sorted(got_next) == sorted(expected_next)
    assert not set(got_next) & set(consumed)


def test_stream_reshard_past_the_epoch_end_moves_to_the_next_epoch():
    stream = _stream(0, 2)
    assert stream.reshard_state([{"epoch": 0, "offset": 11}] * 2, 0, 4) == {"epoch": 1, "offset": 0}
    with pytest.raises(ValueError, match="different stream positions"):
        stream.reshard_state([{"epoch": 0, "offset": 3}, {"epoch": 0, "offset": 4}], 0, 1)


def test_reshard_keeps_equal_states_and_rejects_differing_ones_without_a_hook():
    class Plain:
        pass

    assert reshard("trainer", Plain(), [{"step": 5}, {"step": 5}], 0, 1) == {"step": 5}
    with pytest.raises(ValueError, match="'odd'.*reshard_state"):
        reshard("odd", Plain(), [{"a": 1}, {"a": 2}], 0, 3)
    rng = RNGState(seed=3)
    states = [{"python": "old0"}, {"python": "old1"}]
    assert rng.reshard_state(states, 1, 4) == {"python": "old1"}
    fresh2, fresh3 = rng.reshard_state(states, 2, 4), rng.reshard_state(states, 3, 4)
    assert fresh2["torch"] != fresh3["torch"]


def test_preemption_flag_is_set_by_sigusr1_and_agreed_by_max():
    watcher = PreemptionWatcher()
    try:
        assert not watcher.agreed() and not watcher.agreed(lambda v: max(v, 0))
        assert watcher.agreed(lambda v: max(v, 1))  # another rank got the signal
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watcher.requested == signal.SIGUSR1 and watcher.agreed()
    finally:
        watcher.close()


def test_launcher_exit_code_keeps_the_requeue_request():
    assert combined_exit_code([0, 0]) == 0
    assert combined_exit_code([REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE]) == REQUEUE_EXIT_CODE == 75
    assert combined_exit_code([0, REQUEUE_EXIT_CODE]) == REQUEUE_EXIT_CODE
    assert combined_exit_code([REQUEUE_EXIT_CODE, 1]) == 1
    assert combined_exit_code([-9, 0]) == 137


def test_ema_follows_the_warmed_up_decay():
    module = nn.Linear(2, 1)
    frozen = nn.Linear(1, 1).requires_grad_(False)
    module.add_module("frozen", frozen)
    ema = EMA(module, decay=0.5, keep=True)
    assert set(ema.shadow) == {"weight", "bias"}
    start = module.weight.detach().clone()
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update()  # decay min(0.5, 1/10) = 0.1
    torch.testing.assert_close(ema.shadow["weight"], 0.1 * start + 0.9 * module.weight.detach())
    weights = ema.weights(module.state_dict())
    torch.testing.assert_close(weights["frozen.weight"], frozen.weight)
    snapshot = ema.weights(module.state_dict(), copy=True)  # what a background checkpoint write gets
    before = ema.shadow["weight"].clone()
    ema.update()
    assert weights["weight"] is ema.shadow["weight"] and not torch.equal(before, ema.shadow["weight"])
    assert torch.equal(snapshot["weight"], before)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(make_model, encode, tiny_config):
    def run(checkpointing: bool):
        model = make_model(seed=1).train()
        model.unet.gradient_checkpointing = checkpointing
        objective = DiffDisObjective(model, tiny_config.diffusion, tiny_config.loss)
        torch.manual_seed(5)
        pixels = torch.rand(4, 3, 16, 16) * 2 - 1
        losses = objective(pixels=pixels, **encode(["a 1", "a 2", "digit 3", "four"]))
        losses["loss"].backward()
        return losses["loss"].detach(), {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}

    loss_plain, grads_plain = run(False)
    loss_ckpt, grads_ckpt = run(True)
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=1e-6)
    assert grads_plain.keys() == grads_ckpt.keys() and len(grads_plain) > 50
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_frozen_text_encoder_is_left_out_of_the_optimizer(make_model):
    from pretrain.engine import param_groups  # noqa: PLC0415

    model = make_model(text_encoder=RunConfig().model.text_encoder.__class__(trainable=False))
    optimised = {id(p) for group in param_groups(model, 0.01) for p in group["params"]}
    assert all(not p.requires_grad and id(p) not in optimised for p in model.text_encoder.parameters())
    assert any(id(p) in optimised for p in model.unet.parameters())


def test_checkpoint_store_lists_only_complete_step_directories(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    assert store.tags() == []
    for step, complete in ((2, True), (4, False), (10, True)):
        store.write_text("x", f"step-{step:09d}", "a.bin")
        if complete:
            store.write_text("{}", f"step-{step:09d}", "COMPLETE")
    (tmp_path / "ck" / "universal" / "step-000000002").mkdir(parents=True)
    assert store.tags() == ["step-000000002", "step-000000004", "step-000000010"]
    assert store.complete_tags() == ["step-000000002", "step-000000010"]
    source = tmp_path / "f.bin"
    source.write_bytes(b"abc")
    store.put(source, "step-000000004", "sub", "f.bin")
    assert not source.exists() and store.files("step-000000004") == ["a.bin", "sub/f.bin"]
