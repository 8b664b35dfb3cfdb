"""`diffdis submit slurm` and `diffdis jobs` against a real Slurm: slurmctld + slurmd + munge from
Debian's packages, installed and started on this machine by scripts/slurm-local.sh (root only).

One 2-task CPU training job on the tiny config runs under srun with ranks from Slurm's variables;
`diffdis jobs cancel --signal USR1` makes every rank checkpoint and exit 75; the batch script
requeues the job, which resumes by itself (--resume auto) and finishes, its metrics continuing the
ones before the requeue. A job that fails for another reason (its data is missing: exit 2) is not
requeued. Deselect with -m "not slurm"."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.checkpoint import COMPLETE, tag_for
from pretrain.config import CONFIGS_DIR, load_run_config
from pretrain.engine import lr_multiplier
from pretrain.evaluator import flat_scalars

pytestmark = [pytest.mark.slurm, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm-local.sh"
SECRET = "s3cr3t-value-never-rendered"
STEPS = 12


@pytest.fixture(scope="session")
def slurm():
    """A running single-node Slurm. Started here (and stopped after the session) unless one was
    already answering. Not root, or no apt-get: the tests fail with the reason (deselect with -m "not slurm")."""
    # A machine that cannot get Slurm fails these tests (a silent skip would hide the missing set-up);
    # deselect them explicitly with `-m "not slurm"` where that is known and wanted.
    if os.geteuid() != 0:
        pytest.fail("real-Slurm tests need root to install and start slurmctld/slurmd/munge (CI runs as root); "
                    "deselect with -m 'not slurm'")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.fail("no apt-get and no slurmctld: cannot install Slurm on this machine; deselect with -m 'not slurm'")
    running = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0
    started = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"could not start Slurm:\n{result.stdout}\n{result.stderr}"
    print(f"\nslurm-local: ready in {time.monotonic() - started:.1f} s (already running: {running})")
    yield
    if not running:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120)


def diffdis(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env or job_env(), timeout=120)


def job_env() -> dict[str, str]:
    """What sbatch exports to the job: this environment, with a credential in it that must never
    reach a rendered file, and without rank variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    # PYTHONPATH: Ray workers of the shard job import this checkout, not the installed copy
    return {**env, "AWS_SECRET_ACCESS_KEY": SECRET, "OMP_NUM_THREADS": "1", "DIFFDIS_PROGRESS": "log", "PYTHONPATH": str(ROOT)}


# a pending job with one of these reasons never starts: fail now, naming it, instead of timing out
HOPELESS = ("PartitionConfig", "BadConstraints", "PartitionNodeLimit", "ReqNodeNotAvail", "PartitionDown", "NodeDown")
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def status(run: Path) -> dict:
    result = diffdis("jobs", "status", str(run), "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert not (record["state"] == "PENDING" and record["reason"].startswith(HOPELESS)), (
        f"job {record['job_id']} can never start: {record['reason']} (see sinfo, /etc/slurm/slurm.conf)")
    return record


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [r for r in map(json.loads, lines) if "event" not in r]


def wait_until(condition, what: str, timeout: float, run: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    logs = "".join(p.read_text()[-3000:] for p in (run / "slurm").glob("*.out")) if run else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def submit(run: Path, *extra: str, tasks: int = 2) -> str:
    result = diffdis("submit", "slurm", "--gpus-per-node", "0", "--tasks-per-node", str(tasks), "--cpus-per-task", "1",
                     "--config", str(CONFIGS_DIR / "tiny.yaml"), "--out", str(run), "--name", run.name, *extra)
    assert result.returncode == 0, result.stderr
    return (run / "slurm" / "job_id").read_text().strip()


@pytest.mark.multiprocess
def test_preempt_requeue_resume_and_failure_not_requeued(slurm, tmp_path):
    t0 = time.monotonic()
    run = tmp_path / "train"
    job = submit(run, f"train.steps={STEPS}", "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=1000",
                 "train.keep_last=0")
    script = (run / "slurm" / "train.sbatch").read_text()
    assert SECRET not in script and "--signal=USR1@120" in script and "--requeue" in script
    assert "--resume auto" in script and "--ntasks-per-node=2" in script

    assert status(run)["state"] in ("PENDING", "RUNNING")
    wait_until(lambda: len(metrics(run)) >= 2, "2 logged steps", 240, run)
    first = status(run)
    assert first["state"] == "RUNNING" and first["restarts"] == 0 and first["job_id"] == job
    listing = diffdis("jobs", "status").stdout.splitlines()  # the queue, as squeue shows it
    assert any(line.split()[:3] == [job, run.name, "RUNNING"] for line in listing), listing
    t_signal = time.monotonic()
    result = diffdis("jobs", "cancel", str(run), "--signal", "USR1")
    assert result.returncode == 0, result.stderr

    # a job that fails for another reason (its shards do not exist): queued behind the training job
    failing = tmp_path / "fails"
    submit(failing, "data.source=shards", f"data.shards={tmp_path}/no-such-shards", tasks=1)

    # the preempted job checkpoints at the step every rank agreed on, exits 75 and is requeued
    log = run / "slurm" / f"{run.name}-{job}.out"
    wait_until(lambda: "requeueing job" in log.read_text(), "the requeue line in the job log", 120, run)
    stopped = max(r["step"] for r in metrics(run))
    marker = json.loads((run / "checkpoints" / tag_for(stopped) / COMPLETE).read_text())
    assert marker["world_size"] == 2 and marker["step"] == stopped  # 2 ranks, from SLURM_PROCID / SLURM_NTASKS
    assert "step exited with 75" in log.read_text()
    requeued = wait_until(lambda: (s := status(run))["restarts"] >= 1 and s, "restarts=1", 60, run)
    t_requeued = time.monotonic()
    assert requeued["state"] in ("PENDING", "REQUEUED", "RUNNING"), requeued

    done = wait_until(lambda: (s := status(failing))["state"] in FINISHED and s, "the failing job", 240)
    assert done["state"] == "FAILED" and done["restarts"] == 0 and done["exit_code"].startswith("2:"), done
    failing_log = diffdis("jobs", "logs", str(failing), "-n", "0").stdout
    assert "step exited with 2" in failing_log and "requeueing" not in failing_log

    final = wait_until(lambda: (s := status(run))["state"] in FINISHED and s, "the resumed job", 300, run)
    t_end = time.monotonic()
    text = log.read_text()
    assert final["state"] == "COMPLETED" and final["restarts"] == 1, (final, text[-3000:])
    assert "(restart 0)" in text and "(restart 1)" in text
    assert f"resumed from {run / 'checkpoints' / tag_for(stopped)} (step {stopped}" in text

    # the metrics after the requeue continue the ones before it: every step once, the LR schedule on
    steps = [r["step"] for r in metrics(run)]
    assert steps == list(range(1, STEPS + 1)), steps
    optim = load_run_config(CONFIGS_DIR / "tiny.yaml", [f"train.steps={STEPS}"]).optim
    expected = [optim.lr * lr_multiplier(s, optim.warmup_steps, STEPS, optim.min_lr_ratio) for s in steps]
    assert [r["lr"] for r in metrics(run)] == pytest.approx(expected, rel=1e-6)  # a restart would repeat step 1's LR
    assert all(math.isfinite(r["loss"]) for r in metrics(run))
    # and the data stream: each rank consumed 4 samples a step (batch 8 over 2 ranks), none twice, none skipped
    for step in (stopped, STEPS):
        for rank in range(2):
            state = json.loads((run / "checkpoints" / tag_for(step) / "trainer_state" / f"rank-{rank:05d}.json").read_text())
            assert state["trainer"] == {"step": step} and state["data"] == {"epoch": 0, "offset": step * 4}, state
    print(f"\nslurm timings: first steps + USR1 at {t_signal - t0:.1f} s, requeued after {t_requeued - t_signal:.1f} s, "
          f"finished {t_end - t_requeued:.1f} s later; stopped at step {stopped}; total {t_end - t0:.1f} s")


def test_bad_config_is_refused_before_submission(slurm, tmp_path):
    result = diffdis("submit", "slurm", "--gpus-per-node", "0", "--tasks-per-node", "1", "--config",
                     str(CONFIGS_DIR / "tiny.yaml"), "--out", str(tmp_path / "run"), "train.stepz=3")
    assert result.returncode == 2 and "train.stepz" in result.stderr
    assert not (tmp_path / "run" / "slurm" / "job_id").exists()


def test_ray_shard_job_on_slurm(slurm, tmp_path):
    """The data pipeline as a Ray-on-Slurm job: Ray head started with srun, diffdis shard joins it."""
    t0 = time.monotonic()
    out, run = tmp_path / "shards", tmp_path / "shard-run"
    result = diffdis("submit", "slurm-shard", "digits", str(out), "--shard-config", str(CONFIGS_DIR / "data" / "digits.yaml"),
                     "--nodes", "1", "--cpus-per-node", "2", "--name", "shardjob", "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    assert SECRET not in (run / "slurm" / "shard.sbatch").read_text()
    final = wait_until(lambda: (s := status(run))["state"] in FINISHED and s, "the shard job", 300, run)
    log = diffdis("jobs", "logs", str(run), "-n", "0").stdout
    assert final["state"] == "COMPLETED", log[-3000:]
    assert "Ray head" in log and "diffdis shard exited with 0" in log
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(s["samples"] for s in manifest["shards"]) == manifest["total_samples"] > 1000, manifest.keys()
    print(f"\nray-on-slurm shard job: {time.monotonic() - t0:.1f} s")


@pytest.mark.multiprocess
def test_evaluator_job_evaluates_every_checkpoint_of_the_training_job_once(slurm, tmp_path):
    """`--evaluator`: a second job watches the run's checkpoints while the training job is queued or
    running, then makes a final pass. On this 2-CPU node the training job (2 ranks) holds both CPUs, so
    the evaluator starts only when training ends: it must still evaluate every checkpoint, once each."""
    run = tmp_path / "evaluated"
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n  - {kind: zeroshot, name: zs, data: heldout, limit: 24, steps: 1}\n")
    submit(run, "--evaluator", "--eval-suite", str(suite), "train.steps=4", "train.batch_size=8",
           "train.checkpoint_every=2", "train.keep_last=0")
    assert (run / "slurm" / "evaluator.sbatch").is_file()
    results = run / "eval" / "results.jsonl"

    def evaluated_steps() -> list[int] | None:
        lines = results.read_text().splitlines() if results.is_file() else []
        steps = [json.loads(line)["step"] for line in lines]
        return steps if len(steps) >= 2 else None

    steps = wait_until(evaluated_steps, "the evaluator's results for steps 2 and 4", 420, run)
    time.sleep(2)  # a third (duplicate) record would land right after the final pass
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] == steps
    assert all(r["status"] == "evaluated" for r in records), records
    for record in records:
        top1 = [v for k, v in flat_scalars(record["metrics"]).items() if k.endswith("top1")]
        assert top1 and all(0.0 <= v <= 1.0 for v in top1), record
