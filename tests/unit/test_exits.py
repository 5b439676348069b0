"""A rank that leaves while its data-loader workers are alive (they ignore SIGTERM, as sslscale's
do) still ends at once: ``sslscale.exits`` SIGKILLs them at interpreter exit, also when the
DataLoader's SIGCHLD handler would raise about the first one killed."""

from __future__ import annotations

import subprocess
import sys
import time

RANK = r"""
import signal, sys
import torch
from torch.utils.data import DataLoader, IterableDataset

from sslscale import exits


class Endless(IterableDataset):
    def __iter__(self):
        while True:
            yield torch.zeros(4)


def ignore_stop_signals(worker_id):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


exits.kill_children_at_exit()
batches = iter(DataLoader(Endless(), batch_size=2, num_workers=3, worker_init_fn=ignore_stop_signals))
next(batches)  # the workers run; the iterator is never shut down
print("leaving", flush=True)
sys.exit(75)
"""


def test_live_workers_do_not_hold_the_exit():
    start = time.time()
    done = subprocess.run([sys.executable, "-c", RANK], capture_output=True, text=True, timeout=60)
    assert done.returncode == 75, done.stderr[-3000:]
    assert "leaving" in done.stdout and time.time() - start < 30
