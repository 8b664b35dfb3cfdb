"""``diffdis eval``/``sample`` on checkpoints kept on S3 (moto's server), and ``eval --suite``.

Before this, ``diffdis eval s3://bucket/ckpt`` failed with "s3:/bucket/ckpt does not exist" (argparse
made a Path of the URL) and ``diffdis eval RUN`` for a run with ``train.checkpoint_dir`` on S3 said it
was "neither a run nor a checkpoint directory"."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pretrain.cli import main
from pretrain.config_io import dump_yaml
from pretrain.model import DiffDisModel
from pretrain.trainer import tokenizer_spec
from tests.evaluator_helpers import TINY_SUITE, checkpointer, corrupt_file, save_step


@pytest.fixture(scope="module")
def model(tiny_config, tokenizer):
    torch.manual_seed(0)
    return DiffDisModel(tiny_config.model, tokenizer_spec(tokenizer)).eval()


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_and_sample_take_s3_checkpoints_and_runs(s3_endpoint, tmp_path, model, tokenizer, tiny_config, capsys):
    root = f"s3://{s3_endpoint.bucket}/run/ckpts"
    writer = checkpointer(root, tmp_path / "staging")
    save_step(writer, 1, model, tokenizer, tiny_config)
    ema = DiffDisModel(tiny_config.model, tokenizer_spec(tokenizer)).eval()  # other weights: tells the folders apart
    save_step(writer, 2, model, tokenizer, tiny_config, ema_model=ema)

    assert main(["eval", f"{root}/step-000000001", "--task", "zeroshot", "--steps", "1", "--json"]) == 0
    result = _last_json(capsys)
    assert result["checkpoint_step"] == 1 and result["checkpoint"] == f"{root}/step-000000001"
    assert 0.0 <= result["top1"] <= 1.0 and result["n"] == 359

    assert main(["eval", root, "--task", "retrieval", "--steps", "1", "--json"]) == 0  # a checkpoint root: newest
    assert _last_json(capsys)["checkpoint_step"] == 2

    # a run that kept EMA weights: only model-ema/ (and model/config.json) is downloaded, and it is what loads
    from pretrain.checkpoint_fetch import local_checkpoint  # noqa: PLC0415
    from pretrain.evaluate import load_checkpoint  # noqa: PLC0415

    with local_checkpoint(f"{root}/step-000000002") as (directory, url):
        downloaded = sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*.safetensors"))
        loaded = load_checkpoint(directory)
    assert downloaded == ["model-ema/model.safetensors"] and url == f"{root}/step-000000002"
    name, weight = next(iter(ema.state_dict().items()))
    assert torch.equal(loaded.model.state_dict()[name], weight)

    run = tmp_path / "run"  # a run whose checkpoints live on S3: only its config.yaml is local
    run.mkdir()
    dump_yaml(replace(tiny_config, train=replace(tiny_config.train, checkpoint_dir=root)), run / "config.yaml")
    assert main(["eval", str(run), "--steps", "1", "--json"]) == 0
    assert _last_json(capsys)["checkpoint"] == f"{root}/step-000000002"

    grid = tmp_path / "grid.png"
    assert main(["sample", f"{root}/step-000000002", "--prompt", "a handwritten digit one", "--out", str(grid),
                 "--per-prompt", "2", "--steps", "2"]) == 0
    assert grid.is_file() and grid.stat().st_size > 0

    assert main(["eval", f"s3://{s3_endpoint.bucket}/nothing-here", "--json"]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err


def test_eval_suite_json_and_a_corrupt_checkpoint_named(tmp_path, model, tokenizer, tiny_config, capsys):
    root = tmp_path / "ckpts"
    save_step(checkpointer(str(root), tmp_path / "staging"), 3, model, tokenizer, tiny_config)
    suite = tmp_path / "suite.yaml"
    suite.write_text(TINY_SUITE + "  - {kind: samples, name: grid, prompts: [a handwritten digit two], per_prompt: 2, steps: 2}\n")
    assert main(["eval", str(root / "step-000000003"), "--suite", str(suite), "--images", str(tmp_path / "img"), "--json"]) == 0
    result = _last_json(capsys)
    assert result["checkpoint_step"] == 3 and result["metrics"]["zs"]["n"] == 24
    assert set(result["metrics"]["zs"]) >= {"top1", "top5", "mean_per_class_recall"}
    assert result["images"]["grid"].endswith("grid-step-000000003.png")

    # an S3 download is verified against COMPLETE before loading: a corrupt local copy is caught the same way
    # by the watcher; here the local checkpoint's weights are damaged and the suite run reports the file
    from pretrain.checkpoint_fetch import fetch  # noqa: PLC0415
    from pretrain.checkpoint_store import CheckpointStore  # noqa: PLC0415

    corrupt_file(root / "step-000000003" / "model" / "model.safetensors")
    with pytest.raises(ValueError, match=r"step-000000003/model/model.safetensors is corrupt"):
        fetch(CheckpointStore(str(root)), "step-000000003", tmp_path / "scratch")


def test_digits_frechet_distance_in_judge_features(tmp_path, model, tokenizer, tiny_config):
    """The offline generation metric (not FID): a random-init model's samples lie far from real digits,
    real training digits lie close to real held-out ones, and noise added to real digits moves them away
    in proportion."""
    from pretrain.config_io import from_dict  # noqa: PLC0415
    from pretrain.eval_metrics import frechet_distance  # noqa: PLC0415
    from pretrain.evaluate import load_checkpoint  # noqa: PLC0415
    from pretrain.judge import uint8_to_pixels  # noqa: PLC0415
    from pretrain.suite import SuiteConfig, SuiteRunner, judge_features  # noqa: PLC0415

    root = tmp_path / "ckpts"
    save_step(checkpointer(str(root), tmp_path / "staging"), 1, model, tokenizer, tiny_config)
    suite = from_dict(SuiteConfig, {"tasks": [{"kind": "digits_frechet", "name": "fd", "per_class": 5, "steps": 2}]})
    runner = SuiteRunner(suite, tmp_path / "img")
    metrics = runner.run(load_checkpoint(root / "step-000000001")).metrics["fd"]
    assert metrics["n_generated"] == 50 and metrics["n_real"] == 359
    assert metrics["real_floor"] < 1.0 and 5 * metrics["real_floor"] < metrics["frechet_distance"]
    (digits, judge, real, _), = runner._judges.values()
    pixels = uint8_to_pixels(digits.heldout_images)
    noisy = [frechet_distance(judge_features(judge, pixels + torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0)) * s), real)
             for s in (0.0, 0.3, 1.0)]
    assert noisy[0] == pytest.approx(0.0, abs=1e-6) and noisy[0] < noisy[1] < noisy[2]


@pytest.mark.parametrize("command", [["evaluator", "watch"], ["dashboard"], ["report"]])
def test_new_subcommands_explain_themselves(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: diffdis" in capsys.readouterr().out


def test_users_data_layouts_score_like_the_builtin_heldout_set(tmp_path, model, tokenizer, tiny_config):
    """The held-out digits exported as a CLIP_benchmark webdataset (the eval templates with {c}) and as
    captioned shards give exactly the numbers of ``data: heldout``: same images, prompts, captions and
    seeded chain (or fixed denoising draws), read through the users'-data path (format detected
    automatically)."""
    import io  # noqa: PLC0415
    import tarfile  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    from data_pipeline.digits import CLASS_NAMES, EVAL_TEMPLATES, TRAIN_TEMPLATES, caption_for, load_digits_split  # noqa: PLC0415
    from pretrain.config_io import from_dict  # noqa: PLC0415
    from pretrain.evaluate import load_checkpoint  # noqa: PLC0415
    from pretrain.suite import SuiteConfig, SuiteRunner  # noqa: PLC0415

    count = 100
    split = load_digits_split("heldout", image_size=tiny_config.model.image_size,
                              heldout_fraction=tiny_config.data.heldout_fraction, split_seed=tiny_config.data.split_seed)

    def write(path, members):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as archive:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))

    def png(image) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    wds, shards = tmp_path / "wds_digits", tmp_path / "captioned"
    write(wds / "test" / "0.tar", [m for i in range(count) for m in
                                   ((f"s{i:06d}.png", png(split.images[i])), (f"s{i:06d}.cls", str(split.labels[i]).encode()))])
    (wds / "classnames.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    (wds / "zeroshot_classification_templates.txt").write_text("\n".join(t.replace("{word}", "{c}") for t in EVAL_TEMPLATES))
    captions = [caption_for(int(label), i % len(TRAIN_TEMPLATES)) for i, label in enumerate(split.labels[:count])]
    write(shards / "heldout-000000.tar", [m for i in range(count) for m in
                                          ((f"{i:09d}.png", png(split.images[i])), (f"{i:09d}.txt", captions[i].encode()))])
    suite = from_dict(SuiteConfig, {"tasks": [
        {"kind": "zeroshot", "name": "builtin_zs", "limit": count, "steps": 2},
        {"kind": "zeroshot", "name": "wds_zs", "data": str(wds), "steps": 2},
        {"kind": "retrieval", "name": "builtin_ret", "limit": count, "steps": 2},
        {"kind": "retrieval", "name": "shards_ret", "data": str(shards), "steps": 2},
        {"kind": "denoising", "name": "builtin_den", "limit": count, "draws": 2},
        {"kind": "denoising", "name": "shards_den", "data": str(shards), "draws": 2},
    ]})
    root = tmp_path / "ckpts"
    save_step(checkpointer(str(root), tmp_path / "staging"), 1, model, tokenizer, tiny_config)
    metrics = SuiteRunner(suite, tmp_path / "img").run(load_checkpoint(root / "step-000000001")).metrics
    assert metrics["wds_zs"]["n"] == count
    for name in ("top1", "top5", "mean_per_class_recall"):
        assert metrics["wds_zs"][name] == metrics["builtin_zs"][name]
    assert {k: v for k, v in metrics["shards_ret"].items()} == {k: v for k, v in metrics["builtin_ret"].items()}
    assert metrics["shards_den"]["n_images"] == count and metrics["shards_den"] == metrics["builtin_den"]
