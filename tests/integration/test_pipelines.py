"""Every documented way to load an export gives trained, deterministic weights, end to end from
real runs exported by the CLI: ``AutoModel`` (pooler included), ``AutoModelForMaskedLM``,
``pipeline("fill-mask")`` and ``pipeline("image-feature-extraction")`` (with ``pool=True``).
Two loads must agree exactly and no load may report a weight as newly initialized; the MLM
export's fill-mask must beat chance on held-out text (its head is the trained one)."""

import json
import logging
import os

import numpy as np
import pytest
import torch

from ..conftest import MLM_RECIPE, ROOT, tiny_overrides, tiny_text_overrides
from .test_export_push import _run

pytestmark = pytest.mark.integration


class _Logs(logging.Handler):
    """transformers' warnings (its load reports) while in a ``with`` block, text in ``.text``."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.text = ""

    def emit(self, record):
        self.text += record.getMessage() + "\n"

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_warning()
        logging.getLogger("transformers").addHandler(self)
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        logging.getLogger("transformers").removeHandler(self)
        hf_logging.set_verbosity(self._level)


def _assert_no_new_weights(logs: _Logs) -> None:
    assert "MISSING" not in logs.text and "newly initialized" not in logs.text, logs.text


@pytest.fixture(scope="module")
def mlm_export(text_shards, tmp_path_factory):
    """A tiny BERT trained 40 MLM steps under ZeRO-3 (tied embeddings consolidated), exported
    without --repo-id."""
    root = tmp_path_factory.mktemp("mlm-pipelines")
    run_dir, out = root / "run", root / "exported"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    _run(["train", str(MLM_RECIPE), *tiny_text_overrides(text_shards, run_dir, "train.max_steps=40",
                                                          "optim.lr=3e-3", "deepspeed.zero_stage=3")], env, [])
    result = _run(["export", str(run_dir), "--out", str(out)], env, [])
    return {"out": out, "run_dir": run_dir, "result": json.loads(result.stdout.splitlines()[-1]),
            "val": text_shards["val"]}


def _held_out_cases(val_dir, tokenizer, width=24, limit=1000):
    """(text with one mask, masked token id) from the held-out pydoc topics: per window of
    ``width`` tokens, its middle token masked, kept when it is a whole word or punctuation (not a
    ``##`` piece, nor followed by one) and the text tokenizes back to the same window."""
    from pydoc_data.topics import topics

    cases = []
    for key in (val_dir / "documents.txt").read_text().split():
        ids = tokenizer(topics[key], add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - width, width):
            window, middle = list(ids[start:start + width]), width // 2
            target = window[middle]
            pieces = tokenizer.convert_ids_to_tokens(window[middle:middle + 2])
            if target in tokenizer.all_special_ids or any(t.startswith("##") for t in pieces):
                continue
            window[middle] = tokenizer.mask_token_id
            text = tokenizer.decode(window)
            if tokenizer(text, add_special_tokens=False)["input_ids"] == window:
                cases.append((text, target))
            if len(cases) == limit:
                return cases
    return cases


def test_mlm_export_fill_mask_is_the_trained_head(mlm_export):
    from transformers import pipeline

    out = mlm_export["out"]
    assert mlm_export["result"]["class"] == "BertForMaskedLM"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    with _Logs() as logs:
        first, second = (pipeline("fill-mask", model=str(out)) for _ in range(2))
    _assert_no_new_weights(logs)
    cases = _held_out_cases(mlm_export["val"], first.tokenizer)
    assert len(cases) >= 400
    text = cases[0][0]
    a, b = first(text, top_k=5), second(text, top_k=5)
    assert [r["token"] for r in a] == [r["token"] for r in b] and [r["score"] for r in a] == [r["score"] for r in b]

    predictions = first([text for text, _ in cases], top_k=1, batch_size=64)
    hits = sum(pred[0]["token"] == want for pred, (_, want) in zip(predictions, cases))
    vocab = first.tokenizer.vocab_size
    # Chance is 1/vocab (0.1%: ~0.6 of ~600 cases; 4+ hits by chance: p < 0.5%). 40 steps of this
    # tiny BERT give ~2% (its held-out eval/mlm_accuracy, on all masked tokens, is ~2-3%).
    print(f"fill-mask top-1 on held-out text: {hits}/{len(cases)} (chance {1 / vocab:.4f})")
    assert hits > 5 * len(cases) / vocab, f"{hits}/{len(cases)} held-out masked tokens right"


def test_mlm_export_auto_model_loads_the_encoder_deterministically(mlm_export):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    out = mlm_export["out"]
    batch = AutoTokenizer.from_pretrained(out)(["Shards are read as resumable streams."], return_tensors="pt")
    with _Logs() as logs, torch.no_grad():
        loads = [AutoModel.from_pretrained(out).eval()(**batch) for _ in range(2)]
        AutoModelForMaskedLM.from_pretrained(out)
    _assert_no_new_weights(logs)
    assert torch.equal(loads[0].pooler_output, loads[1].pooler_output)
    assert torch.equal(loads[0].last_hidden_state, loads[1].last_hidden_state)
    torch.testing.assert_close(loads[0].pooler_output, torch.tanh(loads[0].last_hidden_state[:, 0]))
    # The card has no local path for a title and reports the held-out accuracy in its metadata.
    body = (out / "README.md").read_text()
    assert "\n# mlm_bert_tiny_pydocs (mlm encoder)\n" in body and str(out) not in body.split("## Model")[0]
    assert "pipeline_tag: fill-mask" in body and "- type: accuracy" in body


@pytest.fixture(scope="module")
def image_export(real_shards, tmp_path_factory):
    """A tiny SimCLR ViT (CLS pooling) trained 2 steps and exported."""
    root = tmp_path_factory.mktemp("image-pipelines")
    run_dir, out = root / "run", root / "exported"
    recipe = ROOT / "configs" / "demo" / "simclr_vit_tiny_fmnist.yaml"
    _run(["train", str(recipe), *tiny_overrides(real_shards, run_dir, "train.max_steps=2", "objective.pooling=cls",
                                                "objective.projection_hidden_dim=64", "objective.projection_dim=32")],
         {**os.environ, "WANDB_MODE": "disabled"}, [])
    _run(["export", str(run_dir), "--out", str(out)], {**os.environ, "WANDB_MODE": "disabled"}, [])
    return out


def test_image_export_pools_deterministically_in_auto_model_and_the_pipeline(image_export):
    """AutoModel builds ViT's pooler whatever the config says: the export saves an identity
    one, so two loads agree, nothing is newly initialized and ``pool=True`` is the CLS token
    (this run's representation: ``objective.pooling=cls``)."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, pipeline

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8), "L")
    runs = []
    with _Logs() as logs:
        for _ in range(2):
            inputs = AutoImageProcessor.from_pretrained(image_export)(image, return_tensors="pt")
            with torch.no_grad():
                out = AutoModel.from_pretrained(image_export).eval()(**inputs)
            extract = pipeline("image-feature-extraction", model=str(image_export))
            runs.append((out.pooler_output, out.last_hidden_state[:, 0],
                         extract(image, pool=True, return_tensors=True)))
    _assert_no_new_weights(logs)
    (pooled, cls, piped), (pooled2, _, piped2) = runs
    assert torch.equal(pooled, pooled2) and torch.equal(piped, piped2)
    torch.testing.assert_close(pooled, cls, rtol=0, atol=0)
    torch.testing.assert_close(piped.reshape(cls.shape), cls, rtol=0, atol=1e-6)
