"""wav2vec 2.0 on real speech (Debian ktuberling-data): the resampler, the audio shards, the
per-clip span masks and distractors (the same on any rank and world size), the forward without
host syncs against transformers' own, the loss, the Gumbel schedule and the FLOP count."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from launcher.cli import main as cli
from sslscale import flops
from sslscale.config import ConfigError, load_config
from sslscale.data.audio import AudioDecoder, decode_audio, prepare_audio, resample
from sslscale.data.masking import feature_frames, sample_negatives, span_mask
from sslscale.data.shards import load_manifest
from sslscale.data.stream import TrainStream, _open_at, decoder_for, eval_batches
from sslscale.engine import apply_schedules, build_optimizer
from sslscale.objectives import build_objective
from sslscale.objectives.wav2vec2 import encode, gumbel_noise, gumbel_temperature

from ..conftest import TINY_W2V, W2V_RECIPE, for_objective

NO_DROPOUT = ["model.hidden_dropout=0.0", "model.attention_dropout=0.0", "model.feat_proj_dropout=0.0"]


def w2v_config(shards, *extra):
    return load_config(str(W2V_RECIPE), [f"data.train_shards={shards['train']}", *TINY_W2V, *extra])


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resample_keeps_a_tone_and_removes_what_16k_cannot_hold(rate):
    t = np.arange(2 * rate) / rate
    y = resample(np.sin(2 * np.pi * 440 * t), rate, 16_000)
    assert len(y) == 32_000 and y.dtype == np.float32
    want = np.sin(2 * np.pi * 440 * np.arange(len(y)) / 16_000)
    assert np.abs(y - want)[300:-300].max() < 1e-3  # the band below 7.5 kHz passes
    if rate > 16_000:  # a 10 kHz tone would alias to 6 kHz: the filter stops it (< -60 dB)
        alias = resample(np.sin(2 * np.pi * 10_000 * t), rate, 16_000)
        assert np.sqrt(np.mean(alias[300:-300] ** 2)) < 1e-3
    with pytest.raises(ValueError, match="rates must be > 0"):
        resample(y, 0, 16_000)


def test_prepare_audio_writes_labeled_16k_clips_split_by_language(audio_shards):
    train, val = load_manifest(audio_shards["train"]), load_manifest(audio_shards["val"])
    assert train.modality == val.modality == "audio"
    assert train.source == "ktuberling-data" and train.license == "GPL-2+"
    meta = train.meta
    assert meta["sampling_rate"] == 16_000 and len(meta["classes"]) > 10 and len(train.shards) == 4
    assert train.num_samples + val.num_samples == 96
    raw = [s for i in range(len(train.shards)) for s in _open_at(train, i, 0)]
    paths = {json.loads(s["json"])["path"] for s in raw}
    val_paths = {json.loads(s["json"])["path"] for i in range(len(val.shards)) for s in _open_at(val, i, 0)}
    assert not paths & val_paths  # no file in both splits
    first = raw[0]
    info = json.loads(first["json"])
    assert meta["classes"][int(first["cls"])] == info["class"] and info["path"].split("/")[-2] == info["class"]
    assert info["path"].split("/")[-1].startswith(info["word"] + ".") and "words" not in meta  # O(shards)
    x = decode_audio(first)
    assert x.dtype == np.float32 and meta["min_num_samples"] <= len(x) <= meta["max_num_samples"]
    assert 0.01 < np.abs(x).max() <= 1.0  # speech, not silence


def test_prepare_audio_names_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare_audio(tmp_path / "out", inputs=[str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .wav/.flac/.ogg files"):
        prepare_audio(tmp_path / "out", inputs=[str(tmp_path / "empty")])
    (tmp_path / "bad" / "en").mkdir(parents=True)
    (tmp_path / "bad" / "en" / "word.wav").write_bytes(b"RIFF not really")
    with pytest.raises(ValueError, match="word.wav: not a readable sound file"):
        prepare_audio(tmp_path / "out", inputs=[str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="sample 7 from x.tar has no audio"):
        decode_audio({"__key__": "7", "__url__": "x.tar", "txt": b"hello"})


def test_prepare_audio_path_labels_hold_out_another_speaker(tmp_path, capsys):
    """``--labels path --val-input``: the class is what is said (the path under the speaker's
    folder), on one class list for both splits; the held-out speaker is val, whole."""
    import soundfile

    said = {"carlo": ["digits/1", "digits/2", "letters/a", "hello"], "menardi": ["digits/1", "letters/a", "bye"]}
    for speaker, names in said.items():
        for j, name in enumerate(names):
            path = tmp_path / speaker / f"{name}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            t = np.arange(4000) / 8000  # 0.5 s at 8 kHz, as telephone prompts are recorded
            soundfile.write(path, 0.3 * np.sin(2 * np.pi * (200 + 100 * j) * t), 8000, subtype="PCM_16")
    assert cli(["data", "prepare", "audio", "--input", str(tmp_path / "carlo"), "--labels", "path",
                "--val-input", str(tmp_path / "menardi"), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads(capsys.readouterr().out)
    classes = ["bye", "digits/1", "digits/2", "hello", "letters/a"]
    assert summary["classes"] == classes and summary["train"]["samples"] == 4 and summary["val"]["samples"] == 3
    for split, speaker in (("train", "carlo"), ("val", "menardi")):
        manifest = load_manifest(tmp_path / "out" / split)
        assert manifest.meta["labels"] == "path" and manifest.meta["classes"] == classes
        assert manifest.meta["inputs"] == [str(tmp_path / speaker)]
        samples = [s for i in range(len(manifest.shards)) for s in _open_at(manifest, i, 0)]
        got = {json.loads(s["json"])["path"]: classes[int(s["cls"])] for s in samples}
        assert got == {str(tmp_path / speaker / f"{name}.wav"): name for name in said[speaker]}
        assert len(decode_audio(samples[0])) == 8000  # resampled to 16 kHz
    # --labels path without --val-input: files are split as one group (each class may have one file)
    split = prepare_audio(tmp_path / "out2", inputs=[str(tmp_path / "carlo")], labels="path", val_fraction=0.25)
    assert (split["train"]["samples"], split["val"]["samples"]) == (3, 1)
    assert cli(["data", "prepare", "audio", "--input", str(tmp_path / "carlo"), "--val-fraction", "0.2",
                "--val-input", str(tmp_path / "menardi"), "--out", str(tmp_path / "out3")]) == 2
    assert "--val-input holds out whole folders as val: leave --val-fraction out" in capsys.readouterr().err
    assert cli(["data", "prepare", "mnist5k", "--labels", "path", "--out", str(tmp_path / "out4")]) == 2
    assert "--labels is for text and audio; mnist5k labels come from the source" in capsys.readouterr().err
    assert cli(["data", "prepare", "pydoc-topics", "--val-input", str(tmp_path), "--out", str(tmp_path / "out4")]) == 2
    assert "--val-input is for audio, not pydoc-topics" in capsys.readouterr().err
    assert not (tmp_path / "out4").exists()
    with pytest.raises(ValueError, match="--labels for audio must be one of folder, path, got 'section'"):
        prepare_audio(tmp_path / "out3", inputs=[str(tmp_path / "carlo")], labels="section")


def test_span_mask_and_distractors_follow_the_paper():
    rng = np.random.default_rng(0)
    for frames in (5, 30, 49, 200):
        mask = span_mask(rng, frames, 250, 0.65, 10, 2)
        assert not mask[frames:].any()  # never on padding
        if frames >= 20:
            assert 10 <= mask.sum() <= frames
        negatives = sample_negatives(rng, mask, 20)
        rows = np.flatnonzero(mask)
        assert negatives.shape == (250, 20)
        if len(rows) > 1:
            assert mask[negatives[rows]].all()  # distractors are other masked frames of the clip
            assert (negatives[rows] != rows[:, None]).all()
        unmasked = np.flatnonzero(~mask)
        assert (negatives[unmasked] == unmasked[:, None]).all()
    assert feature_frames(16_000, [10, 3, 3, 3, 3, 2, 2], [5, 2, 2, 2, 2, 2, 2]) == 49  # 20 ms frames
    assert feature_frames(300, [10, 3, 3, 3, 3, 2, 2], [5, 2, 2, 2, 2, 2, 2]) == 0


def test_masks_and_distractors_are_a_function_of_the_clip_not_the_rank(audio_shards):
    """What each clip gets on 1 rank and on each of 2 ranks (per clip, by its sample seed): the
    same crop, mask and distractors; different clips get different ones."""
    cfg = w2v_config(audio_shards)
    manifest = load_manifest(audio_shards["train"])
    decode = decoder_for(cfg, manifest)

    def clips(rank, world):
        stream = TrainStream(manifest, rank=rank, world_size=world, num_workers=1, batch_size=8, decode=decode,
                             seed=0, shuffle_buffer=64, num_streams=4)
        out = {}
        for batch in itertools.islice(iter(stream), 6):
            for i, seed in enumerate(batch["sample_seeds"].tolist()):
                out[seed] = {k: batch[k][i] for k in ("input_values", "mask_time_indices", "sampled_negative_indices")}
        return out

    one = clips(0, 1)
    two = {**clips(0, 2), **clips(1, 2)}
    common = one.keys() & two.keys()
    assert len(common) >= 24
    for seed in common:
        for key in one[seed]:
            assert torch.equal(one[seed][key], two[seed][key]), key
    masks = [one[s]["mask_time_indices"] for s in common]
    assert len({tuple(m.tolist()) for m in masks}) > len(masks) // 2
    assert 0.2 < torch.stack(masks).float().mean() < 0.8


def test_encode_matches_transformers_and_the_loss_trains(audio_shards):
    cfg = w2v_config(audio_shards, *NO_DROPOUT)
    manifest = load_manifest(audio_shards["train"])
    batch = next(eval_batches(manifest, rank=0, world_size=1, batch_size=8, decode=decoder_for(cfg, manifest)))
    assert (batch["attention_mask"] == 0).any()  # some clips are padded
    torch.manual_seed(0)
    objective = build_objective(cfg)
    for module in objective.modules():  # activation_dropout too: the same batch gives the same loss
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model = objective.model.wav2vec2
    with torch.no_grad():
        hidden, extract, frames = encode(model, batch["input_values"], batch["attention_mask"], batch["mask_time_indices"])
        ref = model(batch["input_values"], attention_mask=batch["attention_mask"],
                    mask_time_indices=batch["mask_time_indices"].clone())
    assert torch.equal(hidden, ref.last_hidden_state) and torch.equal(extract, ref.extract_features)
    assert frames.shape == batch["mask_time_indices"].shape
    objective.on_step_start(100, 400)
    assert objective.gumbel_tau.item() == pytest.approx(gumbel_temperature(100, max_temperature=2.0, min_temperature=0.5,
                                                                            decay=cfg.objective.gumbel_temperature_decay))
    out = objective(batch)
    again = objective(batch)  # the Gumbel noise comes from the sample seeds, not a global RNG
    assert torch.equal(out.loss, again.loss)
    groups, per_group = cfg.model.num_codevector_groups, cfg.model.num_codevectors_per_group
    assert groups <= out.metrics["codebook_perplexity"] <= groups * per_group
    assert out.metrics["contrastive_loss"] > 0 and 0 <= out.metrics["diversity_loss"] < 1
    assert 0 < out.metrics["contrastive_chance"] <= np.log(cfg.objective.num_negatives + 1) + 1e-6
    out.loss.backward()
    q = objective.model.quantizer
    for p in (q.codevectors, q.weight_proj.weight, model.masked_spec_embed, model.feature_extractor.conv_layers[0].conv.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    other = dict(batch, sample_seeds=batch["sample_seeds"] + 1)
    assert not torch.equal(objective(other).loss, out.loss)
    features = objective.eval().features({k: batch[k] for k in ("input_values", "attention_mask")})
    assert features.shape == (8, cfg.model.hidden_size) and torch.isfinite(features).all()


def test_gumbel_noise_is_finite_at_the_uniforms_extremes(monkeypatch):
    """The largest uniform (1 - 2^-24) once became 1.0 (+ 2^-25 rounds up in float32): an
    infinite logit, a NaN loss and a skipped step in about 1 micro-batch of 100."""
    import sslscale.objectives.wav2vec2 as w2v

    extremes = torch.tensor([[0.0, 1.0 - 2.0 ** -24, 0.5]])
    monkeypatch.setattr(w2v, "uniform", lambda seeds, n, tag: extremes.expand(len(seeds), n))
    noise = gumbel_noise(torch.zeros(2, dtype=torch.long), (3,))
    assert noise.shape == (2, 3) and torch.isfinite(noise).all()
    assert noise[0, 0] < noise[0, 2] < noise[0, 1]  # monotone in u
    monkeypatch.undo()
    many = gumbel_noise(torch.arange(64), (49, 2, 64))
    assert torch.isfinite(many).all() and abs(many.mean().item() - 0.5772) < 0.01  # Euler's constant


def test_gumbel_temperature_is_a_pure_function_of_the_step():
    schedule = dict(max_temperature=2.0, min_temperature=0.5, decay=0.999995)
    assert gumbel_temperature(0, **schedule) == 2.0
    assert gumbel_temperature(1000, **schedule) == pytest.approx(2.0 * 0.999995 ** 1000)
    assert gumbel_temperature(10 ** 7, **schedule) == 0.5


def test_flops_match_the_flop_counter(audio_shards):
    cfg = w2v_config(audio_shards, *NO_DROPOUT, "model.attn_implementation=eager")
    manifest = load_manifest(audio_shards["train"])
    batch = next(eval_batches(manifest, rank=0, world_size=1, batch_size=4, decode=decoder_for(cfg, manifest)))
    torch.manual_seed(0)
    objective = build_objective(cfg)
    with FlopCounterMode(display=False) as counter:
        objective(batch).loss.backward()
    want = counter.get_total_flops() / 4
    # the counter takes the grouped position convolution's weight gradient for an ungrouped one
    m, frames = cfg.model, batch["mask_time_indices"].shape[1]
    groups, k = m.num_conv_pos_embedding_groups, m.num_conv_pos_embeddings
    want -= (groups - 1) * flops.linear_flops(frames + 1 - k % 2, m.hidden_size // groups * k, m.hidden_size)
    got = flops.flops_per_sample_of_batch(cfg, batch, world_size=2)
    assert got == flops.flops_per_sample(cfg, num_samples=batch["input_values"].shape[1])
    # the rest: the K + 1 cosine logits per frame (elementwise ops the counter does not see)
    assert got == pytest.approx(want, rel=0.01)


def test_config_names_the_key_and_its_owner():
    cfg = load_config(None, for_objective("wav2vec2", []))
    assert cfg.model.name == "wav2vec2" and cfg.objective.mask_time_length == 10
    with pytest.raises(ConfigError, match="objective.mask_time_prob"):
        load_config(None, for_objective("wav2vec2", ["objective.mask_time_prob=1.5"]))
    with pytest.raises(ConfigError, match="belongs to objective wav2vec2"):
        load_config(None, ["objective.name=mae", "objective.num_negatives=5"])
    with pytest.raises(ConfigError, match="data.max_audio_seconds"):
        load_config(None, for_objective("wav2vec2", ["data.max_audio_seconds=0"]))
    with pytest.raises(ValueError, match="unknown crop 'left'"):
        AudioDecoder(100, crop="left")


def test_loss_matches_transformers_pretraining(audio_shards):
    """The contrastive and diversity terms (per masked frame) equal ``Wav2Vec2ForPreTraining``'s
    (sums over the masked frames) on the same masks and distractors, in eval mode (argmax codes:
    no Gumbel noise, no dropout)."""
    cfg = w2v_config(audio_shards, *NO_DROPOUT)
    manifest = load_manifest(audio_shards["train"])
    batch = next(eval_batches(manifest, rank=0, world_size=1, batch_size=8, decode=decoder_for(cfg, manifest)))
    torch.manual_seed(0)
    objective = build_objective(cfg).eval()
    negatives = batch["sampled_negative_indices"]
    b, t, _ = negatives.shape
    with torch.no_grad():
        out = objective(batch)
        ref = objective.model(batch["input_values"], attention_mask=batch["attention_mask"],
                              mask_time_indices=batch["mask_time_indices"],
                              sampled_negative_indices=negatives + torch.arange(b)[:, None, None] * t)
    masked = batch["mask_time_indices"].sum()
    assert out.metrics["contrastive_loss"] == pytest.approx((ref.contrastive_loss / masked).item(), rel=1e-5)
    assert out.metrics["diversity_loss"] == pytest.approx((ref.diversity_loss / masked).item(), rel=1e-5)


@pytest.mark.parametrize("init", ["uniform", "centered"])
def test_codevector_init_sets_how_alike_the_targets_start(audio_shards, init):
    """transformers' (and fairseq's) U(0, 1) codebook makes every target alike at init (cosine
    ~0.85: the logits of the positive and its distractors differ by < 1.5 at temperature 0.1);
    ``objective.codevector_init=centered`` starts them near orthogonal."""
    torch.manual_seed(0)
    objective = build_objective(w2v_config(audio_shards, f"objective.codevector_init={init}"))
    q = objective.model.quantizer
    books = q.codevectors.view(q.num_groups, q.num_vars, -1)
    codes = torch.randint(0, q.num_vars, (256, q.num_groups))  # random product-codebook entries
    targets = objective.model.project_q(torch.cat([books[g, codes[:, g]] for g in range(q.num_groups)], -1))
    cosine = torch.nn.functional.cosine_similarity(targets[:128], targets[128:], dim=-1).mean().item()
    assert (cosine > 0.6) if init == "uniform" else (abs(cosine) < 0.2)
    with pytest.raises(ConfigError, match="objective.codevector_init"):
        w2v_config(audio_shards, "objective.codevector_init=normal")


def train_steps(cfg, batches) -> list[dict[str, float]]:
    """The objective's metrics at each optimizer step of ``cfg`` over ``batches`` on one rank
    (the trainer's AdamW, lr schedule and grad clipping; one micro-batch per step)."""
    torch.manual_seed(0)
    objective = build_objective(cfg)
    optimizer = build_optimizer(objective, cfg)
    metrics = []
    for step, batch in enumerate(batches):
        apply_schedules(optimizer, step, cfg)
        objective.on_step_start(step, cfg.train.max_steps)
        result = objective(batch)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics.append({k: v.item() for k, v in result.metrics.items()})
    return metrics


def codebook_perplexities(cfg, steps: int) -> list[float]:
    """``train/codebook_perplexity`` of each of the first ``steps`` optimizer steps of ``cfg``."""
    manifest = load_manifest(cfg.data.train_shards)
    stream = TrainStream(manifest, rank=0, world_size=1, num_workers=1, batch_size=cfg.train.micro_batch_size,
                         decode=decoder_for(cfg, manifest), seed=0, shuffle_buffer=64, num_streams=4)
    return [m["codebook_perplexity"] for m in train_steps(cfg, itertools.islice(iter(stream), steps))]


LAYER_NORMS = ["model.feat_extract_norm=layer", "model.do_stable_layer_norm=true"]  # the LARGE arrangement


def test_codebook_perplexity_does_not_fall_over_the_first_steps(audio_shards):
    """With per-frame LayerNorms in the feature encoder (the LARGE arrangement) the contrastive
    term pulls the features of all frames together early on (a distractor given the positive's
    code drops out of the loss) and with the paper's diversity weight 0.1 the codebook perplexity
    falls (here 12.5 -> ~9 of 32 over 40 steps; the demo: 18.6 -> 4.1 of 128 over 30). The
    recipe's BASE arrangement (GroupNorm in the first conv layer) with the same weight does not."""
    cfg = w2v_config(audio_shards)
    assert cfg.model.feat_extract_norm == "group" and cfg.objective.diversity_loss_weight == 0.1
    grows = codebook_perplexities(cfg, 40)
    assert np.mean(grows[-10:]) > grows[0]
    falls = codebook_perplexities(w2v_config(audio_shards, *LAYER_NORMS), 40)
    assert np.mean(falls[-10:]) < 0.9 * falls[0]


def neighbour_similarity(cfg) -> tuple[float, float]:
    """``(adjacent, random)``: mean cosine of the random-init feature encoder's (centered)
    ``extract_features`` of adjacent frames, and of a frame and a random frame of the same clip."""
    manifest = load_manifest(cfg.data.train_shards)
    batch = next(eval_batches(manifest, rank=0, world_size=1, batch_size=32, decode=decoder_for(cfg, manifest)))
    torch.manual_seed(0)
    model = build_objective(cfg).eval().model.wav2vec2
    with torch.no_grad():
        _, features, frames = encode(model, batch["input_values"], batch["attention_mask"], None)
    features = torch.nn.functional.normalize(features - features[frames].mean(0), dim=-1)
    adjacent = (features[:, 1:] * features[:, :-1]).sum(-1)[frames[:, 1:] & frames[:, :-1]].mean().item()
    generator = torch.Generator().manual_seed(0)
    other = torch.stack([torch.randint(0, int(n), (features.shape[1],), generator=generator) for n in frames.sum(1)])
    random = (features * features.gather(1, other[..., None].expand_as(features))).sum(-1)[frames].mean().item()
    return adjacent, random


def test_feature_encoder_keeps_neighbouring_frames_alike(audio_shards):
    """Why the contrastive loss stayed at chance with per-frame LayerNorms in every conv layer:
    at init a frame's features were no more like its neighbour's than like any frame of the clip
    (the demo: cosine 0.07 vs 0.05; the log spectrum: 0.73 vs 0.26), so the quantized target of
    a masked frame could not be told from the unmasked context (800 steps at ln 21). The BASE
    arrangement's GroupNorm over time keeps each frame's energy (the demo: 0.62 vs 0.27) and
    the loss falls below chance (README)."""
    adjacent, random = neighbour_similarity(w2v_config(audio_shards))
    assert adjacent > 1.5 * random
    adjacent, random = neighbour_similarity(w2v_config(audio_shards, *LAYER_NORMS))
    assert adjacent < 1.2 * random


def test_contrastive_loss_falls_when_overfitting_one_batch(audio_shards):
    """The loss wiring (context vs its own target in column 0, gradients into the targets and
    the context): 40 steps of the recipe's optimizer on one batch of 8 clips (fixed masks and
    Gumbel noise) take the contrastive loss from above chance to well below it (2.78 -> 1.11,
    chance 2.38; accuracy 0.14 -> 0.66 when written)."""
    cfg = w2v_config(audio_shards, *NO_DROPOUT)
    manifest = load_manifest(cfg.data.train_shards)
    batch = next(eval_batches(manifest, rank=0, world_size=1, batch_size=8, decode=decoder_for(cfg, manifest)))
    metrics = train_steps(cfg, [batch] * 40)
    first, last = metrics[0], metrics[-1]
    assert first["contrastive_accuracy"] < 0.25 and first["contrastive_loss"] > first["contrastive_chance"]
    assert last["contrastive_loss"] < 0.6 * last["contrastive_chance"] and last["contrastive_accuracy"] > 0.5


def test_feature_encoder_lr_scale_reaches_its_param_groups(audio_shards):
    from sslscale.engine import param_groups

    objective = build_objective(w2v_config(audio_shards, "objective.feature_encoder_lr_scale=0.1"))
    scale_of = {id(p): g["lr_scale"] for g in param_groups(objective) for p in g["params"]}
    for name, p in objective.named_parameters():
        assert scale_of[id(p)] == (0.1 if name.startswith("model.wav2vec2.feature_extractor.") else 1.0), name
    cfg = w2v_config(audio_shards, "objective.feature_encoder_lr_scale=1.0")
    optimizer = build_optimizer(build_objective(cfg), cfg)
    assert len(optimizer.param_groups) == 2 and {g["lr_scale"] for g in optimizer.param_groups} == {1.0}
    with pytest.raises(ConfigError, match="objective.feature_encoder_lr_scale"):
        w2v_config(audio_shards, "objective.feature_encoder_lr_scale=-1")
