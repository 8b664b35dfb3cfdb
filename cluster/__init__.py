"""Job rendering and submission (Slurm, Kubernetes), launch glue, preemption."""


class ClusterError(RuntimeError):
    """A scheduler command failed or is missing (sbatch, scontrol, the Kubernetes API); the message
    says which and what it answered. ``diffdis`` prints it and exits 1."""
