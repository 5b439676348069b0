"""The Triton programs of the tiled InfoNCE loss (forward log-sum-exp, backward d rows, d cols).

Imported lazily by :mod:`sslscale.kernels.infonce_triton`, which owns the launches, the
autograd function and the public entry point. ``@triton.jit`` decides at decoration time
whether a kernel is compiled for the GPU or run by the interpreter (``TRITON_INTERPRET=1``), so
``INTERPRETED`` records which one this import made.

Tiling follows FlashAttention (Dao et al., arXiv 2205.14135) as applied to the contrastive loss
by Inf-CL (arXiv 2410.17243): one program per ``BLOCK_M`` rows walks all columns in
``BLOCK_N`` tiles with an online log-sum-exp in base 2 (``exp2``), so only the ``(M,)``
log-sum-exp leaves the forward pass. The backward recomputes each tile's probabilities: one
kernel per row block for ``d rows`` and one per column block for ``d cols`` (no atomics, so
autotuning may rerun them). Both split the feature dim of their output in ``BLOCK_DO`` chunks.
Logits and accumulators are float32; with ``UPCAST`` the inputs are cast to float32 before
``tl.dot`` (the interpreter computes bf16 ``tl.dot`` wrongly, triton-lang/triton#11584).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tile_dot(A, B, offs_a, offs_b, NA, NB, D, stride_a, stride_b,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 ``(BLOCK_A, BLOCK_B)`` tile of ``A[offs_a] @ B[offs_b].T``, looping over D."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(A + offs_a[:, None] * stride_a + offs_k[None, :],
                    mask=(offs_a[:, None] < NA) & (offs_k[None, :] < D), other=0.0)
        b = tl.load(B + offs_b[None, :] * stride_b + offs_k[:, None],
                    mask=(offs_b[None, :] < NB) & (offs_k[:, None] < D), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _lse_fwd_kernel(R, C, EXCL, LSE, M, N, D, stride_r, stride_c, scale_log2,
                    HAS_EXCL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``LSE[i] = ln sum_{j != EXCL[i]} exp(R_i . C_j / T)``; ``scale_log2 = log2(e) / T``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    excl = tl.load(EXCL + offs_m, mask=mask_m, other=-1) if HAS_EXCL else offs_m
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _tile_dot(R, C, offs_m, offs_n, M, N, D, stride_r, stride_c,
                      UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K) * scale_log2
        valid = offs_n[None, :] < N
        if HAS_EXCL:
            valid = valid & (offs_n[None, :] != excl[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    tl.store(LSE + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mask_m)


@triton.jit
def _bwd_rows_kernel(R, C, EXCL, LSE, G, DR, M, N, D, stride_r, stride_c, stride_dr, scale_log2,
                     HAS_EXCL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_DO: tl.constexpr):
    """``DR[i, d] = sum_j G_i P_ij C[j, d]`` for one row block and one ``BLOCK_DO`` feature chunk;
    ``P_ij = exp(R_i . C_j / T - LSE_i)`` (0 on the excluded column), ``G_i = d loss_i / T``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mask_m = offs_m < M
    excl = tl.load(EXCL + offs_m, mask=mask_m, other=-1) if HAS_EXCL else offs_m
    lse2 = tl.load(LSE + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    g = tl.load(G + offs_m, mask=mask_m, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _tile_dot(R, C, offs_m, offs_n, M, N, D, stride_r, stride_c,
                      UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K) * scale_log2
        valid = offs_n[None, :] < N
        if HAS_EXCL:
            valid = valid & (offs_n[None, :] != excl[:, None])
        p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0) * g[:, None]
        c = tl.load(C + offs_n[:, None] * stride_c + offs_d[None, :],
                    mask=(offs_n[:, None] < N) & (offs_d[None, :] < D), other=0.0)
        if UPCAST:
            c = c.to(tl.float32)
        acc = tl.dot(p.to(c.dtype), c, acc, input_precision=PRECISION)
    tl.store(DR + offs_m[:, None] * stride_dr + offs_d[None, :], acc,
             mask=mask_m[:, None] & (offs_d[None, :] < D))


@triton.jit
def _bwd_cols_kernel(R, C, EXCL, LSE, G, DC, M, N, D, stride_r, stride_c, stride_dc, scale_log2,
                     HAS_EXCL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_DO: tl.constexpr):
    """``DC[j, d] = sum_i G_i P_ij R[i, d]`` for one column block and one feature chunk."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        lse2 = tl.load(LSE + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
        g = tl.load(G + offs_m, mask=mask_m, other=0.0)
        st = _tile_dot(C, R, offs_n, offs_m, N, M, D, stride_c, stride_r,
                       UPCAST, PRECISION, BLOCK_N, BLOCK_M, BLOCK_K) * scale_log2
        valid = mask_n[:, None] & mask_m[None, :]
        if HAS_EXCL:
            excl = tl.load(EXCL + offs_m, mask=mask_m, other=-1)
            valid = valid & (offs_n[:, None] != excl[None, :])
        pt = tl.where(valid, tl.exp2(st - lse2[None, :]), 0.0) * g[None, :]
        r = tl.load(R + offs_m[:, None] * stride_r + offs_d[None, :],
                    mask=mask_m[:, None] & (offs_d[None, :] < D), other=0.0)
        if UPCAST:
            r = r.to(tl.float32)
        acc = tl.dot(pt.to(r.dtype), r, acc, input_precision=PRECISION)
    tl.store(DC + offs_n[:, None] * stride_dc + offs_d[None, :], acc,
             mask=mask_n[:, None] & (offs_d[None, :] < D))
