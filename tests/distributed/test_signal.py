"""SIGUSR1 to one rank of a 2-rank run, or SIGTERM to every process of the job (ranks and their
data-loader workers, as Slurm's preemption or `scancel` does): both ranks save the same step and
exit with code 75. The ranks are started as srun starts them: one process each, rank in the
environment."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launcher.env import free_port

from ..conftest import DEMO_RECIPE, ROOT, process_tree, tiny_overrides

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("how", ["usr1-to-one-rank", "term-to-every-process"])
def test_stop_signal_saves_on_both_ranks_and_exits_75(real_shards, tmp_path, how):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "sslscale.train", str(DEMO_RECIPE),
           *tiny_overrides(real_shards, run_dir, "train.max_steps=100000", "checkpoint.every_steps=0",
                           "eval.train_shards=null", "deepspeed.zero_stage=2", "data.num_workers=2")]
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
        if how == "usr1-to-one-rank":
            ranks[1].send_signal(signal.SIGUSR1)
        else:
            for pid in [pid for p in ranks for pid in process_tree(p.pid)]:
                os.kill(pid, signal.SIGTERM)
        codes = [p.wait(timeout=300) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    assert codes == [75, 75], ranks[0].stderr.read()[-3000:]
    latest = (run_dir / "checkpoints" / "latest").read_text()
    marker = json.loads((run_dir / "checkpoints" / latest / "complete.json").read_text())
    assert marker["world_size"] == 2 and sum("optim_states" in f for f in marker["files"]) == 2
    assert "stop signal: saving at step" in ranks[0].stderr.read()
