"""Triton implementation of the tiled InfoNCE loss: launches, autotuning and autograd.

Owns :func:`info_nce_triton` (what ``info_nce(..., impl="triton")`` runs) and
:func:`available`. The programs themselves live in :mod:`sslscale.kernels._infonce_tl`
(FlashAttention / Inf-CL tiling, arXiv 2205.14135 and 2410.17243); this module picks their tile
sizes (``triton.autotune`` on CUDA; a fixed small tile under ``TRITON_INTERPRET=1``, where
autotuning cannot run), upcasts to float32 in the interpreter (its bf16 ``tl.dot`` is wrong,
triton-lang/triton#11584) and adds the positive-pair term in PyTorch.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from sslscale.kernels.infonce import _check_inputs, _positive_logits, info_nce_chunked

LOG2E = 1.4426950408889634
# Tile used under the interpreter (and by default when a config is forced): small, so that
# tests on CPU exercise several tiles and the feature-dim split at tiny shapes.
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_DO": 32}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TUNED: dict[tuple[int, str], object] = {}


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


def _tuned(name: str):
    """The autotuned wrapper of kernel ``name`` (CUDA only: autotuning needs a driver)."""
    import triton

    mod = _kernels()
    key = (id(mod), name)
    if key not in _TUNED:
        if name == "fwd":
            tiles = [(64, 64, 64), (128, 64, 64), (64, 128, 64), (128, 128, 64), (128, 128, 32)]
            configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w,
                                     num_stages=s)
                       for m, n, k in tiles for w, s in ((4, 3), (8, 3))]
            kernel = mod._lse_fwd_kernel
        else:
            tiles = [(64, 64, 64, 64), (64, 64, 64, 128), (128, 64, 64, 128), (64, 128, 64, 128),
                     (64, 64, 64, 256), (32, 64, 64, 256)]
            configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "BLOCK_DO": d},
                                     num_warps=w, num_stages=s)
                       for m, n, k, d in tiles for w, s in ((4, 2), (8, 2))]
            kernel = mod._bwd_rows_kernel if name == "rows" else mod._bwd_cols_kernel
        _TUNED[key] = triton.autotune(configs, key=["M", "N", "D"])(kernel)
    return _TUNED[key]


def _launch(name: str, args: tuple, flags: dict, config: dict | None, M: int, N: int, D: int):
    """Launch kernel ``name`` ("fwd", "rows", "cols") over its grid with ``config`` or autotune."""
    import triton

    def grid(meta):
        if name == "fwd":
            return (triton.cdiv(M, meta["BLOCK_M"]),)
        outer = meta["BLOCK_M"] if name == "rows" else meta["BLOCK_N"]
        return (triton.cdiv(M if name == "rows" else N, outer), triton.cdiv(D, meta["BLOCK_DO"]))

    if config is None and not interpreting():
        _tuned(name)[grid](*args, **flags)
        return
    cfg = dict(INTERPRET_CONFIG if config is None else config)
    if name == "fwd":
        cfg.pop("BLOCK_DO", None)
    mod = _kernels()
    kernel = {"fwd": mod._lse_fwd_kernel, "rows": mod._bwd_rows_kernel,
              "cols": mod._bwd_cols_kernel}[name]
    kernel[grid(cfg)](*args, **flags, **cfg)


def _flags(dtype: torch.dtype, has_exclude: bool) -> dict:
    """Compile-time flags: exclusion, float32 upcast (interpreter), tl.dot fp32 precision."""
    tf32 = dtype == torch.float32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32
    return {"HAS_EXCL": has_exclude, "UPCAST": interpreting() and dtype != torch.float32,
            "PRECISION": "tf32" if tf32 else "ieee"}


class _TritonInfoNCE(torch.autograd.Function):
    """Forward: Triton log-sum-exp ``(M,)``; backward: Triton ``d rows`` and ``d cols``."""

    @staticmethod
    def forward(ctx, rows, cols, positives, exclude, temperature, config):
        M, D = rows.shape
        N = cols.shape[0]
        lse = torch.empty(M, dtype=torch.float32, device=rows.device)
        excl = exclude if exclude is not None else positives  # unread when HAS_EXCL is False
        flags = _flags(rows.dtype, exclude is not None)
        _launch("fwd", (rows, cols, excl, lse, M, N, D, rows.stride(0), cols.stride(0),
                        LOG2E / temperature), flags, config, M, N, D)
        with torch.no_grad():
            loss = lse - _positive_logits(rows, cols, positives) / temperature
        ctx.save_for_backward(rows, cols, positives, excl, lse)
        ctx.cfg = (temperature, config, flags)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        rows, cols, positives, excl, lse = ctx.saved_tensors
        temperature, config, flags = ctx.cfg
        M, D = rows.shape
        N = cols.shape[0]
        g = (grad_loss.float() / temperature).contiguous()
        common = (rows, cols, excl, lse, g)
        d_rows = d_cols = None
        if ctx.needs_input_grad[0]:
            d_rows = torch.empty(M, D, dtype=torch.float32, device=rows.device)
            _launch("rows", (*common, d_rows, M, N, D, rows.stride(0), cols.stride(0),
                             d_rows.stride(0), LOG2E / temperature), flags, config, M, N, D)
            d_rows.sub_(cols.float().index_select(0, positives) * g[:, None])
            d_rows = d_rows.to(rows.dtype)
        if ctx.needs_input_grad[1]:
            d_cols = torch.empty(N, D, dtype=torch.float32, device=cols.device)
            _launch("cols", (*common, d_cols, M, N, D, rows.stride(0), cols.stride(0),
                             d_cols.stride(0), LOG2E / temperature), flags, config, M, N, D)
            d_cols.index_add_(0, positives, rows.float() * g[:, None], alpha=-1.0)
            d_cols = d_cols.to(cols.dtype)
        return d_rows, d_cols, None, None, None, None


def info_nce_triton(rows: Tensor, cols: Tensor, positives: Tensor, *, temperature: float,
                    exclude: Tensor | None = None, config: dict | None = None) -> Tensor:
    """Triton InfoNCE: same arguments and result as :func:`sslscale.kernels.info_nce`.

    ``config`` forces the tiles (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``BLOCK_DO``: powers of
    two >= 16) instead of autotuning on CUDA; under the interpreter the default is
    ``INTERPRET_CONFIG``. Inputs float32, bfloat16 or float16. Raises ``RuntimeError`` if triton
    is missing or the inputs are not on CUDA outside ``TRITON_INTERPRET=1``, ``TypeError`` for
    other dtypes, and what :func:`info_nce` raises for malformed inputs."""
    _check_inputs(rows, cols, positives, temperature, exclude)
    if not available():
        raise RuntimeError("info_nce(impl='triton') needs the triton package: "
                           "pip install 'sslscale[kernels]'")
    if not rows.is_cuda and not interpreting():
        raise RuntimeError(f"info_nce(impl='triton') needs CUDA tensors (got {rows.device}); "
                           "set TRITON_INTERPRET=1 to run the kernels on CPU, or use impl='chunked'")
    if rows.dtype not in _DTYPES:
        raise TypeError(f"info_nce(impl='triton') supports {_DTYPES}, got {rows.dtype}")
    if rows.shape[0] == 0:
        return info_nce_chunked(rows, cols, positives, temperature=temperature, exclude=exclude)
    return _TritonInfoNCE.apply(rows.contiguous(), cols.contiguous(), positives.contiguous(),
                                None if exclude is None else exclude.contiguous(),
                                float(temperature), config)
