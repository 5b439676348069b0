"""Several DeepSpeed engines for one objective: a GAN's discriminator and generator.

An objective with ``networks()`` (``{name: submodule}``, e.g. ``sslscale.objectives.adversarial``)
gets one DeepSpeed engine per network, each with its own torch AdamW (``engine.build_optimizer``)
and peak learning rate (the objective's ``lr[name]``, else ``optim.lr``; the same warm-up and
cosine schedule, a pure function of the trainer's step), the same DeepSpeed config (ZeRO stage,
precision, batch sizes, clipping) and the same data-parallel group. ZeRO 0-2 only: ZeRO-3 would
partition the parameters that the objective's losses call directly.

``EngineSet`` stands where the trainer and ``sslscale.checkpoint`` expect one engine (``ds``,
``module``, ``device``, ``save_checkpoint``, ...). One checkpoint holds every engine:
``step-XXXXXXXX/<name>/`` is that network's DeepSpeed checkpoint (each with the client state),
under the one completion marker; ``sslscale.checkpoint.load`` loads each, on another world size
through its own universal checkpoint (elastic resume). The objective's losses call the networks'
modules directly (not through ``DeepSpeedEngine.forward``); ``only(name)`` makes only that
network's parameters require gradients while it steps, so a loss that runs through another
network (the generator's, through the discriminator) leaves that one's gradients (and ZeRO's
gradient hooks and buckets) untouched.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from torch import nn

from sslscale.config import ConfigError


class EngineSet:
    """``engines``: ``{name: sslscale.engine.Engine}`` in the objective's ``networks()`` order;
    ``objective``: the module holding the networks (``module``)."""

    def __init__(self, engines: dict[str, Any], objective: nn.Module, peak_lr: dict[str, float | None]):
        self.engines, self.objective, self.peak_lr = engines, objective, peak_lr
        first = next(iter(engines.values()))
        self.precision, self.ds_config = first.precision, first.ds_config

    # --- what the trainer reads of an Engine
    @property
    def ds(self) -> "EngineSet":  # checkpoint.save / load take it as they take a DeepSpeedEngine
        return self

    @property
    def module(self) -> nn.Module:
        return self.objective

    @property
    def device(self) -> torch.device:
        return next(iter(self.engines.values())).device

    @property
    def grad_accum_steps(self) -> int:
        return next(iter(self.engines.values())).grad_accum_steps

    @property
    def skipped_steps(self) -> int:
        return sum(e.skipped_steps for e in self.engines.values())

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The main network's optimizer (each engine has its own)."""
        return self.engines[self.main()].optimizer

    def main(self) -> str:
        """The network whose step logs ``train/loss`` (the last phase's: the generator)."""
        return self.objective.phases()[-1].network

    def grad_norm(self) -> float:
        return self.engines[self.main()].grad_norm()

    def apply_schedules(self, step: int, cfg) -> dict[str, float]:
        """Each engine's lr and weight decay for ``step``; returns the main network's as
        ``lr`` / ``weight_decay`` and every other's lr as ``<name>_lr``."""
        from sslscale.engine import apply_schedules

        out = {}
        for name, engine in self.engines.items():
            hparams = apply_schedules(engine.optimizer, step, cfg, peak_lr=self.peak_lr.get(name))
            if name == self.main():
                out.update(hparams)
            else:
                out[f"{name}_lr"] = hparams["lr"]
        return out

    def log_metrics(self) -> dict[str, float]:
        """``train/<name>_grad_norm`` of the networks other than the main one."""
        return {f"train/{name}_grad_norm": e.grad_norm() for name, e in self.engines.items()
                if name != self.main()}

    @contextlib.contextmanager
    def only(self, name: str) -> Iterator[None]:
        """Within: only network ``name``'s parameters require gradients."""
        frozen = [p for other, e in self.engines.items() if other != name
                  for p in e.module.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    # --- what sslscale.checkpoint calls on a DeepSpeedEngine
    def zero_optimization_stage(self) -> int:
        return next(iter(self.engines.values())).ds.zero_optimization_stage()

    def zero_optimization_partition_weights(self) -> bool:
        return False  # ZeRO-3 is refused (build_engine_set)

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool = False) -> None:
        """Every engine into ``save_dir/tag/<name>/`` (collective)."""
        for name, engine in self.engines.items():
            engine.ds.save_checkpoint(os.path.join(save_dir, tag), tag=name, client_state=client_state,
                                      save_latest=False)


def build_engine_set(cfg, world_size: int, objective: nn.Module, precision: str,
                     ds_config: dict[str, Any]) -> EngineSet:
    """One DeepSpeed engine per ``objective.networks()``; ``ConfigError`` for ZeRO-3 or
    ``train.compile``."""
    import deepspeed

    from sslscale.engine import Engine, build_optimizer

    if cfg.deepspeed.zero_stage == 3:
        raise ConfigError(f"key 'deepspeed.zero_stage' = 3: objective '{cfg.objective.name}' trains "
                          "several networks, one DeepSpeed engine each, under ZeRO 0-2 only")
    if cfg.train.compile:
        raise ConfigError(f"key 'train.compile' = true is not supported for objective "
                          f"'{cfg.objective.name}' (several engines)")
    peak_lr = dict(getattr(objective, "lr", {}))
    engines = {}
    for name, network in objective.networks().items():
        optimizer = build_optimizer(network, cfg)
        ds, _, _, _ = deepspeed.initialize(model=network, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
        if world_size == 1 and cfg.deepspeed.zero_stage == 0:
            ds.enable_backward_allreduce = False  # as build_engine: a sum over one rank
        engines[name] = Engine(ds=ds, optimizer=optimizer, precision=precision, ds_config=ds_config)
    objective.to(next(iter(engines.values())).device)  # the rest (augmentation buffers)
    return EngineSet(engines, objective, peak_lr)
