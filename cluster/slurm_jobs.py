"""``diffdis jobs status|cancel|logs`` for Slurm: thin wrappers over squeue, scontrol and scancel.

Status comes from ``scontrol show job`` (state, restarts, exit code, log path), which answers for
running, pending and recently finished jobs (``MinJobAge``, 300 s by default) and needs no
accounting database; ``sacct`` (slurmdbd) is used only when scontrol no longer knows the job.
A job is named by its id or by its run directory (``RUN/slurm/job_id``, written at submission).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster import ClusterError

JOB_ID_FILE = "job_id"


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    name: str
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, REQUEUED, ...
    restarts: int  # how often the job was requeued
    exit_code: str  # "code:signal" as Slurm prints it
    reason: str
    nodes: str
    stdout: str  # the log file

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def resolve_job_id(job: str) -> str:
    """A job id, or a run directory submitted by ``diffdis submit slurm`` (its ``slurm/job_id``)."""
    if job.isdigit():
        return job
    path = Path(job) / "slurm" / JOB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    raise ValueError(f"{job!r} is neither a Slurm job id nor a run directory with {path.relative_to(job)}")


def parse_scontrol(text: str) -> dict[str, str]:
    """``scontrol show job -o`` (one line of KEY=VALUE) → dict. Values never contain a space
    followed by KEY=, except Command/WorkDir paths, which we do not need to split."""
    fields: dict[str, str] = {}
    key = None
    for token in text.split():
        name, sep, value = token.partition("=")
        if sep and name and name[0].isalpha():
            key = name
            fields[key] = value
        elif key is not None:  # a value with spaces (e.g. Reason=...)
            fields[key] += " " + token
    return fields


def _run(command: list[str]) -> subprocess.CompletedProcess:
    if shutil.which(command[0]) is None:
        raise ClusterError(f"{command[0]}: not found; run on a Slurm login node (or start a local Slurm with "
                           "`bash scripts/slurm-local.sh start`)")
    return subprocess.run(command, capture_output=True, text=True)


def job_status(job_id: str) -> JobStatus:
    result = _run(["scontrol", "show", "job", "-o", job_id])
    if result.returncode == 0 and result.stdout.strip():
        f = parse_scontrol(result.stdout.splitlines()[0])
        return JobStatus(job_id=f.get("JobId", job_id), name=f.get("JobName", ""), state=f.get("JobState", "UNKNOWN"),
                         restarts=int(f.get("Restarts", "0")), exit_code=f.get("ExitCode", ""),
                         reason=f.get("Reason", ""), nodes=f.get("NodeList", ""), stdout=f.get("StdOut", ""))
    if shutil.which("sacct"):  # finished long ago: accounting, when the cluster has it
        acct = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,JobName,State,ExitCode,NodeList"],
                              capture_output=True, text=True)
        line = acct.stdout.strip().splitlines()[:1]
        if acct.returncode == 0 and line:
            jid, name, state, code, nodes = line[0].split("|")
            return JobStatus(jid, name, state.split()[0], 0, code, "", nodes, "")
    raise ValueError(f"Slurm job {job_id}: unknown to scontrol ({result.stderr.strip() or 'no output'}) "
                     "and no accounting (sacct) record")


def queue(user: str | None = None) -> str:
    """``squeue`` for the user's jobs (all jobs when ``user`` is None)."""
    command = ["squeue", "-o", "%.10i %.20j %.9T %.6D %.10M %R"] + (["-u", user] if user else [])
    result = _run(command)
    if result.returncode != 0:
        raise ClusterError(f"squeue failed: {result.stderr.strip()}")
    return result.stdout


def cancel(job_id: str, signal: str | None = None) -> None:
    """``scancel``; with ``signal`` (e.g. USR1) the job's steps get that signal instead of being
    cancelled: the trainer checkpoints, exits 75 and the job requeues itself."""
    result = _run(["scancel", *([f"--signal={signal}"] if signal else []), job_id])
    if result.returncode != 0:
        raise ClusterError(f"scancel {job_id} failed: {result.stderr.strip()}")


def log_tail(job_id: str, lines: int = 50) -> tuple[str, str]:
    """(path, the last ``lines`` lines) of the job's output file."""
    path = job_status(job_id).stdout
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"Slurm job {job_id}: log {path or '(none reported)'} not found on this machine")
    text = Path(path).read_text(errors="replace").splitlines()
    return path, "\n".join(text[-lines:] if lines > 0 else text)
