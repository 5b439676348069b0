"""Text corpora -> WordPiece tokenizer -> shards of fixed-length token blocks, and their readers.

Owns ``sslscale data prepare text|pydoc-topics``: a document-level train/validation split, a
BERT WordPiece tokenizer trained on the train split only (Devlin et al. 2019, "BERT"; trained
with the Hugging Face ``tokenizers`` library and saved as a transformers ``BertTokenizer`` that
``AutoTokenizer.from_pretrained`` loads offline), and token blocks packed as in RoBERTa's
FULL-SENTENCES (Liu et al. 2019): documents are concatenated with ``[SEP]`` between them and cut
into blocks ``[CLS] + (seq_len - 2) tokens + [SEP]``, with no padding (the tail is dropped) and
the block order shuffled once, as BERT's ``create_pretraining_data.py`` shuffles its instances.

Layout written to ``OUT``::

    OUT/train/  shard-000000.tar ... manifest.json documents.txt tokenizer/
    OUT/val/    shard-000000.tar ... manifest.json documents.txt tokenizer/

Each sample is ``{"__key__": "<block index before shuffling, %08d>", "input_ids.npy": <.npy
bytes of a 1-D uint16 array (int32 when the vocabulary exceeds 65,535)>}``. The manifest has
``modality: "text"`` and ``meta`` = {split, seq_len, vocab_size, num_tokens, dtype, tokenizer
(folder relative to the manifest), tokenizer_sha256, num_documents, corpus_tokens,
dropped_tokens, special_tokens}. Readers use ``decode_token_block`` and ``load_tokenizer``.

Labeled text (``--labels section``, for fine-tuning and linear probing): the same document split
(so the held-out documents are the MLM run's), but each sample is one paragraph (blank-line
separated, >= ``MIN_PARAGRAPH_WORDS`` words) as ``[CLS] tokens [SEP]`` truncated to ``seq_len``
and padded with ``[PAD]``, with member ``cls`` = the index of its document's top-level folder
(``library/os.rst.txt`` -> ``library``) in ``meta.classes``: the folders holding at least
``MIN_SECTION_DOCUMENTS`` documents of the corpus, sorted; documents at the root or in smaller
folders are left out. ``meta`` adds labels, classes, class_counts, num_paragraphs,
truncated_paragraphs. Readers use ``LabeledTextDecoder``.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sslscale.data.shards import Manifest, ShardWriter
from sslscale.data.corpus import Document, TextCorpus, open_text_source

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_DIR = "tokenizer"
TOKENS_MEMBER = "input_ids.npy"
MAX_BLOCKS_PER_SHARD = 10_000
MIN_TRAIN_SHARDS = 32  # auto shard size: enough train shards for up to 32 data streams
LABEL_MEMBER = "cls"
LABEL_KINDS = ("section",)
MIN_SECTION_DOCUMENTS = 5  # --labels section: smaller top-level folders are left out
MIN_PARAGRAPH_WORDS = 8  # shorter paragraphs (headings, underlines, one-line directives) are left out


def split_documents(documents: Sequence[Document], val_fraction: float,
                    seed: int) -> tuple[list[Document], list[Document]]:
    """Hold out ``round(val_fraction * n)`` whole documents (at least 1 when ``val_fraction > 0``)
    chosen by a permutation seeded with ``seed``; both lists keep the corpus order.

    Raises ``ValueError`` when ``val_fraction`` is outside [0, 1) or leaves no train document.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n = len(documents)
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    if n - n_val < 1:
        raise ValueError(f"{n} document(s) cannot be split with --val-fraction {val_fraction}: "
                         "no training document would remain")
    order = list(range(n))
    random.Random(f"sslscale-text-split:{seed}").shuffle(order)
    val = set(order[:n_val])
    return ([d for i, d in enumerate(documents) if i not in val],
            [d for i, d in enumerate(documents) if i in val])


def train_wordpiece(texts: Sequence[str], vocab_size: int):
    """A BERT WordPiece tokenizer trained on ``texts``: lowercasing ``BertNormalizer``,
    ``BertPreTokenizer``, ``##`` continuation prefix, special tokens ``[PAD] [UNK] [CLS] [SEP]
    [MASK]`` at ids 0-4, ``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]`` templates.

    Returns a transformers ``BertTokenizer`` (tokenizers backend) of at most ``vocab_size``
    tokens (fewer when the corpus has fewer distinct pieces). ``ValueError`` when
    ``vocab_size`` cannot hold the special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"--vocab-size {vocab_size} leaves no room beside the "
                         f"{len(SPECIAL_TOKENS)} special tokens")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        continuing_subword_prefix="##", show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return BertTokenizerFast(tokenizer_object=tok, do_lower_case=True, unk_token="[UNK]",
                             pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                             mask_token="[MASK]")


def open_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer.from_pretrained(path)`` for ``--tokenizer``; ``FileNotFoundError`` names a
    missing folder, ``ValueError`` a tokenizer without a [CLS]/[SEP] (or BOS/EOS) pair or
    without a mask token (masked language modeling needs one)."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"--tokenizer {path}: no such tokenizer folder")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if None in _block_ids(tokenizer):
        raise ValueError(f"--tokenizer {path}: has neither [CLS]/[SEP] nor BOS/EOS tokens to "
                         "start and end blocks")
    if tokenizer.mask_token_id is None:
        raise ValueError(f"--tokenizer {path}: has no mask token ([MASK] / <mask>), which masked "
                         "language modeling needs")
    return tokenizer


def _block_ids(tokenizer) -> tuple[int | None, int | None]:
    """(start, end) token ids of a block: [CLS]/[SEP], else BOS/EOS."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    return start, end


def encode_documents(tokenizer, texts: Sequence[str], batch: int = 64) -> list[np.ndarray]:
    """Token ids (int64, no special tokens) of each text, in order."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    out: list[np.ndarray] = []
    for i in range(0, len(texts), batch):
        chunk = list(texts[i:i + batch])
        if backend is not None:
            ids = [e.ids for e in backend.encode_batch(chunk, add_special_tokens=False)]
        else:
            ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        out += [np.asarray(x, dtype=np.int64) for x in ids]
    return out


def token_blocks(documents: Sequence[np.ndarray], seq_len: int, cls_id: int, sep_id: int,
                 dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Pack documents into blocks: ``(num_blocks, seq_len)`` array of ``dtype`` and the number of
    tail tokens dropped. The stream is ``doc_0 [SEP] doc_1 [SEP] ... doc_n``; every block is
    ``[CLS]`` + the next ``seq_len - 2`` stream tokens + ``[SEP]``. ``ValueError`` for
    ``seq_len < 3``."""
    if seq_len < 3:
        raise ValueError(f"--seq-len must be >= 3 ([CLS] + tokens + [SEP]), got {seq_len}")
    sep = np.asarray([sep_id], dtype=np.int64)
    parts = [p for i, doc in enumerate(documents) for p in ((sep, doc) if i else (doc,))]
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    body = seq_len - 2
    n = len(stream) // body
    blocks = np.empty((n, seq_len), dtype=dtype)
    blocks[:, 0], blocks[:, -1] = cls_id, sep_id
    blocks[:, 1:-1] = stream[:n * body].reshape(n, body)
    return blocks, len(stream) - n * body


def block_dtype(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies up to 65,535 tokens, int32 beyond."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.int32)


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _sha256_file(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def document_section(key: str) -> str | None:
    """A document's label under ``--labels section``: the top-level folder of its key
    (``library/os.rst.txt`` -> ``library``; the ``<i>:`` prefix of several inputs dropped), None
    for a file at the root of its input."""
    path = re.sub(r"^\d+:", "", key)
    head, sep, _ = path.partition("/")
    return head if sep else None


def section_classes(documents: Sequence[Document]) -> list[str]:
    """The sorted sections holding at least ``MIN_SECTION_DOCUMENTS`` of ``documents``.
    ``ValueError`` when fewer than two remain (nothing to classify)."""
    counts = Counter(document_section(d.key) for d in documents)
    classes = sorted(c for c, n in counts.items() if c is not None and n >= MIN_SECTION_DOCUMENTS)
    if len(classes) < 2:
        raise ValueError(f"--labels section: {len(classes)} top-level folder(s) with >= "
                         f"{MIN_SECTION_DOCUMENTS} documents ({dict(counts)}); the labels need two")
    return classes


def paragraphs(text: str) -> list[str]:
    """The blank-line separated paragraphs of ``text`` with >= ``MIN_PARAGRAPH_WORDS`` words."""
    return [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.split()) >= MIN_PARAGRAPH_WORDS]


def _lm_blocks(tokenizer, docs: list[Document], seq_len: int, dtype: np.dtype, where: str):
    """MLM data: ``(blocks, None, meta)`` of the packed documents (``token_blocks``)."""
    cls_id, sep_id = _block_ids(tokenizer)
    ids = encode_documents(tokenizer, [d.text for d in docs])
    blocks, dropped = token_blocks(ids, seq_len, cls_id, sep_id, dtype)
    corpus_tokens = sum(len(x) for x in ids) + max(len(ids) - 1, 0)
    if len(blocks) == 0:
        raise ValueError(f"{where}: {corpus_tokens} tokens in {len(docs)} document(s), fewer than one "
                         f"block of --seq-len {seq_len}; use a larger corpus, a smaller --seq-len or "
                         "another --val-fraction")
    return blocks, None, {"num_tokens": int(blocks.size), "corpus_tokens": corpus_tokens,
                          "dropped_tokens": dropped}


def _paragraph_blocks(tokenizer, docs: list[Document], classes: list[str], seq_len: int,
                      dtype: np.dtype, where: str):
    """Labeled data: ``(blocks, labels, meta)``, one padded block per paragraph of the documents
    whose section is in ``classes`` (the others left out)."""
    cls_id, sep_id = _block_ids(tokenizer)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{where}: the tokenizer has no [PAD] token to pad paragraphs with")
    index = {c: i for i, c in enumerate(classes)}
    kept = [doc for doc in docs if document_section(doc.key) in index]
    pairs = [(p, index[document_section(doc.key)]) for doc in kept for p in paragraphs(doc.text)]
    texts, labels = [p for p, _ in pairs], [label for _, label in pairs]
    if not texts:
        raise ValueError(f"{where}: no paragraph of >= {MIN_PARAGRAPH_WORDS} words in a labeled "
                         f"section ({', '.join(classes)}); use another --val-fraction or --seed")
    blocks = np.full((len(texts), seq_len), tokenizer.pad_token_id, dtype=dtype)
    truncated = 0
    for row, ids in zip(blocks, encode_documents(tokenizer, texts)):
        body = ids[:seq_len - 2]
        truncated += len(body) < len(ids)
        row[0], row[1:1 + len(body)], row[1 + len(body)] = cls_id, body, sep_id
    return blocks, np.asarray(labels), {
        "num_tokens": int((blocks != tokenizer.pad_token_id).sum()), "labels": "section",
        "classes": classes, "class_counts": np.bincount(labels, minlength=len(classes)).tolist(),
        "num_paragraphs": len(texts), "truncated_paragraphs": truncated, "documents": kept}


def write_split(out_dir: Path, split: str, docs: list[Document], tokenizer, corpus: TextCorpus, *,
                seq_len: int, samples_per_shard: int | None, seed: int,
                classes: list[str] | None = None) -> Manifest:
    """Tokenize ``docs``, pack and shuffle their blocks (``classes``: one labeled block per
    paragraph instead, see the module docstring), write shards + manifest + tokenizer +
    ``documents.txt`` (one key per line) into ``out_dir``. ``ValueError`` names the split when
    it has fewer tokens than one block (no labeled paragraph)."""
    vocab_size = len(tokenizer)
    dtype = block_dtype(vocab_size)
    where = f"{split} split of {corpus.name}"
    blocks, labels, extra = (_paragraph_blocks(tokenizer, docs, classes, seq_len, dtype, where) if classes
                             else _lm_blocks(tokenizer, docs, seq_len, dtype, where))
    docs = extra.pop("documents", docs)
    min_shards = MIN_TRAIN_SHARDS if split == "train" else 1  # evaluation reads sample by sample
    per_shard = samples_per_shard or min(MAX_BLOCKS_PER_SHARD, max(1, len(blocks) // min_shards))
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir / TOKENIZER_DIR))
    (out_dir / "documents.txt").write_text("".join(d.key + "\n" for d in docs))
    order = np.random.default_rng(seed).permutation(len(blocks))
    cls_id, sep_id = _block_ids(tokenizer)
    with ShardWriter(out_dir, per_shard, mtime=int(time.time())) as writer:
        for i in order:
            sample = {"__key__": f"{i:08d}", TOKENS_MEMBER: encode_npy(blocks[i])}
            if labels is not None:
                sample[LABEL_MEMBER] = str(int(labels[i])).encode()
            writer.write(sample)
        meta = {"split": split, "seq_len": seq_len, "vocab_size": vocab_size, "dtype": dtype.name,
                "tokenizer": TOKENIZER_DIR,
                "tokenizer_sha256": _sha256_file(out_dir / TOKENIZER_DIR / "tokenizer.json"),
                "num_documents": len(docs), **extra, "inputs": corpus.inputs,
                "special_tokens": {"cls": cls_id, "sep": sep_id,
                                   "pad": tokenizer.pad_token_id, "mask": tokenizer.mask_token_id}}
        return writer.close(source=corpus.name, license=corpus.license, meta=meta, modality="text")


def prepare_text(name: str, out_dir: str | os.PathLike, *, inputs: Sequence[str] | None = None,
                 vocab_size: int = 8192, tokenizer: str | None = None, seq_len: int = 128,
                 val_fraction: float = 0.05, samples_per_shard: int | None = None, seed: int = 0,
                 limit: int | None = None, labels: str | None = None) -> dict[str, Any]:
    """Write text source ``name`` (``text`` or ``pydoc-topics``) as ``out_dir/train`` and
    ``out_dir/val`` token-block shards (see the module docstring); ``val`` is skipped when
    ``val_fraction`` is 0. The tokenizer is trained on the train documents only, unless
    ``tokenizer`` names a Hugging Face tokenizer folder to reuse. ``limit`` keeps the first N
    documents (quick tests); ``samples_per_shard`` None writes train in ``blocks // 32``-block
    shards (so at least 32 shards) and val in one, both capped at 10,000 blocks per shard.
    Returns the summary the CLI prints: totals over both splits, per-split counts and
    ``seconds`` (wall time). Raises ``FileNotFoundError`` / ``ValueError`` naming a missing or
    empty input, a bad flag or a split too small for one block.
    """
    start = time.perf_counter()
    if samples_per_shard is not None and samples_per_shard <= 0:
        raise ValueError(f"--samples-per-shard must be > 0, got {samples_per_shard}")
    if labels is not None and labels not in LABEL_KINDS:
        raise ValueError(f"--labels {labels}: unknown; valid: {', '.join(LABEL_KINDS)}")
    corpus = open_text_source(name, inputs)
    documents = corpus.documents[:limit] if limit else corpus.documents
    classes = section_classes(documents) if labels else None
    train_docs, val_docs = split_documents(documents, val_fraction, seed)
    tok = open_tokenizer(tokenizer) if tokenizer else train_wordpiece([d.text for d in train_docs], vocab_size)
    splits = {"train": train_docs, "val": val_docs} if val_docs else {"train": train_docs}
    manifests = {split: write_split(Path(out_dir) / split, split, docs, tok, corpus, seq_len=seq_len,
                                    samples_per_shard=samples_per_shard, seed=seed, classes=classes)
                 for split, docs in splits.items()}
    per_split = {split: {"out": m.root, "documents": m.meta["num_documents"], "samples": m.num_samples,
                         "shards": len(m.shards), "tokens": m.meta["num_tokens"]}
                 for split, m in manifests.items()}
    return {"out": str(out_dir), "source": corpus.name, "license": corpus.license,
            "num_shards": sum(len(m.shards) for m in manifests.values()),
            "num_samples": sum(m.num_samples for m in manifests.values()),
            "num_tokens": sum(m.meta["num_tokens"] for m in manifests.values()),
            "vocab_size": len(tok), "seq_len": seq_len, "duplicates_dropped": corpus.duplicates,
            **({"classes": classes} if classes else {}),
            **per_split, "seconds": round(time.perf_counter() - start, 2)}


def decode_token_block(sample: dict[str, Any], seq_len: int | None = None) -> torch.Tensor:
    """A raw WebDataset sample -> ``input_ids`` LongTensor ``(seq_len,)``.

    Reads the ``input_ids.npy`` member (a 1-D integer .npy array). Raises ``ValueError`` naming
    the sample key and shard URL when the member is missing, is not a valid .npy array, is not
    1-D integer data, or (when ``seq_len`` is given) has another length.
    """
    where = f"sample {sample.get('__key__')!r} of shard {sample.get('__url__', '?')}"
    data = sample.get(TOKENS_MEMBER)
    if data is None:
        raise ValueError(f"{where}: no '{TOKENS_MEMBER}' member (members: "
                         f"{sorted(k for k in sample if not k.startswith('__'))})")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{where}: corrupt '{TOKENS_MEMBER}' ({type(e).__name__}: {e})") from None
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"{where}: '{TOKENS_MEMBER}' is {array.dtype} of shape {array.shape}, "
                         "expected a 1-D integer array")
    if seq_len is not None and len(array) != seq_len:
        raise ValueError(f"{where}: block of {len(array)} tokens, expected seq_len {seq_len}")
    return torch.from_numpy(array.astype(np.int64))


def load_tokenizer(manifest: Manifest):
    """The ``AutoTokenizer`` saved beside a text manifest (folder ``meta["tokenizer"]``).

    Raises ``ValueError`` naming the manifest when it is not a text manifest or its vocabulary
    size differs from the tokenizer's, ``FileNotFoundError`` naming the missing folder.
    """
    from transformers import AutoTokenizer

    where = os.path.join(manifest.root, "manifest.json")
    if manifest.modality != "text" or "tokenizer" not in manifest.meta:
        raise ValueError(f"{where}: not a text manifest (modality '{manifest.modality}', no "
                         "meta.tokenizer); prepare it with `sslscale data prepare text`")
    folder = Path(manifest.meta["tokenizer"])
    folder = folder if folder.is_absolute() else Path(manifest.root) / folder
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} named by {where} is missing")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    expected = manifest.meta.get("vocab_size")
    if expected is not None and len(tokenizer) != expected:
        raise ValueError(f"{where}: vocab_size {expected} but the tokenizer in {folder} has "
                         f"{len(tokenizer)} tokens")
    return tokenizer


class LabeledTextDecoder:
    """A labeled text sample (``--labels``) -> ``{"input_ids": (L,) int64, "attention_mask": (L,)
    int64 (0 at [PAD]), "labels": int (-1 = none), "sample_seeds": int}``. Errors as
    ``decode_token_block`` and ``stream.read_label`` (``ValueError`` naming sample and shard)."""

    def __init__(self, seq_len: int, pad_id: int, label_key: str = LABEL_MEMBER):
        self.seq_len, self.pad_id, self.label_key = seq_len, pad_id, label_key

    @classmethod
    def for_manifest(cls, manifest: Manifest) -> "LabeledTextDecoder":
        """``ValueError`` naming the manifest when it holds no labeled text (``meta.classes``)."""
        meta = manifest.meta or {}
        if manifest.modality != "text" or not meta.get("classes"):
            raise ValueError(f"{manifest.root}/manifest.json: no labeled text (meta.classes); prepare "
                             "it with `sslscale data prepare text --labels section`")
        return cls(int(meta["seq_len"]), int(meta["special_tokens"]["pad"]),
                   (manifest.keys or {}).get("label") or LABEL_MEMBER)

    def __call__(self, sample: dict[str, Any], seed: int = 0) -> dict[str, Any]:
        from sslscale.data.stream import read_label

        ids = decode_token_block(sample, self.seq_len)
        return {"input_ids": ids, "attention_mask": (ids != self.pad_id).long(),
                "labels": read_label(sample, self.label_key), "sample_seeds": seed}


class TokenBlockDecoder:
    """A token block (``input_ids.npy``) -> ``{"input_ids": (L,) int64, "sample_seeds": int}``,
    uncorrupted: the input of causal language modeling (``objective.name: clm``). Blocks are full
    (no padding), so there is no ``attention_mask``; the ``[SEP]`` tokens inside a block are the
    boundaries between the packed documents (and each block ends with one), which the model
    learns to predict like any other token. ``ValueError`` as ``decode_token_block``."""

    def __init__(self, seq_len: int | None = None):
        self.seq_len = seq_len

    @classmethod
    def for_manifest(cls, manifest: Manifest) -> "TokenBlockDecoder":
        """``ValueError`` naming the manifest when it holds no token blocks (``meta.seq_len``)."""
        meta = manifest.meta or {}
        if manifest.modality != "text" or "seq_len" not in meta:
            raise ValueError(f"{manifest.root}/manifest.json: no token blocks (modality "
                             f"'{manifest.modality}', no meta.seq_len); prepare them with "
                             "`sslscale data prepare text`")
        return cls(int(meta["seq_len"]))

    def __call__(self, sample: dict[str, Any], seed: int = 0) -> dict[str, Any]:
        return {"input_ids": decode_token_block(sample, self.seq_len), "sample_seeds": seed}
