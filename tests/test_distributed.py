"""The distributed trainer for real: 2 gloo processes started by ``diffdis train --nproc 2``, DeepSpeed
ZeRO 2 and 3, exact resume, resume at another world size, export, checkpoints on S3 (moto).

Expensive runs are module fixtures shared by several tests. Each run is the tiny config with a batch
of 8 for 4 optimizer steps, a checkpoint at step 2 (N = 2, 2N = 4)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.checkpoint import COMPLETE, CheckpointError, tag_for
from pretrain.config import CONFIGS_DIR, load_run_config

pytestmark = [pytest.mark.integration, pytest.mark.multiprocess]
ROOT = Path(__file__).resolve().parents[1]
COMMON = ["train.batch_size=8", "train.log_every=1", "train.keep_last=0", "train.checkpoint_every=2",
          "optim.warmup_steps=2", "optim.grad_clip=0.5"]
# the exactness checks also cover EMA, activation checkpointing, gradient accumulation (ZeRO-3),
# and for ZeRO-2 a resume from / save to S3 in async mode
STAGES = {
    2: ["deepspeed=zero2", "train.ema_decay=0.9", "train.activation_checkpointing=true"],
    3: ["deepspeed=zero3", "train.ema_decay=0.9", "train.grad_accum=2", "train.activation_checkpointing=true"],
}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without rank variables (in-process trainers export them)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return {**env, **extra}


def train_command(run: Path, *overrides: str, nproc: int = 2, resume: bool = False) -> list[str]:
    command = [sys.executable, "-m", "pretrain.cli", "train", "--config", str(CONFIGS_DIR / "tiny.yaml"), "--out", str(run),
               "--nproc", str(nproc), *COMMON, *overrides]
    return command + (["--resume", "auto"] if resume else [])


def train(run: Path, *overrides: str, resume: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(run, *overrides, resume=resume), cwd=ROOT, env=clean_env(**(env or {})),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def records(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def seed_resume_dir(source: Path, target: Path, step: int) -> Path:
    """A fresh run directory holding only ``source``'s checkpoint at ``step`` (and its tokenizer)."""
    shutil.copytree(source / "checkpoints" / tag_for(step), target / "checkpoints" / tag_for(step))
    shutil.copytree(source / "tokenizer", target / "tokenizer")
    return target


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def s3_server():
    """One moto S3 server for the module (the conftest fixture is per test); env restored after."""
    from moto.server import ThreadedMotoServer  # noqa: PLC0415

    from tests.s3 import S3Endpoint  # noqa: PLC0415

    endpoint = S3Endpoint(ThreadedMotoServer)
    endpoint.start()
    saved = {k: os.environ.get(k) for k in endpoint.environment()}
    os.environ.update(endpoint.environment())
    endpoint.create_bucket()
    yield endpoint
    endpoint.reset()
    endpoint.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, s3_server):
    """Per stage: a straight 2N-step run and one resumed from its step-N checkpoint (made lazily).
    Returns (straight run, resumed run, resumed run's checkpoint root as a local directory). The
    ZeRO-2 resumed run keeps its checkpoints on S3 (step N uploaded there first), saving asynchronously."""
    import fsspec  # noqa: PLC0415

    made = {}

    def get(stage: int) -> tuple[Path, Path, Path]:
        if stage not in made:
            base = tmp_path_factory.mktemp(f"zero{stage}")
            straight = base / "straight"
            train(straight, "train.steps=4", *STAGES[stage])
            if stage == 2:
                resumed = base / "resumed"
                shutil.copytree(straight / "tokenizer", resumed / "tokenizer")
                url = f"s3://{s3_server.bucket}/zero2/checkpoints"
                fs = fsspec.filesystem("s3", skip_instance_cache=True)
                fs.put(str(straight / "checkpoints" / tag_for(2)), f"{url}/{tag_for(2)}", recursive=True)
                train(resumed, "train.steps=4", *STAGES[stage], f"train.checkpoint_dir={url}",
                      "train.async_checkpoint=true", resume=True)
                local = base / "resumed-checkpoints"
                fs.invalidate_cache()
                fs.get(f"{url}/{tag_for(4)}", str(local / tag_for(4)), recursive=True)
            else:
                resumed = seed_resume_dir(straight, base / "resumed", 2)
                train(resumed, "train.steps=4", *STAGES[stage], resume=True)
                local = resumed / "checkpoints"
            made[stage] = straight, resumed, local
        return made[stage]

    return get


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_equals_the_uninterrupted_run(zero_runs, stage):
    straight, resumed, resumed_checkpoints = zero_runs(stage)
    expected, got = records(straight), records(resumed)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        # health/*: computed on every rank (ZeRO-3 gathers inside the forward) from a step-seeded generator
        for key in ("loss", "loss_gen", "loss_align", "lr", "grad_norm", "health/query_spread",
                    "health/prediction_spread", "health/sens_image_t999", "health/sens_noise_t500"):
            assert got[step][key] == pytest.approx(expected[step][key], abs=1e-6), (step, key)
    final = tag_for(4)
    for folder in ("model", "model-ema"):
        assert_same_weights(straight / "checkpoints" / final / folder / "model.safetensors",
                            resumed_checkpoints / final / folder / "model.safetensors")
    marker = json.loads((resumed_checkpoints / final / COMPLETE).read_text())
    assert (marker["step"], marker["world_size"], marker["zero_stage"]) == (4, 2, stage)
    assert (straight / "tensorboard").is_dir() and "checkpoint_blocked_s" in expected[2]


def test_export_consolidates_zero3_shards_and_ema(zero_runs, tmp_path):
    from pretrain.export import export_checkpoint  # noqa: PLC0415
    from pretrain.model import DiffDisModel  # noqa: PLC0415

    straight, *_ = zero_runs(3)
    checkpoint = straight / "checkpoints" / tag_for(4)
    raw = export_checkpoint(straight, tmp_path / "raw", use_ema=False)
    ema = export_checkpoint(checkpoint, tmp_path / "ema")
    assert (raw["weights"], ema["weights"], raw["step"]) == ("trained", "ema", 4)
    # ZeRO-3 shards consolidated by DeepSpeed == the weights gathered from the live engine at save time
    assert_same_weights(checkpoint / "model" / "model.safetensors", tmp_path / "raw" / "model.safetensors")
    assert_same_weights(checkpoint / "model-ema" / "model.safetensors", tmp_path / "ema" / "model.safetensors")
    loaded = DiffDisModel.from_pretrained(tmp_path / "raw")
    assert (tmp_path / "raw" / "tokenizer" / "tokenizer.json").is_file() and (tmp_path / "raw" / "config.yaml").is_file()
    assert loaded.config.image_size == 16
    raw_weights, ema_weights = load_file(str(tmp_path / "raw" / "model.safetensors")), load_file(str(tmp_path / "ema" / "model.safetensors"))
    assert any(not torch.equal(raw_weights[k], ema_weights[k]) for k in raw_weights)


@pytest.fixture(scope="module")
def shrunk(zero_runs, tmp_path_factory):
    """2 → 1: the ZeRO-2 run's step-2 checkpoint resumed by one in-process trainer for one step."""
    from pretrain.trainer import Trainer  # noqa: PLC0415

    straight, *_ = zero_runs(2)
    run = seed_resume_dir(straight, tmp_path_factory.mktemp("shrunk") / "run", 2)
    config = load_run_config(CONFIGS_DIR / "tiny.yaml", [*COMMON, *STAGES[2], "train.steps=4"])  # the same schedule
    trainer = Trainer(config, run, resume="auto")
    assert trainer.dist.world_size == 1
    trainer.maybe_resume()
    restored = {name: p.detach().clone() for name, p in trainer.engine.module.named_parameters()}
    optimizer = trainer.engine.optimizer
    restored_moments = [optimizer.optimizer.state[p]["exp_avg"].clone() for p in optimizer.single_partition_of_fp32_groups]
    stream_state = trainer.stream.state_dict()
    metrics, _ = trainer.optimizer_step()  # step 3, then a checkpoint of it (world size 1)
    trainer.counter.step += 1
    trainer.metrics_after_step_3 = {**metrics, "lr": trainer.engine.get_lr()[0]}
    trainer.checkpointer.save(3, trainer.save_extras)
    trainer.checkpointer.close()
    return trainer, straight, run, restored, restored_moments, stream_state


def test_world_size_2_to_1_restores_weights_optimizer_and_data_position(shrunk):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415

    trainer, straight, run, restored, restored_moments, stream_state = shrunk
    source = straight / "checkpoints" / tag_for(2)
    # weights: exactly the consolidated fp32 weights of the 2-process checkpoint
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(source.parent), tag=source.name)
    assert consolidated.keys() == restored.keys()
    for name, value in consolidated.items():
        torch.testing.assert_close(restored[name], value, rtol=0, atol=1e-7, msg=name)
    # Adam moments: the two ranks' flat partitions of the 2-process run, concatenated (padding dropped)
    shards = [torch.load(source / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", map_location="cpu", weights_only=False)
              for r in range(2)]
    for group, moment in enumerate(restored_moments):
        parts = [s["optimizer_state_dict"]["base_optimizer_state"]["state"][group]["exp_avg"] for s in shards]
        numel = sum(p.numel() for p in trainer.engine.optimizer.bit16_groups[group])
        torch.testing.assert_close(moment[:numel], torch.cat(parts)[:numel], rtol=0, atol=1e-7)
    # data: each of the 2 ranks was at offset k (2 micro batches of 4); the one rank continues at 2k
    saved = [json.loads((source / "trainer_state" / f"rank-{r:05d}.json").read_text())["data"] for r in range(2)]
    assert saved[0] == saved[1] and stream_state == {"epoch": saved[0]["epoch"], "offset": 2 * saved[0]["offset"]}
    # schedule and temperature continue: step 3's LR and the (restored) logit scale match the 2-process run.
    # The loss itself is not compared: each rank draws its own diffusion noise, so the same global
    # batch gets other noise at another world size.
    expected, got = records(straight)[3], trainer.metrics_after_step_3
    assert got["lr"] == pytest.approx(expected["lr"], abs=1e-12)
    assert got["logit_scale"] == pytest.approx(expected["logit_scale"], abs=1e-6)
    assert (run / "checkpoints" / "universal" / tag_for(2) / "zero").is_dir()


def test_exported_model_gives_the_live_models_zero_shot_outputs(shrunk, tmp_path):
    from data_pipeline.digits import class_prompts  # noqa: PLC0415
    from pretrain.evaluate import heldout_data, load_checkpoint  # noqa: PLC0415
    from pretrain.export import export_checkpoint  # noqa: PLC0415
    from pretrain.inference import image_queries, zero_shot_classify  # noqa: PLC0415
    from pretrain.model import DiffDisModel  # noqa: PLC0415

    trainer, _, run, *_ = shrunk
    export_checkpoint(run, tmp_path / "export", use_ema=False)
    exported = DiffDisModel.from_pretrained(tmp_path / "export").eval()
    live = trainer.model.eval()
    pixels, labels, _ = heldout_data(trainer.config)
    pixels, labels = pixels[:40], labels[:40]
    diffusion = trainer.config.diffusion
    torch.testing.assert_close(image_queries(exported, pixels, diffusion, steps=2),
                               image_queries(live, pixels, diffusion, steps=2), rtol=0, atol=1e-6)
    expected = zero_shot_classify(live, trainer.tokenizer, pixels, labels, class_prompts(), diffusion, steps=2)
    assert zero_shot_classify(exported, trainer.tokenizer, pixels, labels, class_prompts(), diffusion, steps=2) == expected
    # the evaluator prefers the EMA folder, and its weights are the trainer's average
    ema_model = load_checkpoint(run).model
    assert load_checkpoint(run).path.name == tag_for(3)
    for name, value in trainer.ema.shadow.items():
        torch.testing.assert_close(ema_model.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_world_size_1_to_2_continues_the_data_and_schedule(shrunk):
    _, straight, run, *_ = shrunk
    result = train(run, *STAGES[2], "train.steps=4", resume=True)
    assert "written by 1 processes, this run has 2" in result.stderr
    marker = json.loads((run / "checkpoints" / tag_for(4) / COMPLETE).read_text())
    assert marker["world_size"] == 2
    one_process = json.loads((run / "checkpoints" / tag_for(3) / "trainer_state" / "rank-00000.json").read_text())["data"]
    for rank in range(2):
        state = json.loads((run / "checkpoints" / tag_for(4) / "trainer_state" / f"rank-{rank:05d}.json").read_text())
        assert state["data"] == {"epoch": one_process["epoch"], "offset": one_process["offset"] // 2 + 4}
        assert state["trainer"] == {"step": 4}
    assert records(run)[4]["lr"] == pytest.approx(records(straight)[4]["lr"], abs=1e-12)


def test_missing_or_corrupt_rank_shard_is_named(zero_runs, tmp_path):
    from pretrain.trainer import Trainer  # noqa: PLC0415

    straight, *_ = zero_runs(2)
    config = load_run_config(CONFIGS_DIR / "tiny.yaml", [*COMMON, *STAGES[2], "train.steps=4"])
    shard = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    corrupt = seed_resume_dir(straight, tmp_path / "corrupt", 2)
    path = corrupt / "checkpoints" / tag_for(2) / shard
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{shard}.*corrupt"):
        Trainer(config, corrupt, resume="auto").maybe_resume()
    missing = seed_resume_dir(straight, tmp_path / "missing", 2)
    (missing / "checkpoints" / tag_for(2) / shard).unlink()
    with pytest.raises(CheckpointError, match=f"{shard}.*missing"):
        Trainer(config, missing, resume="auto").maybe_resume()


def test_checkpoints_on_s3_round_trip(zero_runs, s3_server):
    """The ZeRO-2 resumed run read step N from s3:// (--resume auto) and saved step 2N there
    asynchronously: equal to the local run (test_resume_equals_the_uninterrupted_run[2]); here, the
    object layout: COMPLETE lists every rank's files, ``latest`` was written, nothing local but the cache."""
    import fsspec  # noqa: PLC0415

    _, resumed, _ = zero_runs(2)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    prefix = f"{s3_server.bucket}/zero2/checkpoints"
    assert fs.cat_file(f"{prefix}/latest").decode() == tag_for(4)
    marker = json.loads(fs.cat_file(f"{prefix}/{tag_for(4)}/{COMPLETE}"))
    stored = fs.find(f"{prefix}/{tag_for(4)}")
    for rank in range(2):
        assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in marker["files"]
        assert any(name.endswith(f".done/rank-0000{rank}.json") for name in stored)
    assert all(any(name.endswith(f) for name in stored) for f in marker["files"])
    assert not (resumed / "checkpoints").exists()
    assert (resumed / ".checkpoint-cache" / tag_for(2) / COMPLETE).is_file()
    assert "checkpoint_blocked_s" in records(resumed)[4]
