"""A real two-node Slurm cluster on this machine for the session (slurm/local-cluster.sh), and
helpers to submit through the `sslscale` command line and wait for a job.

The cluster is started once per session and stopped at the end, unless one was already running
(then it is used and left running). Tests that need it skip, with the reason, where Slurm
cannot be installed (not root, no apt-get); a cluster that is installed but does not start is
a failure."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from launcher import slurm

from ..conftest import ROOT

CLUSTER = ROOT / "slurm" / "local-cluster.sh"
STATE = Path(os.environ.get("SSLSCALE_SLURM_DIR", "/tmp/sslscale-slurm"))


def _script(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """``SLURM_CONF`` of a running local cluster (also set in ``os.environ`` for sbatch & co)."""
    install = _script("install")
    if install.returncode:
        pytest.skip(f"Slurm cannot be installed here: {install.stderr.strip()[-300:]}")
    was_running = _script("status").returncode == 0
    started = _script("start")
    if started.returncode:
        logs = "\n".join(p.read_text()[-1500:] for p in sorted((STATE / "log").glob("*.log")))
        pytest.fail(f"local Slurm cluster did not start:\n{started.stderr}\n{logs}")
    conf = started.stdout.strip().split("=", 1)[1]
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    if not was_running:
        _script("stop")


def wait_for_job(job_id: int, timeout: float, until=None) -> dict[str, str]:
    """Poll ``scontrol show job`` until the job is finished (or ``until(info)`` is true);
    returns the last info. Fails the test after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while True:
        info = slurm.job_info(job_id)
        state = info.get("JobState", "")
        if (until(info) if until else state not in slurm.ACTIVE_STATES and state != ""):
            return info
        assert time.time() < deadline, f"job {job_id} still {state} after {timeout} s: {info}"
        time.sleep(1)
