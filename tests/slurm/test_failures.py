"""Failures on a real two-node Slurm cluster (2 x 1 rank, 2 data-loader workers each) end as the
README's exit-code table says: a rank killed with SIGKILL or SIGSTOPped (caught by the stall
watchdog) is requeued and the run finishes with the samples of an uninterrupted one; plain
`scancel` ends CANCELLED without requeue; a run that finishes inside the signal grace window
ends COMPLETED; crashes beyond `slurm.max_failures` end FAILED."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launcher import slurm

from ..conftest import DEMO_RECIPE, ROOT, sslscale_cmd, tiny_overrides
from .conftest import wait_for_job
from .test_cluster import client_state, log_text, train_rows

pytestmark = pytest.mark.slurm


def submit(run_dir: Path, shards, *extra: str, env=None) -> int:
    cmd = sslscale_cmd("submit", str(DEMO_RECIPE),
                       *tiny_overrides(shards, run_dir, "eval.train_shards=null", "eval.test_shards=null",
                                       "data.num_workers=2", *extra),
                       "--nodes", "2", "--ntasks-per-node", "1", "--time", "10")
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})  # sbatch exports the environment
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def wait_until(check, job_id: int, run_dir: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline and slurm.job_info(job_id).get("JobState") in slurm.ACTIVE_STATES, \
            log_text(run_dir, job_id)[-3000:]
        time.sleep(0.05)


def rank_pid(run_dir: Path, rank: int) -> int:
    return json.loads((run_dir / "stalls" / f"heartbeat-{rank:05d}.json").read_text())["pid"]


def ends(run_dir: Path) -> list[tuple]:
    return [(e["restart_count"], e["outcome"], e["requeue"]) for e in slurm.attempts(run_dir)
            if e["event"] == "end"]


@pytest.mark.parametrize("how", ["kill-9", "sigstop"])
def test_a_lost_rank_is_requeued_and_the_run_finishes_with_every_sample(slurm_cluster, real_shards,
                                                                       tmp_path, monkeypatch, how):
    run_dir, steps = tmp_path / "run", 40
    # The submitter has a live wandb-core session (WANDB_SERVICE, left by any wandb.init in it, as
    # in a notebook or this pytest process after an in-process test), which sbatch exports: the
    # crashed attempt's wandb run must not stay open in it ("run ID ... is in use" on requeue).
    monkeypatch.setenv("WANDB_SERVICE", "")
    import wandb
    wandb.teardown()  # a session of an earlier test would not write the variable again
    wandb.setup()
    assert os.environ["WANDB_SERVICE"]
    job_id = submit(run_dir, real_shards, f"train.max_steps={steps}", "checkpoint.every_steps=10",
                    "train.stall_timeout_s=15")
    wait_until(lambda: (run_dir / "checkpoints" / "latest").is_file(), job_id, run_dir)
    pid = rank_pid(run_dir, 1)
    os.kill(pid, signal.SIGKILL if how == "kill-9" else signal.SIGSTOP)
    info = wait_for_job(job_id, timeout=400)
    log = log_text(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, log[-3000:]
    assert ends(run_dir) == [(0, "crashed", True), (1, "finished", False)], slurm.attempts(run_dir)
    if how == "sigstop":
        assert "error: rank 0 stalled" in log and list((run_dir / "stalls").glob("rank-00000-*.txt"))
    rows = train_rows(run_dir)
    global_batch = client_state(run_dir, steps)["config"]["train"]["global_batch_size"]
    assert rows[-1]["step"] == steps and client_state(run_dir, steps)["samples_seen"] == steps * global_batch


def test_scancel_cancels_without_requeue(slurm_cluster, real_shards, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submit(run_dir, real_shards, "train.max_steps=100000", "checkpoint.every_steps=0")
    wait_until(lambda: (run_dir / "metrics.jsonl").is_file(), job_id, run_dir)
    subprocess.run(sslscale_cmd("cancel", str(run_dir)), cwd=ROOT, check=True, timeout=60)
    info = wait_for_job(job_id, timeout=120)
    time.sleep(2)  # the batch script's last lines
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", log_text(run_dir, job_id)[-3000:]
    assert all(not e["requeue"] for e in slurm.attempts(run_dir) if e["event"] == "end")
    assert slurm.job_info(job_id)["JobState"] == "CANCELLED"


def test_a_run_finishing_in_the_grace_window_completes(slurm_cluster, real_shards, tmp_path):
    run_dir, steps = tmp_path / "run", 8
    job_id = submit(run_dir, real_shards, f"train.max_steps={steps}", "checkpoint.every_steps=0")
    last_logged = lambda: (run_dir / "metrics.jsonl").is_file() and \
        f'"step": {steps},' in (run_dir / "metrics.jsonl").read_text()  # noqa: E731
    wait_until(last_logged, job_id, run_dir)
    # the last step is done: the preemption signal comes while the ranks save, exit and srun ends
    subprocess.run(["scancel", "--signal=USR1", "--full", str(job_id)], check=True, timeout=30)
    info = wait_for_job(job_id, timeout=120)
    log = log_text(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log[-3000:]
    assert "sslscale: SIGUSR1" in log and ends(run_dir) == [(0, "finished", False)], log[-3000:]


def test_crashes_beyond_max_failures_end_failed(slurm_cluster, real_shards, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submit(run_dir, real_shards, "train.max_steps=100", "checkpoint.every_steps=0",
                    "slurm.max_failures=1", env={"SSLSCALE_FAULT_INJECT": "crash-at-step:3"})
    info = wait_for_job(job_id, timeout=300)
    log = log_text(run_dir, job_id)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", log[-3000:]
    assert ends(run_dir) == [(0, "crashed", True), (1, "failed", False)], slurm.attempts(run_dir)
    assert log.count("error: rank 1: RuntimeError: injected crash at step 3") == 2, log[-3000:]
