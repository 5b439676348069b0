"""BERT's masked-language-model corruption, done in the data workers, per sample from its seed,
with the predicted positions as a fixed-size padded list (static shapes for the objective).

Devlin et al., "BERT" (NAACL 2019, arXiv 1810.04805) §3.1 and transformers'
``DataCollatorForLanguageModeling``: each non-special token is selected with probability
``mlm_probability``; a selected token becomes ``[MASK]`` with probability ``mask_replace_prob``,
a uniformly random vocabulary id with ``random_replace_prob``, and stays unchanged otherwise.
``labels`` hold the original id at selected positions and -100 everywhere else. Special tokens
([CLS], [SEP], [PAD], [MASK]) are never selected. The draws come from a NumPy generator seeded
with the sample's seed, so a sample is masked identically on any rank, world size or resume.

Fixed-size predictions (NVIDIA DeepLearningExamples BERT / Google BERT's
``create_pretraining_data.py``: ``masked_lm_positions`` padded to ``max_predictions_per_seq``,
20 for seq 128 at 15%). Each block also carries ``masked_positions`` ``(K,)`` and
``masked_labels`` ``(K,)``: the selected positions in ascending order, then padding (position 0
with label -100), so a batch is ``(B, K)`` whatever was drawn and the objective gathers the K
rows without a data-dependent shape (no host sync, no ``torch.compile`` graph break).

Unlike Google's fixed count (``round(L * p)`` tokens per block), selection here stays Bernoulli,
so the count varies per block; ``K = max_predictions_per_seq(L, mlm_probability)`` is the
smallest multiple of 8 with ``P(Binomial(L, p) > K) <= 1e-5`` (40 for 128 tokens at 15%: a
tail of 1.0e-6; 24 for 64 tokens; 120 for 512). In the rare block that selects more than K
tokens, the K with the smallest selection draws are kept (the others stay uncorrupted and
unpredicted, and ``labels`` says so): the per-token selection rate is ``p`` to within ~1e-8,
the masks of every other block are exactly those of plain Bernoulli selection (as before the K
slots existed), and every count of predicted tokens (``labels``, ``masked_labels``,
``eval/num_masked_tokens``) is the true one. The price of the static shape is the head on K
rows per block instead of the ~``p * L`` drawn (19 of 40 at 128 tokens).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from sslscale.data.shards import Manifest

IGNORE_INDEX = -100
CAP_TAIL = 1e-5  # bound on P(a block selects more than K tokens) at the default K
K_MULTIPLE = 8   # K rounded up to a multiple of 8 (tensor-core friendly GEMM rows)


def max_predictions_per_seq(seq_len: int, mlm_probability: float, *, tail: float = CAP_TAIL,
                            multiple: int = K_MULTIPLE) -> int:
    """K: predicted positions per block, the smallest multiple of ``multiple`` (at most
    ``seq_len``) with ``P(Binomial(seq_len, mlm_probability) > K) <= tail``; at least
    ``multiple`` (or ``seq_len``). Exact binomial tail in log space. ``ValueError`` for
    ``seq_len < 1`` or a probability outside [0, 1]."""
    if seq_len < 1 or not 0.0 <= mlm_probability <= 1.0:
        raise ValueError(f"max_predictions_per_seq: seq_len={seq_len} must be >= 1 and "
                         f"mlm_probability={mlm_probability} in [0, 1]")
    n, p, k = seq_len, mlm_probability, seq_len
    if 0.0 < p < 1.0:
        log_p, log_q, cdf = math.log(p), math.log1p(-p), 0.0
        for j in range(n + 1):
            cdf += math.exp(math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
                            + j * log_p + (n - j) * log_q)
            if 1.0 - cdf <= tail:
                k = j
                break
    elif p == 0.0:
        k = 0
    return min(max(multiple, -(-k // multiple) * multiple), seq_len)


def pad_positions(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(masked_positions, masked_labels)``, both ``(k,)`` int64, of one block's ``labels``
    ``(L,)``: the predicted positions ascending, then position 0 with label -100.
    ``ValueError`` if more than ``k`` positions are predicted."""
    where = np.flatnonzero(labels != IGNORE_INDEX)
    if len(where) > k:
        raise ValueError(f"{len(where)} predicted positions do not fit max_predictions={k}")
    positions = np.zeros(k, dtype=np.int64)
    targets = np.full(k, IGNORE_INDEX, dtype=np.int64)
    positions[:len(where)], targets[:len(where)] = where, labels[where]
    return positions, targets


def masked_positions_of(labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masked_positions (B, k), masked_labels (B, k))`` int64 of ``labels`` ``(B, L)`` with
    static shapes (a stable sort, no ``nonzero``): for hand-built batches (tests, benchmarks)
    that carry only ``labels``. Predicted positions come first in ascending order; the padding
    slots point at unpredicted positions (or 0 when ``k > L``) with label -100. A row with more
    than ``k`` predicted positions loses the rest: pass ``k`` >= the largest count per row."""
    unpredicted = (labels == IGNORE_INDEX).to(torch.uint8)
    order = torch.sort(unpredicted, dim=1, stable=True).indices[:, :k]
    targets = labels.gather(1, order)
    if order.shape[1] < k:
        extra = k - order.shape[1]
        order = torch.nn.functional.pad(order, (0, extra))
        targets = torch.nn.functional.pad(targets, (0, extra), value=IGNORE_INDEX)
    return order, targets


class MLMDecoder:
    """Raw sample (``input_ids.npy`` token block) + seed -> ``{"input_ids": (L,) int64,
    "labels": (L,) int64 (-100 = not predicted), "masked_positions": (K,) int64,
    "masked_labels": (K,) int64 (-100 = padding), "sample_seeds": seed}``, with
    ``K = max_predictions`` (default :func:`max_predictions_per_seq` of ``seq_len`` and
    ``mlm_probability``).

    Raises ``ValueError`` (naming sample and shard) for a missing or corrupt block.
    """

    def __init__(self, *, seq_len: int, vocab_size: int, mask_id: int, special_ids: list[int],
                 mlm_probability: float = 0.15, mask_replace_prob: float = 0.8,
                 random_replace_prob: float = 0.1, max_predictions: int | None = None):
        self.seq_len, self.vocab_size, self.mask_id = seq_len, vocab_size, mask_id
        self.special = np.array(sorted(set(special_ids)), dtype=np.int64)
        self.p, self.p_mask, self.p_random = mlm_probability, mask_replace_prob, random_replace_prob
        self.max_predictions = (max_predictions_per_seq(seq_len, mlm_probability)
                                if max_predictions is None else max_predictions)
        if self.max_predictions < 1:
            raise ValueError(f"max_predictions={self.max_predictions} must be >= 1")

    @classmethod
    def from_config(cls, cfg, manifest: Manifest) -> "MLMDecoder":
        """From a text manifest's ``meta`` (seq_len, vocab_size, special token ids) and the
        ``objective`` section; ``ValueError`` naming the manifest if a field is missing."""
        meta = manifest.meta
        missing = [k for k in ("seq_len", "vocab_size", "special_tokens") if k not in meta]
        if missing:
            raise ValueError(f"{manifest.root}/manifest.json: text manifest lacks meta {missing}; "
                             "re-create it with `sslscale data prepare text`")
        special = {k: v for k, v in meta["special_tokens"].items() if v is not None}
        if "mask" not in special:
            raise ValueError(f"{manifest.root}/manifest.json: the tokenizer has no mask token")
        from sslscale.config_schema import MLMConfig, defaults

        o = {**defaults(MLMConfig), **cfg.objective}  # MLM's defaults for another objective's run
        return cls(seq_len=meta["seq_len"], vocab_size=meta["vocab_size"], mask_id=special["mask"],
                   special_ids=list(special.values()), mlm_probability=o["mlm_probability"],
                   mask_replace_prob=o["mask_replace_prob"], random_replace_prob=o["random_replace_prob"])

    def mask(self, input_ids: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``(corrupted input_ids, labels)`` for one block ``(L,)``, deterministic in ``seed``;
        at most ``max_predictions`` positions are selected (see the module docstring)."""
        rng = np.random.default_rng(seed)
        u = rng.random((3, len(input_ids)))
        selected = (u[0] < self.p) & ~np.isin(input_ids, self.special)
        where = np.flatnonzero(selected)
        if len(where) > self.max_predictions:  # P <= 1e-5 per block at the default K
            selected[:] = False
            selected[where[np.argsort(u[0][where], kind="stable")[:self.max_predictions]]] = True
        labels = np.where(selected, input_ids, IGNORE_INDEX)
        out = input_ids.copy()
        out[selected & (u[1] < self.p_mask)] = self.mask_id
        random = selected & (u[1] >= self.p_mask) & (u[1] < self.p_mask + self.p_random)
        out[random] = (u[2][random] * self.vocab_size).astype(np.int64)
        return out, labels

    def mask_block(self, input_ids: np.ndarray, seed: int) -> dict[str, Any]:
        """The example of one decoded block ``(L,)`` (see the class docstring)."""
        corrupted, labels = self.mask(input_ids, seed)
        positions, targets = pad_positions(labels, self.max_predictions)
        return {"input_ids": torch.from_numpy(corrupted), "labels": torch.from_numpy(labels),
                "masked_positions": torch.from_numpy(positions),
                "masked_labels": torch.from_numpy(targets), "sample_seeds": seed}

    def __call__(self, sample: dict[str, Any], seed: int = 0) -> dict[str, Any]:
        from sslscale.data.text import decode_token_block

        return self.mask_block(decode_token_block(sample, self.seq_len).numpy(), seed)


# ------------------------------------------------------------------ wav2vec 2.0 (speech)
def feature_frames(num_samples: int, conv_kernel, conv_stride) -> int:
    """Frames the convolutional feature encoder makes of ``num_samples`` waveform samples (each
    layer ``floor((L - kernel) / stride) + 1``, transformers' ``_get_feat_extract_output_lengths``);
    0 when the clip is shorter than the receptive field."""
    length = num_samples
    for kernel, stride in zip(conv_kernel, conv_stride):
        length = (length - kernel) // stride + 1 if length >= kernel else 0
    return max(length, 0)


def span_mask(rng: np.random.Generator, num_frames: int, total_frames: int, mask_prob: float,
              mask_length: int, min_masks: int = 0) -> np.ndarray:
    """wav2vec 2.0's time mask (Baevski et al. 2020, §3.1 / §4.2; transformers'
    ``_compute_mask_indices`` for one clip, drawn from ``rng``): ``int(mask_prob * num_frames /
    mask_length + U(0, 1))`` spans (at least ``min_masks``; at most what fits) of ``mask_length``
    frames start at distinct positions drawn uniformly from the clip's ``num_frames`` valid frames;
    spans may overlap. Returns bool ``(total_frames,)``, False on the padding frames."""
    mask = np.zeros(total_frames, dtype=bool)
    starts_available = num_frames - (mask_length - 1)
    spans = max(int(mask_prob * num_frames / mask_length + rng.random()), min_masks)
    spans = min(spans, num_frames // mask_length, max(starts_available, 0))
    if spans <= 0:
        return mask
    for start in rng.choice(starts_available, spans, replace=False):
        mask[start:start + mask_length] = True
    return mask


def sample_negatives(rng: np.random.Generator, mask: np.ndarray, num_negatives: int) -> np.ndarray:
    """Distractors of each masked frame (§3.2: "uniformly sampled from other masked time steps of
    the same utterance"; with replacement, never the frame itself, as transformers'
    ``_sample_negative_indices``): int64 ``(T, num_negatives)`` frame indices into the clip;
    rows of unmasked frames, and of a clip with one masked frame, point at the frame itself
    (the loss ignores distractors equal to the positive)."""
    total = len(mask)
    out = np.broadcast_to(np.arange(total, dtype=np.int64)[:, None], (total, num_negatives)).copy()
    masked = np.flatnonzero(mask)
    if len(masked) < 2:
        return out
    draws = rng.integers(0, len(masked) - 1, size=(len(masked), num_negatives))
    draws += draws >= np.arange(len(masked))[:, None]  # skip the frame itself
    out[masked] = masked[draws]
    return out


class SpanMasking:
    """Per-clip wav2vec 2.0 masks drawn from the clip's seed in the data workers, so a clip gets
    the same mask and distractors on any rank, world size or resume: ``(valid_samples,
    num_samples, seed) -> {"mask_time_indices": bool (T,), "sampled_negative_indices": int64
    (T, num_negatives)}`` with ``T = feature_frames(num_samples)`` (the padded clip's frames),
    masks and distractors among the ``feature_frames(valid_samples)`` frames of its audio."""

    def __init__(self, *, conv_kernel, conv_stride, mask_time_prob: float, mask_time_length: int,
                 mask_time_min_masks: int, num_negatives: int):
        self.conv_kernel, self.conv_stride = list(conv_kernel), list(conv_stride)
        self.prob, self.length, self.min_masks = mask_time_prob, mask_time_length, mask_time_min_masks
        self.num_negatives = num_negatives

    @classmethod
    def from_config(cls, cfg) -> "SpanMasking":
        o, m = cfg.objective, cfg.model
        return cls(conv_kernel=m.conv_kernel, conv_stride=m.conv_stride, mask_time_prob=o.mask_time_prob,
                   mask_time_length=o.mask_time_length, mask_time_min_masks=o.mask_time_min_masks,
                   num_negatives=o.num_negatives)

    def __call__(self, valid_samples: int, num_samples: int, seed: int) -> dict[str, Any]:
        rng = np.random.default_rng([seed, 1])
        total = feature_frames(num_samples, self.conv_kernel, self.conv_stride)
        mask = span_mask(rng, feature_frames(valid_samples, self.conv_kernel, self.conv_stride), total,
                         self.prob, self.length, self.min_masks)
        return {"mask_time_indices": torch.from_numpy(mask),
                "sampled_negative_indices": torch.from_numpy(sample_negatives(rng, mask, self.num_negatives))}
