"""The run environment of one process: rank, local rank, world size, node, rendezvous address.

Three sources, decided once per process (never mixed):

- **torchrun** (``RANK`` is set): RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK, MASTER_ADDR/PORT.
  torchrun under Slurm (one agent per node) also lands here: its ranks are not Slurm tasks.
- **Slurm** (inside a job step, i.e. an ``srun`` task: ``SLURM_STEP_ID`` and ``SLURM_PROCID``
  set): SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS (else SLURM_NTASKS), SLURM_NODEID,
  SLURMD_NODENAME. The rendezvous is MASTER_ADDR/MASTER_PORT when the job script exported them
  (``slurm.master_port``, or ``20000 + job id % 20000`` moved to the next free port if taken on
  the first node), else the first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST and
  ``20000 + job id % 20000``.
  The batch shell itself (SLURM_PROCID=0 but no step) is *not* a rank: a process started there
  directly runs alone instead of waiting for ranks that never come.
- **none**: a single process (rank 0 of 1) on a free local port.

Node identity never comes from ``hostname``: emulated Slurm nodes (and some containers) share
one, so it is SLURM_NODEID / SLURMD_NODENAME or torchrun's GROUP_RANK.

A rendezvous port that another process already listens on makes rank 0's TCPStore fail with a
long ``DistNetworkError``; :func:`rendezvous_errors` turns it into one line that names the
address, the port and the setting that chooses another.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

# MASTER_PORT = base + job id % span (launcher/templates/train.sbatch does the same, then moves
# to the next free port in the span if that one is taken; slurm.master_port overrides both)
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class RunEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "none"  # torchrun | slurm | none
    node_name: str = ""  # SLURMD_NODENAME under Slurm; "" otherwise
    job_id: int | None = None  # SLURM_JOB_ID
    restart_count: int = 0  # SLURM_RESTART_COUNT: times this Slurm job was requeued

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


_BRACKET = re.compile(r"\[([^\]]*)\]")


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist expression, as ``scontrol show hostnames`` would list
    it: ``"gpu-[07-09,12],cpu1"`` -> ``"gpu-07"`` (zero padding kept), ``"rack[1-2]-n[3-4]"``
    -> ``"rack1-n3"``. ``ValueError`` names an empty or malformed list."""
    head, depth = "", 0
    for ch in nodelist.strip():
        if ch == "," and depth == 0:
            break
        depth += (ch == "[") - (ch == "]")
        if depth not in (0, 1):
            raise ValueError(f"malformed Slurm node list {nodelist!r}")
        head += ch
    if not head or depth or not re.fullmatch(r"[\w.\-]*(\[[\d,\-]+\][\w.\-]*)*", head):
        raise ValueError(f"malformed Slurm node list {nodelist!r}")
    return _BRACKET.sub(lambda m: m.group(1).split(",")[0].split("-")[0], head)


def slurm_port(job_id: int) -> int:
    """The rendezvous port of Slurm job ``job_id`` (the same on every node, no communication)."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def source_of(env: Mapping[str, str]) -> str:
    """``"torchrun"``, ``"slurm"`` (an srun task) or ``"none"``, as described in the module doc."""
    if env.get("RANK", "") != "":
        return "torchrun"
    if env.get("SLURM_PROCID", "") != "" and env.get("SLURM_STEP_ID", "") != "":
        return "slurm"
    return "none"


def _slurm_env(env: Mapping[str, str]) -> RunEnv:
    world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1)
    job = _int(env, "SLURM_JOB_ID", default=-1)
    addr = env.get("MASTER_ADDR", "")
    if not addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        addr = first_host(nodelist) if nodelist else "127.0.0.1"
    port = _int(env, "MASTER_PORT", default=slurm_port(job) if job >= 0 else 29500)
    return RunEnv(rank=_int(env, "SLURM_PROCID", default=0), local_rank=_int(env, "SLURM_LOCALID", default=0),
                  world_size=world, node_rank=_int(env, "SLURM_NODEID", default=0), master_addr=addr,
                  master_port=port, source="slurm", node_name=env.get("SLURMD_NODENAME", ""),
                  job_id=job if job >= 0 else None, restart_count=_int(env, "SLURM_RESTART_COUNT", default=0))


def read_env(env: Mapping[str, str] | None = None) -> RunEnv:
    """The ``RunEnv`` described by ``env`` (default ``os.environ``); see the module doc for which
    variables count. ``ValueError`` names a variable that is not an integer, a rank outside the
    world size, or a malformed Slurm node list."""
    env = os.environ if env is None else env
    source = source_of(env)
    if source == "slurm":
        run_env = _slurm_env(env)
    elif source == "torchrun":
        run_env = RunEnv(rank=_int(env, "RANK", default=0), local_rank=_int(env, "LOCAL_RANK", default=0),
                         world_size=_int(env, "WORLD_SIZE", default=1),
                         node_rank=_int(env, "GROUP_RANK", default=0),
                         master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
                         master_port=_int(env, "MASTER_PORT", default=29500), source="torchrun")
    else:
        run_env = RunEnv(master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
                         master_port=_int(env, "MASTER_PORT", default=0) or free_port())
    if not 0 <= run_env.rank < run_env.world_size:
        names = "SLURM_PROCID / SLURM_STEP_NUM_TASKS" if source == "slurm" else "RANK / WORLD_SIZE"
        raise ValueError(f"rank {run_env.rank} is outside world size {run_env.world_size} (check {names})")
    if not 0 <= run_env.local_rank < run_env.world_size:
        raise ValueError(f"local rank {run_env.local_rank} is outside world size {run_env.world_size}")
    return run_env


def export_env(run_env: RunEnv) -> None:
    """Set the torch.distributed variables in ``os.environ`` (so that a plain single process
    or an srun task joins its process group with the ``env://`` method, without torchrun)."""
    os.environ.update({
        "RANK": str(run_env.rank), "LOCAL_RANK": str(run_env.local_rank),
        "WORLD_SIZE": str(run_env.world_size), "MASTER_ADDR": run_env.master_addr,
        "MASTER_PORT": str(run_env.master_port),
    })


class RendezvousPortInUse(RuntimeError):
    """Rank 0 could not listen on the rendezvous port: another process uses it."""


_IN_USE = ("EADDRINUSE", "address already in use")


def port_in_use_message(run_env: RunEnv) -> str:
    """One line: which rendezvous address is taken, and how to choose another port."""
    where = f"rendezvous port {run_env.master_port} on {run_env.master_addr} (MASTER_PORT) is already in use"
    if run_env.source == "slurm":
        job = f" of job {run_env.job_id}" if run_env.job_id is not None else ""
        return (f"{where} by another process (another job's rendezvous?): set slurm.master_port to a "
                f"free port and resubmit; with slurm.master_port=0 (the default) each attempt{job} "
                "moves to a free port when it starts")
    if run_env.source == "torchrun":
        return (f"{where} by another process: give torchrun another --master-port, or rerun "
                "(`sslscale launch` takes a free port at each start)")
    return f"{where} by another process: unset MASTER_PORT (a free port is then chosen) or set a free one"


@contextmanager
def rendezvous_errors(run_env: RunEnv) -> Iterator[None]:
    """Around joining the process group: torch's "address already in use" from rank 0's TCPStore
    (``DistNetworkError``, a ``RuntimeError``) becomes :class:`RendezvousPortInUse` with
    :func:`port_in_use_message` (the original error is its ``__cause__``); other errors pass."""
    try:
        yield
    except (RuntimeError, OSError) as error:
        if not any(s.lower() in str(error).lower() for s in _IN_USE):
            raise
        raise RendezvousPortInUse(port_in_use_message(run_env)) from error
