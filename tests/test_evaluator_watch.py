"""The watcher: every complete checkpoint evaluated exactly once, in step order, across restarts and a
SIGKILL; incomplete ones wait; pruned ones are skipped with a log line; corrupt ones are named."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint_fetch
from pretrain.checkpoint_store import COMPLETE, CheckpointStore
from pretrain.evaluator import PAUSE_BEFORE_COMMIT_ENV, Evaluator, WatchOptions
from pretrain.model import DiffDisModel
from pretrain.suite import load_suite
from pretrain.trainer import tokenizer_spec
from tests.evaluator_helpers import TINY_SUITE, checkpointer, corrupt_file, ledger, perturbed, save_step

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tiny_config, tokenizer):
    torch.manual_seed(0)
    return DiffDisModel(tiny_config.model, tokenizer_spec(tokenizer)).eval()


@pytest.fixture
def suite_file(tmp_path) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(TINY_SUITE)
    return path


def _watch_once(root: str, eval_dir: Path, suite_file: Path, newest_first: bool = False) -> int:
    options = WatchOptions(poll_s=0.1, once=True, newest_first=newest_first, device="cpu")
    return Evaluator(root, eval_dir, load_suite(suite_file), options).run()


def _tensorboard_steps(eval_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: PLC0415

    events = EventAccumulator(str(eval_dir / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def _scenario(root: str, tmp_path: Path, model, tokenizer, tiny_config, suite_file, corrupt, hide_complete, show_complete):
    """Steps 1-3 complete (step 2's weights corrupted), step 4 without COMPLETE (a save in flight):
    the first pass evaluates 1 and 3, names 2's bad file, leaves 4; once 4 completes a second evaluator
    (a restart) evaluates 4 alone."""
    writer = checkpointer(root, tmp_path / "staging")
    for step in (1, 2, 3, 4):
        save_step(writer, step, perturbed(model, step), tokenizer, tiny_config)
    corrupt("step-000000002/model/model.safetensors")
    hide_complete("step-000000004")
    eval_dir = tmp_path / "eval"

    assert _watch_once(root, eval_dir, suite_file) == 2
    records = ledger(eval_dir)
    assert [(r["step"], r["status"]) for r in records] == [(1, "evaluated"), (2, "corrupt"), (3, "evaluated")]
    assert "step-000000002/model/model.safetensors is corrupt" in records[1]["error"]
    assert "CRC-32" in records[1]["error"]
    assert 0.0 <= records[0]["metrics"]["zs"]["top1"] <= 1.0 and records[0]["metrics"]["zs"]["n"] == 24

    show_complete("step-000000004")
    assert _watch_once(root, eval_dir, suite_file) == 1  # restart: only the new one
    assert _watch_once(root, eval_dir, suite_file) == 0  # and again: nothing
    records = ledger(eval_dir)
    assert [(r["step"], r["status"]) for r in records] == [(1, "evaluated"), (2, "corrupt"), (3, "evaluated"), (4, "evaluated")]
    assert _tensorboard_steps(eval_dir, "eval/zs/top1") == [1, 3, 4]


def test_local_exactly_once_in_order_incomplete_waits_corrupt_named(tmp_path, model, tokenizer, tiny_config, suite_file):
    root = tmp_path / "ckpts"
    aside = tmp_path / "aside"
    aside.mkdir()
    _scenario(
        str(root), tmp_path, model, tokenizer, tiny_config, suite_file,
        corrupt=lambda name: corrupt_file(root / name),
        hide_complete=lambda tag: (root / tag / COMPLETE).rename(aside / tag),
        show_complete=lambda tag: (aside / tag).rename(root / tag / COMPLETE),
    )


def test_s3_exactly_once_in_order_incomplete_waits_corrupt_named(s3_endpoint, tmp_path, model, tokenizer, tiny_config,
                                                                suite_file):
    root = f"s3://{s3_endpoint.bucket}/run/ckpts"
    store = CheckpointStore(root)
    markers = {}

    def corrupt(name: str) -> None:
        data = bytearray(store.fs.cat_file(store.path(name)))
        data[len(data) // 2] ^= 0xFF
        store.fs.pipe_file(store.path(name), bytes(data))

    def hide(tag: str) -> None:
        markers[tag] = store.read_text(tag, COMPLETE)
        store.fs.rm_file(store.path(tag, COMPLETE))

    _scenario(root, tmp_path, model, tokenizer, tiny_config, suite_file, corrupt, hide,
              show_complete=lambda tag: store.write_text(markers[tag], tag, COMPLETE))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_checkpoint_pruned_while_read_is_logged_and_skipped(where, request, tmp_path, model, tokenizer, tiny_config,
                                                           suite_file, monkeypatch, caplog):
    if where == "s3":
        request.getfixturevalue("s3_endpoint")
        root = "s3://diffdis-test/ckpts"
    else:
        root = str(tmp_path / "ckpts")
    writer = checkpointer(root, tmp_path / "staging")
    for step in (1, 2, 3):
        save_step(writer, step, model, tokenizer, tiny_config)
    original = checkpoint_fetch._pause_hook

    def prune_step_2(tag: str) -> None:  # keep-last-K removes it between COMPLETE and the weights being read
        if tag == "step-000000002":
            CheckpointStore(root).remove(tag)
        original(tag)

    monkeypatch.setattr(checkpoint_fetch, "_pause_hook", prune_step_2)
    with caplog.at_level(logging.WARNING, logger="diffdis.evaluator"):
        assert _watch_once(root, tmp_path / "eval", suite_file) == 2
    assert [(r["step"], r["status"]) for r in ledger(tmp_path / "eval")] == [(1, "evaluated"), (2, "deleted"), (3, "evaluated")]
    assert any("skipped" in m and "step-000000002" in m and "deleted" in m for m in caplog.messages)


def test_newest_first_order(tmp_path, model, tokenizer, tiny_config, suite_file):
    root = str(tmp_path / "ckpts")
    writer = checkpointer(root, tmp_path / "staging")
    for step in (5, 10, 15):
        save_step(writer, step, model, tokenizer, tiny_config)
    evaluator = Evaluator(root, tmp_path / "eval", load_suite(suite_file), WatchOptions(newest_first=True, device="cpu"))
    assert evaluator.pending() == ["step-000000015", "step-000000010", "step-000000005"]
    assert _watch_once(root, tmp_path / "eval", suite_file, newest_first=True) == 3
    assert [r["step"] for r in ledger(tmp_path / "eval")] == [15, 10, 5]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def test_sigkill_mid_evaluation_then_restart_beside_a_writer(tmp_path, model, tokenizer, tiny_config, suite_file):
    """A real watcher process killed with SIGKILL after evaluating step 2 but before recording it; the
    restarted one (a long-running watcher) re-evaluates 2, then 3, then the checkpoints written while
    it runs, each exactly once and in order, while keep-last-K pruning goes on."""
    root = tmp_path / "ckpts"
    eval_dir = tmp_path / "eval"
    writer = checkpointer(str(root), tmp_path / "staging", keep_last=3)
    for step in (1, 2, 3):
        save_step(writer, step, model, tokenizer, tiny_config)
    command = [sys.executable, "-m", "pretrain.cli", "evaluator", "watch", str(root), "--out", str(eval_dir),
               "--suite", str(suite_file), "--poll", "0.2", "--device", "cpu"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", PAUSE_BEFORE_COMMIT_ENV: "2:300"}
    log_file = tmp_path / "watch-1.log"
    with log_file.open("w") as handle:
        first = subprocess.Popen(command, cwd=REPO, env=environment, stdout=handle, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: "pausing" in log_file.read_text() or first.poll() is not None, 120, "the watcher to reach step 2")
        assert first.poll() is None, log_file.read_text()[-3000:]
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    assert [(r["step"], r["status"]) for r in ledger(eval_dir)] == [(1, "evaluated")]

    environment.pop(PAUSE_BEFORE_COMMIT_ENV)
    log_file = tmp_path / "watch-2.log"
    with log_file.open("w") as handle:
        second = subprocess.Popen(command, cwd=REPO, env=environment, stdout=handle, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: len(ledger(eval_dir)) >= 3 or second.poll() is not None, 120, "steps 2 and 3")
        for step in (4, 5):  # training goes on; keep_last=3 prunes 1 and 2
            save_step(writer, step, model, tokenizer, tiny_config)
        _wait_for(lambda: len(ledger(eval_dir)) >= 5 or second.poll() is not None, 120, "steps 4 and 5")
        assert second.poll() is None, log_file.read_text()[-3000:]
    finally:
        second.terminate()
        second.wait(30)
    records = ledger(eval_dir)
    assert [(r["step"], r["status"]) for r in records] == [(s, "evaluated") for s in (1, 2, 3, 4, 5)]
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000000003", "step-000000004", "step-000000005"]


@pytest.mark.integration
def test_watcher_beside_a_real_training_run(tmp_path, suite_file):
    """`diffdis train` (tiny config, a checkpoint every step, keep-last-2 pruning) and `diffdis evaluator
    watch` as two processes started together: every checkpoint the watcher sees is recorded once, in
    step order; the pruned ones it reached too late are `deleted`, never failed; the last is evaluated,
    and so is every checkpoint left on disk."""
    run = tmp_path / "run"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = subprocess.Popen(
        [sys.executable, "-m", "pretrain.cli", "train", "--config", "configs/tiny.yaml", "--out", str(run),
         "train.steps=4", "train.checkpoint_every=1", "train.batch_size=8", "train.keep_last=2"],
        cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log_file = tmp_path / "watch.log"
    with log_file.open("w") as handle:
        watch = subprocess.Popen([sys.executable, "-m", "pretrain.cli", "evaluator", "watch", str(run / "checkpoints"),
                                  "--out", str(run / "eval"), "--suite", str(suite_file), "--poll", "0.3", "--device", "cpu"],
                                 cwd=REPO, env=environment, stdout=handle, stderr=subprocess.STDOUT)
    try:
        _, errors = train.communicate(timeout=300)
        assert train.returncode == 0, errors[-3000:]
        _wait_for(lambda: any(r["step"] == 4 for r in ledger(run / "eval")) or watch.poll() is not None, 120,
                  "the watcher to record step 4")
        assert watch.poll() is None, log_file.read_text()[-3000:]
    finally:
        for process in (train, watch):
            if process.poll() is None:
                process.terminate()
                process.wait(30)
    records = ledger(run / "eval")
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and steps[-1] == 4
    assert {r["status"] for r in records} <= {"evaluated", "deleted"}
    assert records[-1]["status"] == "evaluated"
    on_disk = {int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")}
    assert on_disk == {3, 4} and on_disk <= {r["step"] for r in records if r["status"] == "evaluated"}


def test_s3_outage_is_waited_out(s3_endpoint, tmp_path, model, tokenizer, tiny_config, suite_file, caplog, monkeypatch):
    """The object store goes away before the watcher's first listing and comes back: the watcher logs,
    keeps polling, then evaluates the checkpoint once; nothing is recorded while the store is away."""
    import threading  # noqa: PLC0415

    import s3fs  # noqa: PLC0415

    root = f"s3://{s3_endpoint.bucket}/ckpts"
    save_step(checkpointer(root, tmp_path / "staging"), 1, model, tokenizer, tiny_config)
    s3_endpoint.stop()
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries of a refused connection take seconds
    s3fs.S3FileSystem.clear_instance_cache()
    evaluator = Evaluator(root, tmp_path / "eval", load_suite(suite_file), WatchOptions(poll_s=0.2, device="cpu"))
    with caplog.at_level(logging.WARNING, logger="diffdis.evaluator"):
        thread = threading.Thread(target=evaluator.run, daemon=True)
        thread.start()
        try:
            _wait_for(lambda: any("cannot list" in m for m in caplog.messages), 60, "the listing to fail")
            assert ledger(tmp_path / "eval") == []
            s3_endpoint.start()  # same port; moto kept the objects
            _wait_for(lambda: len(ledger(tmp_path / "eval")) == 1, 60, "step 1 to be evaluated")
        finally:
            evaluator.stop()
            thread.join(60)
    assert not thread.is_alive()
    assert [(r["step"], r["status"]) for r in ledger(tmp_path / "eval")] == [(1, "evaluated")]


def test_a_second_watcher_on_the_same_eval_dir_is_refused(tmp_path, suite_file):
    """Two watchers on one ledger could both evaluate a checkpoint neither has recorded yet."""
    import threading  # noqa: PLC0415

    first = Evaluator(str(tmp_path / "ckpts"), tmp_path / "eval", load_suite(suite_file), WatchOptions(poll_s=0.1, device="cpu"))
    thread = threading.Thread(target=first.run, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: (tmp_path / "eval" / ".lock").is_file() and (tmp_path / "eval" / ".lock").read_text() != "", 30,
                  "the first watcher's lock")
        second = Evaluator(str(tmp_path / "ckpts"), tmp_path / "eval", load_suite(suite_file), WatchOptions(once=True, device="cpu"))
        with pytest.raises(ValueError, match=f"another evaluator \\(pid {os.getpid()}\\) is writing"):
            second.run()
    finally:
        first.stop()
        thread.join(30)
    assert _watch_once(str(tmp_path / "ckpts"), tmp_path / "eval", suite_file) == 0  # released: a later one runs


def test_ledger_drops_a_partial_last_line(tmp_path):
    """A crash inside the append (a full disk) leaves a fragment: it is dropped, the finished lines stay,
    and the next append starts on a line of its own."""
    from pretrain.evaluator import Ledger  # noqa: PLC0415

    path = tmp_path / "results.jsonl"
    path.write_text('{"tag": "step-000000001", "step": 1, "status": "evaluated"}\n'
                    '{"tag": "step-000000002", "step": 2, "status": "corrupt"}\n{"tag": "step-0000')
    ledger_ = Ledger(path)
    assert ledger_.tags() == {"step-000000001", "step-000000002"}
    ledger_.append({"tag": "step-000000003", "step": 3, "status": "evaluated"})
    assert [r["step"] for r in ledger(tmp_path)] == [1, 2, 3]
    assert Ledger(path).tags() == {"step-000000001", "step-000000002", "step-000000003"}
