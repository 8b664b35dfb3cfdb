"""Joining or starting Ray, one way for every Ray job we run (``diffdis shard``, ``diffdis precompute``)."""

from __future__ import annotations

import logging
import os


def start_ray(ray_address: str | None, num_cpus: int | None) -> bool:
    """Join ``ray_address`` or start a local Ray; returns whether we started it (so we stop it).

    A Ray that is already initialised in this process (a test session, a notebook) is reused.
    ``address="local"`` never attaches to some other ``ray start`` cluster found on this machine.
    Workers get this process's ``PYTHONPATH``, so a checkout that is not the installed one runs its
    own code in the tasks too."""
    import ray  # noqa: PLC0415 - Ray only where it is used

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}} if os.environ.get("PYTHONPATH") else None
    if ray_address:
        ray.init(address=ray_address, log_to_driver=False, logging_level=logging.WARNING, runtime_env=runtime_env)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray >= 2.5x asks for a token otherwise
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING, runtime_env=runtime_env)
    return True
