"""The recipe benchmark: DiffDis vs its single-task baselines (and CLIP) at equal steps and batch, over seeds.

The paper's central claim is that one network doing both tasks is at least as good as each task alone
(METHOD.md "What the paper reports"). This trains every model on every dataset's SHARDS (made once
with the Ray pipeline, as ``diffdis demo`` does) with the recipe of ``configs/demo.yaml``, for each
seed, and measures:

- **discrimination**: held-out zero-shot top-1 (``pretrain.evaluate.evaluate``; on scenes also
  ``top1_shape``/``top1_colour``/``top1_size``, and ``joint_shape``/``joint_colour`` from two-attribute
  prompts) for every model that has a text-query path, and beside
  it a linear probe of the same image queries (``probe_*``, ``pretrain.evaluate.probe_queries``), which
  says whether a zero-shot miss is the image side's or the class prompts'; on scenes also the nearest
  training-style "a {colour} {shape}" caption (``pair_*``, ``marginal_*``,
  ``pretrain.evaluate.pair_caption_queries``), which says whether the image queries of a never-seen pair
  compose it;
- **generation** (DiffDis vs gen-only): the final L_IG (mean ``loss_gen`` of the last 5 logged
  records of ``metrics.jsonl``: one batch's loss is noisy), the held-out L_IG on fixed draws
  (``pretrain.denoising``: the same (t_z, ε) for every model; conditional and with the null context,
  so what the caption is worth shows apart from how well the network denoises) and the prompt-following accuracy of
  samples judged by a small CNN trained on the real training images (``pretrain.judge``), once with a
  training-style phrasing and once with a phrasing never seen in training. The judge's own accuracy
  on real held-out images is printed beside it.

Models (all from the same code and trainer, same steps, batch, optimizer and data order per seed):

    diffdis   configs/demo.yaml
    dis-only  configs/demo.yaml + model.generation=false                      (no decoder path, no L_IG)
    gen-only  configs/demo.yaml + model.discrimination=false loss.align_weight=0   (no text-query stream)
    clip      configs/clip.yaml                                               (CLIP on the same data)

Datasets: ``digits`` (configs/data/digits.yaml) and ``scenes`` (configs/data/scenes.yaml, shard source
``scenes:train``, run override ``data.eval_set=scenes``). Every run takes ``model.image_size`` and
``data.split_seed`` from the shard config, so it is evaluated on the split its shards held out. Digits
train for the recipe's 620 steps, scenes for 3720 (57 epochs of 4,160 images: the length at which all ten scenes
draws measured meet every goal, against 7 of 14 at 1860; RESULTS stops 40-42); ``--steps`` sets one length for every run.
A model or dataset whose config is missing from this checkout is reported as "not available in
this checkout" and the rest runs; the defaults are all that exist.

    python benchmarks/bench_recipe.py [--quick] [--seeds 0,1,2] [--datasets digits,scenes]
        [--models diffdis,dis-only,clip,gen-only] [--steps N] [--per-class N] [--out DIR]

``--quick`` (sized for ~10 minutes on an idle 2-core CPU): seed 0 only, digits only, 250 steps per
run instead of the recipe's 620 (the LR schedule is stretched over the shorter run), every available
model; explicit ``--seeds``/``--datasets``/``--steps`` still win. Its figures are a smoke test of the
comparison, not the comparison.

Each run trains in its own subprocess (``diffdis train``; the trainer seeds every global RNG from
``train.seed``) in its own directory ``OUT/DATASET/MODEL/steps-N-seed-S``, then is evaluated in this
process; its figures go to ``bench.json`` there. Rerunning with the same ``--out`` reuses every run
whose ``bench.json`` exists and resumes an interrupted training from its newest complete checkpoint.

Prints the zero-shot table (min / median / max over seeds), the generation table, the wall and CPU
time per run, and, as the LAST line, one JSON object of all figures. Exit status 1 if a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.config import CONFIGS_DIR  # noqa: E402

RESULT_FILE = "bench.json"
QUICK_STEPS = 250
L_IG_RECORDS = 5  # final L_IG = mean loss_gen of this many last logged records
NOT_AVAILABLE = "not available in this checkout"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: Path
    overrides: tuple[str, ...] = ()
    zeroshot: bool = True  # has a text-query path: zero-shot eval
    generation: bool = False  # has a decoder path: samples are judged


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    shard_config: Path
    overrides: tuple[str, ...] = ()
    module: str = ""  # a module the dataset needs (its generator / judge data)
    # The benchmark's length on this dataset when --steps is not given; None: the recipe's own (620 in
    # configs/demo.yaml, sized for 1,438 digits). Scenes has 4,160 training images and two attributes that
    # must compose on never-seen pairs: at 1860 steps the shipped recipe met every goal on 7 of 14 draws;
    # at 3720 on all ten draws measured (seeds 0-7, 10, 11; benchmarks/RESULTS.md, stops 40-42).
    steps: int | None = None


DEMO = CONFIGS_DIR / "demo.yaml"
MODELS = {
    "diffdis": ModelSpec("diffdis", DEMO, generation=True),
    "dis-only": ModelSpec("dis-only", DEMO, ("model.generation=false",)),
    "clip": ModelSpec("clip", CONFIGS_DIR / "clip.yaml"),
    "gen-only": ModelSpec("gen-only", DEMO, ("model.discrimination=false", "loss.align_weight=0"), zeroshot=False,
                          generation=True),
}
DATASETS = {
    "digits": DatasetSpec("digits", CONFIGS_DIR / "data" / "digits.yaml", module="data_pipeline.digits"),
    "scenes": DatasetSpec("scenes", CONFIGS_DIR / "data" / "scenes.yaml", ("data.eval_set=scenes",),
                          module="data_pipeline.scenes", steps=3720),
}
PROBE_METRICS = ("probe_digit", "probe_shape", "probe_colour", "probe_size")
ZEROSHOT_METRICS = ("top1", "top1_shape", "top1_colour", "top1_size")
JOINT_METRICS = ("joint_shape", "joint_colour")  # scenes only
PAIR_METRICS = ("pair_shape", "pair_colour", "marginal_shape", "marginal_colour")  # scenes only
SUMMARY_METRICS = (*ZEROSHOT_METRICS, *JOINT_METRICS, *PROBE_METRICS, *PAIR_METRICS, "l_ig", "l_ig_heldout", "l_ig_heldout_uncond",
                   "pf_train_style", "pf_unseen",
                   "pf_train_style_shape", "pf_train_style_colour", "pf_unseen_shape", "pf_unseen_colour",
                   "train_s", "wall_s")


# -- what exists in this checkout -------------------------------------------------------------------
def model_unavailable(spec: ModelSpec) -> str | None:
    if not spec.config.is_file():
        return f"{NOT_AVAILABLE}: {spec.config.relative_to(ROOT)} is missing"
    return None


def dataset_unavailable(spec: DatasetSpec) -> str | None:
    """Why ``spec`` cannot run here (its shard config, its module, or its run overrides), else None."""
    import importlib  # noqa: PLC0415

    from pretrain.config import load_run_config  # noqa: PLC0415

    if not spec.shard_config.is_file():
        return f"{NOT_AVAILABLE}: {spec.shard_config.relative_to(ROOT)} is missing"
    try:
        importlib.import_module(spec.module)
        load_run_config(DEMO, list(spec.overrides))
    except Exception as error:  # noqa: BLE001 - any failure here means "this checkout lacks it"
        return f"{NOT_AVAILABLE}: {type(error).__name__}: {error}"
    return None


def select(names: list[str] | None, known: dict, unavailable) -> tuple[list[str], dict[str, str]]:
    """The requested (default: all) names that can run, and a reason for each one that cannot."""
    chosen = names or list(known)
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise SystemExit(f"unknown name(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    reasons = {n: r for n in chosen if (r := unavailable(known[n])) is not None}
    return [n for n in chosen if n not in reasons], reasons


# -- one run ----------------------------------------------------------------------------------------
def final_l_ig(metrics_file: Path, last: int = L_IG_RECORDS) -> float | None:
    """Mean ``loss_gen`` of the last ``last`` logged steps (a resumed run's repeated steps count once)."""
    if not metrics_file.is_file():
        return None
    by_step = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if record.get("loss_gen") is not None:
            by_step[int(record["step"])] = float(record["loss_gen"])
    values = [by_step[s] for s in sorted(by_step)[-last:]]
    return statistics.fmean(values) if values else None


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train_subprocess(config: Path, run_dir: Path, overrides: list[str]) -> None:
    """``diffdis train --resume auto`` in a fresh process (own globals, own RNG seeding, memory freed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "pretrain.cli", "train", "--config", str(config), "--out", str(run_dir),
               "--resume", "auto", *overrides]
    with (run_dir / "train.log").open("a") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if result.returncode != 0:
        tail = "\n".join((run_dir / "train.log").read_text().splitlines()[-15:])
        raise RuntimeError(f"training {run_dir} exited with {result.returncode}; end of {run_dir / 'train.log'}:\n{tail}")


class Judges:
    """One judge per (dataset, image size, split seed), fitted when first needed."""

    def __init__(self, per_class: int):
        self.per_class = per_class
        self.cache: dict[tuple, tuple] = {}

    def get(self, dataset: str, config):
        from pretrain.judge import fit_judge, generation_task, named  # noqa: PLC0415

        key = (dataset, config.model.image_size, config.data.split_seed, config.data.heldout_fraction)
        if key not in self.cache:
            started = time.perf_counter()
            task = generation_task(dataset, config, self.per_class)
            judge = fit_judge(task.train_images, task.train_labels, seed=0)
            accuracy = named(judge.accuracy(task.heldout_images, task.heldout_labels), task.head_names)
            print(f"judge for {dataset} at {judge.image_size}x{judge.image_size}: real held-out accuracy "
                  f"{accuracy} ({time.perf_counter() - started:.1f} s)", flush=True)
            self.cache[key] = (task, judge, accuracy)
        return self.cache[key]


def generation_metrics(loaded, dataset: str, judges: Judges) -> dict:
    from pretrain.judge import named, prompt_following  # noqa: PLC0415

    task, judge, judge_accuracy = judges.get(dataset, loaded.config)
    figures: dict = {"judge_heldout": judge_accuracy["all"], "gen_per_class": task.per_class,
                     "gen_steps": loaded.config.eval.sample_steps, "gen_guidance": loaded.config.eval.sample_guidance}
    for phrasing, prompts in task.prompt_sets.items():
        metrics = named(prompt_following(loaded, judge, prompts, task.per_class, loaded.config.eval.sample_steps,
                                         loaded.config.eval.sample_guidance, seed=0, targets=task.targets),
                        task.head_names)
        figures[f"pf_{phrasing}"] = metrics.pop("all")
        figures.update({f"pf_{phrasing}_{head}": value for head, value in metrics.items()})
        figures[f"prompt_{phrasing}"] = prompts[0][0]
    return figures


def heldout_l_ig(loaded) -> dict:
    """Held-out L_IG on fixed draws, conditional and unconditional (``pretrain.denoising``)."""
    from pretrain.denoising import denoising_loss  # noqa: PLC0415
    from pretrain.evaluate import heldout_data  # noqa: PLC0415

    pixels, _, captions = heldout_data(loaded.config)
    result = denoising_loss(loaded.model, loaded.tokenizer, pixels, captions, loaded.config.diffusion,
                            batch_size=loaded.config.eval.batch_size)
    return {"l_ig_heldout": result.loss, "l_ig_heldout_uncond": result.loss_uncond,
            **{f"l_ig_heldout_{band}": value for band, value in result.by_band.items()}}


def run_overrides(dataset: DatasetSpec, model: ModelSpec, shards: Path, seed: int, steps: int | None) -> list[str]:
    """The ``diffdis train`` overrides of one run; ``steps`` (``--steps``) wins over the dataset's own length."""
    from data_pipeline.shard_config import ShardConfig  # noqa: PLC0415
    from pretrain.config_io import load_config  # noqa: PLC0415

    steps = steps or dataset.steps
    shard = load_config(ShardConfig, dataset.shard_config)
    return ["data.source=shards", f"data.shards={shards}", f"model.image_size={shard.image.size}",
            f"data.split_seed={shard.source.split_seed}", *dataset.overrides, *model.overrides,
            f"train.seed={seed}", *([f"train.steps={steps}"] if steps else [])]


def run_one(dataset: DatasetSpec, model: ModelSpec, seed: int, steps: int | None, shards: Path, out: Path,
            judges: Judges) -> dict:
    """Train (unless finished), evaluate, write ``bench.json``; a finished run is read back instead."""
    from pretrain.checkpoint import latest_complete, step_of  # noqa: PLC0415
    from pretrain.config import load_run_config  # noqa: PLC0415
    from pretrain.evaluate import evaluate, load_checkpoint, pair_caption_queries, probe_queries  # noqa: PLC0415

    overrides = run_overrides(dataset, model, shards, seed, steps)
    config = load_run_config(model.config, overrides)  # a bad override stops here, naming the key
    total = config.train.steps
    run_dir = out / dataset.name / model.name / f"steps-{total}-seed-{seed}"
    result_file = run_dir / RESULT_FILE
    if result_file.is_file():
        return {**json.loads(result_file.read_text()), "reused": True}
    started, cpu_before = time.perf_counter(), children_cpu_s()
    latest = latest_complete(run_dir / "checkpoints")
    if latest is None or step_of(latest) < total:
        train_subprocess(model.config, run_dir, overrides)
    train_s, train_cpu_s = time.perf_counter() - started, children_cpu_s() - cpu_before
    eval_started, eval_cpu = time.perf_counter(), time.process_time()
    loaded = load_checkpoint(run_dir)
    if loaded.step != total:
        raise RuntimeError(f"{run_dir}: newest complete checkpoint is step {loaded.step}, expected {total}")
    record: dict = {"dataset": dataset.name, "model": model.name, "seed": seed, "steps": total,
                    "batch_size": config.train.batch_size, "run_dir": str(run_dir)}
    if model.zeroshot:
        zeroshot = evaluate(loaded, "zeroshot")
        record.update({k: v for k, v in zeroshot.items() if k.startswith(("top1", "top5", "joint"))})
        record.update(probe_queries(loaded))
        record.update(pair_caption_queries(loaded))
    if model.generation:
        record["l_ig"] = final_l_ig(run_dir / "metrics.jsonl")
        record.update(heldout_l_ig(loaded))
        record.update(generation_metrics(loaded, dataset.name, judges))
    record.update(train_s=round(train_s, 1), eval_s=round(time.perf_counter() - eval_started, 1),
                  wall_s=round(time.perf_counter() - started, 1),
                  cpu_s=round(train_cpu_s + time.process_time() - eval_cpu, 1))
    result_file.write_text(json.dumps(record, indent=2))
    return {**record, "reused": False}


# -- aggregation and tables -------------------------------------------------------------------------
def summarize(runs: list[dict], metrics: tuple[str, ...] = SUMMARY_METRICS) -> dict[str, dict]:
    """Per ``DATASET/MODEL``: for each metric present, ``min``/``median``/``max`` over seeds and ``n``
    (the seeds that have it); ``seeds`` lists the seeds. Pure: the bench's figures come from here."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(f"{run['dataset']}/{run['model']}", []).append(run)
    summary = {}
    for key, members in groups.items():
        entry: dict = {"seeds": sorted(run["seed"] for run in members)}
        for name in metrics:
            values = [float(run[name]) for run in members if run.get(name) is not None]
            if values:
                entry[name] = {"min": min(values), "median": statistics.median(values), "max": max(values),
                               "n": len(values)}
        summary[key] = entry
    return summary


def _spread(stat: dict | None, digits: int = 3) -> str:
    if stat is None:
        return "-"
    return f"{stat['min']:.{digits}f} / {stat['median']:.{digits}f} / {stat['max']:.{digits}f} ({stat['n']})"


def _print_block(title: str, metrics: tuple[str, ...], summary: dict[str, dict]) -> None:
    """One min / median / max table of the ``metrics`` any summary entry has; nothing when none has one."""
    present = [m for m in metrics if any(m in e for e in summary.values())]
    if not present:
        return
    print(f"\n{title}")
    print(f"{'dataset/model':<18}" + "".join(f"{c:>28}" for c in present))
    for key, entry in summary.items():
        if any(c in entry for c in present):
            print(f"{key:<18}" + "".join(f"{_spread(entry.get(c)):>28}" for c in present))


def print_tables(summary: dict[str, dict], runs: list[dict], judge_accuracy: dict[str, float]) -> None:
    _print_block("held-out zero-shot accuracy: min / median / max over seeds (n)", ZEROSHOT_METRICS, summary)
    _print_block("joint zero-shot: the attributes of the best-scoring two-attribute prompt ('painted {colour}"
                 " {shape}', eval words only)", JOINT_METRICS, summary)
    _print_block("linear probe on the image queries, held-out accuracy (high probe, low zero-shot: the class"
                 " prompts miss what the image side holds)", PROBE_METRICS, summary)
    _print_block("the image queries against training-style 'a {colour} {shape}' captions: the nearest caption's"
                 " attribute (pair_*) and each class's captions averaged over the other attribute (marginal_*)",
                 PAIR_METRICS, summary)
    generating = {k: e for k, e in summary.items() if "pf_train_style" in e or "l_ig" in e}
    if generating:
        print("\ngeneration: final L_IG (training log), held-out L_IG on fixed draws (with captions / null context)"
              " and prompt-following accuracy (judged), min / median / max over seeds (n)")
        print(f"{'dataset/model':<18}{'L_IG':>31}{'held-out L_IG':>31}{'held-out, null context':>31}"
              f"{'training-style prompt':>28}{'unseen phrasing':>28}")
        for key, entry in generating.items():
            print(f"{key:<18}{_spread(entry.get('l_ig'), 4):>31}{_spread(entry.get('l_ig_heldout'), 4):>31}"
                  f"{_spread(entry.get('l_ig_heldout_uncond'), 4):>31}{_spread(entry.get('pf_train_style')):>28}"
                  f"{_spread(entry.get('pf_unseen')):>28}")
            for head in ("shape", "colour"):  # scenes: each attribute judged alone (the row above: both right)
                if f"pf_train_style_{head}" in entry:
                    print(f"{'  ' + head:<18}{'':>93}{_spread(entry.get(f'pf_train_style_{head}')):>28}"
                          f"{_spread(entry.get(f'pf_unseen_{head}')):>28}")
        for dataset, accuracy in judge_accuracy.items():
            print(f"judge ({dataset}): {accuracy:.3f} on real held-out images; chance = 1 / classes")
    print("\nruns")
    print(f"{'dataset':<8} {'model':<9} {'seed':>4} {'steps':>6} {'train s':>8} {'wall s':>8} {'CPU s':>8}  note")
    for run in runs:
        print(f"{run['dataset']:<8} {run['model']:<9} {run['seed']:>4} {run.get('steps', '-'):>6} "
              f"{run.get('train_s', '-'):>8} {run.get('wall_s', '-'):>8} {run.get('cpu_s', '-'):>8}  "
              f"{'reused' if run.get('reused') else run.get('error', '')}")


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"seed 0, digits, {QUICK_STEPS} steps (~10 min, 2-core CPU)")
    parser.add_argument("--seeds", default=None, help="comma-separated train.seed values (default 0,1,2)")
    parser.add_argument("--datasets", default=None, help=f"comma-separated, from {','.join(DATASETS)} (default: all available)")
    parser.add_argument("--models", default=None, help=f"comma-separated, from {','.join(MODELS)} (default: all available)")
    parser.add_argument("--steps", type=int, default=None, help="train.steps of every run (default: "
                        "the dataset's benchmark length: digits the recipe's 620, scenes 3720)")
    parser.add_argument("--per-class", type=int, default=20, help="generated images per class per phrasing "
                        "(scenes: a quarter of it for each of its 64 shape-colour classes)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_recipe", help="output directory")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    seeds = [int(s) for s in (_names(args.seeds) or (["0"] if args.quick else ["0", "1", "2"]))]
    steps = args.steps or (QUICK_STEPS if args.quick else None)
    datasets, unavailable = select(_names(args.datasets) or (["digits"] if args.quick else None), DATASETS,
                                   dataset_unavailable)
    models, model_reasons = select(_names(args.models), MODELS, model_unavailable)
    unavailable.update(model_reasons)
    for name, reason in unavailable.items():
        print(f"{name}: {reason}; skipped", flush=True)

    from data_pipeline.pipeline import run_pipeline  # noqa: PLC0415
    from data_pipeline.shard_config import ShardConfig  # noqa: PLC0415
    from pretrain.config_io import load_config  # noqa: PLC0415

    judges, runs, failed, shard_s = Judges(args.per_class), [], [], {}
    for dataset_name in datasets:
        dataset = DATASETS[dataset_name]
        shards = args.out / "shards" / dataset_name
        shard_started = time.perf_counter()
        try:
            made = run_pipeline(load_config(ShardConfig, dataset.shard_config), str(shards), progress=False)
        except Exception as error:  # noqa: BLE001 - e.g. Ray failed to start: the other datasets still run
            traceback.print_exc()
            message = f"sharding {dataset.shard_config.relative_to(ROOT)} failed: {str(error).splitlines()[0]}"
            failed += [{"dataset": dataset_name, "model": m, "seed": s, "error": message} for s in seeds for m in models]
            runs += failed[-len(seeds) * len(models):]
            continue
        shard_s[dataset_name] = round(time.perf_counter() - shard_started, 1)
        print(f"{dataset_name}: {made.samples} samples in {made.shards} shards at {shards} ({shard_s[dataset_name]} s)",
              flush=True)
        for seed in seeds:
            for model_name in models:
                label = f"{dataset_name}/{model_name}/seed {seed}"
                print(f"{label}: ...", flush=True)
                try:
                    run = run_one(dataset, MODELS[model_name], seed, steps, shards, args.out, judges)
                except Exception as error:  # noqa: BLE001 - report, carry on with the other runs
                    traceback.print_exc()
                    run = {"dataset": dataset_name, "model": model_name, "seed": seed, "error": str(error).splitlines()[0]}
                    failed.append(run)
                runs.append(run)
                shown = {k: run[k] for k in ("top1", "l_ig", "l_ig_heldout", "pf_train_style", "pf_unseen", "wall_s", "reused", "error")
                         if k in run}
                print(f"{label}: {shown}", flush=True)

    summary = summarize([run for run in runs if "error" not in run])
    judge_accuracy = {run["dataset"]: run["judge_heldout"] for run in runs if "judge_heldout" in run}
    print_tables(summary, runs, judge_accuracy)
    figures = {
        "benchmark": "bench_recipe", "quick": args.quick, "steps": steps, "seeds": seeds, "datasets": datasets,
        "models": models, "unavailable": unavailable, "judge_heldout": judge_accuracy, "shard_s": shard_s,
        "summary": summary, "runs": runs, "failed": len(failed), "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(figures))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
