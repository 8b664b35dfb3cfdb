"""Preemption: a signal asks the job to stop; every rank finishes the same step, checkpoints, and the
process exits with :data:`REQUEUE_EXIT_CODE` so the scheduler (or a wrapper script) requeues it.

Slurm sends SIGTERM at preemption/time limit (or the signal chosen with ``--signal=USR1@120``);
Kubernetes sends SIGTERM before deleting a pod. A signal may reach only some ranks (or reach them
at different steps), so the stop decision is agreed by a max-reduction of a flag after every step:
all ranks stop after the same step. A ``kill -9`` cannot be caught: it loses the steps since the last
complete checkpoint, which is why checkpoints are written whole with ``COMPLETE`` last.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

# sysexits.h EX_TEMPFAIL: "temporary failure, try again". Slurm requeue wrappers and Kubernetes
# podFailurePolicy rules match on it (any other non-zero code is a real failure).
REQUEUE_EXIT_CODE = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


EARLY_SIGNALS = (signal.SIGUSR1,)
EARLY_SIGNAL_ENV = "DIFFDIS_EARLY_SIGNAL"  # set by the local launcher for workers it starts after such a signal
_early: dict[str, int | None] = {"signum": None}


def catch_early(signals: tuple[int, ...] = EARLY_SIGNALS) -> None:
    """Record a preemption warning that arrives before the trainer's watcher exists.

    Starting a rank takes tens of seconds (imports, DeepSpeed, the data stream); SIGUSR1's default
    action is to terminate, so Slurm's ``--signal=USR1@GRACE`` or ``scancel --signal=USR1`` in that
    window would kill the rank with 138, which is not the requeue code. Recorded here, the first
    :class:`PreemptionWatcher` takes it over: the run stops after its first step, checkpoints and exits
    75. SIGTERM keeps its default (a plain ``kill`` of a starting run ends it at once)."""
    def record(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
        _early["signum"] = signum

    if os.environ.get(EARLY_SIGNAL_ENV):
        _early["signum"] = int(os.environ[EARLY_SIGNAL_ENV])
    if threading.current_thread() is threading.main_thread():
        for signum in signals:
            signal.signal(signum, record)


def early_signal() -> int | None:
    """The preemption warning recorded by :func:`catch_early` and not yet taken by a watcher."""
    return _early["signum"]


class PreemptionWatcher:
    """Records whether a preemption signal arrived; :meth:`agreed` turns the local flags of all ranks
    into one decision. Handlers are installed on construction (main thread only) and restored by
    :meth:`close`. The handler only sets a flag: the training step in flight finishes normally."""

    def __init__(self, signals: tuple[int, ...] = PREEMPTION_SIGNALS):
        self.requested: int | None = _early["signum"]  # the signal number received, if any (even before us)
        _early["signum"] = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.requested = signum

    def agreed(self, reduce_max: Callable[[int], int] | None = None) -> bool:
        """True when any rank received a signal. ``reduce_max`` all-reduces an int with MAX across ranks
        (None for a single process); every rank must call this at the same point of every step."""
        local = int(self.requested is not None)
        return bool(reduce_max(local) if reduce_max is not None else local)

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
