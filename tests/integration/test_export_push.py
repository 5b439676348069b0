"""Export and push end to end on a real run: a tiny MAE trained under ZeRO-3 on real shards,
stopped and resumed (one wandb run id across the restart), scored against its random init, then
exported by the CLI and loaded in a fresh offline process, its model card checked against the run's own numbers, pushed with the hub
client's calls captured, and refused in seconds when the hub cannot be used (no hub is reachable
here; a local server plays a refusing one). HF_TOKEN=hf_secretsentinel is set through all of it:
it must appear in no file and no output."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ..conftest import DEMO_RECIPE, ROOT, sslscale_cmd, tiny_overrides

pytestmark = pytest.mark.integration
SENTINEL = "hf_secretsentinel"


def _run(args, env, logs, timeout=600):
    proc = subprocess.run(sslscale_cmd(*args), cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout)
    logs.append(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def run(real_shards, tmp_path_factory):
    """The run dir after train (2 steps) -> resume (to 4) -> eval knn --baseline -> export."""
    root = tmp_path_factory.mktemp("export")
    run_dir, out = root / "run", root / "exported"
    env = {**os.environ, "HF_TOKEN": SENTINEL, "WANDB_MODE": "offline"}
    logs: list[str] = []
    train = ["train", str(DEMO_RECIPE), *tiny_overrides(real_shards, run_dir, "checkpoint.every_steps=2",
                                                          "deepspeed.zero_stage=3")]
    _run([*train, "train.max_steps=2"], env, logs)
    resumed = _run([*train, "train.max_steps=4"], env, logs)
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    knn = _run(["eval", "knn", str(run_dir), "--baseline"], env, logs)
    (run_dir / "eval" / "knn_vs_random_init.json").write_text(knn.stdout.strip().splitlines()[-1] + "\n")
    exported = _run(["export", str(run_dir), "--out", str(out), "--repo-id", "sslscale-test/mae-tiny"], env, logs)
    return {"run_dir": run_dir, "out": out, "logs": logs, "root": root,
            "export": json.loads(exported.stdout.strip().splitlines()[-1]),
            "knn": json.loads(knn.stdout.strip().splitlines()[-1])}


def _wandb_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_resumed_run_continues_one_wandb_run_with_its_config(run):
    run_dir = run["run_dir"]
    run_id = (run_dir / "wandb_id").read_text().strip()
    sessions = _wandb_runs(run_dir)[:2]  # train, then the resumed train
    assert len(sessions) == 2 and {p.name.rsplit("-", 1)[1] for p in sessions} == {run_id}
    for folder in sessions:  # each session logged the run's config (wandb's binary log holds it)
        log = (folder / f"run-{run_id}.wandb").read_bytes()
        assert b"global_batch_size" in log and b"mae_vit_tiny_fmnist" in log
    systems = [json.loads(line) for line in (run_dir / "system.jsonl").read_text().splitlines()]
    assert len(systems) == 2 and systems[0]["world_size"] == 1 and systems[0]["device"] == "cpu"


def test_export_loads_offline_in_a_fresh_process_and_matches_the_checkpoint(run):
    out, run_dir = run["out"], run["run_dir"]
    assert run["export"]["class"] == "ViTModel" and run["export"]["step"] == 4
    assert run["export"]["round_trip_max_abs_diff"] <= 1e-5
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                     "preprocessor_config.json"]
    script = (
        "import sys, torch\n"
        "from PIL import Image\n"
        "from transformers import AutoImageProcessor, AutoModel\n"
        "from sslscale.export import fixed_images\n"
        "proc = AutoImageProcessor.from_pretrained(sys.argv[1])\n"
        "model = AutoModel.from_pretrained(sys.argv[1]).eval()\n"
        "pil = [Image.fromarray(i[0].numpy(), 'L') for i in fixed_images(1, 28)]\n"
        "with torch.no_grad():\n"
        "    h = model(**proc(pil, return_tensors='pt')).last_hidden_state\n"
        "torch.save({'class': type(model).__name__, 'hidden': h}, sys.argv[2])\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(out), str(run["root"] / "fresh.pt")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = torch.load(run["root"] / "fresh.pt")
    assert fresh["class"] == "ViTModel"

    # The reference: the objective restored from the ZeRO-3 checkpoint, as in training.
    from sslscale import checkpoint
    from sslscale.config import load_config
    from sslscale.export import fixed_images, training_features
    from sslscale.objectives import build_objective

    cfg = load_config(run_dir / "config.yaml")
    objective = build_objective(cfg)
    objective.load_state_dict(checkpoint.load_module_state(checkpoint.find_latest(run_dir), 3))
    x = (fixed_images(1, 28).float() / 255 - cfg.data.mean[0]) / cfg.data.std[0]
    want = training_features(objective.encoder(), {"pixel_values": x})
    assert fresh["hidden"].shape == want.shape == (4, 17, 32)
    assert (fresh["hidden"] - want).abs().max().item() <= 1e-5


def _card(out):
    text = (out / "README.md").read_text()
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert match, text[:500]
    return yaml.safe_load(match.group(1)), match.group(2)


def _row(body, name):
    line = next(line for line in body.splitlines() if line.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_model_card_holds_the_runs_real_numbers(run):
    import hashlib

    meta, body = _card(run["out"])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-feature-extraction"
    assert {"mae", "sslscale", "arxiv:2111.06377"} <= set(meta["tags"]) and meta["license"] == "apache-2.0"
    run_dir = run["run_dir"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    loss = [r["train/loss"] for r in rows if r["step"] == 4 and "train/loss" in r][-1]
    assert _row(body, "final training loss")[1].startswith(f"{loss:.4f} (`train/loss` at step 4")
    assert _row(body, "steps")[1].startswith("4 optimizer steps")
    assert _row(body, "global batch size")[1].startswith("16 samples per step")
    assert _row(body, "samples seen")[1].startswith("64 (")
    assert _row(body, "world size")[1] == "1 rank(s)"
    assert "ZeRO-3" in _row(body, "precision / ZeRO")[1] and "fp32 (CPU)" in _row(body, "precision / ZeRO")[1]
    shards = Path(yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["train_shards"])
    digest = hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    assert f"`{digest}`" in _row(body, "manifest sha256")[1]
    knn = _row(body, "kNN top-1")
    assert knn[1] == f"{run['knn']['knn_top1']:.4f}"
    assert knn[2].startswith(f"{run['knn']['random_init_knn_top1']:.4f} (same architecture at random init")
    params = sum(t.numel() for t in load_file(run["out"] / "model.safetensors").values())
    assert f"Parameters: {params:,}" in body
    assert 'AutoModel.from_pretrained("sslscale-test/mae-tiny")' in body and body.startswith("\n# sslscale-test/mae-tiny\n")
    assert "name: mae_vit_tiny_fmnist" in body and "not measured" not in body
    bank, queries = run["knn"]["num_train"], run["knn"]["num_test"]
    assert f"a bank of {bank:,} labeled training images, {queries:,} test queries" in knn[3]
    # Metadata as HF Trainer writes it: the training data and the measured kNN top-1.
    source = {"fashion-mnist": "zalando-datasets/fashion_mnist", "mnist5k": "ylecun/mnist"}
    assert meta["datasets"] == [source[yaml.safe_load((shards / "manifest.json").read_text())["source"]]]
    [index] = meta["model-index"]
    assert index["name"] == "sslscale-test/mae-tiny"
    [result] = index["results"]
    assert result["task"]["type"] == "image-classification" and result["dataset"]["split"] == "test"
    assert result["dataset"]["type"] == meta["datasets"][0]
    assert result["metrics"] == [{"type": "accuracy", "value": round(run["knn"]["knn_top1"], 6),
                                  "name": "kNN top-1"}]


def test_push_uploads_the_checked_folder_and_links_the_card_in_wandb(run, monkeypatch, capfd, tmp_path):
    import huggingface_hub
    from huggingface_hub import CommitInfo, HfApi

    from launcher.cli import main

    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        calls.append(("upload_folder", kw["repo_id"], kw))
        shutil.copytree(kw["folder_path"], tmp_path / "uploaded")  # the temp folder goes away
        return CommitInfo(commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/{'0' * 40}",
                          commit_message=kw["commit_message"], commit_description="", oid="0" * 40)

    def whoami(self, token=None, **kw):
        calls.append(("whoami", None, kw))
        return {"name": "tester", "auth": {"accessToken": {"role": "write"}}}

    for name, fn in [("create_repo", create_repo), ("create_branch", create_branch),
                     ("upload_folder", upload_folder), ("whoami", whoami)]:
        monkeypatch.setattr(HfApi, name, fn)
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the hub is faked here
    run_dir = run["run_dir"]
    assert main(["push", str(run_dir), "--repo-id", "sslscale-test/mae-tiny", "--private",
                 "--revision", "exp-1"]) == 0
    captured = capfd.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert [c[0] for c in calls] == ["whoami", "create_repo", "create_branch", "upload_folder"]
    assert calls[1][2]["exist_ok"] is True and calls[1][2]["private"] is True
    assert calls[2][2]["branch"] == "exp-1" and calls[3][2]["revision"] == "exp-1"
    assert "at step 4" in calls[3][2]["commit_message"]
    assert result["model_card"] == "https://huggingface.co/sslscale-test/mae-tiny/blob/exp-1/README.md"
    assert result["wandb"] is True
    assert huggingface_hub.get_token() == SENTINEL  # what the real client would have sent

    uploaded = tmp_path / "uploaded"
    from transformers import AutoImageProcessor, AutoModel
    assert type(AutoModel.from_pretrained(uploaded)).__name__ == "ViTModel"
    assert list(AutoImageProcessor.from_pretrained(uploaded).image_mean) == [0.286] * 3
    assert _card(uploaded)[0]["tags"] == _card(run["out"])[0]["tags"]

    # The push continued the run's wandb run and recorded the card's link there.
    run_id = (run_dir / "wandb_id").read_text().strip()
    latest = _wandb_runs(run_dir)[-1]
    assert latest.name.endswith(run_id) and len(_wandb_runs(run_dir)) == 3
    assert result["model_card"].encode() in (latest / f"run-{run_id}.wandb").read_bytes()

    # The token appears in no file under the run dir or the exports, and in no output.
    for folder in (run_dir, run["out"], uploaded):
        for path in folder.rglob("*"):
            if path.is_file():
                assert SENTINEL.encode() not in path.read_bytes(), path
    for text in [*run["logs"], captured.out, captured.err]:
        assert SENTINEL not in text


def test_export_and_push_errors_name_the_problem(run, monkeypatch, capsys, tmp_path):
    import huggingface_hub.constants

    from launcher.cli import main

    assert main(["export", str(run["run_dir"]), "--step", "3", "--out", str(tmp_path / "x")]) == 2
    assert "no complete checkpoint for step 3" in capsys.readouterr().err
    assert main(["export", str(run["run_dir"]), "--out", str(run["out"])]) == 2
    assert "exists and is not empty (pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert "no config.yaml" in capsys.readouterr().err and not (tmp_path / "y").exists()
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["push", str(run["run_dir"]), "--repo-id", "org/name"]) == 2
    assert "no Hugging Face token: set HF_TOKEN or run `hf auth login`" in capsys.readouterr().err


class _FakeHub(threading.Thread):
    """A local HTTP server answering ``/api/whoami-v2`` with ``status`` and ``body``."""

    def __init__(self, status, body):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass
        super().__init__(daemon=True)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def run(self):
        self.server.serve_forever()


@pytest.mark.parametrize("hub", ["offline", "unreachable", "401", "read-only"])
def test_push_fails_fast_with_one_line_when_the_hub_cannot_be_used(run, hub):
    """Checked before the export (which takes the run's restore + round trip): one `error:`
    line, exit 2, no traceback, never the token."""
    env = {**os.environ, "HF_TOKEN": SENTINEL, "HF_HUB_OFFLINE": "0", "WANDB_MODE": "disabled"}
    server = None
    if hub == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    elif hub == "unreachable":
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: connection refused
    else:
        server = _FakeHub(401, {"error": "Invalid credentials in Authorization header"}) if hub == "401" else \
            _FakeHub(200, {"name": "tester", "auth": {"accessToken": {"role": "read"}}})
        server.start()
        env["HF_ENDPOINT"] = server.url
    start = time.monotonic()
    try:
        proc = subprocess.run(sslscale_cmd("push", str(run["run_dir"]), "--repo-id", "org/name"), cwd=ROOT,
                              capture_output=True, text=True, env=env, timeout=120)
    finally:
        if server is not None:
            server.server.shutdown()
    elapsed = time.monotonic() - start
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and SENTINEL not in proc.stdout + proc.stderr
    assert not proc.stdout.strip()  # no JSON result: nothing was exported or pushed
    want = {"offline": "HF_HUB_OFFLINE=1 is set", "unreachable": "whoami at http://127.0.0.1:9 failed",
            "401": "HTTP 401", "read-only": "read-only"}[hub]
    assert want in errors[0], errors[0]
    assert elapsed < 30, f"took {elapsed:.1f} s (the export alone takes longer)"


def test_push_checks_the_hub_before_exporting(run, monkeypatch, capsys):
    import huggingface_hub.constants

    import sslscale.hub
    from launcher.cli import main

    exported = []
    monkeypatch.setattr(sslscale.hub, "export_run", lambda *a, **kw: exported.append(a))
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["push", str(run["run_dir"]), "--repo-id", "org/name"]) == 2
    assert "HF_HUB_OFFLINE=1 is set" in capsys.readouterr().err and exported == []


def test_plot_of_the_run(run, tmp_path):
    from launcher.cli import main

    assert main(["plot", str(run["run_dir"]), "--out", str(tmp_path / "loss.png")]) == 0
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


_FRESH_LOAD = (
    "import json, sys, torch\n"
    "from transformers import AutoConfig, AutoModel\n"
    "folder = sys.argv[1]\n"
    "model, info = AutoModel.from_pretrained(folder, output_loading_info=True)\n"
    "model.eval()\n"
    "if model.main_input_name == 'pixel_values':\n"
    "    from PIL import Image\n"
    "    from transformers import AutoImageProcessor\n"
    "    inputs = AutoImageProcessor.from_pretrained(folder)(Image.new('L', (40, 40), 128), return_tensors='pt')\n"
    "else:\n"
    "    from transformers import AutoTokenizer\n"
    "    inputs = AutoTokenizer.from_pretrained(folder)(['Shards are read as streams.'], return_tensors='pt')\n"
    "with torch.no_grad():\n"
    "    hidden = model(**inputs).last_hidden_state\n"
    "print(json.dumps({'class': type(model).__name__, 'shape': list(hidden.shape),\n"
    "                  'finite': bool(torch.isfinite(hidden).all()),\n"
    "                  'missing': sorted(info['missing_keys'])}))\n")


@pytest.mark.parametrize("objective", ["simclr", "mlm"])
def test_demo_recipe_run_exports_and_loads_offline(objective, real_shards, text_shards, tmp_path):
    from ..conftest import MLM_RECIPE, tiny_text_overrides

    run_dir, out = tmp_path / "run", tmp_path / "exported"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    logs: list[str] = []
    if objective == "mlm":
        train = ["train", str(MLM_RECIPE), *tiny_text_overrides(text_shards, run_dir, "train.max_steps=2",
                                                                "deepspeed.zero_stage=2")]
    else:
        recipe = ROOT / "configs" / "demo" / "simclr_vit_tiny_fmnist.yaml"
        train = ["train", str(recipe), *tiny_overrides(real_shards, run_dir, "train.max_steps=2",
                                                       "objective.projection_hidden_dim=64",
                                                       "objective.projection_dim=32")]
    _run(train, env, logs)
    result = json.loads(_run(["export", str(run_dir), "--out", str(out)], env, logs).stdout.splitlines()[-1])
    assert result["round_trip_max_abs_diff"] <= 1e-5 and result["step"] == 2
    fresh = subprocess.run([sys.executable, "-c", _FRESH_LOAD, str(out)], cwd=ROOT, capture_output=True,
                           text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    loaded = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert loaded["class"] == ("BertModel" if objective == "mlm" else "ViTModel") and loaded["finite"]
    assert result["class"] == ("BertForMaskedLM" if objective == "mlm" else "ViTModel")
    assert loaded["missing"] == []  # no weight initialized at random (the pooler is saved)
    assert loaded["shape"][0] == 1 and loaded["shape"][-1] == 32
    if objective == "simclr":
        assert loaded["shape"][1] == 17  # CLS + 16 patches, the 40x40 input resized to 28x28

    meta, body = _card(out)
    assert objective in meta["tags"]
    assert meta["pipeline_tag"] == ("fill-mask" if objective == "mlm" else "image-feature-extraction")
    name = yaml.safe_load((run_dir / "config.yaml").read_text())["name"]
    title = body.strip().splitlines()[0]
    assert title == f"# {name} ({objective} encoder)" and str(out) not in title  # no --repo-id
    assert meta["datasets"] == ["pydoc-topics" if objective == "mlm" else "zalando-datasets/fashion_mnist"
                                if real_shards["source"] == "fashion-mnist" else "ylecun/mnist"]
    [index] = meta["model-index"]
    [result_meta] = index["results"]
    assert index["name"] == name and result_meta["dataset"]["type"] in meta["datasets"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    loss = [r["train/loss"] for r in rows if r["step"] == 2 and "train/loss" in r][-1]
    assert _row(body, "final training loss")[1].startswith(f"{loss:.4f}")
    if objective == "mlm":
        acc = [r["eval/mlm_accuracy"] for r in rows if "eval/mlm_accuracy" in r][-1]
        base = [r["eval/mlm_baseline_accuracy"] for r in rows if "eval/mlm_baseline_accuracy" in r][-1]
        row = _row(body, "masked-token accuracy (held-out)")
        assert row[1] == f"{acc:.4f}" and row[2].startswith(f"{base:.4f} (always the most frequent")
        assert _row(body, "tokens seen")[1] == f"{32 * 64:,}"  # 32 blocks of 64 tokens
        assert (out / "tokenizer.json").is_file() and "with its trained MLM head" in body
        assert result_meta["task"]["type"] == "fill-mask"
        assert [(m["type"], m["value"]) for m in result_meta["metrics"]] == [
            ("accuracy", round(acc, 6)),
            ("perplexity", round([r["eval/mlm_perplexity"] for r in rows if "eval/mlm_perplexity" in r][-1], 6))]
    else:
        knn = [r["eval/knn_top1"] for r in rows if "eval/knn_top1" in r][-1]
        assert _row(body, "kNN top-1")[1] == f"{knn:.4f}" and "without the projection head" in body
        assert [(m["type"], m["value"]) for m in result_meta["metrics"]] == [("accuracy", round(knn, 6))]
        assert _row(body, "kNN top-1")[2].startswith("not measured (run `sslscale eval knn RUN_DIR --baseline`)")
        assert "features = hidden[:, 1:].mean(dim=1)" in body  # the recipe's pooling: mean
