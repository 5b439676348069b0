"""The job script without a cluster: the `--dry-run` golden script, hostile values refused or
quoted, and the script's own logic (signal trap, requeue only on exit 75 and not after
`cancel --save`, the rendezvous port moved off a taken one unless `slurm.master_port` set it)
run by bash with stand-ins for srun and scontrol."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import slurm
from launcher.env import SLURM_PORT_BASE, SLURM_PORT_SPAN
from sslscale.config import load_config

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
printf 'MASTER=%s:%s\\n' "$MASTER_ADDR" "$MASTER_PORT" >> "$FAKE_LOG/srun.args"
sleep "${FAKE_SRUN_SLEEP:-0}"
if [ -n "$FAKE_SRUN_TOUCH" ]; then touch "$FAKE_SRUN_TOUCH"; fi  # rank 0 wrote exit.json now
exit "${FAKE_SRUN_CODE:-0}"
"""
FAKE_SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then echo sslnode1; echo sslnode2
elif [ "$1" = show ]; then echo "JobId=42 JobState=RUNNING"
else echo "$*" >> "$FAKE_LOG/scontrol.log"; fi
"""


def _fake_bin(tmp_path: Path) -> tuple[Path, Path]:
    """``(bin_dir, run_dir)``: stand-ins for srun / scontrol, and a run dir with its slurm/."""
    bin_dir, run_dir = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    (run_dir / "slurm").mkdir(parents=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir, run_dir


@pytest.fixture
def fake_job(tmp_path):
    """A rendered script with hostile-but-valid values, runnable by bash with stand-ins for
    srun / scontrol (pyxis, needed for --container-image, cannot run here)."""
    bin_dir, run_dir = _fake_bin(tmp_path)
    spec = slurm.JobSpec(job_name="t", nodes=2, container_image="img$(touch${IFS}PWNED)",
                         env=(("NOTE", "a b; $(touch PWNED2) `touch PWNED3`"),))
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.render(spec, run_dir=run_dir, workdir=tmp_path, config=run_dir / "c.yaml",
                                   python="/opt/py thon"))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path),
           "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "sslnode[1-2]"}

    def run(code: int, sleep: float = 0.0, usr1_after: float | None = None,
            term_after: float | None = None, write_exit: bool = False) -> int:
        env.update(FAKE_SRUN_CODE=str(code), FAKE_SRUN_SLEEP=str(sleep),
                   FAKE_SRUN_TOUCH=str(run_dir / "exit.json") if write_exit else "")
        proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for signum, after in ((signal.SIGUSR1, usr1_after), (signal.SIGTERM, term_after)):
            if after is not None:  # as `scancel [--signal=USR1 --full]` reaches the batch shell
                time.sleep(after)
                proc.send_signal(signum)
        proc.wait(timeout=30)
        return proc.returncode

    return tmp_path, run_dir, run


def test_script_quotes_values_and_maps_exit_codes_to_requeue(fake_job):
    """The README's exit-code table, without a cluster: max_failures = 3 (the default)."""
    tmp_path, run_dir, run = fake_job
    requeues = lambda: (tmp_path / "scontrol.log").read_text().count("requeue 42") \
        if (tmp_path / "scontrol.log").exists() else 0  # noqa: E731
    assert run(0) == 0
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert "--container-image=img$(touch${IFS}PWNED)" in args and "/opt/py thon" in args
    assert "--kill-on-bad-exit=1" in args and "NOTE=a b; $(touch PWNED2) `touch PWNED3`" in args
    assert not list(tmp_path.glob("PWNED*"))
    assert requeues() == 0  # finished: no requeue
    assert run(2) == 2 and requeues() == 0  # a config error: a rerun would repeat it
    # SIGUSR1 to the batch shell mid-run: it waits for the ranks, then requeues on their 75.
    assert run(75, sleep=1.5, usr1_after=0.5) == 0 and requeues() == 1
    # SIGTERM without a SIGUSR1 first (scancel): never requeued, even on the ranks' 75
    assert run(75, sleep=1.5, term_after=0.5) == 0 and requeues() == 1
    # `sslscale cancel --save` leaves a stop file: the ranks' 75 then ends the job, COMPLETED.
    (run_dir / "slurm" / "stop").write_text("42\n")
    assert run(75) == 0 and requeues() == 1
    assert not (run_dir / "slurm" / "stop").exists()
    # crashes, stalls, killed ranks: requeued 3 times, the 4th ends the job with its code
    assert [run(code) for code in (1, 124, 137)] == [0, 0, 0] and requeues() == 4
    assert run(1) == 1 and requeues() == 4
    # the ranks' verdict in exit.json wins over srun's code (USR1 reached srun after they finished)
    (run_dir / "exit.json").write_text('{"code": 0, "step": 8}')
    assert run(138, write_exit=True) == 0 and requeues() == 4
    outcomes = [(e["exit_code"], e["outcome"], e["failure"], e["requeue"])
                for e in slurm.attempts(run_dir) if e["event"] == "end"]
    assert outcomes == [(0, "finished", False, False), (2, "error", False, False),
                        (75, "preempted", False, True), (75, "cancelled", False, False),
                        (75, "stopped", False, False), (1, "crashed", True, True),
                        (124, "crashed", True, True), (137, "crashed", True, True),
                        (1, "failed", True, False), (0, "finished", False, False)]


@pytest.mark.parametrize("limit, seconds", [("30", 1800), ("5:30", 330), ("1:00:00", 3600), ("2-00", 172800),
                                            ("1-02:03", 93780), ("1-00:00:05", 86405), ("UNLIMITED", None)])
def test_time_limits_in_seconds(limit, seconds):
    assert slurm.time_limit_s(limit) == seconds


def test_signal_grace_must_leave_time_to_train():
    spec = slurm.JobSpec(job_name="t", time="2", signal_grace=120, sources={"time": "--time"})
    with pytest.raises(slurm.SlurmError, match="--signal-grace = 120 s is not shorter than the time limit 2 "):
        slurm.check(spec)
    slurm.check(slurm.JobSpec(job_name="t", time="3", signal_grace=120))


def _listening_in_span() -> socket.socket:
    """A socket listening on some port of the span the job script derives ports from."""
    for port in random.sample(range(SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_SPAN - 1), 200):
        sock = socket.socket()
        try:
            sock.bind(("", port))
            sock.listen()
            return sock
        except OSError:
            sock.close()
    pytest.skip("no free port in the derived span to take")


@pytest.mark.parametrize("master_port, node, moves", [
    (0, "sslnode1", True),  # derived port taken on the first node (this script's): the next free one
    (0, "sslnode2", False),  # this script is not on the rendezvous host: it cannot check there
    (29999, "sslnode1", False),  # slurm.master_port: used as given (a taken one fails in one line)
])
def test_rendezvous_port_moves_off_a_taken_one_unless_set(tmp_path, master_port, node, moves):
    bin_dir, run_dir = _fake_bin(tmp_path)
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.render(slurm.JobSpec(job_name="t", nodes=2, master_port=master_port),
                                   run_dir=run_dir, workdir=tmp_path, config=run_dir / "c.yaml",
                                   python="python"))

    def run(job_id: int) -> tuple[int, str]:
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path),
               "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": "sslnode[1-2]", "SLURMD_NODENAME": node}
        done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=30, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        addr, port = (tmp_path / "srun.args").read_text().split("MASTER=")[1].split()[0].split(":")
        assert addr == "sslnode1" and f"rendezvous sslnode1:{port}" in done.stdout
        return int(port), done.stdout

    with _listening_in_span() as taken:
        derived = taken.getsockname()[1]
        job_id = derived  # 20000 + job id % 20000 == derived (derived is in the span)
        port, out = run(job_id)
        if master_port:
            assert port == master_port and "in use" not in out
        elif moves:
            assert port != derived and SLURM_PORT_BASE <= port < SLURM_PORT_BASE + SLURM_PORT_SPAN
            assert f"sslscale: port {derived} is in use on sslnode1: trying the next one" in out
        else:
            assert port == derived and "in use" not in out
    if not master_port:  # free again (a requeued attempt checks anew): the derived port
        assert run(job_id)[0] == derived


def test_master_port_key_is_checked_and_owns_master_port():
    cfg = load_config(None, ["slurm.master_port=80"])
    with pytest.raises(slurm.SlurmError, match=r"key 'slurm.master_port' must be 0 \(derived from the job "
                                               r"id\) or a port in 1024-65535, got 80"):
        slurm.check(slurm.spec_from(cfg.slurm, "t", {}))
    cfg = load_config(None, ["slurm.env.MASTER_PORT=23456"])
    with pytest.raises(slurm.SlurmError, match="MASTER_PORT is set by sslscale .* use key 'slurm.master_port'"):
        slurm.check(slurm.spec_from(cfg.slurm, "t", {}))
    cfg = load_config(None, ["slurm.master_port=23456"])
    assert slurm.spec_from(cfg.slurm, "t", {}).master_port == 23456
