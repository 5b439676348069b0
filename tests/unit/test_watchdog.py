"""The stall watchdog (timeouts, stack dumps, peers that stopped beating) and the one-line causes
of fatal errors, in-process."""

from __future__ import annotations

import json
import time

from sslscale import exits
from sslscale.watchdog import MIN_AUTO_TIMEOUT_S, StallWatchdog


def test_stall_dumps_every_thread_and_names_a_silent_peer(tmp_path):
    fired = []
    dog = StallWatchdog(tmp_path, rank=0, world_size=3, timeout_s=0.5, poll_s=0.05, on_stall=fired.append)
    stalls = tmp_path / "stalls"
    dog.start()
    (stalls / "heartbeat-00001.json").write_text(json.dumps(  # stopped long ago
        {"rank": 1, "pid": 1, "host": "elsewhere", "node": "n9", "step": 7, "phase": "step",
         "time": time.time() - 60}))
    (stalls / "heartbeat-00002.json").write_text(json.dumps(  # alive, one step behind
        {"rank": 2, "pid": 2, "host": "h", "node": "", "step": 7, "phase": "step", "time": time.time() + 60}))
    dog.beat(8)
    deadline = time.time() + 10
    while not fired and time.time() < deadline:
        time.sleep(0.05)
    assert fired, "the watchdog did not fire"
    line = fired[0]
    assert line.startswith("error: rank 0 stalled: no progress for") and "after step 8" in line
    assert "rank 1 (pid 1 on n9): no heartbeat" in line and "rank 2: behind, in step at step 7" in line
    dump = next(stalls.glob("rank-00000-*.txt")).read_text()
    assert "Current thread" in dump or "Thread 0x" in dump
    assert json.loads((stalls / "heartbeat-00000.json").read_text())["step"] == 8


def test_not_armed_before_the_first_step_and_phases_restart_the_clock(tmp_path):
    fired = []
    dog = StallWatchdog(tmp_path, rank=0, world_size=1, timeout_s=0.3, poll_s=0.05, on_stall=fired.append)
    dog.start()
    time.sleep(0.6)  # start-up (compiling, resuming) is not timed
    assert not fired
    dog.beat(1)
    for _ in range(6):  # a long save that keeps reporting progress is not a stall
        time.sleep(0.1)
        dog.phase("save")
    assert not fired
    time.sleep(0.6)
    assert fired and "in save after step 1" in fired[0]
    dog.stop()


def test_auto_timeout_is_twenty_median_steps_but_at_least_ten_minutes(tmp_path):
    dog = StallWatchdog(tmp_path, rank=0, world_size=1)
    assert dog.timeout() == MIN_AUTO_TIMEOUT_S
    dog._durations.extend([40.0, 50.0, 60.0])
    assert dog.timeout() == 1000.0
    assert StallWatchdog(tmp_path, rank=0, world_size=1, timeout_s=20).timeout() == 20.0


def test_cause_of_a_worker_error_and_a_lost_peer_is_one_line():
    worker = RuntimeError("Caught RuntimeError in DataLoader worker process 1.\nOriginal Traceback "
                          "(most recent call last):\n  File \"x.py\", line 1, in f\nRuntimeError: "
                          "data.strict=true: shard-000002.tar: missing")
    assert exits.cause_of(worker) == ("RuntimeError: data.strict=true: shard-000002.tar: missing "
                                      "(DataLoader worker process 1)")
    peer = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1. This is typically "
                        "caused by a remote worker crashing.")
    assert "lost the connection to another rank" in exits.cause_of(peer)
    assert "\n" not in exits.cause_of(ValueError("a\nb")) and exits.cause_of(KeyboardInterrupt()) == "KeyboardInterrupt"


def test_report_fatal_writes_the_traceback_beside_the_run(tmp_path):
    try:
        raise OSError(28, "No space left on device")
    except OSError as e:
        line = exits.report_fatal(e, 3, tmp_path)
    assert line.startswith("error: rank 3: OSError: [Errno 28] No space left on device (traceback in ")
    assert "Traceback" in next((tmp_path / "errors").glob("rank-00003-*.txt")).read_text()
