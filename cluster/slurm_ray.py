"""The data pipeline as a Ray-on-Slurm job: ``diffdis submit slurm-shard SOURCE OUTPUT``.

The sbatch script starts a Ray head on the first node of the allocation and one Ray worker on each
other node (each a long-running ``srun`` step, ``--overlap`` so the driver can share the first
node), waits until the head answers, then runs ``diffdis shard SOURCE OUTPUT --ray-address
HEAD:PORT`` in the batch shell. When the driver exits, the job ends and Slurm stops the Ray steps.
``diffdis shard`` resumes (writes only missing or damaged shards), so ``--requeue`` after a
preemption continues where it stopped.

Ray's own token authentication is switched off for the job's cluster (``RAY_AUTH_MODE=disabled``,
as for local runs) unless the submitting environment sets ``RAY_AUTH_MODE``: the head listens on the
node's address for the job's lifetime, reachable by whoever can reach the node.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cluster.slurm import placement_options

SCRIPT_NAME = "shard.sbatch"
RAY_PORT_BASE = 30000  # + job id mod 10000 (the trainer uses 20000 + id mod 10000)
HEAD_WAIT_S = 120


def default_bin_dir() -> str:
    """Where this interpreter's ``ray`` and ``python`` live (login and compute nodes share the venv)."""
    return str(Path(sys.executable).parent)


@dataclass
class RayShardJob:
    source: str
    output: str
    log_dir: str  # the script and Slurm's log go here (a path every node sees)
    shard_args: list[str] = field(default_factory=list)  # e.g. ["--config", "configs/data/digits.yaml", "image.size=64"]
    name: str = "diffdis-shard"
    nodes: int = 1
    cpus_per_node: int = 32
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    bin_dir: str = field(default_factory=default_bin_dir)
    setup: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"nodes (--nodes) = {self.nodes}: must be >= 1")
        if self.cpus_per_node < 1:
            raise ValueError(f"cpus_per_node (--cpus-per-node) = {self.cpus_per_node}: must be >= 1")


def render_ray_sbatch(job: RayShardJob) -> str:
    ray = shlex.quote(f"{job.bin_dir}/ray")
    shard = " ".join(shlex.quote(p) for p in [f"{job.bin_dir}/python", "-m", "pretrain.cli", "shard", job.source,
                                              job.output, *job.shard_args])
    options = [f"--job-name={job.name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
               f"--cpus-per-task={job.cpus_per_node}"]
    options += placement_options(job.partition, job.account, job.time)
    options += ["--requeue", f"--output={job.log_dir}/%x-%j.out", "--open-mode=append"]
    header = "\n".join(f"#SBATCH {o}" for o in options)
    setup = "".join(line + "\n" for line in job.setup)
    return f"""#!/bin/bash
# Rendered by `diffdis submit slurm-shard` (cluster/slurm_ray.py): Ray head + {job.nodes - 1} worker node(s), then diffdis shard.
{header}
{setup}set -u
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=${{RAY_AUTH_MODE:-disabled}}
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${{nodes[0]}}
port=$(( {RAY_PORT_BASE} + SLURM_JOB_ID % 10000 ))
echo "diffdis-slurm: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}): Ray head $head:$port, $(date -u +%FT%TZ)"
srun --nodes=1 --ntasks=1 --overlap -w "$head" {ray} start --head --node-ip-address="$head" --port="$port" \\
    --num-cpus="$SLURM_CPUS_PER_TASK" --include-dashboard=false --block &
for i in $(seq 1 {HEAD_WAIT_S}); do
    {ray} status --address "$head:$port" >/dev/null 2>&1 && break
    [ "$i" -eq {HEAD_WAIT_S} ] && {{ echo "diffdis-slurm: Ray head did not answer in {HEAD_WAIT_S} s"; exit 1; }}
    sleep 1
done
for node in "${{nodes[@]:1}}"; do
    srun --nodes=1 --ntasks=1 -w "$node" {ray} start --address="$head:$port" --num-cpus="$SLURM_CPUS_PER_TASK" --block &
done
{shard} --ray-address "$head:$port"
code=$?
echo "diffdis-slurm: diffdis shard exited with $code"
exit "$code"
"""


def write_script(job: RayShardJob) -> Path:
    path = Path(job.log_dir) / SCRIPT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_ray_sbatch(job))
    return path
