"""Triton implementation of the tiled InfoNCE loss: launches, autotuning and autograd.

Owns :func:`info_nce_triton` (what ``info_nce(..., impl="triton")`` runs) and
:func:`available`. The programs themselves live in :mod:`sslscale.kernels._infonce_tl`
(FlashAttention / Inf-CL tiling with a flash-decoding column split, arXiv 2205.14135 and
2410.17243); this module picks their tile sizes (``triton.autotune`` on CUDA; a fixed small tile
under ``TRITON_INTERPRET=1``, where autotuning cannot run), how many column ranges to split the
columns into (enough programs for every SM), upcasts to float32 in the interpreter (its bf16
``tl.dot`` is wrong, triton-lang/triton#11584) and adds the positive-pair term in PyTorch.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

from sslscale.kernels.infonce import _check_inputs, _positive_logits, info_nce_chunked

LOG2E = 1.4426950408889634
# Tile used under the interpreter (and by default when a config is forced): small, so that
# tests on CPU exercise several tiles and the column split at tiny shapes.
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "SPLIT_N": 64}
MAX_D = 256  # widest feature dim the kernels hold in one block; wider runs the chunked version
MIN_SPLIT_N = 256  # fewest columns per program of the column split (2-8 tiles of BLOCK_N)
PRECISIONS = ("tf32", "ieee")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TUNED: dict[tuple, object] = {}


def available() -> bool:
    """Whether the ``triton`` package is importable (does not import it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set (kernels run on CPU tensors, in numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    """The kernel module. ``RuntimeError`` if ``TRITON_INTERPRET`` differs from when triton was
    first imported: triton decorates its own library (``tl.max``, ``tl.sum``) at import, so
    interpreted kernels cannot run in a process whose triton was imported compiled (torch may
    import triton early: set the variable before starting Python)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from sslscale.kernels import _infonce_tl

    library_interpreted = isinstance(tl.max, InterpretedFunction)
    if not library_interpreted == _infonce_tl.INTERPRETED == interpreting():
        raise RuntimeError(
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} now, but triton was "
            f"imported {'with' if library_interpreted else 'without'} it: set it before Python "
            "starts (the Triton InfoNCE kernels run interpreted only in such a process)")
    return _infonce_tl


def block_d(D: int) -> int:
    """The feature block of the kernels: D rounded up to a power of two, at least 16."""
    return max(16, 1 << (D - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_cols(M: int, N: int, device: torch.device) -> int:
    """Columns per program of the column split (``SPLIT_N``). On CUDA, when the row blocks
    (counted at the largest tile, 128 rows) are fewer than the SMs: enough column ranges for ~2
    programs per SM, each a multiple of 128 columns and at least ``MIN_SPLIT_N`` wide. All of N
    (no split) otherwise and off CUDA."""
    row_programs = _cdiv(M, 128)
    if device.type != "cuda" or row_programs >= _num_sms(device.index or 0):
        return N
    splits = max(1, min(_cdiv(2 * _num_sms(device.index or 0), row_programs), N // MIN_SPLIT_N))
    return _cdiv(_cdiv(N, splits), 128) * 128


# (BLOCK_M, BLOCK_N, num_warps) autotuned on CUDA per kernel and feature block; chosen so that
# none spills registers on sm_90 with bf16 inputs (Triton 3.9, ``python -m
# sslscale.kernels.compile_check``): the row block and, in the backward, its (BLOCK, BLOCK_D)
# float32 accumulator stay in registers. A few spill a little with float32 (TF32) inputs.
TUNE_TILES = {
    "fwd": {64: [(64, 64, 4), (128, 64, 8), (128, 128, 8), (64, 128, 4)],
            128: [(64, 64, 4), (128, 64, 8), (128, 128, 8), (64, 128, 8)],
            256: [(64, 64, 4), (128, 64, 8), (64, 128, 8), (128, 32, 8)]},
    "rows": {64: [(64, 64, 4), (128, 64, 8), (64, 128, 4), (128, 32, 4)],
             128: [(64, 64, 4), (128, 64, 8), (64, 128, 8), (64, 32, 4)],
             256: [(64, 32, 8), (32, 64, 8), (32, 32, 4), (64, 16, 8)]},
    "cols": {64: [(64, 64, 4), (64, 128, 8), (128, 64, 4), (32, 128, 4)],
             128: [(64, 64, 4), (64, 128, 8), (32, 64, 4), (32, 128, 8)],
             256: [(64, 64, 8), (32, 64, 8), (64, 32, 8), (128, 32, 8)]},
}


def _tuned(name: str, d_block: int, fp32: bool):
    """The autotuned wrapper of kernel ``name`` for feature block ``d_block`` (CUDA only:
    autotuning needs a driver). Float32 operands take twice the shared memory per pipeline
    stage: their forward pipelines 2 stages instead of 3 (configs that still exceed the GPU's
    shared memory fail to launch and are skipped by the autotuner)."""
    import triton

    mod = _kernels()
    key = (id(mod), name, d_block, fp32)
    if key not in _TUNED:
        tiles = TUNE_TILES[name][max(64, d_block)]
        stages = 3 if name == "fwd" and not fp32 else 2
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=stages)
                   for m, n, w in tiles]
        kernel = {"fwd": mod._lse_fwd_kernel, "rows": mod._bwd_rows_kernel,
                  "cols": mod._bwd_cols_kernel}[name]
        _TUNED[key] = triton.autotune(configs, key=["M", "N", "D"])(kernel)
    return _TUNED[key]


def _launch(name: str, args: tuple, flags: dict, config: dict | None, M: int, N: int,
            splits: int):
    """Launch kernel ``name`` ("fwd", "rows", "cols") over its grid with ``config`` or autotune.
    ``flags``: the compile-time flags (``BLOCK_D`` included)."""
    import triton

    def grid(meta):
        if name == "cols":
            return (triton.cdiv(N, meta["BLOCK_N"]),)
        return (triton.cdiv(M, meta["BLOCK_M"]), splits)

    if config is None and not interpreting():
        _tuned(name, flags["BLOCK_D"], args[0].dtype == torch.float32)[grid](*args, **flags)
        return
    cfg = {k: v for k, v in (INTERPRET_CONFIG if config is None else config).items()
           if k in ("BLOCK_M", "BLOCK_N")}
    mod = _kernels()
    kernel = {"fwd": mod._lse_fwd_kernel, "rows": mod._bwd_rows_kernel,
              "cols": mod._bwd_cols_kernel}[name]
    kernel[grid(cfg)](*args, **flags, **cfg)


def _plan(rows: Tensor, cols: Tensor, config: dict | None, precision: str | None,
          has_exclude: bool) -> tuple[dict, int]:
    """(compile-time flags, ``SPLIT_N``) of one call."""
    (M, D), N = rows.shape, cols.shape[0]
    forced = INTERPRET_CONFIG if config is None and interpreting() else (config or {})
    if precision is None:  # float32 operands only; interpreted dot products are exact anyway
        precision = "ieee" if interpreting() else "tf32"
    flags = {"HAS_EXCL": has_exclude, "UPCAST": interpreting() and rows.dtype != torch.float32,
             "PRECISION": precision, "BLOCK_D": block_d(D)}
    return flags, max(1, int(forced.get("SPLIT_N", split_cols(M, N, rows.device))))


class _TritonInfoNCE(torch.autograd.Function):
    """Forward: Triton partial log-sum-exps ``(S, M)``, combined; backward: Triton ``d rows``
    (partial sums ``(S, M, D)`` over the column ranges, summed) and ``d cols``."""

    @staticmethod
    def forward(ctx, rows, cols, positives, exclude, temperature, config, precision):
        M, D = rows.shape
        N = cols.shape[0]
        flags, split_n = _plan(rows, cols, config, precision, exclude is not None)
        splits = _cdiv(N, split_n)
        part = torch.empty(splits, M, dtype=torch.float32, device=rows.device)
        excl = exclude if exclude is not None else positives  # unread when HAS_EXCL is False
        _launch("fwd", (rows, cols, excl, part, M, N, D, rows.stride(0), cols.stride(0),
                        LOG2E / temperature, split_n), flags, config, M, N, splits)
        with torch.no_grad():
            lse = part[0] if splits == 1 else torch.logsumexp(part, dim=0)
            loss = lse - _positive_logits(rows, cols, positives) / temperature
        ctx.save_for_backward(rows, cols, positives, excl, lse)
        ctx.cfg = (temperature, config, flags, split_n)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        rows, cols, positives, excl, lse = ctx.saved_tensors
        temperature, config, flags, split_n = ctx.cfg
        M, D = rows.shape
        N = cols.shape[0]
        splits = _cdiv(N, split_n)
        g = (grad_loss.float() / temperature).contiguous()
        common = (rows, cols, excl, lse, g)
        d_rows = d_cols = None
        if ctx.needs_input_grad[0]:
            part = torch.empty(splits, M, D, dtype=torch.float32, device=rows.device)
            _launch("rows", (*common, part, M, N, D, rows.stride(0), cols.stride(0),
                             LOG2E / temperature, split_n), flags, config, M, N, splits)
            d_rows = part[0] if splits == 1 else part.sum(0)
            d_rows -= cols.index_select(0, positives).float() * g[:, None]
            d_rows = d_rows.to(rows.dtype)
        if ctx.needs_input_grad[1]:
            d_cols = torch.empty(N, D, dtype=torch.float32, device=cols.device)
            _launch("cols", (*common, d_cols, M, N, D, rows.stride(0), cols.stride(0),
                             d_cols.stride(0), LOG2E / temperature), flags, config, M, N, 1)
            d_cols.index_add_(0, positives, rows.float() * g[:, None], alpha=-1.0)
            d_cols = d_cols.to(cols.dtype)
        return d_rows, d_cols, None, None, None, None, None


def info_nce_triton(rows: Tensor, cols: Tensor, positives: Tensor, *, temperature: float,
                    exclude: Tensor | None = None, config: dict | None = None,
                    precision: str | None = None) -> Tensor:
    """Triton InfoNCE: same arguments and result as :func:`sslscale.kernels.info_nce`.

    ``config`` forces the tiles instead of autotuning on CUDA: ``BLOCK_M``, ``BLOCK_N`` (powers
    of two >= 16) and optionally ``SPLIT_N`` (columns per program of the column split, default
    :func:`split_cols`); under the interpreter the default is ``INTERPRET_CONFIG``. Features
    wider than ``MAX_D`` (256) run :func:`info_nce_chunked` instead: the kernels hold a block of
    rows with all its features, and their float32 gradient accumulator, in registers.

    Precision: bfloat16 / float16 inputs go to the tensor cores as they are (probabilities are
    cast to the input dtype for the backward's second product, as FlashAttention does), with
    float32 logits, log-sum-exp and accumulators. Float32 inputs use ``tl.dot`` with
    ``input_precision=precision``: ``"tf32"`` by default on CUDA (operands rounded to 10 mantissa
    bits, float32 accumulation: the tensor cores, ~8x the ``"ieee"`` rate on H100; logits off by
    up to ~1e-3 / T, as with ``torch.backends.cuda.matmul.allow_tf32``), ``"ieee"`` for full
    float32 products (the default under the interpreter, whose products are exact anyway).

    Memory beyond the inputs and gradients: ``(S, M)`` partial log-sum-exps and ``(S, M, D)``
    float32 partial row gradients, ``S = cdiv(N, SPLIT_N)`` column ranges (``S * M`` stays near
    ``max(M, 256 x SMs)``). Raises ``RuntimeError`` if triton is missing or the inputs are not
    on CUDA outside ``TRITON_INTERPRET=1``, ``TypeError`` for other dtypes, ``ValueError`` for
    an unknown ``precision``, and what :func:`info_nce` raises for malformed inputs."""
    _check_inputs(rows, cols, positives, temperature, exclude)
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"info_nce_triton: precision must be one of {PRECISIONS}, "
                         f"got {precision!r}")
    if not available():
        raise RuntimeError("info_nce(impl='triton') needs the triton package: "
                           "pip install 'sslscale[kernels]'")
    if not rows.is_cuda and not interpreting():
        raise RuntimeError(f"info_nce(impl='triton') needs CUDA tensors (got {rows.device}); "
                           "set TRITON_INTERPRET=1 to run the kernels on CPU, or use impl='chunked'")
    if rows.dtype not in _DTYPES:
        raise TypeError(f"info_nce(impl='triton') supports {_DTYPES}, got {rows.dtype}")
    if rows.shape[0] == 0 or rows.shape[1] > MAX_D:
        return info_nce_chunked(rows, cols, positives, temperature=temperature, exclude=exclude)
    return _TritonInfoNCE.apply(rows.contiguous(), cols.contiguous(), positives.contiguous(),
                                None if exclude is None else exclude.contiguous(),
                                float(temperature), config, precision)
