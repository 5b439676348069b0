"""Bitwise resume (CPU, fp32): a run killed with SIGKILL after a checkpoint and resumed with
resume=auto logs exactly the same train/loss for every later step as an uninterrupted run, for
ZeRO 1, 2 and 3 on 1 and 2 ranks (MAE), and on 2 ranks for MoCo v3 (momentum encoder, ZeRO-3),
MLM (masks made in the workers, dropout), CLM (GPT-2, dropout), fine-tuning (classify: labels, drop path,
layer-wise lr decay), RotNet, the denoising autoencoder, the VAE, wav2vec 2.0 (real speech:
masks, distractors and Gumbel noise from the sample seeds, dropout) and the GAN and BiGAN (two
DeepSpeed engines in one checkpoint, alternating optimizer steps) and the CycleGAN (four networks
in two engines, two domains' streams). Engine state, data positions and RNG states all
matter."""

import json
import subprocess
import time

import pytest

from ..conftest import (CLM_RECIPE, DEMO_RECIPE, MLM_RECIPE, ROOT, W2V_RECIPE, kill_tree, process_tree,
                        sslscale_cmd, tiny_audio_overrides, tiny_overrides, tiny_text_overrides, wait_dead)

pytestmark = pytest.mark.distributed
MAX_STEPS = 30


def command(nproc, shards, run_dir, stage, recipe=DEMO_RECIPE, extra=()):
    tiny = (tiny_text_overrides if recipe in (MLM_RECIPE, CLM_RECIPE) else
            tiny_audio_overrides if recipe == W2V_RECIPE else tiny_overrides)
    overrides = tiny(shards, run_dir, f"deepspeed.zero_stage={stage}",
                     f"train.max_steps={MAX_STEPS}", "checkpoint.every_steps=3",
                     "eval.train_shards=null", "eval.test_shards=null", *extra)
    if nproc == 1:
        return sslscale_cmd("train", str(recipe), *overrides)
    return sslscale_cmd("launch", "--nproc", str(nproc), str(recipe), *overrides)


def losses(run_dir, key="train/loss"):
    """step -> ``key``, the last value logged for each step (a resumed run logs again)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def kill_and_resume(command_for, tmp_path) -> tuple[dict, dict, int]:
    """Losses of an uninterrupted run and of one SIGKILLed after its first checkpoint and resumed;
    and the step it resumed from. The uninterrupted run goes beside the other two (start-ups,
    checkpoint writes and waits leave cores idle); no run's result depends on the others' timing.
    It saves only at its end (an override after the command's), so saving every third step, as
    the other run does, must not change a loss either."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    full_stderr = tmp_path / "full.stderr"
    with open(full_stderr, "w") as err:
        uninterrupted = subprocess.Popen([*command_for(full), "checkpoint.every_steps=0"], cwd=ROOT,
                                         stdout=subprocess.DEVNULL, stderr=err)
    try:
        saved = _kill_after_first_checkpoint_and_resume(command_for, cut)
        assert uninterrupted.wait(timeout=600) == 0, full_stderr.read_text()[-4000:]
    finally:
        if uninterrupted.poll() is None:  # a failed check leaves nothing running
            kill_tree(uninterrupted.pid)
            uninterrupted.wait()
    expected, got = losses(full), losses(cut)
    later = range(saved + 1, MAX_STEPS + 1)
    assert [got[s] for s in later] == [expected[s] for s in later]  # exactly, not approximately
    return expected, got, saved


def _kill_after_first_checkpoint_and_resume(command_for, cut) -> int:
    """Start a run in ``cut``, SIGKILL it and all its ranks once its first checkpoint is complete,
    resume it to the end; the step it resumed from."""
    proc = subprocess.Popen(command_for(cut), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    ranks = process_tree(proc.pid)
    kill_tree(proc.pid)  # the launcher and every rank, mid-run
    proc.wait()
    wait_dead(ranks)  # none survives to write into the run dir while it resumes
    saved = int((cut / "checkpoints" / "latest").read_text().split("-")[1])
    assert saved < MAX_STEPS

    resumed = subprocess.run(command_for(cut), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    return saved


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_kill_and_resume_is_bitwise(real_shards, tmp_path, nproc, stage):
    kill_and_resume(lambda run: command(nproc, real_shards, run, stage), tmp_path)
    cut = tmp_path / "cut"
    # Every checkpoint carries the encoder in Hugging Face format, gathered under ZeRO-3 too.
    from safetensors.torch import load_file
    from transformers import AutoModel

    encoder_dir = cut / "checkpoints" / f"step-{MAX_STEPS:08d}" / "encoder"
    encoder = AutoModel.from_pretrained(encoder_dir)
    weights = load_file(encoder_dir / "model.safetensors")
    assert type(encoder).__name__ == "ViTMAEModel" and all(w.numel() > 0 for w in weights.values())
    assert weights["embeddings.patch_embeddings.projection.weight"].abs().sum() > 0


OTHER_OBJECTIVES = {  # the keys each needs beyond the MAE demo recipe's model
    "moco_v3": ["objective.projection_hidden_dim=64", "objective.projection_dim=16",
                "objective.predictor_hidden_dim=32"],
    "classify": ["optim.layer_decay=0.75", "objective.pooling=mean",  # labels, smoothing, lr decay,
                 "objective.drop_path_rate=0.2"],  # drop path from the sample seeds
    "rotnet": ["objective.rotations_per_image=2"],  # rotations drawn from the sample seeds
    "dae": ["objective.noise=gaussian"],  # per-pixel noise from the sample seeds
    "vae": ["objective.latent_dim=8"],  # the reparameterization's epsilon from the sample seeds
    # its own recipe (W2V_RECIPE) on real speech: masks, distractors and Gumbel noise per sample
    "wav2vec2": ["objective.gumbel_temperature_decay=0.9"],  # the temperature moves within the run
    # two DeepSpeed engines in one checkpoint; two discriminator steps per generator step (the
    # data position), DiffAugment's crops of the generated images; latents from the sample seeds
    "gan": ["objective.latent_dim=8", "objective.generator_width=8", "objective.d_steps_per_g=2",
            "objective.diff_augment=true", "objective.d_lr=0.002"],
    "bigan": ["objective.latent_dim=8", "objective.generator_width=8", "objective.reconstruction_weight=1.0"],
    # four networks in two engines; two unpaired domains, each from its own streams (positions)
    "cyclegan": ["objective.generator_width=4", "objective.generator_blocks=1", "objective.image_every_steps=10"],
}


@pytest.mark.parametrize("objective,stage", [("moco_v3", 3), ("mlm", 2), ("clm", 2), ("classify", 2),
                                             ("rotnet", 2), ("dae", 1), ("vae", 2), ("wav2vec2", 2),
                                             ("gan", 2), ("bigan", 1), ("cyclegan", 2)])
def test_kill_and_resume_is_bitwise_for_every_objective(request, tmp_path, objective, stage):
    if objective in ("mlm", "clm"):
        recipe = MLM_RECIPE if objective == "mlm" else CLM_RECIPE
        run = lambda r: command(2, request.getfixturevalue("text_shards"), r, stage, recipe)  # noqa: E731
    elif objective == "wav2vec2":
        audio = request.getfixturevalue("audio_shards")  # skips without ktuberling-data
        run = lambda r: command(2, audio, r, stage, W2V_RECIPE, OTHER_OBJECTIVES[objective])  # noqa: E731
    else:
        extra = [f"objective.name={objective}", *OTHER_OBJECTIVES[objective]]
        run = lambda r: command(2, request.getfixturevalue("real_shards"), r, stage, extra=extra)  # noqa: E731
    expected, _, saved = kill_and_resume(run, tmp_path)
    assert len(set(expected.values())) > MAX_STEPS // 2  # the loss moves: the check is not vacuous
    if objective in ("gan", "bigan", "cyclegan"):  # train/loss is the generator's; the discriminator's too
        d_losses = [losses(tmp_path / run, "train/d_loss") for run in ("full", "cut")]
        assert all(d_losses[1][s] == d_losses[0][s] for s in range(saved + 1, MAX_STEPS + 1))
