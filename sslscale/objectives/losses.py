"""Distributed pieces of the contrastive losses: gathering features with gradient, BatchNorm over
all ranks, and the NT-Xent / InfoNCE / negative-cosine losses built on them.

The scheme is open_clip's ``gather_with_grad`` + ``local_loss`` (``src/open_clip/loss.py``):
each rank computes the loss of its *local* rows against the columns gathered from every rank
(with autograd, so a rank's features get the gradient of every rank's loss), and the engine's
gradient average over ranks then equals the gradient of one process holding the whole batch.
Losses are means over local rows; the mean over ranks of those is the full-batch loss.

The InfoNCE itself is ``sslscale.kernels.infonce.info_nce`` (tiled: the ``(rows x columns)``
logits are never materialized).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from sslscale.dist import rank_and_world
from sslscale.kernels.infonce import info_nce


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``(W * B, ...)``: ``x`` ``(B, ...)`` of every rank, concatenated in rank order, with
    autograd (the backward sums each rank's gradient into the owner). Identity on one process.
    Every rank must pass the same shape."""
    _, world = rank_and_world()
    if world == 1:
        return x
    with warnings.catch_warnings():  # its replacement (_functional_collectives) is not public yet
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(torch.distributed.nn.functional.all_gather(x), dim=0)


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks, with autograd (the gradient is all-reduced too)."""
    _, world = rank_and_world()
    if world == 1:
        return x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.distributed.nn.functional.all_reduce(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Like ``gather_with_grad`` for tensors that need no gradient (MoCo's keys)."""
    _, world = rank_and_world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over the features ``(B, C)`` of all ranks (statistics all-reduced with autograd,
    like ``nn.SyncBatchNorm``, which needs CUDA), so heads behave as in one process with the whole
    micro-batch. ``global_stats=False`` or one process: plain ``BatchNorm1d``. Running statistics
    (unbiased variance) are kept for eval mode."""

    def __init__(self, num_features: int, affine: bool = True, global_stats: bool = True):
        super().__init__(num_features, affine=affine)
        self.global_stats = global_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, world = rank_and_world()
        if not self.training or not self.global_stats or world == 1:
            return super().forward(x)
        # two passes (mean, then squared deviations): as accurate as one process's BatchNorm
        count = len(x) * world
        mean = all_reduce_with_grad(x.sum(0)) / count
        centered = x - mean
        var = all_reduce_with_grad((centered * centered).sum(0)) / count
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * count / max(count - 1, 1), alpha=m)
            self.num_batches_tracked += 1
        y = centered * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, *, last_bn: bool,
        global_stats: bool) -> nn.Sequential:
    """Projection / prediction head: ``num_layers`` linears, BatchNorm + ReLU between them, and an
    affine-free BatchNorm after the last one if ``last_bn`` (MoCo v3's and SimSiam's heads)."""
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=False))
        if not last:
            layers += [GlobalBatchNorm1d(dims[i + 1], global_stats=global_stats), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(GlobalBatchNorm1d(dims[i + 1], affine=False, global_stats=global_stats))
    return nn.Sequential(*layers)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, *, gather: bool = True) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, arXiv 2002.05709) for two views ``(B, D)`` each: every
    one of the 2B local views is classified against all 2N views of the global batch (N = B x
    ranks with ``gather``), itself excluded, its partner view positive. Returns the mean over the
    local views (scalar); the mean over ranks is the full-batch loss."""
    rank, world = rank_and_world() if gather else (0, 1)
    rows = F.normalize(torch.cat([z1, z2]), dim=1)
    cols = gather_with_grad(rows) if world > 1 else rows
    b = len(z1)
    local = torch.arange(2 * b, device=rows.device)
    offset = rank * 2 * b  # rank r's views sit at columns [r * 2B, (r + 1) * 2B)
    return info_nce(rows, cols, offset + (local + b) % (2 * b), temperature=temperature,
                    exclude=offset + local).mean()


def moco_infonce(q: torch.Tensor, k: torch.Tensor, temperature: float, *, gather: bool = True) -> torch.Tensor:
    """MoCo v3's contrastive loss (Chen, Xie, He 2021, arXiv 2104.02057): queries ``q`` ``(B, D)``
    against the keys ``k`` ``(B, D)`` of the global batch (no gradient), positive = own key,
    scaled by ``2 * temperature`` as in the reference. Mean over local rows (scalar)."""
    rank, world = rank_and_world() if gather else (0, 1)
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    keys = gather_no_grad(k) if world > 1 else k
    positives = rank * len(q) + torch.arange(len(q), device=q.device)
    return info_nce(q, keys, positives, temperature=temperature).mean() * (2 * temperature)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's ``D(p, z) = -cos(p, stopgrad(z))`` (Chen & He 2021, arXiv 2011.10566), mean over
    rows ``(B, D)``."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()
