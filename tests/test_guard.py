"""The NaN / loss-spike guard: its decisions as plain Python, then on the real DeepSpeed engine (faults
injected with ``train.guard.inject_faults``): skipped steps leave weights, Adam moments, LR and EMA
untouched; repeated trouble rolls back to the last good checkpoint and skips the batches after it; too
many rollbacks stop with exit 65; with 2 processes a fault on one rank makes both take the same
decision; resume is still exact with the guard's state in the checkpoint."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.checkpoint import tag_for
from pretrain.config import CONFIGS_DIR, load_run_config
from pretrain.config_io import ConfigError
from pretrain.guard import (
    DIVERGED_EXIT_CODE,
    LOSS_SPIKE,
    NONFINITE_GRAD,
    NONFINITE_LOSS,
    SPIKE_INJECT_FACTOR,
    Fault,
    FaultInjector,
    GuardConfig,
    TrainingGuard,
    corrupt,
    parse_faults,
    poisoned,
)
from pretrain.launch import combined_exit_code

# -- decisions, no engine ------------------------------------------------------------------------


def _guard(**fields) -> TrainingGuard:
    config = GuardConfig(**fields)
    config.validate()
    return TrainingGuard(config)


def test_nonfinite_losses_are_bad_and_spikes_need_a_full_window():
    guard = _guard(window=4, spike_factor=3.0)
    assert guard.check_loss(float("nan")).kind == NONFINITE_LOSS
    assert guard.check_loss(float("inf")).kind == NONFINITE_LOSS
    for step, loss in enumerate([1.0, 1.2, 0.9], start=1):
        assert guard.check_loss(100.0) is None  # no spike test before `window` accepted steps
        assert guard.end_step(step, None, loss) is None
    guard.end_step(4, None, 1.1)
    assert guard.spike_threshold() == pytest.approx(3.0 * 1.05)  # median(1.0, 1.2, 0.9, 1.1)
    assert guard.check_loss(3.14) is None
    assert guard.check_loss(3.16) == Fault(LOSS_SPIKE, 3.16)
    # a skipped step's loss stays out of the history: the median is not dragged up by the spike
    guard.end_step(5, Fault(LOSS_SPIKE, 50.0), 50.0)
    assert guard.spike_threshold() == pytest.approx(3.0 * 1.05)


def test_repeated_trouble_rolls_back_then_stops():
    guard = _guard(bad_window=10, max_bad_steps=3, max_rollbacks=1)
    bad = Fault(NONFINITE_LOSS, float("nan"))
    assert guard.end_step(3, bad, float("nan")).action == "skip"
    assert guard.end_step(12, bad, float("nan")).action == "skip"  # step 3 left the 10-step window
    assert guard.end_step(13, bad, float("nan")).action == "skip"
    event = guard.end_step(14, bad, float("nan"))
    assert (event.kind, event.step, event.action) == (NONFINITE_LOSS, 14, "rollback")
    assert guard.rollback_before() == 12  # the first bad step still in the window
    guard.rolled_back()
    assert [guard.end_step(s, bad, float("nan")).action for s in (11, 12, 13)] == ["skip", "skip", "stop"]
    assert guard.totals() == {"events": 7, "skipped_steps": 7, "rollbacks": 1, NONFINITE_LOSS: 7, LOSS_SPIKE: 0,
                              NONFINITE_GRAD: 0}
    assert _guard(max_rollbacks=0, max_bad_steps=1).end_step(1, bad, 0.0).action == "stop"


def test_guard_state_round_trips_through_json():
    guard = _guard(window=3)
    for step, loss in enumerate([2.0, 1.0, 3.0, 4.0], start=1):
        guard.end_step(step, None, loss)
    guard.end_step(5, Fault(NONFINITE_GRAD, float("inf")), 1.0)
    guard.drawn = 7
    copy = _guard(window=3)
    copy.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert copy.state_dict() == guard.state_dict() and list(copy.history) == [1.0, 3.0, 4.0]
    assert copy.spike_threshold() == guard.spike_threshold() == 9.0


def test_fault_specs_parse_and_bad_ones_name_the_field():
    specs = parse_faults("nan@12, spike@3-4:1,gradnan@20+")
    injector = FaultInjector("nan@12, spike@3-4:1,gradnan@20+", rank=1)
    assert [injector.kind_at(b) for b in (2, 3, 4, 5, 12, 19, 20, 999)] == [None, "spike", "spike", None, "nan", None,
                                                                          "gradnan", "gradnan"]
    assert FaultInjector("spike@3-4:1", rank=0).kind_at(3) is None and specs[0].rank is None
    assert not FaultInjector(None, rank=0)
    for bad in ("nan12", "nan@0", "nan@5-3", "boom@3", "nan@3:x"):
        with pytest.raises(ValueError, match="inject_faults"):
            parse_faults(bad)
    with pytest.raises(ConfigError, match=r"train\.guard: inject_faults: cannot parse 'nan12'"):
        load_run_config(None, ["train.guard.inject_faults=nan12"])
    with pytest.raises(ConfigError, match=r"train\.guard: spike_factor=1\.0 must be > 1"):
        load_run_config(None, ["train.guard.spike_factor=1.0"])
    with pytest.raises(ConfigError, match=r"max_bad_steps=9 must lie in \[1, bad_window=4\]"):
        load_run_config(None, ["train.guard.bad_window=4", "train.guard.max_bad_steps=9"])


def test_corruptions_and_poison():
    x = torch.tensor(2.0, requires_grad=True)
    assert math.isnan(corrupt(x * 3, "nan").item()) and corrupt(x * 3, "spike").item() == 6 * SPIKE_INJECT_FACTOR
    hidden = corrupt(x * 3, "gradnan")
    assert hidden.item() == 6.0  # a finite loss ...
    hidden.backward()
    assert math.isnan(x.grad.item())  # ... with a NaN gradient
    x.grad = None
    poisoned(x * 0).backward()  # NaN even where the true gradient is 0
    assert math.isnan(x.grad.item())


def test_launcher_reports_a_workers_own_exit_code_before_a_signal_death():
    assert combined_exit_code([-15, DIVERGED_EXIT_CODE]) == DIVERGED_EXIT_CODE == 65
    assert combined_exit_code([-9, 0]) == 137


# -- the real engine -------------------------------------------------------------------------------
BASE = ["train.batch_size=8", "train.log_every=1", "train.keep_last=0", "optim.warmup_steps=2"]


def _config(*overrides):
    return load_run_config(CONFIGS_DIR / "tiny.yaml", [*BASE, *overrides])


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _events(run: Path) -> list[tuple]:
    return [(r["event"], r["step"], r["action"]) for r in _lines(run) if "event" in r]


def _steps(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in _lines(run) if "event" not in r}


def _steps_all(run: Path) -> list[dict]:
    return [r for r in _lines(run) if "event" not in r]


def _state(run: Path, step: int, rank: int = 0) -> dict:
    return json.loads((run / "checkpoints" / tag_for(step) / "trainer_state" / f"rank-{rank:05d}.json").read_text())


def _snapshot(trainer) -> dict:
    optimizer = trainer.engine.optimizer  # ZeRO 1/2: fp32 master partitions and their Adam state
    masters = optimizer.single_partition_of_fp32_groups
    return {
        "weights": {k: v.detach().clone() for k, v in trainer.engine.module.named_parameters()},
        "master": [p.detach().clone() for p in masters],
        "exp_avg": [optimizer.optimizer.state[p]["exp_avg"].clone() for p in masters if p in optimizer.optimizer.state],
        "ema": {k: v.clone() for k, v in trainer.ema.shadow.items()},
        "lr_epoch": trainer.engine.lr_scheduler.last_epoch,
    }


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


@pytest.fixture(scope="module")
def skipping(tmp_path_factory):
    """10 steps of 2 micro batches with EMA; a NaN loss at batch 4, a x1000 spike at 7, a NaN gradient
    behind a finite loss at 9; snapshots around every step."""
    from pretrain.trainer import Trainer  # noqa: PLC0415

    class Recording(Trainer):
        def optimizer_step(self):
            before = _snapshot(self)
            result = super().optimizer_step()
            self.snapshots[self.counter.step + 1] = before, _snapshot(self)
            return result

    config = _config("train.steps=10", "train.grad_accum=2", "train.ema_decay=0.9", "train.checkpoint_every=5",
                     "train.guard.window=3", "train.guard.inject_faults=nan@4,spike@7,gradnan@9")
    run = tmp_path_factory.mktemp("skip") / "run"
    trainer = Recording(config, run)
    trainer.snapshots = {}
    trainer.train()
    return trainer, run, config


@pytest.mark.integration
def test_bad_steps_are_skipped_without_touching_the_weights(skipping):
    trainer, run, _ = skipping
    events = [r for r in _lines(run) if "event" in r]
    assert [(e["event"], e["step"], e["action"]) for e in events] == [
        (NONFINITE_LOSS, 4, "skip"), (LOSS_SPIKE, 7, "skip"), (NONFINITE_GRAD, 9, "skip")]
    assert events[0]["value"] == "nan" and events[2]["value"] == "inf"
    assert events[1]["value"] > 100 * _steps(run)[6]["loss"]  # the spike, x1000
    for step in (4, 7, 9):  # weights, fp32 masters, Adam moments, EMA and LR schedule: as before the step
        before, after = trainer.snapshots[step]
        assert _same(before, after), step
    before, after = trainer.snapshots[5]
    assert not _same(before["weights"], after["weights"]) and after["lr_epoch"] == before["lr_epoch"] + 1
    assert trainer.engine.skipped_steps == 3 and trainer.engine.global_steps == 10  # 7 updates in 10 steps
    assert all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())
    assert _steps(run)[4]["loss"] is None and _steps(run)[9]["grad_norm"] is None  # NaN/inf written as null
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: PLC0415

    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    assert [(s.step, s.value) for s in board.Scalars("guard/events")] == [(4, 1), (7, 2), (9, 3)]
    assert [s.value for s in board.Scalars(f"guard/{LOSS_SPIKE}")] == [0, 1, 1]


@pytest.mark.integration
def test_resume_with_the_guard_takes_the_same_decisions(skipping, tmp_path):
    """The spike at step 7 is judged against the median of steps 3, 5 and 6: after a resume from step 5
    that history comes from the checkpoint, and the run is the same as the uninterrupted one."""
    from pretrain.trainer import Trainer  # noqa: PLC0415

    _, straight, config = skipping
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / tag_for(5), resumed / "checkpoints" / tag_for(5))
    shutil.copytree(straight / "tokenizer", resumed / "tokenizer")
    history = _state(straight, 5)["guard"]["history"]
    assert history == pytest.approx([_steps(straight)[s]["loss"] for s in (2, 3, 5)], abs=1e-6)
    Trainer(config, resumed, resume="auto").train()
    assert _events(resumed) == _events(straight)[1:]
    expected, got = _steps(straight), _steps(resumed)
    assert sorted(got) == list(range(6, 11))
    for step in got:
        for key in ("loss", "loss_gen", "loss_align", "lr", "grad_norm"):
            assert got[step][key] == pytest.approx(expected[step][key], abs=1e-6, nan_ok=True), (step, key)
    final_a, final_b = _state(straight, 10), _state(resumed, 10)
    assert final_b["guard"].pop("history") == pytest.approx(final_a["guard"].pop("history"), abs=1e-6)
    assert final_b == final_a  # step, data position, RNG, EMA bookkeeping, guard counters


@pytest.mark.integration
def test_repeated_faults_roll_back_and_skip_the_batches_after_the_checkpoint(tmp_path):
    """NaN at batches 8, 9, 10 with max_bad_steps=3: at step 10 the run goes back to step 6 (the newest
    complete checkpoint before the trouble), keeps its data position, and trains steps 7-12 on
    batches 11-16."""
    from pretrain.trainer import Trainer  # noqa: PLC0415

    class Recording(Trainer):
        def rollback(self, event):
            done = super().rollback(event)
            self.after_rollback = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return done

    run = tmp_path / "run"
    config = _config("train.steps=12", "train.checkpoint_every=3", "train.guard.bad_window=4", "train.guard.max_bad_steps=3",
                     "train.guard.inject_faults=nan@8-10")
    trainer = Recording(config, run)
    trainer.train()
    events = [r for r in _lines(run) if "event" in r]
    assert _events(run) == [(NONFINITE_LOSS, 8, "skip"), (NONFINITE_LOSS, 9, "skip"), (NONFINITE_LOSS, 10, "rollback")]
    assert (events[-1]["to_step"], events[-1]["batch"]) == (6, 10)
    # the weights are exactly checkpoint 6's
    saved = load_file(str(run / "checkpoints" / tag_for(6) / "model" / "model.safetensors"))
    assert saved.keys() <= trainer.after_rollback.keys() and saved
    for key, value in saved.items():
        assert torch.equal(trainer.after_rollback[key], value), key
    # data position: 16 batches of 8 drawn for 12 steps; the 3 skipped batches never came back
    final = _state(run, 12)
    assert final["trainer"] == {"step": 12} and final["guard"]["drawn"] == 16 and final["guard"]["rollbacks"] == 1
    assert final["data"] == {"epoch": 0, "offset": 16 * 8}
    assert _state(run, 6)["data"] == {"epoch": 0, "offset": 6 * 8}
    # step 7 ran twice: on batch 7 before the rollback and on batch 11 after it (same noise, other data)
    sevens = [r["loss"] for r in _steps_all(run) if r["step"] == 7]
    assert len(sevens) == 2 and sevens[0] != pytest.approx(sevens[1], abs=1e-6)
    assert all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())
    # iterations: a step record each, but the rolled-back one (10), which has its event
    iterations = len(_steps_all(run)) + sum(1 for e in events if e["action"] == "rollback")
    assert iterations == 16  # 12 steps + 4 lost (7 trained again, 8-10 skipped) for 3 faults


def _cli_train(run: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``diffdis train`` in one process of its own (no --nproc)."""
    from tests.test_distributed import ROOT, clean_env  # noqa: PLC0415

    command = [sys.executable, "-m", "pretrain.cli", "train", "--config", str(CONFIGS_DIR / "tiny.yaml"), "--out", str(run),
               *BASE, *overrides]
    return subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_zero3_skips_bad_steps_too(tmp_path):
    """ZeRO-3 (partitioned weights, its own overflow clean-up), 2 micro batches: the learned temperature
    read in each forward and the LR schedule do not move across the two skipped steps."""
    run = tmp_path / "run"
    result = _cli_train(run, "deepspeed=zero3", "train.grad_accum=2", "train.steps=4", "train.checkpoint_every=100",
                        "optim.warmup_steps=20", "train.guard.inject_faults=nan@2,gradnan@3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _events(run) == [(NONFINITE_LOSS, 2, "skip"), (NONFINITE_GRAD, 3, "skip")]
    steps = _steps(run)
    assert steps[1]["logit_scale"] != steps[2]["logit_scale"] == steps[3]["logit_scale"] == steps[4]["logit_scale"]
    assert steps[1]["lr"] == steps[2]["lr"] == steps[3]["lr"] < steps[4]["lr"]  # 2 schedule steps in 4 steps
    weights = load_file(str(run / "checkpoints" / tag_for(4) / "model" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.integration
def test_too_many_rollbacks_stop_with_exit_65(tmp_path):
    """A NaN at every batch from 5 on: skip 5, roll back at 6 to step 4, skip, then stop (no rollback left)."""
    run = tmp_path / "run"
    result = _cli_train(run, "train.steps=20", "train.checkpoint_every=2", "train.guard.bad_window=4",
                        "train.guard.max_bad_steps=2", "train.guard.max_rollbacks=1", "train.guard.inject_faults=nan@5+")
    assert result.returncode == DIVERGED_EXIT_CODE == 65, result.stderr[-3000:]
    assert "training diverged at step 6: nonfinite_loss" in result.stderr
    assert "train.guard.max_rollbacks=1" in result.stderr and "exiting with 65" in result.stderr
    assert _events(run) == [(NONFINITE_LOSS, 5, "skip"), (NONFINITE_LOSS, 6, "rollback"),
                            (NONFINITE_LOSS, 5, "skip"), (NONFINITE_LOSS, 6, "stop")]
    assert (run / "checkpoints" / "latest").read_text() == tag_for(4)


# -- two processes ---------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.multiprocess
def test_a_fault_on_one_rank_makes_every_rank_take_the_same_decision(tmp_path):
    """ZeRO-2, 2 gloo processes, 2 micro batches per step: a spike, a NaN loss and a NaN gradient on
    rank 1 only give the same events, guard states and final weights as the same faults on both ranks."""
    from tests.test_distributed import train  # noqa: PLC0415

    common = ["deepspeed=zero2", "train.grad_accum=2", "train.steps=7", "train.guard.window=3"]  # spike test from step 4
    one, both = tmp_path / "rank1", tmp_path / "both"
    train(one, *common, "train.guard.inject_faults=spike@4:1,nan@5:1,gradnan@7:1")
    train(both, *common, "train.guard.inject_faults=spike@4,nan@5,gradnan@7")
    expected = [(LOSS_SPIKE, 4, "skip"), (NONFINITE_LOSS, 5, "skip"), (NONFINITE_GRAD, 7, "skip")]
    assert _events(one) == _events(both) == expected
    for run in (one, both):
        states = [_state(run, 7, rank)["guard"] for rank in range(2)]
        assert states[0] == states[1] and states[0]["skipped"] == 3
    final = tag_for(7)
    a = load_file(str(one / "checkpoints" / final / "model" / "model.safetensors"))
    b = load_file(str(both / "checkpoints" / final / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
        assert torch.isfinite(a[key]).all(), key
