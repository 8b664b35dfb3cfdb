"""Async checkpoints write DeepSpeed's shards from memory snapshots, in the background; failed writes
(disk full, an S3 endpoint that goes away mid-upload) never leave a partial checkpoint as ``latest``.

The trainer runs in-process on the real DeepSpeed engine (one CPU process, gloo) and the real moto S3
server; faults are injected at our own store's write (``CheckpointStore.put``) and at the snapshot
writer's ``torch.save``, never inside DeepSpeed."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import threading
from collections import OrderedDict

import pytest
import torch

from pretrain.checkpoint import COMPLETE, LATEST, CheckpointWriteError, Checkpointer, latest_complete, tag_for
from pretrain.checkpoint_snapshot import BufferPool, SnapshotCheckpointEngine, snapshot
from pretrain.checkpoint_store import CheckpointStore
from pretrain.config import CONFIGS_DIR, load_run_config
from pretrain.trainer import Trainer

OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _config(*overrides):
    return load_run_config(CONFIGS_DIR / "tiny.yaml", ["train.batch_size=8", "train.ema_decay=0.9", "deepspeed=zero2",
                                                       "train.keep_last=0", *overrides])


def _steps(trainer: Trainer, count: int) -> list[float]:
    losses = []
    for _ in range(count):
        metrics, _ = trainer.optimizer_step()
        trainer.counter.step += 1
        losses.append(metrics["loss"])
    return losses


def test_snapshot_is_a_frozen_copy_that_keeps_views_shared(tmp_path):
    flat = torch.arange(12, dtype=torch.float32)
    state = OrderedDict(a=flat[:6].view(2, 3), b=flat[6:], t=flat[::4], n=(1, "x"),
                        p=torch.nn.Parameter(torch.ones(2)), nested=[{"m": flat}])
    pool = BufferPool()
    copy = snapshot(state, pool)
    expected = {k: v.clone() for k, v in (("a", state["a"]), ("b", state["b"]), ("t", state["t"]))}
    flat.mul_(-1)  # training goes on, in place
    state["p"].data.zero_()
    for key, value in expected.items():
        assert torch.equal(copy[key], value), key
    assert type(copy) is OrderedDict and copy["n"] == (1, "x") and torch.equal(copy["p"], torch.ones(2))
    assert isinstance(copy["p"], torch.nn.Parameter)
    # one storage copied once: views of it are still views of one (shared) copy, as torch.save sees them
    shared = {copy[k].untyped_storage().data_ptr() for k in ("a", "b", "t")} | {copy["nested"][0]["m"].untyped_storage().data_ptr()}
    assert len(shared) == 1 and pool.nbytes == 12 * 4 + 2 * 4
    torch.save(copy, tmp_path / "snap.pt")
    loaded = torch.load(tmp_path / "snap.pt")
    assert torch.equal(loaded["t"], expected["t"]) and loaded["t"].untyped_storage().data_ptr() == loaded["a"].untyped_storage().data_ptr()
    pool.reset()  # the next checkpoint reuses the buffers
    again = snapshot(state, pool)
    assert pool.nbytes == 12 * 4 + 2 * 4 and again["a"].untyped_storage().data_ptr() in shared
    assert torch.equal(again["a"], -expected["a"])


@pytest.mark.integration
def test_async_checkpoint_is_the_state_at_save_time_and_resumes_exactly(tmp_path):
    """Step 2 is written to disk only after steps 3 and 4 changed every weight and moment in place:
    resuming from it must still replay steps 3 and 4 exactly."""
    config = _config("train.steps=4", "train.async_checkpoint=true")
    run = tmp_path / "async"
    trainer = Trainer(config, run)
    assert isinstance(trainer.engine.checkpoint_engine, SnapshotCheckpointEngine)
    writer = trainer.checkpointer._snapshots
    gate, original = threading.Event(), writer.write
    writer.write = lambda state, path: (gate.wait(60), original(state, path))
    _steps(trainer, 2)
    trainer.checkpointer.save(2, trainer.save_extras)
    assert trainer.checkpointer.last_blocked_s < 30
    later = _steps(trainer, 2)
    assert not (run / "checkpoints" / tag_for(2) / COMPLETE).exists()  # still held by the gate
    gate.set()
    trainer.checkpointer.save(4, trainer.save_extras)
    trainer.checkpointer.close()
    assert (run / "checkpoints" / LATEST).read_text() == tag_for(4)
    shutil.copytree(run / "tokenizer", tmp_path / "resumed" / "tokenizer")
    resumed = Trainer(config, tmp_path / "resumed", resume=str(run / "checkpoints" / tag_for(2)))
    resumed.maybe_resume()
    assert resumed.counter.step == 2
    assert _steps(resumed, 2) == pytest.approx(later, abs=1e-6)
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(dict(resumed.model.named_parameters())[name], param, rtol=0, atol=1e-6, msg=name)


@pytest.mark.integration
def test_disk_full_leaves_the_previous_checkpoint_usable_and_names_the_file(tmp_path, monkeypatch):
    run = tmp_path / "run"
    config = _config("train.steps=10")
    trainer = Trainer(config, run)
    root = run / "checkpoints"
    _steps(trainer, 1)
    trainer.checkpointer.save(1, trainer.save_extras)

    def full(self, source, *parts):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path(*parts)))

    monkeypatch.setattr(CheckpointStore, "put", full)
    _steps(trainer, 1)
    with pytest.raises(CheckpointWriteError, match=r"step-000000002.*No space left on device") as raised:
        trainer.checkpointer.save(2, trainer.save_extras)
    assert "newest complete checkpoint is" in str(raised.value) and str(root / tag_for(1)) in str(raised.value)
    monkeypatch.undo()

    # async: the engine's snapshot write fails in the background; the next wait reports it
    background = Checkpointer(trainer.store, trainer.engine, trainer.checkpointer.stateful, 0, 1, keep_last=0,
                              staging_dir=tmp_path / "staging", async_save=True)

    write = SnapshotCheckpointEngine.write

    def full_write(self, state, path):
        if not path.endswith(OPTIM_FILE):
            return write(self, state, path)
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(SnapshotCheckpointEngine, "write", full_write)
    background.save(3, trainer.save_extras)
    with pytest.raises(CheckpointWriteError, match=rf"step-000000003.*{OPTIM_FILE}.*No space left on device"):
        background.wait()
    monkeypatch.undo()

    for tag in (tag_for(2), tag_for(3)):
        assert not (root / tag / COMPLETE).exists()
    assert (root / LATEST).read_text() == tag_for(1) and latest_complete(root) == root / tag_for(1)
    shutil.copytree(run / "tokenizer", tmp_path / "resumed" / "tokenizer")
    resumed = Trainer(config, tmp_path / "resumed", resume=str(root / tag_for(1)))
    resumed.maybe_resume()  # every file's size and CRC-32 verified
    assert resumed.counter.step == 1
    background.save(3, trainer.save_extras)  # a later save at the failed step replaces the partial files
    background.close()
    assert (root / tag_for(3) / COMPLETE).is_file() and (root / LATEST).read_text() == tag_for(3)


@pytest.mark.integration
def test_s3_endpoint_restarted_mid_upload_is_retried_or_named(tmp_path, s3_endpoint, monkeypatch, caplog):
    url = f"s3://{s3_endpoint.bucket}/ck"
    config = _config("train.steps=10", "train.async_checkpoint=true", f"train.checkpoint_dir={url}")
    trainer = Trainer(config, tmp_path / "run")
    store = trainer.checkpointer.store
    _steps(trainer, 1)
    trainer.checkpointer.save(1, trainer.save_extras)
    trainer.checkpointer.wait()
    put = CheckpointStore.put

    def outage_then(restart_after: float | None):
        """The endpoint goes down just before this checkpoint's optimizer shard is uploaded."""
        def cut(self, source, *parts):
            if parts[-1] == OPTIM_FILE and s3_endpoint.server is not None:
                s3_endpoint.stop()
                if restart_after is not None:
                    threading.Timer(restart_after, s3_endpoint.start).start()
            return put(self, source, *parts)
        return cut

    # down for 10 s (longer than botocore's own retries of a refused connection): the store retries
    monkeypatch.setattr(CheckpointStore, "put", outage_then(10.0))
    _steps(trainer, 1)
    with caplog.at_level(logging.WARNING, logger="diffdis.checkpoint"):
        trainer.checkpointer.save(2, trainer.save_extras)
        trainer.checkpointer.wait()
    assert "uploading" in caplog.text and "retrying" in caplog.text and OPTIM_FILE in caplog.text
    assert store.complete_tags() == [tag_for(1), tag_for(2)] and store.read_text(LATEST) == tag_for(2)

    # down for good (retries exhausted): the run stops naming the file; step 3 is never complete
    store.retry_s = 1.0
    monkeypatch.setattr(CheckpointStore, "put", outage_then(None))
    _steps(trainer, 1)
    trainer.checkpointer.save(3, trainer.save_extras)
    with pytest.raises(CheckpointWriteError, match=rf"step-000000003.*uploading .*{OPTIM_FILE}"):
        trainer.checkpointer.wait()
    monkeypatch.undo()
    s3_endpoint.start()
    assert store.complete_tags() == [tag_for(1), tag_for(2)] and store.read_text(LATEST) == tag_for(2)
    marker = json.loads(store.read_text(tag_for(2), COMPLETE))
    assert OPTIM_FILE in marker["files"]
    shutil.copytree(tmp_path / "run" / "tokenizer", tmp_path / "resumed" / "tokenizer")
    resumed = Trainer(config, tmp_path / "resumed", resume="auto")  # downloads and verifies step 2
    resumed.maybe_resume()
    assert resumed.counter.step == 2
