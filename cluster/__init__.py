"""Job rendering and submission (Slurm, Kubernetes), launch glue, preemption."""


class ClusterError(RuntimeError):
    """A scheduler command failed or is missing (sbatch, scontrol, the Kubernetes API); the message
    says which and what it answered. ``diffdis`` prints it and exits 1."""


def checkpoints_url(run_dir: str, overrides: list[str]) -> str:
    """Where the trainer writes checkpoints: ``train.checkpoint_dir=`` when overridden (e.g. s3://),
    else RUN/checkpoints. The evaluator job watches this URL (Slurm and Kubernetes alike)."""
    for item in overrides:
        if item.startswith("train.checkpoint_dir="):
            return item.split("=", 1)[1]
    return f"{run_dir.rstrip('/')}/checkpoints"

