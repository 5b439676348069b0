"""The Triton programs of the tiled InfoNCE loss (forward log-sum-exp, backward d rows, d cols).

Imported lazily by :mod:`sslscale.kernels.infonce_triton`, which owns the launches, the
autograd function and the public entry point. ``@triton.jit`` decides at decoration time
whether a kernel is compiled for the GPU or run by the interpreter (``TRITON_INTERPRET=1``), so
``INTERPRETED`` records which one this import made.

Tiling follows FlashAttention (Dao et al., arXiv 2205.14135; the Triton fused-attention
tutorial's layout) as applied to the contrastive loss by Inf-CL (arXiv 2410.17243), with the
feature dim in one block (``BLOCK_D``, a power of two >= D): a program loads its own block of
rows (or columns) once and walks the other side one tile at a time, loading each tile once for
both products of the backward, so no logit tile is ever computed twice. The column split follows
flash-decoding (Dao et al., "Flash-Decoding for long-context inference", 2023): with few local
rows (M = 256 against N = 32768 gathered columns) one program per ``BLOCK_M`` rows would fill
2-4 SMs, so the columns are cut into ``SPLIT_N``-wide ranges, one program per (row block, range):
- forward: a partial log-sum-exp per range (online, base 2, ``exp2``) into ``LSE_PART[s, i]``;
  the caller combines the ranges with ``torch.logsumexp`` over ``s``;
- backward d rows: a partial ``sum_j G_i P_ij C_j`` per range into ``DR_PART[s, i, :]``, summed
  over ``s`` by the caller (no atomics, so autotuning may rerun the kernels);
- backward d cols: one program per ``BLOCK_N`` columns walks all M rows (N >= M in every
  contrastive layout, so these programs are plentiful).
Logits and accumulators are float32; with ``UPCAST`` the inputs are cast to float32 before
``tl.dot`` (the interpreter computes bf16 ``tl.dot`` wrongly, triton-lang/triton#11584).
``PRECISION`` is ``tl.dot``'s ``input_precision`` for float32 operands ("tf32" or "ieee").
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _load_block(X, offs, n, D, stride, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(len(offs), BLOCK_D)`` block of rows ``offs`` of the row-major ``X`` (zeros past ``n``
    rows and ``D`` features), float32 with ``UPCAST``."""
    offs_d = tl.arange(0, BLOCK_D)
    x = tl.load(X + offs[:, None] * stride + offs_d[None, :],
                mask=(offs[:, None] < n) & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _lse_fwd_kernel(R, C, EXCL, LSE_PART, M, N, D, stride_r, stride_c, scale_log2, SPLIT_N,
                    HAS_EXCL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``LSE_PART[s, i] = ln sum_{j in range s, j != EXCL[i]} exp(R_i . C_j / T)`` (-inf for
    none), range ``s`` = columns ``[s * SPLIT_N, (s + 1) * SPLIT_N)``;
    ``scale_log2 = log2(e) / T``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_lo = tl.program_id(1) * SPLIT_N
    n_hi = tl.minimum(n_lo + SPLIT_N, N)
    mask_m = offs_m < M
    r = _load_block(R, offs_m, M, D, stride_r, UPCAST, BLOCK_D)
    excl = tl.load(EXCL + offs_m, mask=mask_m, other=-1) if HAS_EXCL else offs_m
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        c = _load_block(C, offs_n, n_hi, D, stride_c, UPCAST, BLOCK_D)
        s = tl.dot(r, tl.trans(c), input_precision=PRECISION) * scale_log2
        valid = offs_n[None, :] < n_hi
        if HAS_EXCL:
            valid = valid & (offs_n[None, :] != excl[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    tl.store(LSE_PART + tl.program_id(1) * M + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=mask_m)


@triton.jit
def _bwd_rows_kernel(R, C, EXCL, LSE, G, DR_PART, M, N, D, stride_r, stride_c, scale_log2,
                     SPLIT_N, HAS_EXCL: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """``DR_PART[s, i, :] = sum_{j in range s} G_i P_ij C_j`` for one row block and column range
    ``s``; ``P_ij = exp(R_i . C_j / T - LSE_i)`` (0 on the excluded column), ``G_i = d loss_i / T``.
    ``DR_PART`` is contiguous ``(S, M, D)``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_lo = tl.program_id(1) * SPLIT_N
    n_hi = tl.minimum(n_lo + SPLIT_N, N)
    mask_m = offs_m < M
    r = _load_block(R, offs_m, M, D, stride_r, UPCAST, BLOCK_D)
    excl = tl.load(EXCL + offs_m, mask=mask_m, other=-1) if HAS_EXCL else offs_m
    lse2 = tl.load(LSE + offs_m, mask=mask_m, other=0.0) * LOG2E
    g = tl.load(G + offs_m, mask=mask_m, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        c = _load_block(C, offs_n, n_hi, D, stride_c, UPCAST, BLOCK_D)
        s = tl.dot(r, tl.trans(c), input_precision=PRECISION) * scale_log2
        valid = offs_n[None, :] < n_hi
        if HAS_EXCL:
            valid = valid & (offs_n[None, :] != excl[:, None])
        p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0) * g[:, None]
        acc = tl.dot(p.to(c.dtype), c, acc, input_precision=PRECISION)
    offs_d = tl.arange(0, BLOCK_D)
    out = DR_PART + tl.program_id(1).to(tl.int64) * M * D
    tl.store(out + offs_m[:, None] * D + offs_d[None, :], acc,
             mask=mask_m[:, None] & (offs_d[None, :] < D))


@triton.jit
def _bwd_cols_kernel(R, C, EXCL, LSE, G, DC, M, N, D, stride_r, stride_c, stride_dc, scale_log2,
                     HAS_EXCL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``DC[j, :] = sum_i G_i P_ij R_i`` for one column block, over all rows."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    c = _load_block(C, offs_n, N, D, stride_c, UPCAST, BLOCK_D)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        lse2 = tl.load(LSE + offs_m, mask=mask_m, other=0.0) * LOG2E
        g = tl.load(G + offs_m, mask=mask_m, other=0.0)
        r = _load_block(R, offs_m, M, D, stride_r, UPCAST, BLOCK_D)
        st = tl.dot(c, tl.trans(r), input_precision=PRECISION) * scale_log2
        valid = mask_n[:, None] & mask_m[None, :]
        if HAS_EXCL:
            excl = tl.load(EXCL + offs_m, mask=mask_m, other=-1)
            valid = valid & (offs_n[:, None] != excl[None, :])
        pt = tl.where(valid, tl.exp2(st - lse2[None, :]), 0.0) * g[None, :]
        acc = tl.dot(pt.to(r.dtype), r, acc, input_precision=PRECISION)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(DC + offs_n[:, None] * stride_dc + offs_d[None, :], acc,
             mask=mask_n[:, None] & (offs_d[None, :] < D))
