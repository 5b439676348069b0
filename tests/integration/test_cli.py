"""The sslscale command line end to end on real shards: train -> checkpoint -> kill -9 ->
resume=auto continues from the saved step; kNN eval of the run; errors that name the culprit."""

import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch

from ..conftest import CLM_RECIPE, DEMO_RECIPE, MLM_RECIPE, ROOT, sslscale_cmd, tiny_overrides

pytestmark = pytest.mark.integration


def run(*args, timeout=600):
    return subprocess.run(sslscale_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_kill_resume_and_eval(real_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", str(DEMO_RECIPE), *tiny_overrides(real_shards, run_dir, "train.max_steps=8",
                                                        "checkpoint.every_steps=2")]
    # Run 1: killed with SIGKILL as soon as a checkpoint is complete, i.e. mid-run.
    proc = subprocess.Popen(sslscale_cmd(*args, "train.max_steps=200"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "latest").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = int((run_dir / "checkpoints" / "latest").read_text().split("-")[1])
    assert saved >= 2

    # Run 2: resume=auto (the default) continues from the saved step, not step 0.
    done = run(*args, "train.max_steps=" + str(saved + 4))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "engine: DeepSpeed ZeRO-0, fp32, cpu, world size 1, grad accumulation 2, AdamW" in done.stderr
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{saved:08d}'} at step {saved}" in done.stderr
    steps = [r["step"] for r in metrics(run_dir) if "train/loss" in r]
    resumed = steps[steps.index(saved + 1):] if saved + 1 in steps else []
    assert resumed[-4:] == [saved + 1, saved + 2, saved + 3, saved + 4]
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "eval" / f"knn-step-{saved + 4:08d}.json").is_file()

    # kNN of the saved encoder and of the same architecture at random init, as the demo prints.
    ev = run("eval", "knn", str(run_dir), "--baseline")
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    assert result["step"] == saved + 4 and result["num_test"] == 64
    assert 0.0 <= result["knn_top1"] <= 1.0 and 0.0 <= result["random_init_knn_top1"] <= 1.0
    kept = run_dir / "eval" / f"knn-vs-random-init-step-{saved + 4:08d}.json"
    assert json.loads(kept.read_text()) == result  # the model card quotes it

    # Resuming this ZeRO-0 run with another ZeRO stage is refused up front, naming both (another
    # world size is fine: tests/distributed/test_elastic.py).
    other = run("launch", "--nproc", "2", *args[1:], "deepspeed.zero_stage=2")
    assert other.returncode == 2, other.stderr[-3000:]
    assert "written with ZeRO-0, this run has ZeRO-2" in other.stderr


def test_unknown_key_is_named():
    proc = run("train", str(DEMO_RECIPE), "optim.lrr=1")
    assert proc.returncode == 2
    assert "optim.lrr" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_shard_directory_is_named(tmp_path):
    missing = tmp_path / "no-such-shards"
    proc = run("train", str(DEMO_RECIPE), f"data.train_shards={missing}")
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "data.train_shards" in proc.stderr


def test_too_few_shards_for_launch_is_refused_before_start(real_shards):
    proc = run("launch", "--nproc", "4", str(DEMO_RECIPE), f"data.train_shards={real_shards['test']}",
               "data.num_workers=2", "data.num_streams=2", "train.global_batch_size=256", "train.micro_batch_size=64")
    assert proc.returncode == 2 and "cannot be dealt evenly to 4 rank(s) x 2 worker(s)" in proc.stderr


def test_kill_during_save_keeps_the_last_good_checkpoint(real_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", str(DEMO_RECIPE), *tiny_overrides(real_shards, run_dir, "train.max_steps=6",
                                                        "checkpoint.every_steps=2", "eval.train_shards=null")]
    env = {**os.environ, "SSLSCALE_FAULT_INJECT": "kill-before-marker:4"}
    killed = subprocess.run(sslscale_cmd(*args), cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-00000002"
    info = run("ckpt", "info", str(run_dir))
    assert info.returncode == 0
    lines = info.stdout.splitlines()
    assert lines[1].split()[:3] == ["step-00000004", "4", "NO"]
    assert lines[2].split()[:3] == ["step-00000002", "2", "yes"] and lines[2].endswith("<- latest")

    resumed = run(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stderr
    rows = json.loads(run("ckpt", "info", str(run_dir), "--json").stdout)
    assert [(r["step"], r["complete"]) for r in rows] == [(6, True), (4, True), (2, True)]


@pytest.mark.parametrize("bad, rolled_back", [("5-5", False), ("5-7", True)])
def test_non_finite_loss_skips_the_step_then_rolls_back(real_shards, tmp_path, bad, rolled_back):
    """One micro-batch per step (ZeRO stage 0, fp32: sslscale's own skip; ZeRO-2's is DeepSpeed's,
    tests/integration/test_instability.py): a non-finite loss skips its optimizer step, with no
    weight change; three in a row roll back to the last checkpoint and the step is taken again."""
    run_dir = tmp_path / "run"
    args = ["train", str(DEMO_RECIPE), *tiny_overrides(real_shards, run_dir, "train.max_steps=8",
                                                        "checkpoint.every_steps=1", "checkpoint.keep_last=10",
                                                        "eval.train_shards=null",
                                                        "train.micro_batch_size=16", "train.max_bad_steps=3")]
    env = {**os.environ, "SSLSCALE_FAULT_INJECT": f"nan-loss:{bad}"}
    done = subprocess.run(sslscale_cmd(*args), cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [r for r in metrics(run_dir) if "train/loss" in r]
    first, last = map(int, bad.split("-"))
    assert rows[-1]["train/nonfinite_micro_batches"] == last - first + 1
    assert rows[-1]["step"] == 8 and math.isfinite(rows[-1]["train/loss"])
    skipped = [r["step"] for r in rows if not isinstance(r["train/loss"], float)]  # "nan": no finite loss
    # (the step that rolled back is taken again before it is logged)
    assert skipped == list(range(first, last + 1 - rolled_back)), skipped
    # A skipped step changes no weight: its checkpoint holds the weights of the step before.
    from sslscale.checkpoint import load_module_state
    ckpt = run_dir / "checkpoints"
    before, after = (load_module_state(ckpt / f"step-{s:08d}") for s in (first - 1, first))
    assert all(torch.equal(before[k], after[k]) for k in before)
    # samples_seen counts what was read: the skipped steps too, across the rollback
    assert rows[-1]["samples_seen"] == (8 + rolled_back) * 16
    assert ("rolled back to" in done.stderr) == rolled_back
    if rolled_back:  # 3 bad steps in a row (5-7): back to step 6's checkpoint, step 7 taken again
        assert f"rolled back to {ckpt / 'step-00000006'}" in done.stderr
        assert [r["step"] for r in rows][-2:] == [7, 8] and [r["step"] for r in rows].count(7) == 1
    else:
        assert rows[-1]["train/skipped_steps"] == 1


def test_misspelled_key_suggests_the_right_one():
    proc = run("train", str(DEMO_RECIPE), "train.max_step=5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: command line: unknown key 'train.max_step'; "
                                   "did you mean 'train.max_steps'?")


@pytest.mark.parametrize("command", [("train",), ("launch", "--nproc", "1"), ("submit", "--dry-run")])
def test_warmup_longer_than_the_run_is_warned_before_starting(tmp_path, command):
    missing = tmp_path / "no-shards"  # the run then stops at its first check, after the warning
    proc = run(*command, str(DEMO_RECIPE), "train.max_steps=5", "optim.warmup_steps=10",
               f"data.train_shards={missing}", f"run_dir={tmp_path / 'run'}")
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("warning: train.max_steps = 5 <= optim.warmup_steps = 10: ")
    assert proc.returncode == 2 and lines[-1].startswith("error: ") and str(missing) in lines[-1]


def test_data_prepare_image_folder_needs_input(tmp_path):
    proc = run("data", "prepare", "image-folder", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: image-folder needs --input DIR (a folder of images; class sub-folders DIR/<class>/ "
        "become labels)"]
    assert not (tmp_path / "x").exists()


def _eval_error(tmp_path, recipe, *command):
    """The one-line error of ``sslscale eval COMMAND`` on a run with a config and no checkpoint."""
    from sslscale.config import load_config, save_config

    run_dir = tmp_path / "run"
    save_config(load_config(recipe, [f"run_dir={run_dir}"]), run_dir / "config.yaml")
    proc = run("eval", *command, str(run_dir))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return run_dir, lines[0]


def test_eval_mlm_of_an_image_run_names_the_right_commands(tmp_path):
    run_dir, line = _eval_error(tmp_path, DEMO_RECIPE, "mlm")
    assert line.endswith(f"use `sslscale eval knn {run_dir}` or `sslscale eval linear {run_dir}`")


def test_eval_finetune_of_a_clm_run_is_refused_before_launching(tmp_path):
    run_dir, line = _eval_error(tmp_path, CLM_RECIPE, "finetune", "--train-shards", "x", "--test-shards", "y")
    assert line == (f"error: {run_dir}: fine-tuning takes a vit / bert encoder, not this run's gpt2 "
                    f"(objective clm); use `sslscale eval lm {run_dir}`")


def test_eval_knn_of_an_mlm_run_without_checkpoint_says_so(tmp_path):
    # kNN of an MLM encoder is valid (on labeled text); this run has no checkpoint yet
    run_dir, line = _eval_error(tmp_path, MLM_RECIPE, "knn")
    assert line == f"error: {run_dir}: no complete checkpoint"
