"""Fused / tiled kernels of sslscale, each with a PyTorch reference it is tested against.

``info_nce``: the InfoNCE / NT-Xent loss of local rows against gathered columns, tiled so the
``M x N`` logits are never materialized (Triton on CUDA, chunked PyTorch elsewhere); see
:mod:`sslscale.kernels.infonce`. :mod:`sslscale.kernels.compile_check` compiles the Triton
kernels for an NVIDIA GPU (registers, spills, tensor-core use) on a machine without one.
"""

from sslscale.kernels.infonce import info_nce, info_nce_chunked, info_nce_reference

__all__ = ["info_nce", "info_nce_chunked", "info_nce_reference"]
