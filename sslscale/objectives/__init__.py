"""Self-supervised objectives; importing this package registers them in ``OBJECTIVES``."""

from sslscale.objectives import adversarial, autoencoders, classify, clm, contrastive, cyclegan, mae, mlm, rotnet, wav2vec2  # noqa: F401  (register their names)
from sslscale.objectives.base import Objective, ObjectiveOutput
from sslscale.registry import OBJECTIVES


def build_objective(cfg) -> "Objective":
    """Build the objective named by ``cfg.objective.name``; ``ConfigError`` lists valid names."""
    from sslscale.config import ConfigError

    try:
        builder = OBJECTIVES.get(cfg.objective.name)
    except KeyError as e:
        raise ConfigError(f"key 'objective.name': {e.args[0]}") from None
    return builder(cfg)


__all__ = ["Objective", "ObjectiveOutput", "OBJECTIVES", "build_objective"]
