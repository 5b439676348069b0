"""The job script without a cluster: the `--dry-run` golden script, hostile values refused or
quoted, and the script's own logic (signal trap, requeue only on exit 75 and not after
`cancel --save`) run by bash with stand-ins for srun and scontrol."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import slurm

from ..conftest import DEMO_RECIPE, ROOT, sslscale_cmd, tiny_overrides

GOLDEN = Path(__file__).parent / "golden" / "train_2x1.sbatch"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(sslscale_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_dry_run_prints_the_golden_script_and_writes_nothing(real_shards, tmp_path):
    run_dir = tmp_path / "run"
    done = run_cli("submit", str(DEMO_RECIPE), *tiny_overrides(real_shards, run_dir),
                   "slurm.sbatch_extra=['--mem=16G','--exclusive']", "slurm.env.NCCL_DEBUG=WARN",
                   "--nodes", "2", "--ntasks-per-node", "1", "--cpus-per-task", "4", "--time", "0-02:00:00",
                   "--partition", "debug", "--account", "proj1", "--qos", "high", "--constraint", "a100&ib",
                   "--signal-grace", "300", "--dry-run")
    assert done.returncode == 0, done.stderr
    script = (done.stdout.replace(str(run_dir.resolve()), "{RUN_DIR}")
              .replace(sys.executable, "{PYTHON}").replace(str(ROOT), "{WORKDIR}"))
    if os.environ.get("SSLSCALE_UPDATE_GOLDEN"):
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text(), "rendered script changed (SSLSCALE_UPDATE_GOLDEN=1 rewrites it)"
    assert not run_dir.exists()


@pytest.mark.parametrize("overrides, flags, where", [
    (["name=x; rm -rf ~"], [], "key 'name'"),
    ([], ["--job-name", "ok$(touch PWNED)"], "--job-name"),
    ([], ["--partition", "debug\n#SBATCH --uid=0"], "--partition"),
    ([], ["--time", "1:00; reboot"], "--time"),
    (["slurm.sbatch_extra=['--mem=1G; rm -rf ~']"], [], "key 'slurm.sbatch_extra'"),
    (["slurm.sbatch_extra=['--output=/etc/passwd']"], [], "use the --output flag"),
    (["run_dir=/tmp/has space/run"], [], "key 'run_dir'"),
])
def test_hostile_values_are_refused_before_anything_runs(tmp_path, overrides, flags, where):
    done = run_cli("submit", str(DEMO_RECIPE), f"run_dir={tmp_path / 'run'}", *overrides,
                   "--nodes", "2", *flags)
    assert done.returncode == 2 and where in done.stderr, done.stderr
    assert "cannot go into a job script" in done.stderr or "set by sslscale" in done.stderr
    assert not (tmp_path / "run").exists() and not (ROOT / "PWNED").exists()


FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/srun.args"
printf 'NOTE=%s\\n' "$NOTE" >> "$FAKE_LOG/srun.args"
sleep "${FAKE_SRUN_SLEEP:-0}"
exit "${FAKE_SRUN_CODE:-0}"
"""
FAKE_SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then echo sslnode1; echo sslnode2; else echo "$*" >> "$FAKE_LOG/scontrol.log"; fi
"""


@pytest.fixture
def fake_job(tmp_path):
    """A rendered script with hostile-but-valid values, runnable by bash with stand-ins for
    srun / scontrol (pyxis, needed for --container-image, cannot run here)."""
    bin_dir, run_dir = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    (run_dir / "slurm").mkdir(parents=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    spec = slurm.JobSpec(job_name="t", nodes=2, container_image="img$(touch${IFS}PWNED)",
                         env=(("NOTE", "a b; $(touch PWNED2) `touch PWNED3`"),))
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.render(spec, run_dir=run_dir, workdir=tmp_path, config=run_dir / "c.yaml",
                                   python="/opt/py thon"))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path),
           "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "sslnode[1-2]"}

    def run(code: int, sleep: float = 0.0, usr1_after: float | None = None) -> int:
        env.update(FAKE_SRUN_CODE=str(code), FAKE_SRUN_SLEEP=str(sleep))
        proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if usr1_after is not None:
            time.sleep(usr1_after)
            proc.send_signal(signal.SIGUSR1)  # as `scancel --signal=USR1 --full` reaches the batch shell
        proc.wait(timeout=30)
        return proc.returncode

    return tmp_path, run_dir, run


def test_script_quotes_values_and_requeues_only_on_exit_75(fake_job):
    tmp_path, run_dir, run = fake_job
    assert run(0) == 0
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert "--container-image=img$(touch${IFS}PWNED)" in args and "/opt/py thon" in args
    assert "NOTE=a b; $(touch PWNED2) `touch PWNED3`" in args
    assert not list(tmp_path.glob("PWNED*"))
    assert not (tmp_path / "scontrol.log").exists()  # finished: no requeue
    assert run(1) == 1 and not (tmp_path / "scontrol.log").exists()  # failed: no requeue
    # SIGUSR1 to the batch shell mid-run: it waits for the ranks, then requeues on their 75.
    assert run(75, sleep=1.5, usr1_after=0.5) == 75
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 42"]
    # `sslscale cancel --save` leaves a stop file: the ranks' 75 then ends the job.
    (run_dir / "slurm" / "stop").write_text("42\n")
    assert run(75) == 75
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 42"]
    assert not (run_dir / "slurm" / "stop").exists()
    events = slurm.attempts(run_dir)
    assert [(e["event"], e.get("exit_code"), e.get("requeue")) for e in events] == [
        ("start", None, None), ("end", 0, False), ("start", None, None), ("end", 1, False),
        ("start", None, None), ("end", 75, True), ("start", None, None), ("end", 75, False)]


@pytest.mark.parametrize("limit, seconds", [("30", 1800), ("5:30", 330), ("1:00:00", 3600), ("2-00", 172800),
                                            ("1-02:03", 93780), ("1-00:00:05", 86405), ("UNLIMITED", None)])
def test_time_limits_in_seconds(limit, seconds):
    assert slurm.time_limit_s(limit) == seconds


def test_signal_grace_must_leave_time_to_train():
    spec = slurm.JobSpec(job_name="t", time="2", signal_grace=120, sources={"time": "--time"})
    with pytest.raises(slurm.SlurmError, match="--signal-grace = 120 s is not shorter than the time limit 2 "):
        slurm.check(spec)
    slurm.check(slurm.JobSpec(job_name="t", time="3", signal_grace=120))
