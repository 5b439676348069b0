"""The steady-state training step does not wait on the device or on another rank (issue #14).

Real runs of ``sslscale.train.main`` (2 ranks with ZeRO-2, 1 rank with ZeRO stage 0; DeepSpeed,
data-loader workers, real shards) count, per optimizer step, what sslscale's own code does that
would block a GPU step: ``.item()`` / ``.tolist()`` / ``bool()`` / ``int()`` / ``float()`` on a
tensor, and collectives (blocking or not). DeepSpeed's own calls are not counted (they are not
ours to remove). Host-side reads of the data loader's CPU tensors (stream positions, skipped
counts: ``Trainer._take_data_state``) and the stop vote's result
(a CPU tensor) are not device syncs and are listed apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from launcher.env import free_port

from ..conftest import DEMO_RECIPE, ROOT, W2V_RECIPE, tiny_audio_overrides, tiny_overrides

pytestmark = pytest.mark.integration

STEPS = 8
# Run in each rank: count the calls, tagged with the step being taken, then train as usual.
COUNTER = r"""
import json, os, sys, traceback
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

import sslscale
import sslscale.trainer as trainer_module
from sslscale.train import main

OURS = os.path.dirname(sslscale.__file__) + os.sep
SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
         torch.Tensor.__float__, torch.Tensor.__index__}
events, step = [], [0]


def our_caller():
    # The innermost frame in sslscale's code, if the call came from there (else None).
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(OURS):
            return frame.f_code.co_name
        if "site-packages" in name and "/torch/" not in name:
            return None  # DeepSpeed, transformers, ...: not ours
        frame = frame.f_back
    return None


class CountSyncs(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCS:
            caller = our_caller()
            if caller is not None:
                events.append((step[0], "sync", caller))
        return func(*args, **(kwargs or {}))


def counted(name, collective):
    def wrapper(*args, **kwargs):
        caller = our_caller()
        if caller is not None:
            kind = "async collective" if kwargs.get("async_op") else "collective"
            events.append((step[0], kind, caller))
        return collective(*args, **kwargs)
    return wrapper


for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
             "broadcast", "barrier", "all_gather_object", "broadcast_object_list"):
    setattr(dist, name, counted(name, getattr(dist, name)))

train_step = trainer_module.Trainer.train_step


def tagged_train_step(self, batches):
    step[0] = self.state.step + 1  # what follows, up to the next step, belongs to this one
    return train_step(self, batches)


trainer_module.Trainer.train_step = tagged_train_step
with CountSyncs():
    code = main(sys.argv[1], sys.argv[2:])
with open(os.environ["SYNC_EVENTS"] + os.environ["RANK"], "w") as f:
    json.dump(events, f)
sys.exit(code)
"""


def run_counted(tmp_path, real_shards, world_size: int, *extra: str, recipe=DEMO_RECIPE,
                tiny=tiny_overrides) -> list[Counter]:
    """Per-step counts of each rank's events, for the steps that neither log nor save."""
    run_dir, port = tmp_path / "run", str(free_port())
    overrides = tiny(real_shards, run_dir, f"train.max_steps={STEPS}",
                               f"train.log_every={STEPS}", "checkpoint.every_steps=0",
                               "eval.train_shards=null", "eval.test_shards=null",
                               "data.num_workers=2", *extra)
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "SYNC_EVENTS": str(tmp_path / "events-")}
        procs.append(subprocess.Popen([sys.executable, "-c", COUNTER, str(recipe), *overrides],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    steady = range(2, STEPS)  # the first step builds and warms up; the last one logs and saves
    per_step = []
    for rank in range(world_size):
        events = json.loads((tmp_path / f"events-{rank}").read_text())
        for s in steady:
            per_step.append(Counter((kind, caller) for at, kind, caller in events if at == s))
    return per_step


# Reads of CPU tensors, not device syncs: the loader's stream positions and skip counts, and the
# stop vote's result (a gloo all-reduce of a CPU tensor, posted one step earlier).
HOST_SIDE = {("sync", "_take_data_state"), ("sync", "wait")}


def device_syncs(counts: Counter) -> Counter:
    return Counter({k: n for k, n in counts.items() if k not in HOST_SIDE})


def test_zero2_two_ranks_step_has_no_sync_and_one_async_collective(real_shards, tmp_path):
    for counts in run_counted(tmp_path, real_shards, 2, "deepspeed.zero_stage=2"):
        # the stop-signal vote: one non-blocking all-reduce on a CPU group, nothing else
        assert device_syncs(counts) == Counter({("async collective", "post"): 1}), counts


def test_zero0_fp32_step_has_one_sync_the_global_grad_norm(real_shards, tmp_path):
    """Plain fp32 data parallelism has no DeepSpeed overflow check: the engine takes the global
    gradient norm itself, its one host sync per optimizer step (``Engine.backward_step``), here
    with 2 micro-batches per step. One rank: no stop vote to post."""
    for counts in run_counted(tmp_path, real_shards, 1, "deepspeed.zero_stage=0"):
        assert device_syncs(counts) == Counter({("sync", "backward_step"): 1}), counts


def test_wav2vec2_two_ranks_step_has_no_sync(audio_shards, tmp_path):
    """wav2vec 2.0 on real speech: masks and distractors come from the workers, the Gumbel
    temperature is filled in a buffer, the metrics stay on the device."""
    for counts in run_counted(tmp_path, audio_shards, 2, "deepspeed.zero_stage=2", recipe=W2V_RECIPE,
                              tiny=tiny_audio_overrides):
        assert device_syncs(counts) == Counter({("async collective", "post"): 1}), counts
