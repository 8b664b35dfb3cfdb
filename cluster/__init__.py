"""Job rendering and submission (Slurm, Kubernetes), launch glue, preemption."""
