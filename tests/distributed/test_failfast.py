"""Fail fast, never hang (2 ranks through `sslscale launch`, 2 data-loader workers each, as users
run): a strict-data error, a full disk during a save and a failed rollback end every rank with a
non-zero code within 30 s and leave the last complete checkpoint intact; a rank that dies after
all agreed to finish does not fail the run; a SIGSTOPped rank is
caught by the stall watchdog; SIGTERM / SIGINT to `sslscale launch` make every rank save and
exit 75 / 130, and no process of the run remains."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sslscale.watchdog import py_spy

from ..conftest import DEMO_RECIPE, ROOT, process_tree, sslscale_cmd, tiny_overrides, wait_dead

pytestmark = pytest.mark.distributed


def start(shards, run_dir: Path, *extra: str, env=None) -> subprocess.Popen:
    overrides = tiny_overrides(shards, run_dir, "deepspeed.zero_stage=2", "data.num_workers=2",
                               "eval.train_shards=null", "eval.test_shards=null", *extra)
    return subprocess.Popen(sslscale_cmd("launch", "--nproc", "2", str(DEMO_RECIPE), *overrides),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, list[int]]:
    """Exit code and output of ``proc``; asserts that no process of the run is left."""
    tree = process_tree(proc.pid)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    wait_dead(tree, timeout=10)  # ranks and their data-loader workers
    return proc.returncode, out, tree


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def heartbeat(run_dir: Path, rank: int) -> dict:
    """The rank's last heartbeat (its step, pid ...), {} if none is readable yet."""
    try:
        return json.loads((run_dir / "stalls" / f"heartbeat-{rank:05d}.json").read_text())
    except (OSError, ValueError):
        return {}


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error: rank")]


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def assert_intact(run_dir: Path, tag: str) -> None:
    from sslscale import checkpoint

    assert latest(run_dir) == tag and checkpoint.is_complete(run_dir / "checkpoints" / tag)


def ended_within(run_dir: Path, seconds: float) -> None:
    """The run ended at most ``seconds`` after its first error report was written."""
    first = min(p.stat().st_mtime for p in (run_dir / "errors").iterdir())
    assert time.time() - first < seconds, f"ended {time.time() - first:.0f} s after the error"


def test_strict_data_error_ends_every_rank(real_shards, tmp_path):
    shards, run_dir = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(real_shards["train"], shards)
    code, out, _ = finish(start({**real_shards, "train": shards}, run_dir, "train.max_steps=4",
                                "checkpoint.every_steps=2"))
    assert code == 0, out[-3000:]
    (shards / "shard-000002.tar").unlink()  # lost after the run started: the manifest still lists it
    proc = start({**real_shards, "train": shards}, run_dir, "train.max_steps=200", "data.strict=true")
    code, out, _ = finish(proc)
    ended_within(run_dir, 30)
    assert code == 1, out[-3000:]
    lines = error_lines(out)
    assert len(lines) == 2 and "Traceback" not in out, out[-3000:]
    assert any("data.strict=true" in line and "shard-000002.tar" in line for line in lines), lines
    assert_intact(run_dir, "step-00000004")


def test_a_rank_dying_in_its_teardown_after_the_agreed_end_does_not_fail_the_run(real_shards, tmp_path):
    """Rank 1 aborts (SIGABRT, as a C++ destructor's std::terminate would) after all ranks agreed
    to finish: `sslscale launch` reports it and exits with the agreed 0, as the Slurm script does."""
    from sslscale.checkpoint import FAULT_ENV

    run_dir = tmp_path / "run"
    code, out, _ = finish(start(real_shards, run_dir, "train.max_steps=2", env={FAULT_ENV: "abort-at-exit:1"}))
    assert code == 0, out[-3000:]
    assert "a rank ended with code 134 after all ranks had agreed to end with 0" in out, out[-3000:]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root")
def test_full_disk_during_a_save_ends_every_rank_and_keeps_the_last_checkpoint(real_shards, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run_dir = disk / "run"
        proc = start(real_shards, run_dir, "train.max_steps=100000", "checkpoint.every_steps=3",
                     "train.log_every=100000", env={"WANDB_MODE": "disabled"})
        wait_for(run_dir / "checkpoints" / "latest", proc)
        saved = latest(run_dir)
        with open(disk / "filler", "wb") as f:  # the disk fills up before the next save
            try:
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()
            except OSError:
                pass
        full = time.time()  # the next save (3 steps, < 5 s) fails; then 30 s at most
        code, out, _ = finish(proc)
        assert time.time() - full < 35
        assert code == 1, out[-3000:]
        assert "no space left on device" in out and "writing checkpoint" in out, out[-3000:]
        assert "Traceback" not in out, out[out.find("Traceback") - 2000:][:5000]
        (disk / "filler").unlink()
        assert_intact(run_dir, saved)
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_failed_rollback_ends_every_rank(real_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(real_shards, run_dir, "train.max_steps=100", "checkpoint.every_steps=0",
                 env={"SSLSCALE_FAULT_INJECT": "nan-loss:1-1000"})
    code, out, _ = finish(proc)
    ended_within(run_dir, 30)
    assert code == 1 and "no checkpoint to roll back to" in out, out[-3000:]
    # Both ranks meet the same losses; the one that ends second may be ended by the launcher
    # before it says so (on a loaded machine), so one or two lines, each with the cause.
    said = error_lines(out)
    assert "Traceback" not in out and 1 <= len(said) <= 2, out[-3000:]
    assert all("no checkpoint to roll back to" in line for line in said), said


def test_a_stopped_rank_is_caught_by_the_stall_watchdog(real_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(real_shards, run_dir, "train.max_steps=100000", "checkpoint.every_steps=0",
                 "train.stall_timeout_s=20")
    wait_for(run_dir / "stalls" / "heartbeat-00001.json", proc)
    deadline = time.time() + 240
    while min(heartbeat(run_dir, rank).get("step", 0) for rank in (0, 1)) < 2:  # armed
        assert proc.poll() is None and time.time() < deadline, "no step reached"
        time.sleep(0.1)
    rank1 = heartbeat(run_dir, 1)["pid"]
    os.kill(rank1, signal.SIGSTOP)
    stopped = time.time()
    code, out, _ = finish(proc, timeout=120)
    assert time.time() - stopped < 60
    assert code == 124, out[-3000:]
    line = next(line for line in out.splitlines() if "stalled" in line)
    assert line.startswith("error: rank 0 stalled") and "rank 1 (pid" in line, line
    dumps = sorted((run_dir / "stalls").glob("rank-00000-*.txt"))
    text = dumps[0].read_text()  # every thread's stack, the main one inside the training loop
    assert "Thread 0x" in text
    assert "trainer.py" in text and "in fit" in text, text
    if py_spy():  # the stopped rank's own stacks, read without waking it
        spied = sorted((run_dir / "stalls").glob("rank-00001-py-spy-*.txt"))
        assert spied and "MainThread" in spied[0].read_text(), spied


@pytest.mark.parametrize("signum, expected", [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_a_signal_to_launch_saves_on_every_rank(real_shards, tmp_path, signum, expected):
    run_dir = tmp_path / "run"
    proc = start(real_shards, run_dir, "train.max_steps=100000", "checkpoint.every_steps=0")
    wait_for(run_dir / "metrics.jsonl", proc)
    time.sleep(2)
    proc.send_signal(signum)
    code, out, tree = finish(proc, timeout=120)
    assert code == expected, out[-3000:]
    assert out.count("stop signal: saving at step") == 1 and f"exiting with code {expected}" in out
    marker = json.loads((run_dir / "checkpoints" / latest(run_dir) / "complete.json").read_text())
    assert marker["world_size"] == 2 and sum("optim_states" in f for f in marker["files"]) == 2
