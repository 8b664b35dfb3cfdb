"""Render and submit the sbatch script of a training job.

We render the script ourselves (a template, below) rather than with submitit: the user reads the
exact script with ``--dry-run`` and finds it beside the run; the job runs ``diffdis train`` (a
command, not a pickled function), so a requeued job needs no pickle from the login node; and the
requeue contract is the trainer's exit code 75, decided in four lines of shell. docs/design-notes.md
("Cluster submission") has the longer argument.

How the script works:
- one task per GPU (``--ntasks-per-node``), started by ``srun``; each task reads its rank from
  Slurm's variables (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``: ``cluster/env.py``),
  and the rendezvous is env:// on the first node of the allocation (``MASTER_ADDR`` from
  ``scontrol show hostnames``, ``MASTER_PORT`` from the job id). No torchrun: its agent turns a
  worker's exit 75 into 1 (docs/distributed.md).
- ``--signal=USR1@GRACE`` (no ``B:``) reaches the step's tasks GRACE seconds before the time limit:
  every rank finishes its step, checkpoints and exits 75. ``scancel --signal=USR1`` does the same.
- exit 75 from the step → the script calls ``scontrol requeue`` on its own job (``--requeue``): the
  job goes back to the queue with the same id and, on its next start, ``--resume auto`` continues
  from the newest complete checkpoint. Any other non-zero exit ends the job as FAILED.
- the batch shell traps SIGTERM and SIGUSR1 (preemption, time limit, ``scancel``) and keeps waiting for the
  step, so the step's exit code still decides; srun reports the highest exit code of its tasks.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cluster import ClusterError, checkpoints_url

from cluster.preemption import REQUEUE_EXIT_CODE

SCRIPT_NAME = "train.sbatch"
EVALUATOR_SCRIPT_NAME = "evaluator.sbatch"
TRAIN_JOB_VARIABLE = "DIFFDIS_TRAIN_JOB_ID"  # the evaluator job follows this training job
EVALUATOR_POLL_S = 60
# squeue state codes of a job that may still write checkpoints (a requeued job passes through RQ to PD)
ACTIVE_STATES = "PD,R,S,CG,CF,RQ,RF,RH,RS"
MASTER_PORT_BASE = 20000  # + job id mod 10000: below the ephemeral range, distinct for concurrent jobs


def default_entry() -> str:
    """How compute nodes start diffdis: this interpreter (login and compute nodes share the venv)."""
    return f"{sys.executable} -m pretrain.cli"


@dataclass
class SlurmJob:
    """Everything the sbatch script depends on. ``config``/``run_dir`` should be absolute paths on a
    file system the compute nodes share (the CLI resolves them)."""

    run_dir: str
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    name: str = "diffdis"
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # default: one task per GPU; required on CPU-only nodes (gpus_per_node=0)
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # Slurm's format, e.g. "24:00:00" or "2-00:00:00"
    signal_grace_s: int = 120  # USR1 this long before the time limit: enough for one step + a checkpoint
    requeue: bool = True
    entry: str = field(default_factory=default_entry)  # the command that runs `diffdis`
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load, source venv)
    env: dict[str, str] = field(default_factory=dict)  # non-secret variables for every task
    extra_sbatch: list[str] = field(default_factory=list)  # more "#SBATCH" options, e.g. "--exclusive"

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"nodes (--nodes) = {self.nodes}: must be >= 1")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node (--gpus-per-node) = {self.gpus_per_node}: must be >= 0")
        if self.tasks_per_node is None:
            if self.gpus_per_node == 0:
                raise ValueError("tasks_per_node (--tasks-per-node): required when gpus_per_node=0 (CPU nodes have no GPU to count ranks by)")
            self.tasks_per_node = self.gpus_per_node
        if self.tasks_per_node < 1:
            raise ValueError(f"tasks_per_node (--tasks-per-node) = {self.tasks_per_node}: must be >= 1")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ValueError(f"tasks_per_node (--tasks-per-node) = {self.tasks_per_node} with gpus_per_node={self.gpus_per_node}: "
                             "the trainer runs one rank per GPU")
        if self.signal_grace_s < 1:
            raise ValueError(f"signal_grace_s (--signal-grace) = {self.signal_grace_s}: must be >= 1")
        for key in self.env:
            if looks_secret(key):
                raise ValueError(f"env.{key} (--env): looks like a credential; pass secrets through the job's environment "
                                 "(sbatch exports the submitting shell's) or a file, never in the script")

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def slurm_dir(self) -> Path:
        return Path(self.run_dir) / "slurm"


SECRET_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "API_KEY", "ACCESS_KEY", "PRIVATE_KEY")


def looks_secret(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in SECRET_MARKERS)


def train_command(job: SlurmJob) -> str:
    parts = [*shlex.split(job.entry), "train"]
    if job.config:
        parts += ["--config", job.config]
    parts += ["--out", job.run_dir, "--resume", "auto", *job.overrides]
    return " ".join(shlex.quote(p) for p in parts)


def placement_options(partition: str | None, account: str | None, time: str | None) -> list[str]:
    """The #SBATCH options every job of ours shares: where it runs, who pays, how long."""
    return ([f"--partition={partition}"] * bool(partition) + [f"--account={account}"] * bool(account)
            + [f"--time={time}"] * bool(time))


def sbatch_header(options: list[str]) -> str:
    return "\n".join(f"#SBATCH {shlex.quote(o) if ' ' in o else o}" for o in options)


def environment_lines(job: SlurmJob) -> str:
    """The job's non-secret ``export NAME=VALUE`` lines (secrets travel in sbatch's exported environment)."""
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(job.env.items()))


def render_sbatch(job: SlurmJob) -> str:
    """The sbatch script, byte-stable for a given job (golden files in tests/golden/slurm/)."""
    log = f"{job.slurm_dir}/%x-%j.out"
    options = [f"--job-name={job.name}", f"--nodes={job.nodes}", f"--ntasks-per-node={job.tasks_per_node}"]
    if job.gpus_per_node:
        options.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task:
        options.append(f"--cpus-per-task={job.cpus_per_task}")
    options += placement_options(job.partition, job.account, job.time)
    options += [f"--signal=USR1@{job.signal_grace_s}"]
    options += ["--requeue"] if job.requeue else ["--no-requeue"]
    options += [f"--output={log}", "--open-mode=append", *job.extra_sbatch]
    header = sbatch_header(options)
    env_lines = environment_lines(job)
    setup = "\n".join(job.setup)
    # srun of Slurm 22.05-23.02 does not inherit sbatch's --cpus-per-task: pass it again
    cpus = f" --cpus-per-task={job.cpus_per_task}" if job.cpus_per_task else ""
    threads = "" if job.cpus_per_task is None else "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}\n"
    requeue = (f"""if [ "$code" -eq {REQUEUE_EXIT_CODE} ]; then
    echo "diffdis-slurm: exit {REQUEUE_EXIT_CODE} (checkpointed after a preemption signal): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi""" if job.requeue else f"# --no-requeue: exit {REQUEUE_EXIT_CODE} ends the job; resubmit to continue")
    return f"""#!/bin/bash
# Rendered by `diffdis submit slurm` (cluster/slurm.py). {job.nodes} node(s) x {job.tasks_per_node} task(s) = {job.world_size} ranks.
{header}
{setup + chr(10) if setup else ""}set -u
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE  # ranks come from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID
{env_lines + chr(10) if env_lines else ""}{threads}# rendezvous on the first node of the allocation; a port per job id
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$(( {MASTER_PORT_BASE} + SLURM_JOB_ID % 10000 ))
echo "diffdis-slurm: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT, $(date -u +%FT%TZ)"

# SIGTERM (time limit, preemption, scancel) reaches the tasks too: they checkpoint and exit {REQUEUE_EXIT_CODE}.
# The shell keeps waiting so that the step's exit code decides what happens next (USR1 likewise, should
# it be sent to the batch shell with scancel -b).
trap 'echo "diffdis-slurm: batch shell got a signal; waiting for the step"' TERM USR1
srun --kill-on-bad-exit=0{cpus} {train_command(job)} &
step=$!
while true; do
    wait "$step"; code=$?
    kill -0 "$step" 2>/dev/null || break
done
echo "diffdis-slurm: step exited with $code"
{requeue}
exit "$code"
"""


def render_evaluator_sbatch(job: SlurmJob, suite: str | None = None) -> str:
    """The evaluator as its own one-task job beside training: ``diffdis evaluator watch`` on the
    trainer's checkpoint URL (one GPU when the training nodes have GPUs, else CPU), for as long as the
    training job (``$DIFFDIS_TRAIN_JOB_ID``, exported by ``diffdis submit slurm --evaluator``) is in
    the queue, requeues included; then one ``--once`` pass for the checkpoints written since the last
    poll. Killing and restarting the watcher is safe: it records what it finished atomically and
    evaluates nothing twice (pretrain/evaluator.py), so the job is requeueable too."""
    options = [f"--job-name={job.name}-eval", "--nodes=1", "--ntasks=1"]
    options += ["--gpus=1"] * bool(job.gpus_per_node)
    options += [f"--cpus-per-task={job.cpus_per_task}"] * bool(job.cpus_per_task)
    options += placement_options(job.partition, job.account, job.time)
    options += ["--requeue", f"--output={job.slurm_dir}/%x-%j.out", "--open-mode=append", *job.extra_sbatch]
    header = sbatch_header(options)
    setup = "\n".join(job.setup)
    env_lines = environment_lines(job)
    watch = [*shlex.split(job.entry), "evaluator", "watch", checkpoints_url(job.run_dir, job.overrides),
             "--out", f"{job.run_dir.rstrip('/')}/eval", "--device", "cuda" if job.gpus_per_node else "cpu"]
    watch += ["--suite", suite] if suite else []
    command = " ".join(shlex.quote(part) for part in watch)
    return f"""#!/bin/bash
# Rendered by `diffdis submit slurm --evaluator` (cluster/slurm.py): the evaluator beside training job ${TRAIN_JOB_VARIABLE}.
{header}
{setup + chr(10) if setup else ""}set -u
: "${{{TRAIN_JOB_VARIABLE}:?the training job id (diffdis submit slurm --evaluator exports it)}}"
{env_lines + chr(10) if env_lines else ""}echo "diffdis-slurm: evaluator job $SLURM_JOB_ID following training job ${TRAIN_JOB_VARIABLE}, $(date -u +%FT%TZ)"
{command} &
watcher=$!
# while the training job is queued or running (a requeued one comes back as PENDING)
while squeue -h -j "${TRAIN_JOB_VARIABLE}" -t {ACTIVE_STATES} 2>/dev/null | grep -q .; do
    sleep {EVALUATOR_POLL_S}
    kill -0 "$watcher" 2>/dev/null || {{ wait "$watcher"; exit $?; }}
done
kill "$watcher" 2>/dev/null; wait "$watcher"
{command} --once
"""


def write_evaluator_script(job: SlurmJob, suite: str | None = None) -> Path:
    """Write RUN/slurm/evaluator.sbatch and return its path."""
    job.slurm_dir.mkdir(parents=True, exist_ok=True)
    path = job.slurm_dir / EVALUATOR_SCRIPT_NAME
    path.write_text(render_evaluator_sbatch(job, suite))
    return path


def write_script(job: SlurmJob) -> Path:
    """Write the script beside the run (RUN/slurm/train.sbatch) and return its path."""
    job.slurm_dir.mkdir(parents=True, exist_ok=True)
    path = job.slurm_dir / SCRIPT_NAME
    path.write_text(render_sbatch(job))
    return path


def sbatch(script: Path, export: dict[str, str] | None = None) -> str:
    """Submit with ``sbatch --parsable``; returns the job id. ``export`` adds variables to the job's
    environment (``--export=ALL,NAME=VALUE``; job ids, never secrets)."""
    extra = [f"--export=ALL,{','.join(f'{k}={v}' for k, v in export.items())}"] if export else []
    result = subprocess.run(["sbatch", "--parsable", *extra, str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        raise ClusterError(f"sbatch {script} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]
