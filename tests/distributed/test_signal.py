"""SIGUSR1 to one rank of a 2-rank run: both ranks save the same step and exit with code 75.
The ranks are started as Slurm's srun starts them: one process each, rank in the environment."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launcher.env import free_port

from ..conftest import DEMO_RECIPE, ROOT, tiny_overrides

pytestmark = pytest.mark.distributed


def test_sigusr1_to_one_rank_stops_both_after_saving(real_shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "sslscale.train", str(DEMO_RECIPE),
           *tiny_overrides(real_shards, run_dir, "train.max_steps=100000", "checkpoint.every_steps=0",
                           "eval.train_shards=null", "deepspeed.zero_stage=2")]
    port = str(free_port())
    ranks = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"})
             for r in range(2)]
    try:
        deadline = time.time() + 300
        while not (run_dir / "metrics.jsonl").exists() or len((run_dir / "metrics.jsonl").read_text().splitlines()) < 3:
            assert all(p.poll() is None for p in ranks) and time.time() < deadline
            time.sleep(0.1)
        ranks[1].send_signal(signal.SIGUSR1)
        codes = [p.wait(timeout=300) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    assert codes == [75, 75], ranks[0].stderr.read()[-3000:]
    latest = (run_dir / "checkpoints" / "latest").read_text()
    marker = json.loads((run_dir / "checkpoints" / latest / "complete.json").read_text())
    assert marker["world_size"] == 2 and sum("optim_states" in f for f in marker["files"]) == 2
    assert "stop signal: saving at step" in ranks[0].stderr.read()
