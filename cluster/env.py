"""Rank and world size from whichever launcher started us: torchrun / the DeepSpeed launcher, Slurm
(srun), or plain environment variables (Kubernetes indexed jobs set the same names). One place."""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
LISTEN_PORT_FLOOR = 20000  # below the usual ephemeral range, above well-known service ports


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections (Linux default 32768-60999)."""
    try:
        low, high = (int(v) for v in open(EPHEMERAL_RANGE_FILE).read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(rng: random.Random | None = None, attempts: int = 200) -> int:
    """A TCP port free on the loopback interface right now, chosen *outside* the ephemeral range.

    Why not ``bind(0)``: that returns an ephemeral port, and between our check and the moment the
    rendezvous server (TCPStore) binds it, any outgoing connection on the machine (Ray workers, an
    S3 client, another test) may be handed the same port: EADDRINUSE, seen in CI. Ports below the
    ephemeral range are only taken by explicit listeners, so the window is closed in practice."""
    rng = rng or random.Random()
    low, _ = ephemeral_port_range()
    top = max(LISTEN_PORT_FLOOR + 1000, low) - 1
    for _ in range(attempts):
        port = rng.randint(LISTEN_PORT_FLOOR, top)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # everything tried was taken: fall back to the kernel's choice
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_dist_env(environ: dict[str, str] | None = None) -> DistEnv:
    """torchrun-style variables first, then Slurm's; a single local process when neither is set."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    addr = env.get("MASTER_ADDR") or _first_slurm_host(env) or "127.0.0.1"
    # A single process rendezvouses with nobody, so it takes a fresh port even when MASTER_PORT is set:
    # an inherited one (a parent that trained in-process exported its own, and may still hold it) made
    # a child's TCPStore fail with EADDRINUSE.
    port = free_port() if world == 1 else int(env.get("MASTER_PORT", 29500))
    return DistEnv(rank, world, local, addr, port)


def export_dist_env(dist_env: DistEnv) -> None:
    """Write the variables torch.distributed's env:// rendezvous reads."""
    os.environ.update(
        RANK=str(dist_env.rank),
        WORLD_SIZE=str(dist_env.world_size),
        LOCAL_RANK=str(dist_env.local_rank),
        MASTER_ADDR=dist_env.master_addr,
        MASTER_PORT=str(dist_env.master_port),
    )


def _first_slurm_host(env) -> str | None:
    """The first node of a Slurm allocation, where rank 0 runs (srun places tasks in node order)."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    return expand_hostlist(nodelist)[0] if nodelist and "SLURM_PROCID" in env else None


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list → host names, e.g. ``"gpu[01-03,07],login1"`` →
    ``["gpu01", "gpu02", "gpu03", "gpu07", "login1"]`` (zero padding kept). The same as
    ``scontrol show hostnames``, which job scripts use; this one works where scontrol is absent."""
    hosts, i = [], 0
    while i < len(hostlist):
        j = i
        while j < len(hostlist) and hostlist[j] not in ",[":
            j += 1
        prefix = hostlist[i:j]
        if j < len(hostlist) and hostlist[j] == "[":
            end = hostlist.index("]", j)
            suffix_end = end + 1
            while suffix_end < len(hostlist) and hostlist[suffix_end] != ",":
                suffix_end += 1
            suffix = hostlist[end + 1:suffix_end]
            for part in hostlist[j + 1:end].split(","):
                low, _, high = part.partition("-")
                width = len(low)
                for n in range(int(low), int(high or low) + 1):
                    hosts.append(f"{prefix}{n:0{width}d}{suffix}")
            i = suffix_end + 1
        else:
            if prefix:
                hosts.append(prefix)
            i = j + 1
    return hosts
