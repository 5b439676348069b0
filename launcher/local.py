"""``sslscale launch --nproc N``: N local ranks through ``torch.distributed.run`` (torchrun).

Each rank runs ``python -m sslscale.train CONFIG overrides``; torchrun picks a free rendezvous
port (``--standalone``), sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_*, and stops every rank
when one fails.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Sequence


def torchrun_command(nproc: int, recipe: str, overrides: Sequence[str]) -> list[str]:
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "sslscale.train", recipe, *overrides]


def launch(nproc: int, recipe: str, overrides: Sequence[str]) -> int:
    """Run ``nproc`` ranks to completion; returns torchrun's exit code."""
    return subprocess.call(torchrun_command(nproc, recipe, overrides))
