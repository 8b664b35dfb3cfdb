"""benchmarks/bench_recipe.py without training: aggregation over seeds, the final L_IG, what exists."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from pretrain.config import load_run_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_recipe", ROOT / "benchmarks" / "bench_recipe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_summary_gives_min_median_max_over_seeds_per_dataset_and_model(bench):
    runs = [
        {"dataset": "digits", "model": "diffdis", "seed": 0, "top1": 0.5, "l_ig": 0.30, "pf_unseen": 0.4, "wall_s": 10},
        {"dataset": "digits", "model": "diffdis", "seed": 2, "top1": 0.9, "l_ig": 0.20, "pf_unseen": None, "wall_s": 12},
        {"dataset": "digits", "model": "diffdis", "seed": 1, "top1": 0.6, "l_ig": 0.25, "wall_s": 11},
        {"dataset": "digits", "model": "gen-only", "seed": 0, "l_ig": 0.28, "pf_unseen": 0.2, "wall_s": 8},
        {"dataset": "scenes", "model": "diffdis", "seed": 0, "top1": 0.3, "top1_shape": 0.7},
    ]
    summary = bench.summarize(runs)
    assert list(summary) == ["digits/diffdis", "digits/gen-only", "scenes/diffdis"]
    diffdis = summary["digits/diffdis"]
    assert diffdis["seeds"] == [0, 1, 2]
    assert diffdis["top1"] == {"min": 0.5, "median": 0.6, "max": 0.9, "n": 3}
    assert diffdis["l_ig"]["median"] == pytest.approx(0.25)
    assert diffdis["pf_unseen"] == {"min": 0.4, "median": 0.4, "max": 0.4, "n": 1}  # None and missing are skipped
    assert "top1" not in summary["digits/gen-only"]  # gen-only has no zero-shot figure
    assert summary["scenes/diffdis"]["top1_shape"]["max"] == 0.7
    json.dumps(summary)  # goes into the last line as is


def test_final_l_ig_averages_the_last_logged_steps_once_each(bench, tmp_path):
    lines = [{"step": s, "loss_gen": float(s)} for s in (10, 20, 30, 40, 50, 60)]
    lines.insert(3, {"step": 30, "loss_gen": 99.0})  # a resumed run logs step 30 again: the later one counts
    lines.append({"step": 60, "loss": 1.0})  # a record without loss_gen
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(line) for line in lines))
    assert bench.final_l_ig(metrics, last=5) == pytest.approx((20 + 99 + 40 + 50 + 60) / 5)
    assert bench.final_l_ig(tmp_path / "missing.jsonl") is None


def test_unavailable_models_and_datasets_are_named_and_skipped(bench, tmp_path):
    models = {"diffdis": bench.MODELS["diffdis"], "ghost": bench.ModelSpec("ghost", bench.ROOT / "configs" / "ghost.yaml")}
    chosen, reasons = bench.select(None, models, bench.model_unavailable)
    assert chosen == ["diffdis"] and reasons == {"ghost": "not available in this checkout: configs/ghost.yaml is missing"}
    ghost_data = bench.DatasetSpec("ghost", bench.DATASETS["digits"].shard_config, ("data.no_such_key=1",), "data_pipeline.digits")
    assert "not available in this checkout" in bench.dataset_unavailable(ghost_data)
    assert bench.dataset_unavailable(bench.DATASETS["digits"]) is None
    with pytest.raises(SystemExit, match="unknown name"):
        bench.select(["diffdis", "nope"], models, bench.model_unavailable)


def test_baselines_are_the_demo_recipe_with_one_task_switched_off(bench, tmp_path):
    configs = {}
    for name in ("diffdis", "dis-only", "gen-only"):
        spec = bench.MODELS[name]
        configs[name] = load_run_config(spec.config, bench.run_overrides(bench.DATASETS["digits"], spec, tmp_path, 3, 40))
    for config in configs.values():
        assert (config.data.source, config.data.shards, config.train.seed, config.train.steps) == ("shards", str(tmp_path), 3, 40)
        assert config.model.image_size == 8 and config.train.batch_size == configs["diffdis"].train.batch_size
        assert config.optim == configs["diffdis"].optim
    assert (configs["dis-only"].model.generation, configs["dis-only"].model.discrimination) == (False, True)
    assert (configs["gen-only"].model.discrimination, configs["gen-only"].loss.align_weight) == (False, 0.0)
    # the demo recipe's (configs/demo.yaml): METHOD's lambda, both losses training the text encoder
    assert (configs["diffdis"].loss.align_weight, configs["diffdis"].loss.text_grad_from_generation) == (1.0, True)


def test_each_dataset_trains_for_its_benchmark_length_unless_steps_is_given(bench, tmp_path):
    diffdis = bench.MODELS["diffdis"]

    def steps_of(dataset: str, steps: int | None) -> int:
        overrides = bench.run_overrides(bench.DATASETS[dataset], diffdis, tmp_path, 0, steps)
        return load_run_config(diffdis.config, overrides).train.steps

    assert steps_of("digits", None) == load_run_config(diffdis.config).train.steps == 620  # the recipe's own
    assert steps_of("scenes", None) == 3720
    assert steps_of("scenes", 40) == steps_of("digits", 40) == 40  # --steps (and --quick's) win
