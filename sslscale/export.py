"""The encoder in Hugging Face format: gathered from the engine (ZeRO-3 included), checked, saved.

Every checkpoint carries ``encoder/`` (``config.json`` + ``model.safetensors``) that
``AutoModel.from_pretrained`` loads without sslscale. Under ZeRO-3 the parameters are
partitioned across ranks; saving ``module.state_dict()`` there writes empty tensors (DeepSpeed
#3841), so the full weights are gathered first. An export whose tensors are missing, shaped
unlike the architecture, or all zero is an error, not a folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class ExportError(RuntimeError):
    """The encoder weights to export are empty, incomplete or misshapen."""


def _prefix(objective: nn.Module, encoder: nn.Module) -> str:
    name = next(n for n, m in objective.named_modules() if m is encoder)
    return f"{name}." if name else ""


def gather_encoder_state(ds_engine, objective: nn.Module) -> dict[str, torch.Tensor] | None:
    """The encoder's full ``state_dict`` on CPU on rank 0 (None on others). Collective."""
    encoder = objective.encoder()
    if ds_engine.zero_optimization_partition_weights():
        full = ds_engine._zero3_consolidated_16bit_state_dict()  # collective; rank 0 gets it
        if full is None:
            return None
        prefix = _prefix(objective, encoder)
        return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in encoder.state_dict().items()}


def check_encoder_state(encoder: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``ExportError`` unless ``state`` has every tensor of ``encoder``'s architecture, with its
    shape, and not all of them zero."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in type(encoder)(encoder.config).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ExportError(f"encoder export lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    wrong = [(k, tuple(state[k].shape), tuple(s)) for k, s in expected.items() if state[k].shape != s]
    if wrong:
        raise ExportError(f"encoder export has misshapen tensors (name, got, expected): {wrong[:3]}")
    if all(not t.any() for t in state.values()):
        raise ExportError("encoder export is all zeros (ZeRO-3 parameters not gathered?)")


def save_encoder(encoder: nn.Module, state: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Check ``state`` and write ``out_dir`` (config.json + model.safetensors)."""
    check_encoder_state(encoder, state)
    encoder.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
    return Path(out_dir)
