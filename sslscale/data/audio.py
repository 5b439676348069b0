"""Speech recordings -> shards of 16 kHz mono clips, and their reader.

Owns ``sslscale data prepare audio --input DIR ...``: every ``.wav`` / ``.flac`` / ``.ogg`` file
under the inputs (searched recursively, sorted) is decoded with ``soundfile`` (libsndfile),
averaged to mono, resampled to ``sampling_rate`` (16 kHz, wav2vec 2.0's rate) with a windowed-sinc
filter (:func:`resample`), cut into consecutive crops of at most ``--max-seconds`` (none by
default: whole clips) and stored as 16-bit FLAC. Labels come from the file layout
(``--labels``): ``folder`` (the default) makes the first folder under its input the class
(``sounds/en/ball.ogg`` -> language ``en``; files directly in an input have none); ``path`` makes
the file's path under its input, suffix dropped, the class (``it_IT_m_Carlo/digits/7.wav`` ->
``digits/7``): what is said, for prompt sets that several speakers recorded under the same names.
The class is stored as ``cls`` (its index in ``meta.classes``, sorted names over both splits);
the file's stem is its ``word`` (in the sample's ``.json``: per-sample data stays out of the
manifest, which costs O(shards)). Each class is split into train / val by a seeded shuffle
(``--val-fraction``; with ``path`` labels all files form one group), or ``--val-input`` names the
folders held out whole as val (other speakers: a content probe across speakers).

Layout written to ``OUT``::

    OUT/train/  shard-000000.tar ... manifest.json
    OUT/val/    shard-000000.tar ... manifest.json

Each sample is ``{"__key__": "%08d", "flac": <16-bit FLAC bytes>, "cls": b"3", "json": {path,
word, class, offset_seconds}}``; the manifest has ``modality: "audio"``, the source and license
of a known Debian package (``KNOWN_SOURCES``) and ``meta`` = {split, sampling_rate, audio_format,
max_seconds, num_seconds, min_num_samples, max_num_samples, classes, class_counts, labels, inputs}. Readers use :class:`AudioDecoder`.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sslscale.data.shards import Manifest, ShardWriter
from sslscale.data.sources import auto_shards

SAMPLING_RATE = 16_000
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
AUDIO_MEMBERS = ("flac", "wav", "ogg", "npy")
MIN_CROP_SECONDS = 0.25  # --max-seconds: a shorter tail of a long file is dropped
MIN_TRAIN_SHARDS = 16
# Debian packages of real recordings: install folder -> (manifest source, license of the sounds,
# from /usr/share/doc/PACKAGE/copyright)
KNOWN_SOURCES = {"/usr/share/ktuberling/sounds": ("ktuberling-data", "GPL-2+"),
                 "/usr/share/pocketsphinx/test/data": ("pocketsphinx-testdata", "BSD-2-Clause"),
                 "/usr/share/asterisk/sounds/it_IT_m_Carlo": ("asterisk-core-sounds-it-wav", "CC-BY-3.0"),
                 "/usr/share/asterisk/sounds/it_IT_f_Menardi": ("asterisk-prompt-it-menardi-wav",
                                                                "CC-BY-SA-3.0-IT (credit the speakers, "
                                                                "Marco and Alessandra Menardi)")}
LABELS = ("folder", "path")  # --labels: the class is the first folder under the input / the whole path
SINC_ZEROS = 16  # windowed-sinc half width, in zero crossings of the low-pass filter
KAISER_BETA = 8.6  # ~ -80 dB stop band
ROLLOFF = 0.945  # cutoff as a fraction of the lower Nyquist frequency


def resample(x: np.ndarray, orig_sr: int, target_sr: int, *, chunk: int = 1 << 15) -> np.ndarray:
    """Band-limited resampling of ``x`` ``(N,)`` float from ``orig_sr`` to ``target_sr`` Hz:
    ``(ceil(N * target_sr / orig_sr),)`` float32. Each output sample is the input convolved with
    a Kaiser-windowed sinc low-pass (cutoff ``ROLLOFF`` x the lower Nyquist frequency,
    ``SINC_ZEROS`` zero crossings each side) centered at its input-time position (Smith,
    "Digital Audio Resampling", the method of resampy / torchaudio's ``sinc_interp_kaiser``);
    zeros are assumed outside the clip. ``ValueError`` for a non-positive rate."""
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"resample: rates must be > 0, got {orig_sr} -> {target_sr}")
    x = np.asarray(x, dtype=np.float64)
    if orig_sr == target_sr:
        return x.astype(np.float32)
    g = math.gcd(orig_sr, target_sr)
    up, down = target_sr // g, orig_sr // g
    cutoff = ROLLOFF * min(1.0, target_sr / orig_sr)  # in cycles per input sample x 2
    half = int(math.ceil(SINC_ZEROS / cutoff))
    n_out = -(-len(x) * up // down)
    taps = np.arange(-half, half + 1)
    t = np.arange(up)[:, None] / up - taps[None, :]  # phase p: output time = base + p / up
    window = np.i0(KAISER_BETA * np.sqrt(np.clip(1.0 - (t / (half + 1)) ** 2, 0.0, 1.0))) / np.i0(KAISER_BETA)
    bank = cutoff * np.sinc(cutoff * t) * window  # (up, 2 * half + 1): one filter per phase
    padded = np.concatenate([np.zeros(half + 1), x, np.zeros(half + 1)])
    out = np.empty(n_out, dtype=np.float32)
    for start in range(0, n_out, chunk):
        base, phase = np.divmod(np.arange(start, min(start + chunk, n_out)) * down, up)
        out[start:start + len(base)] = np.einsum(
            "nk,nk->n", padded[base[:, None] + taps[None, :] + half + 1], bank[phase])
    return out


def read_audio(source, sampling_rate: int = SAMPLING_RATE, where: str | None = None) -> np.ndarray:
    """A sound file (path or bytes of wav / flac / ogg) -> mono float32 ``(N,)`` in [-1, 1] at
    ``sampling_rate`` Hz (channels averaged, :func:`resample` d). ``ValueError`` naming ``where``
    (default: the path) when libsndfile cannot decode it or it holds no samples."""
    import soundfile

    name = where or (str(source) if not isinstance(source, (bytes, bytearray)) else "audio bytes")
    try:
        data, rate = soundfile.read(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source,
                                    dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(f"{name}: not a readable sound file ({e})") from None
    if data.size == 0:
        raise ValueError(f"{name}: holds no audio samples")
    return resample(data.mean(axis=1), rate, sampling_rate)


def encode_flac(x: np.ndarray, sampling_rate: int = SAMPLING_RATE) -> bytes:
    """float ``(N,)`` in [-1, 1] -> 16-bit mono FLAC bytes (values clipped to [-1, 1])."""
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, np.clip(x, -1.0, 1.0), sampling_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def audio_files(inputs: Sequence[str | os.PathLike], labels: str = "folder") -> list[tuple[Path, str | None]]:
    """``(file, class)`` of every audio file (``AUDIO_SUFFIXES``) under ``inputs`` (folders,
    searched recursively, or files), sorted per input. The class (``labels``): ``folder``, the
    first folder below its input (None directly in it or for a named file); ``path``, the path
    below its input without the suffix, ``/``-separated (a named file: its stem).
    ``FileNotFoundError`` names a missing input, ``ValueError`` says when none holds an audio file."""
    found: list[tuple[Path, str | None]] = []
    for item in inputs:
        root = Path(item)
        if not root.exists():
            raise FileNotFoundError(f"--input {root}: no such file or folder")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*")
                                                     if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        for path in files:
            parts = path.relative_to(root).parts if path != root else ()
            if labels == "path":
                found.append((path, "/".join((*parts[:-1], path.stem))))
            else:
                found.append((path, parts[0] if len(parts) > 1 else None))
    if not found:
        raise ValueError(f"--input {' '.join(map(str, inputs))}: no {'/'.join(AUDIO_SUFFIXES)} files")
    return found


def source_of(inputs: Sequence[str | os.PathLike]) -> tuple[str, str]:
    """``(source, license)`` of the manifest: the Debian package's name and its sounds' license
    when every input lies in one package's folder (``KNOWN_SOURCES``), else ``audio`` with the
    license left to the user (``unknown: see the inputs' copyright``)."""
    found = set()
    for item in inputs:
        path = Path(item).resolve()
        found.add(next((v for k, v in KNOWN_SOURCES.items() if path.is_relative_to(k)), None))
    if len(found) == 1 and None not in found:
        return found.pop()
    known = sorted(f"{name} ({lic})" for name, lic in (f for f in found if f))
    return "audio", "unknown: see the inputs' copyright" + (f"; includes {', '.join(known)}" if known else "")


def crops(x: np.ndarray, max_samples: int | None, min_samples: int) -> list[tuple[int, np.ndarray]]:
    """``(offset, piece)`` of ``x`` cut into consecutive pieces of ``max_samples`` (None: whole);
    a tail shorter than ``min_samples`` is dropped unless it is the only piece."""
    if not max_samples or len(x) <= max_samples:
        return [(0, x)]
    pieces = [(o, x[o:o + max_samples]) for o in range(0, len(x), max_samples)]
    return [p for p in pieces if len(p[1]) >= min_samples] or pieces[:1]


def _split(files: list[tuple[Path, str | None]], val_fraction: float, seed: int, per_class: bool = True):
    """Per class (unlabeled files as one group; all files as one without ``per_class``): a
    seeded shuffle, ``round(val_fraction * n)`` files to val. Returns ``(train, val)`` lists in
    input order."""
    groups: dict[str | None, list[int]] = {}
    for i, (_, cls) in enumerate(files):
        groups.setdefault(cls if per_class else None, []).append(i)
    val: set[int] = set()
    for cls, members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        random.Random(f"sslscale-audio-split:{seed}:{cls}").shuffle(members)
        val.update(members[:int(round(val_fraction * len(members)))])
    return ([f for i, f in enumerate(files) if i not in val], [f for i, f in enumerate(files) if i in val])


def write_audio_split(out_dir: Path, split: str, files, *, classes: list[str], roots: list[str], labels: str,
                      sampling_rate: int, max_seconds: float | None, samples_per_shard: int | None,
                      seed: int) -> Manifest:
    """Decode, crop and shard ``files`` (``(path, class)``) into ``out_dir`` in a seeded random
    order; ``ValueError`` names an undecodable file."""
    max_samples = int(round(max_seconds * sampling_rate)) if max_seconds else None
    pieces = []
    for path, cls in files:
        for offset, x in crops(read_audio(path, sampling_rate), max_samples, int(MIN_CROP_SECONDS * sampling_rate)):
            pieces.append((path, cls, offset, x))
    order = np.random.default_rng(seed).permutation(len(pieces))
    total_bytes = sum(2 * len(p[3]) for p in pieces)
    per_shard = samples_per_shard or max(1, -(-len(pieces) // (auto_shards(len(pieces), total_bytes, MIN_TRAIN_SHARDS)
                                                               if split == "train" else 1)))
    lengths = [len(p[3]) for p in pieces]
    class_index = {c: i for i, c in enumerate(classes)}
    with ShardWriter(out_dir, per_shard, mtime=int(time.time())) as writer:
        for i in order:
            path, cls, offset, x = pieces[i]
            info = {"path": str(path), "word": path.stem, "class": cls, "offset_seconds": offset / sampling_rate}
            sample = {"__key__": f"{i:08d}", "flac": encode_flac(x, sampling_rate),
                      "json": json.dumps(info).encode()}
            if cls is not None:
                sample["cls"] = str(class_index[cls]).encode()
            writer.write(sample)
        per_class = Counter(p[1] for p in pieces)
        counts = [per_class[c] for c in classes]
        meta = {"split": split, "sampling_rate": sampling_rate, "audio_format": "flac",
                "max_seconds": max_seconds, "num_seconds": round(sum(lengths) / sampling_rate, 2),
                "min_num_samples": min(lengths), "max_num_samples": max(lengths), "labels": labels,
                "classes": classes, "class_counts": counts, "inputs": roots}
        source, license = source_of(roots)
        return writer.close(source=source, license=license, meta=meta, modality="audio")


def prepare_audio(out_dir: str | os.PathLike, *, inputs: Sequence[str], max_seconds: float | None = None,
                  val_fraction: float = 0.1, samples_per_shard: int | None = None, seed: int = 0,
                  limit: int | None = None, sampling_rate: int = SAMPLING_RATE, labels: str = "folder",
                  val_inputs: Sequence[str] | None = None) -> dict[str, Any]:
    """Write the audio files under ``inputs`` as ``out_dir/train`` and ``out_dir/val`` shards
    (see the module docstring; ``val`` is skipped when ``val_fraction`` is 0). ``labels``:
    ``folder`` or ``path`` (``LABELS``); ``val_inputs``: folders written whole as ``val``
    instead of the ``val_fraction`` split (which must then be 0). ``limit``: the first N files
    of a seeded shuffle of each split's inputs (quick tests; every class keeps its share).
    Returns the summary the CLI prints (per split: samples, shards, seconds of audio;
    ``seconds``: wall time). Raises ``FileNotFoundError`` / ``ValueError`` naming a missing
    input, a bad flag or an undecodable file."""
    start = time.perf_counter()
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if val_inputs and val_fraction:
        raise ValueError(f"--val-input holds out whole folders as val: leave --val-fraction out "
                         f"(got {val_fraction})")
    if labels not in LABELS:
        raise ValueError(f"--labels for audio must be one of {', '.join(LABELS)}, got {labels!r}")
    if max_seconds is not None and max_seconds <= MIN_CROP_SECONDS:
        raise ValueError(f"--max-seconds must be > {MIN_CROP_SECONDS}, got {max_seconds}")
    if samples_per_shard is not None and samples_per_shard <= 0:
        raise ValueError(f"--samples-per-shard must be > 0, got {samples_per_shard}")

    def found(folders: Sequence[str]) -> list[tuple[Path, str | None]]:
        files = audio_files(folders, labels)
        if limit:
            keep = sorted(random.Random(f"sslscale-audio-limit:{seed}").sample(range(len(files)), min(limit, len(files))))
            files = [files[i] for i in keep]
        return files

    files = found(inputs)
    if val_inputs:
        train, val = files, found(val_inputs)
    else:
        train, val = _split(files, val_fraction, seed, per_class=labels == "folder")
    classes = sorted({c for _, c in train + val if c is not None})
    if not train:
        raise ValueError(f"--val-fraction {val_fraction} leaves no training file of {len(files)}")
    splits = {"train": train, "val": val} if val else {"train": train}
    roots = {"train": inputs, "val": val_inputs or inputs}
    common = dict(classes=classes, labels=labels, sampling_rate=sampling_rate, max_seconds=max_seconds,
                  samples_per_shard=samples_per_shard, seed=seed)
    manifests = {s: write_audio_split(Path(out_dir) / s, s, f, roots=[str(i) for i in roots[s]], **common)
                 for s, f in splits.items()}
    per_split = {s: {"out": m.root, "files": len(splits[s]), "samples": m.num_samples, "shards": len(m.shards),
                     "audio_seconds": m.meta["num_seconds"], "source": m.source, "license": m.license}
                 for s, m in manifests.items()}
    return {"out": str(out_dir), "source": manifests["train"].source, "license": manifests["train"].license,
            "classes": classes, "sampling_rate": sampling_rate,
            "num_samples": sum(m.num_samples for m in manifests.values()), **per_split,
            "seconds": round(time.perf_counter() - start, 2)}


def decode_audio(sample: dict[str, Any], sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """A raw WebDataset sample -> its clip, float32 ``(N,)`` at ``sampling_rate`` (member
    ``flac`` / ``wav`` / ``ogg``, resampled if needed, or ``npy``: a 1-D float array taken to be
    at that rate). ``ValueError`` naming the sample and its shard when it has no audio member or
    the member does not decode."""
    where = f"sample {sample.get('__key__')} from {sample.get('__url__')}"
    key = next((k for k in AUDIO_MEMBERS if k in sample), None)
    if key is None:
        raise ValueError(f"{where} has no audio ({', '.join(AUDIO_MEMBERS)})")
    if key != "npy":
        return read_audio(bytes(sample[key]), sampling_rate, where=f"{where}: member '{key}'")
    try:
        x = np.load(io.BytesIO(sample[key]), allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{where}: member 'npy' is not a .npy array ({e})") from None
    if x.ndim != 1 or x.size == 0 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{where}: member 'npy' must be a non-empty 1-D float array, got {x.dtype} {x.shape}")
    return x.astype(np.float32)


def normalize(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (``Wav2Vec2FeatureExtractor``'s ``do_normalize``: eps 1e-7)."""
    return ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)


class AudioDecoder:
    """A raw sample + seed -> ``{"input_values": float32 (num_samples,), "attention_mask": int64
    (num_samples,) (1 = audio, 0 = padding), "labels": int (-1 = none), "sample_seeds": seed}``
    plus, with ``masking`` (``sslscale.data.masking.SpanMasking``), ``mask_time_indices`` and
    ``sampled_negative_indices`` drawn for the clip's feature frames.

    A clip longer than ``num_samples`` is cropped (``crop="random"``: at an offset drawn from
    the seed; ``"center"``), a shorter one zero-padded; it is normalized over its audio part.
    ``ValueError`` as :func:`decode_audio`."""

    def __init__(self, num_samples: int, *, sampling_rate: int = SAMPLING_RATE, crop: str = "random",
                 label_key: str = "cls", masking=None):
        if crop not in ("random", "center"):
            raise ValueError(f"unknown crop '{crop}'; valid: random, center")
        if num_samples < 1:
            raise ValueError(f"AudioDecoder: num_samples must be >= 1, got {num_samples}")
        self.num_samples, self.sampling_rate, self.crop = num_samples, sampling_rate, crop
        self.label_key, self.masking = label_key, masking

    @classmethod
    def for_manifest(cls, manifest: Manifest, max_seconds: float | None = None, **kwargs) -> "AudioDecoder":
        """Clips of at most ``max_seconds`` (None: the manifest's longest, ``meta.max_num_samples``)
        at the manifest's rate; ``ValueError`` naming the manifest when it holds no audio."""
        meta = manifest.meta or {}
        if manifest.modality != "audio" or "sampling_rate" not in meta:
            raise ValueError(f"{manifest.root}/manifest.json: no audio clips (modality '{manifest.modality}'"
                             ", no meta.sampling_rate); prepare them with `sslscale data prepare audio`")
        rate = int(meta["sampling_rate"])
        length = int(round(max_seconds * rate)) if max_seconds else int(meta["max_num_samples"])
        return cls(length, sampling_rate=rate, label_key=(manifest.keys or {}).get("label") or "cls", **kwargs)

    def __call__(self, sample: dict[str, Any], seed: int = 0) -> dict[str, Any]:
        from sslscale.data.stream import read_label

        x = decode_audio(sample, self.sampling_rate)
        if len(x) > self.num_samples:
            extra = len(x) - self.num_samples
            offset = int(np.random.default_rng([seed, 0]).integers(0, extra + 1)) if self.crop == "random" else extra // 2
            x = x[offset:offset + self.num_samples]
        values = np.zeros(self.num_samples, dtype=np.float32)
        values[:len(x)] = normalize(x)
        mask = np.zeros(self.num_samples, dtype=np.int64)
        mask[:len(x)] = 1
        out = {"input_values": torch.from_numpy(values), "attention_mask": torch.from_numpy(mask),
               "labels": read_label(sample, self.label_key), "sample_seeds": seed}
        if self.masking is not None:
            out.update(self.masking(len(x), self.num_samples, seed))
        return out
