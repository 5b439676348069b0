"""CLM end to end through the command line on real text: a tiny GPT-2 trains a few steps,
evaluates on the held-out documents (in training and with ``sslscale eval lm``), and exports a
folder that ``pipeline("text-generation")`` generates from."""

import json

import pytest

from ..conftest import CLM_RECIPE, sslscale_cmd, tiny_text_overrides
from ..conftest import run_ok as run

pytestmark = pytest.mark.integration


def test_clm_trains_evaluates_exports_and_generates(text_shards, tmp_path):
    run_dir, out = tmp_path / "clm", tmp_path / "export"
    proc = run(sslscale_cmd("train", str(CLM_RECIPE), *tiny_text_overrides(
        text_shards, run_dir, "train.max_steps=6", "checkpoint.every_steps=0")))
    final = json.loads(proc.stdout.strip().splitlines()[-1])  # the evaluation's JSON line
    assert final["step"] == 6 and final["clm_perplexity"] > 1.0
    assert final["unigram_perplexity"] > 1.0 and 0.0 < final["unigram_accuracy"] < 1.0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert train[-1]["tokens_seen"] == 6 * 16 * 64 and 0.0 <= train[-1]["train/next_token_accuracy"] <= 1.0
    assert train[-1]["perf/model_tflops_per_device"] > 0
    logged = [r for r in rows if "eval/clm_perplexity" in r][-1]
    assert {"eval/clm_accuracy", "eval/unigram_perplexity", "eval/unigram_accuracy"} <= logged.keys()
    assert (run_dir / "eval" / "lm-step-00000006.json").is_file()

    evaluated = json.loads(run(sslscale_cmd("eval", "lm", str(run_dir))).stdout)
    assert evaluated["clm_perplexity"] == pytest.approx(final["clm_perplexity"], rel=1e-5)
    assert evaluated["unigram_perplexity"] == pytest.approx(final["unigram_perplexity"])
    wrong = run(sslscale_cmd("eval", "mlm", str(run_dir)), code=2)
    assert "not an MLM run (objective clm); use `sslscale eval lm" in wrong.stderr

    run(sslscale_cmd("export", str(run_dir), "--out", str(out)))
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "GPT2LMHeadModel" in card
    from transformers import AutoModel, AutoTokenizer, pipeline

    assert type(AutoModel.from_pretrained(out)).__name__ == "GPT2Model"
    assert "token_type_ids" not in AutoTokenizer.from_pretrained(out)("a prompt")
    generate = pipeline("text-generation", model=str(out))
    text = generate("The module", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("The module") and len(text) > len("The module")  # the prompt, then new text
    prompted = generate("The module", prefix="[CLS] ", add_special_tokens=False, max_new_tokens=5,
                        do_sample=False)[0]["generated_text"]
    assert prompted.startswith("The module") and len(prompted) > len("The module")
