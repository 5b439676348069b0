"""BERT's masked-language-model corruption, done in the data workers, per sample from its seed.

Devlin et al., "BERT" (NAACL 2019, arXiv 1810.04805) §3.1 and transformers'
``DataCollatorForLanguageModeling``: each non-special token is selected with probability
``mlm_probability``; a selected token becomes ``[MASK]`` with probability ``mask_replace_prob``,
a uniformly random vocabulary id with ``random_replace_prob``, and stays unchanged otherwise.
``labels`` hold the original id at selected positions and -100 everywhere else. Special tokens
([CLS], [SEP], [PAD], [MASK]) are never selected. The draws come from a NumPy generator seeded
with the sample's seed, so a sample is masked identically on any rank, world size or resume.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sslscale.data.shards import Manifest

IGNORE_INDEX = -100


class MLMDecoder:
    """Raw sample (``input_ids.npy`` token block) + seed -> ``{"input_ids": (L,) int64,
    "labels": (L,) int64 (-100 = not predicted), "sample_seeds": seed}``.

    Raises ``ValueError`` (naming sample and shard) for a missing or corrupt block.
    """

    def __init__(self, *, seq_len: int, vocab_size: int, mask_id: int, special_ids: list[int],
                 mlm_probability: float = 0.15, mask_replace_prob: float = 0.8,
                 random_replace_prob: float = 0.1):
        self.seq_len, self.vocab_size, self.mask_id = seq_len, vocab_size, mask_id
        self.special = np.array(sorted(set(special_ids)), dtype=np.int64)
        self.p, self.p_mask, self.p_random = mlm_probability, mask_replace_prob, random_replace_prob

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
        o = cfg.objective
        return cls(seq_len=meta["seq_len"], vocab_size=meta["vocab_size"], mask_id=special["mask"],
                   special_ids=list(special.values()), mlm_probability=o.mlm_probability,
                   mask_replace_prob=o.mask_replace_prob, random_replace_prob=o.random_replace_prob)

    def mask(self, input_ids: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``(corrupted input_ids, labels)`` for one block ``(L,)``, deterministic in ``seed``."""
        rng = np.random.default_rng(seed)
        u = rng.random((3, len(input_ids)))
        selected = (u[0] < self.p) & ~np.isin(input_ids, self.special)
        labels = np.where(selected, input_ids, IGNORE_INDEX)
        out = input_ids.copy()
        out[selected & (u[1] < self.p_mask)] = self.mask_id
        random = selected & (u[1] >= self.p_mask) & (u[1] < self.p_mask + self.p_random)
        out[random] = (u[2][random] * self.vocab_size).astype(np.int64)
        return out, labels

    def __call__(self, sample: dict[str, Any], seed: int = 0) -> dict[str, Any]:
        from sslscale.data.text import decode_token_block

        ids = decode_token_block(sample, self.seq_len).numpy()
        corrupted, labels = self.mask(ids, seed)
        return {"input_ids": torch.from_numpy(corrupted), "labels": torch.from_numpy(labels),
                "sample_seeds": seed}
