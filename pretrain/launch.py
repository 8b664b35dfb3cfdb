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
from dataclasses import dataclass

from cluster.env import free_port
from cluster.preemption import EARLY_SIGNAL_ENV, PREEMPTION_SIGNALS, REQUEUE_EXIT_CODE, early_signal
from pretrain.engine import default_extensions_dir

log = logging.getLogger("diffdis.launch")
FORWARDED_SIGNALS = (*PREEMPTION_SIGNALS, signal.SIGINT)
FAILURE_GRACE_S = 30.0  # after one worker fails, the others get this long before they are killed


def worker_environment(rank: int, world_size: int, port: int, base: dict[str, str] | None = None, *,
                       local_rank: int | None = None, local_world_size: int | None = None,
                       master_addr: str = "127.0.0.1") -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    local_rank = rank if local_rank is None else local_rank
    local_world_size = world_size if local_world_size is None else local_world_size
    env.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(local_world_size),
        MASTER_ADDR=master_addr, MASTER_PORT=str(port),
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    # N processes on one machine: split the cores instead of letting each one take all of them
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // local_world_size)))
    return env


@dataclass(frozen=True)
class NodeLayout:
    """Where this machine sits in a multi-node job: node ``node_rank`` of ``nnodes``, rendezvous at
    ``master_addr:master_port`` (None: pick a free local port, single node only)."""

    node_rank: int = 0
    nnodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int | None = None


def node_layout(env: dict[str, str] | None = None) -> NodeLayout:
    """Read the node layout from torchrun's ``PET_*`` variables, which Kubeflow Trainer (TrainJob
    torch runtime) and the training operator (PyTorchJob with ``nprocPerNode``) set in every pod;
    one node when they are absent. We start the per-GPU processes ourselves (not torchrun) so
    that exit 75 reaches the pod (module docstring)."""
    env = os.environ if env is None else env
    nnodes = int(env.get("PET_NNODES", "1").split(":")[-1])  # torchrun allows MIN:MAX; we run at MAX
    if nnodes <= 1:
        return NodeLayout()
    node_rank = int(env.get("PET_NODE_RANK") or env.get("JOB_COMPLETION_INDEX") or 0)
    addr = env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR")
    port = env.get("PET_MASTER_PORT") or env.get("MASTER_PORT")
    if not addr or not port:
        raise ValueError(f"PET_NNODES={nnodes} but PET_MASTER_ADDR/PET_MASTER_PORT are not set: "
                         "a multi-node --nproc run needs the rendezvous address of node 0")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"PET_NODE_RANK={node_rank}: must be in [0, {nnodes})")
    return NodeLayout(node_rank, nnodes, addr, int(port))


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
    """Run ``python -m pretrain.cli ARGV`` in ``nproc`` processes (ranks 0..nproc-1, or on node k of a
    multi-node job, :func:`node_layout`, ranks k*nproc..) and wait for all.

    Preemption signals and Ctrl-C received here are forwarded to every worker. If one worker fails,
    the others (stuck in a collective) are terminated after :data:`FAILURE_GRACE_S`."""
    if nproc < 1:
        raise ValueError(f"--nproc={nproc} must be >= 1")
    layout = node_layout()
    port = layout.master_port or free_port()
    world = nproc * layout.nnodes
    command = [sys.executable, "-m", "pretrain.cli", *argv]
    early = early_signal()  # a preemption warning that reached us while we were starting: pass it on
    extra = {EARLY_SIGNAL_ENV: str(early)} if early else {}
    workers = [subprocess.Popen(command, env=extra | worker_environment(
        layout.node_rank * nproc + local, world, port, local_rank=local, local_world_size=nproc,
        master_addr=layout.master_addr)) for local in range(nproc)]
    log.info("started %d processes (node %d of %d, master %s:%d): %s", nproc, layout.node_rank, layout.nnodes,
             layout.master_addr, port, " ".join(argv))

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
