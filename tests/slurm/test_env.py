"""launcher/env.py: which variables give rank, world size and node (torchrun, an srun task, the
batch shell, none), the Slurm hostlist's first host, errors that name the variable, and a taken
rendezvous port reported in one line."""

from __future__ import annotations

import socket

import pytest

from launcher.env import RendezvousPortInUse, first_host, read_env, rendezvous_errors, slurm_port

SRUN_TASK = {"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
             "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NODEID": "1",
             "SLURMD_NODENAME": "gpu-08", "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_RESTART_COUNT": "2"}


@pytest.mark.parametrize("nodelist, first", [
    ("sslnode[1-2]", "sslnode1"), ("gpu-[07-09,12],cpu1", "gpu-07"), ("a1,b[2-3]", "a1"),
    ("rack[1-2]-n[03-04]", "rack1-n03"), ("node17", "node17"), ("n[5,2]", "n5"),
])
def test_first_host_follows_slurm_hostlist_order(nodelist, first):
    assert first_host(nodelist) == first


@pytest.mark.parametrize("bad", ["", "n[1-2", "n]1[", "n[[1]]", "n[a-b]"])
def test_malformed_node_list_is_an_error(bad):
    with pytest.raises(ValueError, match="malformed Slurm node list"):
        first_host(bad)


def test_srun_task_takes_everything_from_slurm_never_hostname():
    env = read_env(SRUN_TASK)
    assert (env.source, env.rank, env.local_rank, env.world_size, env.node_rank) == ("slurm", 3, 1, 4, 1)
    assert (env.node_name, env.job_id, env.restart_count) == ("gpu-08", 1234, 2)
    assert (env.master_addr, env.master_port) == ("gpu-07", slurm_port(1234)) and slurm_port(1234) == 21234
    exported = read_env({**SRUN_TASK, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "23456"})
    assert (exported.master_addr, exported.master_port) == ("10.0.0.7", 23456)


def test_step_task_count_wins_over_the_job_allocation():
    env = read_env({**SRUN_TASK, "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "4"})
    assert env.world_size == 4


def test_batch_shell_is_not_a_rank():
    batch = {k: v for k, v in SRUN_TASK.items() if k not in ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS")}
    env = read_env({**batch, "SLURM_PROCID": "0"})
    assert (env.source, env.rank, env.world_size) == ("none", 0, 1)


def test_torchrun_variables_win_over_slurm():
    env = read_env({**SRUN_TASK, "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "GROUP_RANK": "2",
                    "MASTER_ADDR": "h0", "MASTER_PORT": "29400"})
    assert (env.source, env.rank, env.world_size, env.node_rank, env.master_port) == ("torchrun", 5, 8, 2, 29400)


def test_no_launcher_is_one_process_on_a_free_port():
    env = read_env({})
    assert (env.source, env.rank, env.world_size) == ("none", 0, 1) and env.master_port > 0


@pytest.mark.parametrize("env, message", [
    ({**SRUN_TASK, "SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not an integer"),
    ({**SRUN_TASK, "SLURM_PROCID": "4"}, "rank 4 is outside world size 4 (check SLURM_PROCID"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is outside world size 2 (check RANK"),
])
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_env(env)


@pytest.mark.parametrize("env, hint", [
    (SRUN_TASK, ("set slurm.master_port to a free port and resubmit; with slurm.master_port=0 (the "
                 "default) each attempt of job 1234 moves to a free port")),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "give torchrun another --master-port"),
    ({}, "unset MASTER_PORT"),
])
def test_a_taken_rendezvous_port_is_one_line_naming_port_and_key(env, hint):
    """Rank 0's real TCPStore on a port another process listens on (what init_process_group does)."""
    import torch.distributed as dist

    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run_env = read_env({**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        with pytest.raises(RendezvousPortInUse) as caught, rendezvous_errors(run_env):
            dist.TCPStore("127.0.0.1", port, 1, True, wait_for_workers=False)
    message = str(caught.value)
    assert message.startswith(f"rendezvous port {port} on 127.0.0.1 (MASTER_PORT) is already in use")
    assert hint in message and "\n" not in message
    assert "EADDRINUSE" in str(caught.value.__cause__)  # torch's own error, kept for the traceback file


def test_other_rendezvous_errors_pass_unchanged():
    with pytest.raises(RuntimeError, match="connection refused"), rendezvous_errors(read_env(SRUN_TASK)):
        raise RuntimeError("connection refused")
