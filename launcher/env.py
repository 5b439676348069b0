"""The run environment of one process: rank, local rank, world size, node, rendezvous address.

Read from torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), from
Slurm's (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_NODEID) when torchrun's are absent, or
defaulted to a single process. Node identity never comes from ``hostname`` (emulated Slurm
nodes share one).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class RunEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int(env: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        if env.get(name, "") != "":
            try:
                return int(env[name])
            except ValueError:
                raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None
    return default


def read_env(env: Mapping[str, str] | None = None) -> RunEnv:
    """The ``RunEnv`` described by ``env`` (default ``os.environ``); torchrun's names win over
    Slurm's. ``ValueError`` names a variable that is not an integer or a rank out of range."""
    env = os.environ if env is None else env
    rank = _int(env, "RANK", "SLURM_PROCID", default=0)
    world = _int(env, "WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _int(env, "LOCAL_RANK", "SLURM_LOCALID", default=0)
    node = _int(env, "GROUP_RANK", "SLURM_NODEID", default=0)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world} (check RANK / WORLD_SIZE)")
    port = _int(env, "MASTER_PORT", default=0)
    if port == 0:
        job = _int(env, "SLURM_JOB_ID", default=-1)
        port = 20000 + job % 20000 if job >= 0 else (free_port() if world == 1 else 29500)
    return RunEnv(rank=rank, local_rank=local, world_size=world, node_rank=node,
                  master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=port)


def export_env(run_env: RunEnv) -> None:
    """Set the torch.distributed variables in ``os.environ`` (so that a plain single process
    can join a process group of one without torchrun or MPI)."""
    os.environ.update({
        "RANK": str(run_env.rank), "LOCAL_RANK": str(run_env.local_rank),
        "WORLD_SIZE": str(run_env.world_size), "MASTER_ADDR": run_env.master_addr,
        "MASTER_PORT": str(run_env.master_port),
    })
