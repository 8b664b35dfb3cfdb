"""``diffdis train --nproc N``: start N local training processes with torchrun's environment variables.

Under Slurm (``srun``) or Kubernetes the scheduler starts one process per GPU and
``cluster.env.read_dist_env`` reads the rank variables; this launcher is for one machine.

Why our own ~80 lines instead of ``torch.distributed.run`` (torchrun): the preemption contract needs
the workers' exit code (:data:`cluster.preemption.REQUEUE_EXIT_CODE`) to reach the scheduler, and
signals forwarded to every worker so that all of them finish the step and checkpoint. torchrun's
elastic agent reports any worker exit other than 0 as ``ChildFailedError`` (exit 1) and on SIGTERM
tears the workers down on its own schedule. The variables we set are torchrun's, so the workers run
unchanged under torchrun, the DeepSpeed launcher or Slurm.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from cluster.env import free_port
from cluster.preemption import PREEMPTION_SIGNALS, REQUEUE_EXIT_CODE
from pretrain.engine import default_extensions_dir

log = logging.getLogger("diffdis.launch")
FORWARDED_SIGNALS = (*PREEMPTION_SIGNALS, signal.SIGINT)
FAILURE_GRACE_S = 30.0  # after one worker fails, the others get this long before they are killed


def worker_environment(rank: int, world_size: int, port: int, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    # N processes on one machine: split the cores instead of letting each one take all of them
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    return env


def combined_exit_code(codes: list[int]) -> int:
    """0 when every worker succeeded; the requeue code when every worker either succeeded or asked to
    be requeued; otherwise the first real failure, a worker's own exit code before a signal death
    (negative codes become 128+n): when one worker exits with an error, the others are sent SIGTERM
    and may die of it, and their death is not the cause (e.g. the guard's exit 65 on every rank)."""
    failures = sorted((c for c in codes if c not in (0, REQUEUE_EXIT_CODE)), key=lambda c: c < 0)
    if failures:
        code = failures[0]
        return 128 - code if code < 0 else code
    return REQUEUE_EXIT_CODE if REQUEUE_EXIT_CODE in codes else 0


def launch_local(nproc: int, argv: list[str]) -> int:
    """Run ``python -m pretrain.cli ARGV`` in ``nproc`` processes (ranks 0..nproc-1) and wait for all.

    Preemption signals and Ctrl-C received here are forwarded to every worker. If one worker fails,
    the others (stuck in a collective) are terminated after :data:`FAILURE_GRACE_S`."""
    if nproc < 1:
        raise ValueError(f"--nproc={nproc} must be >= 1")
    port = free_port()
    command = [sys.executable, "-m", "pretrain.cli", *argv]
    workers = [subprocess.Popen(command, env=worker_environment(rank, nproc, port)) for rank in range(nproc)]
    log.info("started %d processes (master port %d): %s", nproc, port, " ".join(argv))

    def forward(signum, frame):  # noqa: ARG001
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        failed_at = None
        while any(w.poll() is None for w in workers):
            codes = [w.poll() for w in workers]
            if failed_at is None and any(c not in (None, 0, REQUEUE_EXIT_CODE) for c in codes):
                failed_at = time.monotonic()
                log.error("a worker failed (exit codes %s): stopping the others", codes)
                forward(signal.SIGTERM, None)
            if failed_at is not None and time.monotonic() - failed_at > FAILURE_GRACE_S:
                for worker in workers:
                    if worker.poll() is None:
                        worker.kill()
            time.sleep(0.2)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return combined_exit_code([w.returncode for w in workers])
