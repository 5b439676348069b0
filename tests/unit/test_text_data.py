"""`sslscale data prepare text|pydoc-topics` on real text: document-level split, WordPiece
tokenizer trained on the train split, [CLS] ... [SEP] token blocks, manifest fields, decoding
round trip through the saved tokenizer, and clear errors for bad inputs and corrupt samples."""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from launcher.cli import main as cli
from sslscale.data import corpus
from sslscale.data.shards import ShardWriter, load_manifest, read_tar_samples
from sslscale.data.corpus import open_text_source
from sslscale.data.tar import sample_offsets
from sslscale.data.text import decode_token_block, load_tokenizer, prepare_text, split_documents

SEQ_LEN, VOCAB = 64, 1000


@pytest.fixture(scope="module")
def pydoc(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("pydoc")
    summary = prepare_text("pydoc-topics", out, vocab_size=VOCAB, seq_len=SEQ_LEN, val_fraction=0.1, seed=3)
    return {"out": out, "summary": summary}


def read_blocks(folder: Path, seq_len: int) -> dict[str, np.ndarray]:
    """Every block of a split by key (= position before shuffling), decoded like readers do."""
    manifest = load_manifest(folder)
    blocks = {}
    for i in range(len(manifest.shards)):
        with open(manifest.url(i), "rb") as f:
            for sample in read_tar_samples(f, manifest.url(i)):
                blocks[sample["__key__"]] = decode_token_block(sample, seq_len).numpy()
    return blocks


def documents_from_blocks(blocks: dict[str, np.ndarray], sep_id: int) -> list[np.ndarray]:
    """Undo the packing: strip each block's [CLS]/[SEP], concatenate in key order, split at [SEP]."""
    stream = np.concatenate([blocks[k][1:-1] for k in sorted(blocks)])
    parts = np.split(stream, np.flatnonzero(stream == sep_id))
    return [p[1:] if i else p for i, p in enumerate(parts)]


def assert_round_trip(folder: Path, texts: dict[str, str], max_unk_docs: int = 0) -> int:
    """Decoded documents equal the normalized sources (whitespace aside); returns docs checked."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    keys = (folder / "documents.txt").read_text().splitlines()
    docs = documents_from_blocks(read_blocks(folder, load_manifest(folder).meta["seq_len"]), tok.sep_token_id)
    assert len(docs) == len(keys)
    normalize = tok.backend_tokenizer.normalizer.normalize_str
    unk_docs = 0
    for key, ids in zip(keys[:-1], docs[:-1]):  # the last document lost its tail to the block cut
        if tok.unk_token_id in ids:  # a "word" over 100 characters (hex digests) is [UNK]
            unk_docs += 1
            continue
        assert "".join(tok.decode(ids).split()) == "".join(normalize(texts[key]).split()), key
    last = "".join(tok.decode(docs[-1]).split())
    assert "".join(normalize(texts[keys[-1]]).split()).startswith(last)
    assert unk_docs <= max_unk_docs
    return len(keys) - 1 - unk_docs


def test_split_is_document_level_disjoint_and_seeded(pydoc):
    corpus = open_text_source("pydoc-topics")
    train = (pydoc["out"] / "train" / "documents.txt").read_text().splitlines()
    val = (pydoc["out"] / "val" / "documents.txt").read_text().splitlines()
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(d.key for d in corpus.documents)
    assert len(val) == round(0.1 * len(corpus.documents))
    texts = {d.key: d.text for d in corpus.documents}
    assert not {texts[k] for k in train} & {texts[k] for k in val}
    again = split_documents(corpus.documents, 0.1, seed=3)[1]
    assert [d.key for d in again] == [k for k in sorted(val, key=list(texts).index)]
    assert [d.key for d in split_documents(corpus.documents, 0.1, seed=4)[1]] != [d.key for d in again]


def test_blocks_start_with_cls_end_with_sep_without_padding(pydoc):
    tok = load_tokenizer(load_manifest(pydoc["out"] / "train"))
    for split in ("train", "val"):
        manifest = load_manifest(pydoc["out"] / split)
        blocks = read_blocks(pydoc["out"] / split, SEQ_LEN)
        assert len(blocks) == manifest.num_samples == pydoc["summary"][split]["samples"]
        array = np.stack(list(blocks.values()))
        assert array.shape == (manifest.num_samples, SEQ_LEN)
        assert (array[:, 0] == tok.cls_token_id).all() and (array[:, -1] == tok.sep_token_id).all()
        assert not (array == tok.pad_token_id).any() and not (array[:, 1:-1] == tok.cls_token_id).any()
        assert array.max() < len(tok) == VOCAB
        with open(manifest.url(0), "rb") as f:
            raw = next(read_tar_samples(f, manifest.url(0)))["input_ids.npy"]
        assert np.load(io.BytesIO(raw)).dtype == np.uint16
    keys = list(read_blocks(pydoc["out"] / "train", SEQ_LEN))
    assert keys != sorted(keys)  # block order shuffled across shards


def test_round_trip_through_saved_tokenizer(pydoc):
    texts = {d.key: d.text for d in open_text_source("pydoc-topics").documents}
    assert assert_round_trip(pydoc["out"] / "train", texts) >= 60
    assert assert_round_trip(pydoc["out"] / "val", texts, max_unk_docs=2) >= 3


def test_manifest_fields(pydoc):
    train, val = load_manifest(pydoc["out"] / "train"), load_manifest(pydoc["out"] / "val")
    for m, split in ((train, "train"), (val, "val")):
        assert (m.modality, m.source, m.license) == ("text", "pydoc-topics", "PSF-2.0")
        meta = m.meta
        assert (meta["split"], meta["seq_len"], meta["vocab_size"], meta["dtype"]) == (split, SEQ_LEN, VOCAB, "uint16")
        assert meta["num_tokens"] == m.num_samples * SEQ_LEN == pydoc["summary"][split]["tokens"]
        assert meta["corpus_tokens"] - meta["dropped_tokens"] == m.num_samples * (SEQ_LEN - 2)
        assert 0 <= meta["dropped_tokens"] < SEQ_LEN - 2
        assert meta["tokenizer"] == "tokenizer" and (Path(m.root) / "tokenizer" / "tokenizer.json").is_file()
        assert all(len(sample_offsets(m.url(i))) == s.num_samples and s.sha256 and s.size
                   and Path(m.index_url(i)).stat().st_size == 24 + 8 * s.num_samples
                   for i, s in enumerate(m.shards))
    assert train.meta["tokenizer_sha256"] == val.meta["tokenizer_sha256"]
    assert len(train.shards) >= 32 and len(val.shards) == 1
    s = pydoc["summary"]
    assert s["num_samples"] == train.num_samples + val.num_samples and s["vocab_size"] == VOCAB


def test_image_manifest_without_modality_still_loads(tmp_path):
    with ShardWriter(tmp_path, 4) as writer:
        writer.write({"__key__": "a", "cls": 1})
        writer.close("mnist5k", "CC-BY-SA-3.0")
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw.pop("modality") == "image"
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    manifest = load_manifest(tmp_path)
    assert manifest.modality == "image" and manifest.num_samples == 1
    with pytest.raises(ValueError, match="not a text manifest"):
        load_tokenizer(manifest)


def test_files_gz_md_and_reused_tokenizer(pydoc, tmp_path):
    topics = {d.key: d.text for d in open_text_source("pydoc-topics").documents}
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.md").write_text(topics["for"])
    (corpus / "sub" / "b.rst.gz").write_bytes(gzip.compress(topics["while"].encode()))
    (corpus / "sub" / "c.rst.txt").write_text(topics["with"])
    (corpus / "notes.py").write_text("ignored = True\n")
    single = tmp_path / "d.txt"
    single.write_text(topics["try"])
    summary = prepare_text("text", tmp_path / "out", inputs=[str(corpus), str(single)],
                           tokenizer=str(pydoc["out"] / "train" / "tokenizer"), seq_len=32,
                           val_fraction=0.25, seed=0)
    keys = sorted((tmp_path / "out" / s / "documents.txt").read_text().splitlines() for s in ("train", "val"))
    assert sorted(sum(keys, [])) == ["0:a.md", "0:sub/b.rst.gz", "0:sub/c.rst.txt", "1:d.txt"]
    assert summary["vocab_size"] == VOCAB and summary["val"]["documents"] == 1
    assert summary["source"] == "text"
    texts = {"0:a.md": topics["for"], "0:sub/b.rst.gz": topics["while"], "0:sub/c.rst.txt": topics["with"],
             "1:d.txt": topics["try"]}
    assert assert_round_trip(tmp_path / "out" / "train", texts) == 2


def test_errors_name_the_input(tmp_path, capsys, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        prepare_text("text", tmp_path / "o", inputs=[str(tmp_path / "no-such-dir")])
    (tmp_path / "empty").mkdir()
    assert cli(["data", "prepare", "text", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "empty: holds no .txt/.rst/.md" in capsys.readouterr().err
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="bad.txt: not UTF-8"):
        prepare_text("text", tmp_path / "o", inputs=[str(tmp_path / "bad.txt")])
    assert cli(["data", "prepare", "pydoc-topics", "--out", str(tmp_path / "o"), "--seq-len", "100000"]) == 2
    assert "val split of pydoc-topics" in capsys.readouterr().err
    monkeypatch.setattr(corpus, "PYTHON_DOCS_DIR", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="apt-get install python3.11-doc"):
        prepare_text("text", tmp_path / "o")


def test_named_files_without_an_extension_are_read(tmp_path, capsys):
    """`--input LICENSE copyright`: a file named on the command line is text whatever its name
    (extensions only filter what a folder walk picks up); a named binary file fails cleanly."""
    topics = {d.key: d.text for d in open_text_source("pydoc-topics").documents}
    (tmp_path / "LICENSE").write_text(topics["for"])
    (tmp_path / "copyright").write_text(topics["while"])
    out = tmp_path / "out"
    assert cli(["data", "prepare", "text", "--input", str(tmp_path / "LICENSE"),
                str(tmp_path / "copyright"), "--out", str(out), "--vocab-size", "300",
                "--seq-len", "32", "--val-fraction", "0.5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"]["documents"] == summary["val"]["documents"] == 1
    keys = sorted((out / s / "documents.txt").read_text().strip() for s in ("train", "val"))
    assert keys == ["0:LICENSE", "1:copyright"]
    (tmp_path / "blob").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    assert cli(["data", "prepare", "text", "--input", str(tmp_path / "blob"),
                "--out", str(tmp_path / "o")]) == 2
    assert "blob: not UTF-8" in capsys.readouterr().err


def test_corrupt_sample_and_missing_tokenizer_name_key_and_shard(pydoc, tmp_path):
    shutil.copytree(pydoc["out"] / "val", tmp_path / "val")
    manifest = load_manifest(tmp_path / "val")
    shard = Path(manifest.url(0))
    start = sample_offsets(shard)[1]
    magic = shard.read_bytes().index(b"\x93NUMPY", start)  # the second sample's .npy header
    with open(shard, "r+b") as f:
        f.seek(magic)
        f.write(b"garbage!")
    with open(shard, "rb") as f:
        samples = list(read_tar_samples(f, str(shard)))
    decode_token_block(samples[0], SEQ_LEN)
    with pytest.raises(ValueError, match=rf"sample '{samples[1]['__key__']}' of shard {shard}: corrupt"):
        decode_token_block(samples[1])
    with pytest.raises(ValueError, match="no 'input_ids.npy' member"):
        decode_token_block({"__key__": "k", "__url__": "u", "txt": b"x"})
    with pytest.raises(ValueError, match="expected seq_len 128"):
        decode_token_block(samples[0], 128)
    shutil.rmtree(tmp_path / "val" / "tokenizer")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "val" / "tokenizer")):
        load_tokenizer(manifest)


def test_cli_prints_one_json_line_and_image_sources_still_work(tmp_path, capsys):
    from tests.conftest import real_source

    assert cli(["data", "prepare", "pydoc-topics", "--out", str(tmp_path / "t"), "--limit", "30",
                "--vocab-size", "600", "--seq-len", "32", "--samples-per-shard", "50"]) == 0
    line = capsys.readouterr().out.strip()
    summary = json.loads(line)
    assert "\n" not in line and summary["vocab_size"] <= 600 and summary["seq_len"] == 32
    assert summary["train"]["documents"] + summary["val"]["documents"] == 30
    assert load_manifest(tmp_path / "t" / "train").shards[0].num_samples == 50
    src = real_source()
    assert cli(["data", "prepare", src, "--split", "test", "--limit", "6", "--out", str(tmp_path / "i")]) == 0
    image = json.loads(capsys.readouterr().out)
    assert image["num_samples"] == 6 and load_manifest(tmp_path / "i").modality == "image"


@pytest.mark.skipif(not corpus.PYTHON_DOCS_DIR.is_dir(), reason="Debian python3.11-doc not installed")
def test_python_docs_default_corpus(tmp_path):
    summary = prepare_text("text", tmp_path, vocab_size=2000, limit=60, seq_len=128, seed=1)
    manifest = load_manifest(tmp_path / "train")
    assert (manifest.source, manifest.license) == ("python3.11-doc", "PSF-2.0")
    assert summary["train"]["documents"] == 57 and summary["val"]["documents"] == 3
    assert summary["vocab_size"] == 2000
    texts = {d.key: d.text for d in corpus.text_corpus().documents[:60]}
    assert assert_round_trip(tmp_path / "train", texts, max_unk_docs=2) >= 50
