"""Text corpora that install offline: documents for ``sslscale.data.text.prepare_text``.

- ``text``: any files (named ones whatever their name) or folders of ``.txt``/``.rst``/``.md`` (and their ``.gz``; reST sources
  named ``*.rst.txt`` count), one document per file. Without inputs: the Debian package
  ``python3.11-doc``'s 497 reST sources in /usr/share/doc/python3.11/html/_sources (11 MB, PSF;
  or in ``$SSLSCALE_PYTHON_DOCS`` when the .deb was extracted elsewhere with ``dpkg-deb -x``).
- ``pydoc-topics``: the 79 help topics Python ships in ``pydoc_data.topics`` (0.46 MB, PSF),
  present on every Python install; one document per topic.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# Where python3.11-doc put its reST sources; SSLSCALE_PYTHON_DOCS points elsewhere (an extracted .deb).
PYTHON_DOCS_DIR = Path(os.environ.get("SSLSCALE_PYTHON_DOCS", "/usr/share/doc/python3.11/html/_sources"))
TEXT_SUFFIXES = (".txt", ".rst", ".md")
TEXT_SOURCES = ("text", "pydoc-topics")


@dataclass
class Document:
    key: str  # where it came from: a path relative to its input, or a topic name
    text: str


@dataclass
class TextCorpus:
    name: str
    license: str
    documents: list[Document]
    inputs: list[str]
    duplicates: int = 0  # exact duplicate documents dropped (they would leak across splits)


def is_text_file(path: Path) -> bool:
    """``.txt``, ``.rst``, ``.md`` (any case), optionally gzipped (``.rst.gz``, ``.rst.txt``)."""
    name = path.name.lower()
    return name.removesuffix(".gz").endswith(TEXT_SUFFIXES)


def read_text_file(path: Path) -> str:
    """A file's text (UTF-8, BOM dropped; ``.gz`` decompressed). ``ValueError`` names the file
    when it is not UTF-8 or not valid gzip."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix.lower() == ".gz" else path.read_bytes()
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def text_files(inputs: Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """``(key, path)`` of every text file named or found (recursively, sorted) under ``inputs``.
    A file named in ``inputs`` is read whatever its name (``LICENSE``); the extensions
    (``TEXT_SUFFIXES``) only filter what a folder holds.

    Keys are paths relative to their input folder (prefixed ``<i>:`` when several inputs are
    given, so keys stay unique). Raises ``FileNotFoundError`` naming an input that does not
    exist or holds no text file.
    """
    found: list[tuple[str, Path]] = []
    for i, raw in enumerate(inputs):
        root = Path(raw)
        prefix = f"{i}:" if len(inputs) > 1 else ""
        if root.is_file():  # named on the command line: text whatever its name (LICENSE, copyright)
            found.append((prefix + root.name, root))
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"--input {root}: no such file or folder")
        files = [f for f in sorted(root.rglob("*")) if f.is_file() and is_text_file(f)]
        if not files:
            raise FileNotFoundError(f"--input {root}: holds no {'/'.join(TEXT_SUFFIXES)}(.gz) files")
        found += [(prefix + f.relative_to(root).as_posix(), f) for f in files]
    return found


def _dedupe(documents: list[Document]) -> tuple[list[Document], int]:
    """Drop empty documents and exact duplicates (first one kept)."""
    seen: set[bytes] = set()
    kept = []
    for doc in documents:
        digest = hashlib.sha1(doc.text.encode("utf-8")).digest()
        if doc.text.strip() and digest not in seen:
            seen.add(digest)
            kept.append(doc)
    return kept, len(documents) - len(kept)


def text_corpus(inputs: Sequence[str | os.PathLike] | None = None) -> TextCorpus:
    """Documents of ``inputs``, or of Debian's python3.11-doc reST sources when there are none.

    Raises ``FileNotFoundError`` naming a missing or empty input (with the install command for
    the default corpus), ``ValueError`` naming an undecodable file or an all-empty corpus.
    """
    if not inputs:
        if not PYTHON_DOCS_DIR.is_dir():
            raise FileNotFoundError(
                f"the default text corpus {PYTHON_DOCS_DIR} is missing: install it (apt-get install "
                "python3.11-doc), pass --input DIR_OR_FILES, or use the pydoc-topics source")
        name, license, inputs = "python3.11-doc", "PSF-2.0", [PYTHON_DOCS_DIR]
    else:
        name, license = "text", "see source"
    docs = [Document(key, read_text_file(path)) for key, path in text_files(inputs)]
    kept, dropped = _dedupe(docs)
    if not kept:
        raise ValueError(f"--input {', '.join(map(str, inputs))}: every text file is empty")
    return TextCorpus(name, license, kept, [str(p) for p in inputs], dropped)


def pydoc_topics() -> TextCorpus:
    """The help topics of ``pydoc_data.topics`` (``help('for')`` ...), one document each, by name."""
    from pydoc_data.topics import topics

    kept, dropped = _dedupe([Document(name, topics[name]) for name in sorted(topics)])
    return TextCorpus("pydoc-topics", "PSF-2.0", kept, ["pydoc_data.topics"], dropped)


def open_text_source(name: str, inputs: Sequence[str | os.PathLike] | None = None) -> TextCorpus:
    """The ``TextCorpus`` named ``name`` (``text`` or ``pydoc-topics``); ``ValueError`` lists them."""
    if name == "text":
        return text_corpus(inputs)
    if name == "pydoc-topics":
        if inputs:
            raise ValueError("pydoc-topics takes no --input (use the text source for files)")
        return pydoc_topics()
    raise ValueError(f"unknown text source '{name}'; valid: {', '.join(TEXT_SOURCES)}")
