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
