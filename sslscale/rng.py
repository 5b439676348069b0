"""This process's random number generators: seeding them all (python, numpy, torch CPU and
CUDA), deriving per-rank seeds, and capturing / restoring their states for checkpoints. (The
randomness of augmentation and masking does not live here: it is per sample, see
``sslscale.data.augment``.)"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy (mod 2**32) and torch (CPU and CUDA) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def reseed(seed: int, step: int, rank: int) -> None:
    """``seed_everything`` from a hash of ``(seed, step, rank)`` (an elastic resume's ranks)."""
    digest = hashlib.sha256(f"sslscale-reseed:{seed}:{step}:{rank}".encode()).digest()
    seed_everything(int.from_bytes(digest[:8], "little"))


def rng_state() -> dict[str, Any]:
    """This process's random states (python, numpy, torch CPU and CUDA) as plain types and
    tensors, loadable with ``torch.load(weights_only=True)``."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
