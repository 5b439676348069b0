"""InfoNCE / NT-Xent loss of local rows against (gathered) columns, without the M x N logits.

Owns the public API of the contrastive loss kernels: :func:`info_nce` (dispatching to the
Triton kernel on CUDA, the chunked PyTorch version elsewhere), the naive reference
:func:`info_nce_reference` (materialized logits + ``cross_entropy``) and the chunked PyTorch
implementation :func:`info_nce_chunked`.

The tiled algorithm follows Inf-CL (Cheng et al., "Breaking the Memory Barrier: Near Infinite
Batch Size Scaling for Contrastive Loss", arXiv 2410.17243) and FlashAttention's tiling (Dao et
al., arXiv 2205.14135): the forward pass walks tiles of rows x columns keeping an online
log-sum-exp and saves only the ``(M,)`` log-sum-exp; the backward pass recomputes each tile's
logits and probabilities ``P = exp(s - lse)`` and accumulates ``d rows = (P - onehot) @ cols / T``
and ``d cols = (P - onehot)^T @ rows / T``. Logits, log-sum-exp and accumulators are float32 for
every input dtype; gradients come back in the dtypes of the inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IMPLS = ("auto", "triton", "chunked", "naive")
# Tile of the chunked PyTorch version: 2048 x 2048 fp32 logits, 16 MiB, one buffer reused by every
# tile of a pass. On a 2-core CPU (bench/infonce.py, B = 4096 and 8192) 1024 x 2048, 2048 x 1024
# and 1024 x 1024 tiles were 1.1-2x slower in CPU time; below B = 2048 the tile shrinks to B.
CHUNK_ROWS = 2048
CHUNK_COLS = 2048


def _check_inputs(rows: Tensor, cols: Tensor, positives: Tensor, temperature: float,
                  exclude: Tensor | None) -> None:
    """Raise ``ValueError`` / ``TypeError`` naming the argument that is malformed.

    Index ranges are checked eagerly on CPU, and with an asynchronous device-side assert on
    accelerators (no host synchronization)."""
    if rows.dim() != 2 or cols.dim() != 2:
        raise ValueError(f"info_nce: rows and cols must be 2-D (M, D) and (N, D), got "
                         f"rows {tuple(rows.shape)}, cols {tuple(cols.shape)}")
    if rows.shape[1] != cols.shape[1]:
        raise ValueError(f"info_nce: rows and cols must share the feature dim D, got "
                         f"rows {tuple(rows.shape)}, cols {tuple(cols.shape)}")
    if cols.shape[0] == 0:
        raise ValueError("info_nce: cols is empty (N = 0)")
    if not (rows.is_floating_point() and cols.is_floating_point()):
        raise TypeError(f"info_nce: rows/cols must be floating point, got {rows.dtype}, {cols.dtype}")
    if rows.dtype != cols.dtype:
        raise TypeError(f"info_nce: rows and cols must share a dtype, got {rows.dtype}, {cols.dtype}")
    if rows.device != cols.device:
        raise ValueError(f"info_nce: rows on {rows.device} but cols on {cols.device}")
    if not temperature > 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    for name, idx in (("positives", positives), ("exclude", exclude)):
        if idx is None:
            continue
        if idx.shape != (rows.shape[0],) or idx.dtype != torch.int64:
            raise ValueError(f"info_nce: {name} must be int64 of shape ({rows.shape[0]},) (one "
                             f"column per row), got {idx.dtype} {tuple(idx.shape)}")
        if idx.device != rows.device:
            raise ValueError(f"info_nce: {name} on {idx.device} but rows on {rows.device}")
        if idx.numel() == 0:
            continue
        in_range = (idx.min() >= 0) & (idx.max() < cols.shape[0])
        if idx.device.type == "cpu":
            if not bool(in_range):
                raise ValueError(f"info_nce: {name} must index columns in [0, {cols.shape[0]}), "
                                 f"got values in [{int(idx.min())}, {int(idx.max())}]")
        else:
            torch._assert_async(in_range, f"info_nce: {name} out of [0, {cols.shape[0]})")


def info_nce_reference(rows: Tensor, cols: Tensor, positives: Tensor, *, temperature: float,
                       exclude: Tensor | None = None, impl: str = "naive") -> Tensor:
    """Naive InfoNCE: materialized ``(M, N)`` logits + ``F.cross_entropy``; the baseline.

    The matmul runs in the inputs' dtype (as open_clip and most codebases do); the logits are
    then cast to float32 for the masked log-softmax. Same arguments and result as
    :func:`info_nce`; ``impl`` is accepted for a uniform signature and must be ``"naive"``.
    Memory: O(M * N) floats for the logits, their softmax and their gradient."""
    if impl != "naive":
        raise ValueError(f"info_nce_reference: impl must be 'naive', got {impl!r}")
    _check_inputs(rows, cols, positives, temperature, exclude)
    logits = (rows @ cols.T).float() / temperature
    if exclude is not None:
        logits = logits.scatter(1, exclude[:, None], float("-inf"))
    return F.cross_entropy(logits, positives, reduction="none")


def _positive_logits(rows: Tensor, cols: Tensor, positives: Tensor,
                     block_rows: int = CHUNK_ROWS) -> Tensor:
    """``(M,)`` float32 dot products ``rows_i . cols_{positives_i}``.

    Works in row blocks and picks each block's positive columns *before* converting them to
    float32, so the temporaries are ``(block_rows, D)``, never ``(N, D)``."""
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    for r0 in range(0, rows.shape[0], block_rows):
        sl = slice(r0, r0 + block_rows)
        picked = cols.index_select(0, positives[sl]).float()
        out[sl] = picked.mul_(rows[sl]).sum(-1)  # bf16 rows are upcast exactly by the product
    return out


def _mask_excluded_(s: Tensor, col0: int, exclude_t: Tensor | None) -> Tensor:
    """Set ``s[i, exclude_i - col0] = -inf`` in place where that column lies in this tile.

    Touches ``m`` entries, not the ``m x n`` tile, and never synchronizes with the device: rows
    whose excluded column is elsewhere write their own value back."""
    if exclude_t is None:
        return s
    local = exclude_t - col0
    hit = (local >= 0) & (local < s.shape[1])
    local = local.clamp(0, s.shape[1] - 1)[:, None]
    current = s.gather(1, local)
    return s.scatter_(1, local, current.masked_fill(hit[:, None], float("-inf")))


def _tile_logits(buf: Tensor, rows_t: Tensor, cols_t: Tensor, col0: int,
                 exclude_t: Tensor | None, bias: Tensor | None = None) -> Tensor:
    """float32 ``bias + rows_t @ cols_t.T`` ``(m, n)`` (rows already scaled by 1/T) written into
    the reused flat buffer ``buf`` (at least ``m * n`` floats); -inf on the excluded columns.
    ``bias`` is ``(m, 1)`` (the backward's ``-lse``) or None."""
    s = buf[:rows_t.shape[0] * cols_t.shape[0]].view(rows_t.shape[0], cols_t.shape[0])
    if bias is None:
        torch.mm(rows_t, cols_t.T, out=s)
    else:
        torch.addmm(bias, rows_t, cols_t.T, out=s)
    return _mask_excluded_(s, col0, exclude_t)


def _tile_buffer(rows: Tensor, cols: Tensor, block_rows: int, block_cols: int) -> Tensor:
    """One flat float32 buffer for every logit tile of a pass: allocated once, so the pass's
    extra memory is one tile, whatever the allocator does with freed blocks."""
    numel = min(block_rows, rows.shape[0]) * min(block_cols, cols.shape[0])
    return torch.empty(numel, dtype=torch.float32, device=rows.device)


def _chunked_lse(rows, cols, exclude, inv_t, block_rows, block_cols) -> Tensor:
    """``(M,)`` float32 log-sum-exp over the non-excluded columns: per row tile, the tiles'
    log-sum-exps combined online (``lse = logaddexp(lse, lse_tile)``)."""
    M, N = rows.shape[0], cols.shape[0]
    lse = torch.empty(M, dtype=torch.float32, device=rows.device)
    buf = _tile_buffer(rows, cols, block_rows, block_cols)
    for r0 in range(0, M, block_rows):
        rows_t = rows[r0:r0 + block_rows].float() * inv_t
        ex_t = None if exclude is None else exclude[r0:r0 + block_rows]
        acc = torch.full((rows_t.shape[0],), float("-inf"), dtype=torch.float32, device=rows.device)
        for c0 in range(0, N, block_cols):
            s = _tile_logits(buf, rows_t, cols[c0:c0 + block_cols].float(), c0, ex_t)
            m = s.amax(1, keepdim=True)
            m.masked_fill_(torch.isinf(m), 0.0)  # a row with every column excluded: -inf
            acc = torch.logaddexp(acc, s.sub_(m).exp_().sum(1).log_().add_(m.squeeze(1)))
        lse[r0:r0 + block_rows] = acc
    return lse


def _chunked_grads(rows, cols, positives, exclude, lse, g, inv_t, block_rows, block_cols,
                   d_rows: Tensor | None, d_cols: Tensor | None) -> None:
    """Add ``d rows_i = g_i (sum_j P_ij cols_j - cols_{p_i})`` into ``d_rows`` and
    ``d cols_j = sum_i g_i (P_ij - [j = p_i]) rows_i`` into ``d_cols`` (either may be None, or
    both the same buffer when rows and cols are one tensor), one row tile at a time: each tile's
    probabilities ``P = exp(s - lse)`` are recomputed into one reused buffer. Temporaries: that
    tile and a few ``(block_rows, D)`` float32 blocks."""
    buf = _tile_buffer(rows, cols, block_rows, block_cols)
    for r0 in range(0, rows.shape[0], block_rows):
        sl = slice(r0, r0 + block_rows)
        rows_f = rows[sl].float()  # a view for float32 inputs: never written
        rows_t = rows_f * inv_t
        rows_g = rows_f * g[sl, None] if d_cols is not None else None
        acc = None if d_rows is None else torch.zeros(rows_t.shape, dtype=torch.float32,
                                                      device=rows.device)
        ex_t = None if exclude is None else exclude[sl]
        neg_lse = -lse[sl, None]
        for c0 in range(0, cols.shape[0], block_cols):
            cols_t = cols[c0:c0 + block_cols].float()
            p = _tile_logits(buf, rows_t, cols_t, c0, ex_t, neg_lse).exp_()  # softmax tile
            if acc is not None:
                acc.addmm_(p, cols_t)
            if d_cols is not None:
                d_cols[c0:c0 + block_cols].addmm_(p.T, rows_g)
        if d_cols is not None:
            d_cols.index_add_(0, positives[sl], rows_g, alpha=-1.0)
        if acc is not None:
            acc.sub_(cols.index_select(0, positives[sl]).float()).mul_(g[sl, None])
            d_rows[sl] += acc


class _ChunkedInfoNCE(torch.autograd.Function):
    """Autograd function of the chunked version; saves inputs + ``(M,)`` lse, never ``M x N``.

    When ``rows`` and ``cols`` are one tensor (single-process NT-Xent) both gradients are added
    into one ``(N, D)`` float32 buffer, returned once (autograd would sum the two anyway)."""

    @staticmethod
    def forward(ctx, rows, cols, positives, exclude, temperature, block_rows, block_cols):
        inv_t = 1.0 / temperature
        with torch.no_grad():
            lse = _chunked_lse(rows, cols, exclude, inv_t, block_rows, block_cols)
            loss = lse - _positive_logits(rows, cols, positives, block_rows) * inv_t
        ctx.save_for_backward(rows, cols, positives, exclude, lse)
        ctx.cfg = (inv_t, block_rows, block_cols, rows is cols)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        rows, cols, positives, exclude, lse = ctx.saved_tensors
        inv_t, block_rows, block_cols, same = ctx.cfg
        need_rows, need_cols = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad_loss.float() * inv_t  # (M,): d loss_i / T
        d_cols = torch.zeros(cols.shape, dtype=torch.float32, device=cols.device) \
            if need_cols else None
        if same and need_cols:
            d_rows = d_cols
        else:  # each row is added once: the input dtype holds it without a float32 copy
            d_rows = torch.zeros_like(rows) if need_rows else None
        _chunked_grads(rows, cols, positives, exclude, lse, g, inv_t, block_rows, block_cols,
                       d_rows, d_cols)
        d_cols = None if d_cols is None else d_cols.to(cols.dtype)
        if same and need_cols:
            return d_cols, None, None, None, None, None, None
        return d_rows, d_cols, None, None, None, None, None


def info_nce_chunked(rows: Tensor, cols: Tensor, positives: Tensor, *, temperature: float,
                     exclude: Tensor | None = None, block_rows: int = CHUNK_ROWS,
                     block_cols: int = CHUNK_COLS) -> Tensor:
    """Chunked PyTorch InfoNCE (any device): same arguments and result as :func:`info_nce`.

    Works in ``(block_rows, block_cols)`` tiles of float32 logits written into one reused buffer.
    Extra memory (forward + backward, gradients included): that tile, the ``(N, D)`` float32
    gradient of ``cols`` (also that of ``rows`` when both are one tensor, as in single-process
    NT-Xent), the ``(M, D)`` gradient of ``rows`` otherwise, and ``(block_rows, D)`` and ``(M,)``
    temporaries: linear in ``M + N``, never ``M x N``; bf16 inputs are converted to float32 a
    tile (or a block of picked rows) at a time. Raises ``ValueError`` for non-positive tile sizes."""
    if block_rows < 1 or block_cols < 1:
        raise ValueError(f"info_nce_chunked: tile sizes must be >= 1, got {block_rows}x{block_cols}")
    _check_inputs(rows, cols, positives, temperature, exclude)
    return _ChunkedInfoNCE.apply(rows, cols, positives, exclude, float(temperature),
                                 int(block_rows), int(block_cols))


@torch.compiler.disable  # runs eagerly inside a compiled objective: loops over tiles, Triton launches
def info_nce(rows: Tensor, cols: Tensor, positives: Tensor, *, temperature: float,
             exclude: Tensor | None = None, impl: str = "auto") -> Tensor:
    """Per-row InfoNCE loss ``(M,)`` float32.

    ``loss_i = logsumexp_{j != exclude_i}(rows_i . cols_j / T) - rows_i . cols_{positives_i} / T``

    Args:
        rows: ``(M, D)`` local queries (e.g. this rank's embeddings).
        cols: ``(N, D)`` all keys (e.g. gathered over ranks with autograd); same dtype as rows.
        positives: ``(M,)`` int64, the column of each row's positive.
        temperature: ``T > 0``.
        exclude: ``(M,)`` int64 column masked out of each row's denominator (SimCLR's
            self-similarity), or ``None``. A row whose positive is its excluded column gets +inf.
        impl: ``"auto"`` (Triton on CUDA when triton is installed, chunked otherwise),
            ``"triton"``, ``"chunked"`` or ``"naive"`` (:func:`info_nce_reference`).

    Inputs are used as given (callers L2-normalize). Differentiable w.r.t. rows and cols; logits
    and accumulation are float32 and gradients are returned in the input dtypes. On CUDA the
    Triton kernels take float32 inputs through TF32 tensor-core products (logits within ~1e-3 / T;
    ``info_nce_triton(..., precision="ieee")`` for full float32) and features wider than 256
    through the chunked version (:mod:`sslscale.kernels.infonce_triton`). Raises
    ``ValueError``/``TypeError`` for malformed inputs or an unknown ``impl``, ``RuntimeError``
    for ``impl="triton"`` where Triton cannot run (no CUDA and no ``TRITON_INTERPRET=1``)."""
    if impl not in IMPLS:
        raise ValueError(f"info_nce: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        from sslscale.kernels import infonce_triton
        impl = "triton" if rows.is_cuda and infonce_triton.available() else "chunked"
    if impl == "naive":
        return info_nce_reference(rows, cols, positives, temperature=temperature, exclude=exclude)
    if impl == "chunked":
        return info_nce_chunked(rows, cols, positives, temperature=temperature, exclude=exclude)
    from sslscale.kernels.infonce_triton import info_nce_triton
    return info_nce_triton(rows, cols, positives, temperature=temperature, exclude=exclude)
