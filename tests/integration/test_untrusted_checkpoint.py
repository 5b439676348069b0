"""A checkpoint is data, never code: a crafted pickle in a copied run dir (here DeepSpeed's ZeRO-3
optimizer file, which DeepSpeed itself unpickles with weights_only=False) is refused, without
running, by resume, export, kNN eval and train.init_from (sslscale/safe_load.py)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from ..conftest import DEMO_RECIPE, ROOT, sslscale_cmd, tiny_overrides

pytestmark = pytest.mark.integration


class Payload:
    """Unpickling this runs ``touch SENTINEL``."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(sslscale_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_crafted_pickle_is_never_executed(real_shards, tmp_path):
    run_dir, sentinel = tmp_path / "run", tmp_path / "pwned"
    common = ["deepspeed.zero_stage=3", "data.num_workers=0", "eval.train_shards=null",
              "eval.test_shards=null"]
    overrides = tiny_overrides(real_shards, run_dir, *common)
    done = run("train", str(DEMO_RECIPE), *overrides, "train.max_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    folder = run_dir / "checkpoints" / "step-00000002"
    target = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Payload(sentinel)}, target)  # zip format, as DeepSpeed's
    marker = json.loads((folder / "complete.json").read_text())  # as a forger would: it looks complete
    marker["files"][target.name] = target.stat().st_size
    (folder / "complete.json").write_text(json.dumps(marker))

    other = tiny_overrides(real_shards, tmp_path / "other", *common)
    attempts = {
        "resume": ("train", str(DEMO_RECIPE), *overrides, "train.max_steps=4"),
        "init_from": ("train", str(DEMO_RECIPE), *other, "train.max_steps=2", f"train.init_from={folder}"),
        "export": ("export", str(run_dir), "--out", str(tmp_path / "export")),
        "eval": ("eval", "knn", str(run_dir), "--train-shards", str(real_shards["train"]),
                 "--test-shards", str(real_shards["test"]), "--max-train-samples", "64",
                 "--max-test-samples", "32"),
    }
    for what, args in attempts.items():
        proc = run(*args)
        assert proc.returncode == 2, (what, proc.stderr[-3000:])
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"refusing to load {target}" in errors[0], (what, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, (what, proc.stderr[-3000:])
        assert not sentinel.exists(), f"{what} ran the pickle's code"
