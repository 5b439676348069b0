"""The DeepSpeed engine: the one place that builds the DeepSpeed config and calls
``deepspeed.initialize``.

Owns the mapping of sslscale's batch sizes to DeepSpeed's (``global_batch_size`` ->
``train_batch_size``, ``micro_batch_size`` -> ``train_micro_batch_size_per_gpu``,
``grad_accum_steps`` -> ``gradient_accumulation_steps``), the precision (bf16 on CUDA, fp32 on
CPU, an error for fp16 on CPU), ZeRO stage 0-3, gradient clipping, torch's fused AdamW with decay / no-decay parameter groups, and writing the
scheduled learning rate and weight decay into the optimizer before each step. Loading a DeepSpeed
checkpoint, universal ones included (``load_checkpoint``), goes through here too.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from sslscale.config import ConfigError, grad_accum_steps
from sslscale.schedules import lr_at, weight_decay_at


def resolve_precision(requested: str, device_type: str) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere. ``ConfigError`` for fp16 off CUDA."""
    if requested == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if requested == "fp16" and device_type != "cuda":
        raise ConfigError(f"key 'train.precision' = 'fp16' is not supported on {device_type} "
                          "(DeepSpeed has no fp16 there); use fp32 or bf16")
    return requested


def build_ds_config(cfg, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run; ``cfg.deepspeed.extra`` is merged in last."""
    ds = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, world_size),
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": {"stage": int(cfg.deepspeed.zero_stage)},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # torch's fused AdamW on CPU under ZeRO
        "steps_per_print": 2**31 - 1,  # sslscale.metrics does the logging
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.zero_stage == 3:
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    for key, value in dict(cfg.deepspeed.extra).items():
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    return ds


def param_groups(model: nn.Module, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: weights (decayed) and biases / norms / tokens (1-D, not decayed), each
    carrying ``wd_scale`` (1.0 or 0.0) and ``lr_scale``, read by ``apply_schedules``.

    With ``layer_decay < 1`` and a model that numbers its parameters (``layer_id(name)`` and
    ``num_layers``, as ``ClassifyObjective``), layer-wise lr decay (BEiT, arXiv 2106.08254; MAE
    fine-tuning): a parameter of layer ``i`` gets ``lr_scale = layer_decay ** (num_layers + 1 -
    i)``, one pair of groups per layer. Otherwise ``lr_scale`` is 1 and there are two groups. A
    model with ``lr_scale_of(name) -> float`` multiplies a parameter's ``lr_scale`` by it (one
    pair of groups per distinct scale)."""
    numbered = layer_decay < 1.0 and hasattr(model, "layer_id")
    own_scale = getattr(model, "lr_scale_of", None)  # e.g. wav2vec2's feature encoder
    groups: dict[tuple[int, float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decayed = not (p.ndim <= 1 or name.endswith(".bias"))
        scale = own_scale(name) if own_scale is not None else 1.0
        groups.setdefault((model.layer_id(name) if numbered else 0, scale, decayed), []).append(p)
    top = model.num_layers + 1 if numbered else 0
    return [{"params": params, "wd_scale": 1.0 if decayed else 0.0,
             "lr_scale": (layer_decay ** (top - layer) if numbered else 1.0) * scale}
            for (layer, scale, decayed), params in sorted(groups.items(),
                                                          key=lambda kv: (kv[0][0], -kv[0][1], not kv[0][2]))]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """torch's fused AdamW (``fused=True``: one multi-tensor kernel, on CUDA and CPU) with
    ``param_groups``. Not DeepSpeed's FusedAdam: that one compiles with nvcc on first use and
    fails on images without a CUDA toolkit; torch's needs no build and honours ``found_inf``
    (``Engine.backward_step``)."""
    return torch.optim.AdamW(param_groups(model, cfg.optim.layer_decay), fused=True, lr=cfg.optim.lr,
                             betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             weight_decay=cfg.optim.weight_decay)


def apply_schedules(optimizer: torch.optim.Optimizer, step: int, cfg,
                    peak_lr: float | None = None) -> dict[str, float]:
    """Write the lr (times each group's ``lr_scale``) and weight decay (times ``wd_scale``) for
    optimizer step ``step`` into every param group; returns the unscaled ``{"lr", "weight_decay"}``.
    ``peak_lr`` replaces ``optim.lr`` (a network of several with its own learning rate)."""
    lr = lr_at(step, lr=cfg.optim.lr if peak_lr is None else peak_lr, max_steps=cfg.train.max_steps,
               warmup_steps=cfg.optim.warmup_steps, min_lr=cfg.optim.min_lr)
    wd = weight_decay_at(step, weight_decay=cfg.optim.weight_decay, max_steps=cfg.train.max_steps,
                         weight_decay_end=cfg.optim.weight_decay_end)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = wd * group.get("wd_scale", 1.0)
    return {"lr": lr, "weight_decay": wd}


@dataclass
class Engine:
    """A DeepSpeed engine with what the trainer needs beside it.

    ``ds``: the ``DeepSpeedEngine`` (forward / backward / step / save / load); ``optimizer``: the
    torch optimizer it wraps (its param groups take the schedules); ``module``: the objective.
    """

    ds: Any
    optimizer: torch.optim.Optimizer
    precision: str
    ds_config: dict[str, Any]
    hf_ds_config: Any = None  # kept alive for ZeRO-3: transformers consults it while building
    _own_grad_norm: float | None = None
    own_skipped_steps: int = 0  # ZeRO stage 0 fp32: steps skipped by backward_step's own check

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device

    @property
    def grad_accum_steps(self) -> int:
        return self.ds.gradient_accumulation_steps()

    def backward_step(self, loss: torch.Tensor) -> bool | None:
        """Backward one micro-batch and let DeepSpeed accumulate / step at the boundary.

        Returns None inside the accumulation, else whether the optimizer step was applied:
        False when it was skipped for non-finite gradients (no weight or optimizer-state change),
        which every rank decides alike. DeepSpeed's ZeRO and bf16 optimizers skip such steps
        themselves (``skipped_steps``). Plain fp32 data parallelism (ZeRO stage 0) has no such
        check: the global norm is taken here (gradients are already all-reduced, so every rank
        gets the same) and a non-finite one skips the step through the fused AdamW's
        ``found_inf`` (as ``torch.amp.GradScaler`` does). Its ``.item()`` is this path's one
        host sync per optimizer step."""
        self.ds.backward(loss)
        boundary = self.ds.is_gradient_accumulation_boundary()
        skipped_before = getattr(self.ds, "skipped_steps", 0)
        own_check = boundary and self.precision == "fp32" and self.ds.zero_optimization_stage() == 0
        if own_check:
            grads = [p.grad for p in self.ds.module.parameters() if p.grad is not None]
            self._own_grad_norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()
            if not math.isfinite(self._own_grad_norm):
                self.optimizer.found_inf = torch.ones((), device=grads[0].device)
        try:
            self.ds.step()
        finally:
            if own_check and hasattr(self.optimizer, "found_inf"):
                del self.optimizer.found_inf
        if not boundary:
            return None
        if own_check:
            applied = math.isfinite(self._own_grad_norm)
            self.own_skipped_steps += not applied
            return applied
        return getattr(self.ds, "skipped_steps", 0) == skipped_before

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite gradients (DeepSpeed's count, or this
        engine's own on ZeRO stage 0 fp32), this process's run."""
        return int(getattr(self.ds, "skipped_steps", 0)) + self.own_skipped_steps

    def grad_norm(self) -> float:
        """Global gradient norm (before clipping) of the last optimizer step; NaN if unknown."""
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            norm = self._own_grad_norm
        return float("nan") if norm is None else float(norm)


def init_distributed(timeout_s: float = 600) -> None:
    """Join the process group described by RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
    (gloo on CPU, nccl on CUDA); ``launcher.env`` sets them for a single process. A collective
    (and the rendezvous) that waits longer than ``timeout_s`` (``dist.timeout_s``) fails instead
    of hanging; on NCCL the watchdog then aborts the communicator."""
    import datetime

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from sslscale.metrics import filter_known_warnings
    filter_known_warnings()  # DeepSpeed's 100+ torch deprecation lines per run, once per rank
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   verbose=False, timeout=datetime.timedelta(seconds=timeout_s))


def build_engine(cfg, world_size: int, build_model: Callable[[], nn.Module]) -> Engine:
    """Build the objective with ``build_model()`` and wrap it in a DeepSpeed engine (an objective
    with several ``networks()``: an ``sslscale.engine_set.EngineSet``, one engine per network).

    Raises ``ConfigError`` for batch sizes that do not divide or fp16 on CPU.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    device_type = accel.device_name()
    if device_type == "cuda":
        accel.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    precision = resolve_precision(cfg.train.precision, device_type)
    ds_config = build_ds_config(cfg, world_size, precision)
    hf_ds_config = None
    if cfg.deepspeed.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig
        hf_ds_config = HfDeepSpeedConfig(ds_config)  # partitions the model as it is built
    model = build_model()
    if hasattr(model, "networks"):  # several networks (a GAN): one engine each
        from sslscale.engine_set import build_engine_set
        return build_engine_set(cfg, world_size, model, precision, ds_config)
    optimizer = build_optimizer(model, cfg)
    ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                       dist_init_required=False)
    if world_size == 1 and cfg.deepspeed.zero_stage == 0:
        # One rank, no ZeRO: nothing to average, but DeepSpeed would still flatten every gradient,
        # "all-reduce" it over the one rank and copy it back at each boundary (bench/
        # step_overhead.py's profile: the largest piece of its own time in the demo step). The
        # result is the same bit for bit (a sum over one rank, divided by 1).
        ds.enable_backward_allreduce = False
    if cfg.train.compile:  # the objective's forward (augmentation, model, loss); dynamic shapes
        ds.compile(backend=cfg.train.compile_backend, compile_kwargs={"dynamic": None})
    return Engine(ds=ds, optimizer=optimizer, precision=precision, ds_config=ds_config,
                  hf_ds_config=hf_ds_config)


def load_checkpoint(ds_engine, folder: Path, universal: bool = False) -> tuple[str | None, dict[str, Any]]:
    """``ds_engine.load_checkpoint`` of checkpoint ``folder`` (a ``step-*`` tag folder).

    With ``universal`` the folder is a DeepSpeed universal checkpoint (``ds_to_universal``
    output), loaded on any world size. DeepSpeed reads ``"checkpoint": {"load_universal": true}``
    from the engine's parsed config at load time only, so it is switched on for this one call:
    the engine is built before the run knows which checkpoint it resumes, and later loads of
    its own checkpoints (a rollback) must use the regular format. Returns DeepSpeed's
    ``(load_path, client_state)``; raises ``RuntimeError`` if this DeepSpeed has no such setting.
    """
    config = ds_engine._config
    if not hasattr(config, "load_universal_checkpoint"):
        import deepspeed
        raise RuntimeError(f"DeepSpeed {deepspeed.__version__} has no universal checkpoint loading "
                           "('checkpoint.load_universal'); resume on the world size that saved it")
    groups = ds_engine.optimizer.param_groups
    scales = [(g.get("wd_scale", 1.0), g.get("lr_scale", 1.0)) for g in groups]
    before, config.load_universal_checkpoint = config.load_universal_checkpoint, bool(universal)
    try:
        result = ds_engine.load_checkpoint(str(folder.parent), tag=folder.name)
    finally:
        config.load_universal_checkpoint = before
    if universal:
        _repair_universal_zero3(ds_engine.optimizer, scales)
    return result


def _repair_universal_zero3(zero_optimizer, scales: list[tuple[float, float]]) -> None:
    """Undo two slips of ZeRO-3's universal loading (DeepSpeed 0.19.8,
    ``stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``); no-ops for ZeRO-1/2.

    It copies param group 0's settings into every group, so biases and norms would get weight
    decay: each group's ``wd_scale`` and ``lr_scale`` (this run's choices, not checkpoint state)
    are put back. And it
    gives every sub-group the *same* ``step`` tensor, which the fused AdamW then increments once
    per sub-group per step, skewing Adam's bias correction: each state gets its own copy.
    """
    for group, (wd_scale, lr_scale) in zip(zero_optimizer.param_groups, scales):
        group["wd_scale"], group["lr_scale"] = wd_scale, lr_scale
    for state in zero_optimizer.optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
