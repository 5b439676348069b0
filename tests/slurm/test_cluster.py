"""`sslscale submit` on a real two-node Slurm cluster (slurm/local-cluster.sh): a 2 x 1-rank job
runs to the end without requeue; a job preempted with SIGUSR1 saves, requeues itself, resumes
from the saved step and finishes with the samples of an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from launcher import slurm

from ..conftest import DEMO_RECIPE, ROOT, sslscale_cmd, tiny_overrides
from .conftest import wait_for_job

pytestmark = pytest.mark.slurm


def submit(run_dir: Path, shards, *extra: str) -> int:
    cmd = sslscale_cmd("submit", str(DEMO_RECIPE), *tiny_overrides(shards, run_dir, *extra),
                       "--nodes", "2", "--ntasks-per-node", "1", "--time", "10")
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


def log_text(run_dir: Path, job_id: int) -> str:
    return next((run_dir / "slurm").glob(f"*-{job_id}.out")).read_text()


def test_two_node_job_runs_to_the_end_without_requeue(slurm_cluster, real_shards, tmp_path):
    run_dir, steps = tmp_path / "run", 6
    job_id = submit(run_dir, real_shards, f"train.max_steps={steps}", "eval.train_shards=null")
    info = wait_for_job(job_id, timeout=240)
    log = log_text(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log[-3000:]
    assert info["NodeList"] == "sslnode[1-2]" and info["NumTasks"] == "2"
    assert "world size 2" in log and "not requeued" in log
    system = json.loads((run_dir / "system.jsonl").read_text().splitlines()[0])
    assert (system["world_size"], system["nodes"]) == (2, 2)
    marker = json.loads((run_dir / "checkpoints" / f"step-{steps:08d}" / "complete.json").read_text())
    assert marker["world_size"] == 2  # both ranks wrote their state:
    assert {"rank-00000.pt", "rank-00001.pt"} <= set(marker["files"])
    events = slurm.attempts(run_dir)
    assert [(e["event"], e.get("exit_code")) for e in events] == [("start", None), ("end", 0)]
    assert [r["step"] for r in train_rows(run_dir)] == list(range(1, steps + 1))
    status = subprocess.run(sslscale_cmd("status", str(run_dir), "--json"), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "COMPLETED"


def client_state(run_dir: Path, step: int) -> dict:
    """The client state DeepSpeed stored with the model (step, samples_seen, config, data)."""
    path = run_dir / "checkpoints" / f"step-{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)


def test_sigusr1_saves_requeues_and_resumes_to_the_planned_samples(slurm_cluster, real_shards, tmp_path):
    run_dir, steps = tmp_path / "run", 150
    job_id = submit(run_dir, real_shards, f"train.max_steps={steps}", "checkpoint.every_steps=10",
                    "eval.train_shards=null")
    deadline = time.time() + 180
    while not (run_dir / "checkpoints" / "latest").is_file():  # the first periodic checkpoint
        assert time.time() < deadline and slurm.job_info(job_id)["JobState"] in slurm.ACTIVE_STATES, \
            log_text(run_dir, job_id)[-3000:]
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--full", str(job_id)], check=True, timeout=30)
    info = wait_for_job(job_id, timeout=300)
    log = log_text(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, log[-3000:]

    events = slurm.attempts(run_dir)
    ends = [(e["restart_count"], e["exit_code"], e["requeue"]) for e in events if e["event"] == "end"]
    assert ends == [(0, 75, True), (1, 0, False)], events
    saved = int(log.split("stop signal: saving at step ")[1].split()[0])
    assert 0 < saved < steps
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{saved:08d}'} at step {saved}" in log

    # Every step ran exactly once over the two attempts, and the sample count is the plan's.
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    global_batch = client_state(run_dir, steps)["config"]["train"]["global_batch_size"]
    assert rows[-1]["samples_seen"] == steps * global_batch
    assert client_state(run_dir, steps)["samples_seen"] == steps * global_batch
    # Same wandb run across the requeue: one id, both attempts' offline runs under it.
    run_id = (run_dir / "wandb_id").read_text().strip()
    attempts = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(name.endswith(run_id) for name in attempts), attempts
