"""The run configuration: a dataclass schema merged as defaults < YAML recipe < dotted overrides.

Owns the schema (every key a user may set, with its default), loading and merging through
OmegaConf's structured configs, the checks that name the offending key and its source, and
writing the resolved config to ``RUN_DIR/config.yaml``. Nothing here imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or holds an invalid value."""


@dataclass
class DataConfig:
    train_shards: str = ""  # folder holding manifest.json (or the manifest itself)
    num_workers: int = 2  # data-loader processes per rank
    num_streams: int = 8  # virtual streams; a multiple of ranks x workers, <= shards; fixed per run
    # samples per shuffled block within a shard; each worker holds (its streams x this) samples
    shuffle_buffer: int = 1000
    strict: bool = False  # fail on unreadable data instead of skipping and counting it
    # per-channel normalization in [0, 1] pixel units (default: ImageNet's)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class ModelConfig:
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    decoder_hidden_size: int = 512
    decoder_num_hidden_layers: int = 8
    decoder_num_attention_heads: int = 16
    decoder_intermediate_size: int = 2048
    attn_implementation: str = "sdpa"
    # text (MLM): 0 = the tokenizer's vocabulary size; positions >= the data's seq_len
    vocab_size: int = 0
    max_position_embeddings: int = 512


@dataclass
class ObjectiveConfig:
    name: str = "mae"  # mae | mlm | simclr | moco_v3 | simsiam
    mask_ratio: float = 0.75  # fraction of patches hidden from the MAE encoder
    norm_pix_loss: bool = True  # MAE: per-patch normalized pixel targets
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # random resized crop
    hflip: bool = True
    # MLM (BERT's 80/10/10): of the selected tokens, mask_replace_prob -> [MASK],
    # random_replace_prob -> a random token, the rest unchanged
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    # contrastive views: SimCLR color-jitter strength s, per-view blur / solarize probabilities
    color_jitter: float = 0.5
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: list[float] = field(default_factory=lambda: [1.0, 0.1])
    solarize_prob: list[float] = field(default_factory=lambda: [0.0, 0.2])
    # contrastive heads and loss
    pooling: str = "cls"  # cls | mean: the encoder's representation (also the kNN feature)
    projection_hidden_dim: int = 2048
    projection_dim: int = 256
    predictor_hidden_dim: int = 512  # moco_v3 / simsiam predictor
    temperature: float = 0.1  # InfoNCE / NT-Xent
    momentum: float = 0.99  # moco_v3 EMA at step 0, cosine to 1.0 at max_steps
    # global: negatives (and BatchNorm statistics) over all ranks' micro-batches; local: own rank
    negatives: str = "global"


@dataclass
class OptimConfig:
    lr: float = 1.5e-4  # peak learning rate, after warmup
    min_lr: float = 0.0  # end of the cosine decay
    warmup_steps: int = 0
    weight_decay: float = 0.05
    weight_decay_end: Optional[float] = None  # cosine schedule to this value; None = constant
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps
    global_batch_size: int = 256  # samples per optimizer step, all ranks
    micro_batch_size: int = 64  # samples per rank per forward
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0
    log_every: int = 10
    max_bad_steps: int = 3  # consecutive non-finite micro-batches before rolling back
    compile: bool = False  # torch.compile the objective (through DeepSpeed's engine.compile)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: capture only, for tests)
    # a checkpoint step folder whose model weights start a fresh run (not its optimizer, step or
    # data position; e.g. BERT's seq-512 phase from the seq-128 run); ignored when resuming
    init_from: Optional[str] = None


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the DeepSpeed JSON last


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # 0 = only at the end
    keep_last: int = 3  # newest complete checkpoints kept; 0 = keep all
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0 = none


@dataclass
class EvalConfig:
    train_shards: Optional[str] = None  # labeled shards: the kNN memory bank
    test_shards: Optional[str] = None  # labeled shards: the queries
    every_steps: int = 0  # 0 = only at the end of training
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 256
    max_train_samples: Optional[int] = None  # first N samples of the bank; None = all
    max_test_samples: Optional[int] = None


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled; the WANDB_MODE env var wins
    project: str = "sslscale"
    entity: Optional[str] = None


@dataclass
class SlurmConfig:
    """Defaults for `sslscale submit` (launcher/slurm.py checks them); its flags win."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time: str = "24:00:00"  # job time limit: MM | HH:MM:SS | D-HH[:MM[:SS]]
    signal_grace_s: int = 120  # SIGUSR1 this many seconds before the limit: save, requeue
    sbatch_extra: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. "--mem=64G"
    env: dict[str, str] = field(default_factory=dict)  # exported in the job script


@dataclass
class Config:
    name: str = "run"
    run_dir: Optional[str] = None  # default: runs/<name>
    resume: str = "auto"  # auto (latest complete checkpoint, if any) | never | PATH to a step dir
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


_CHOICES = {
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "wandb.mode": ("offline", "online", "disabled"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
    "objective.pooling": ("cls", "mean"),
    "objective.negatives": ("global", "local"),
}


def _merge(base: DictConfig, other: DictConfig | dict, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        raise ConfigError(f"{source}: unknown key '{e.full_key}' (check the spelling; "
                          f"valid keys are listed in sslscale/config.py)") from None
    except ValidationError as e:
        raise ConfigError(f"{source}: key '{e.full_key}': {e.msg}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(recipe: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Build the run config: schema defaults < the YAML ``recipe`` < dotted ``overrides``.

    ``overrides`` look like ``optim.lr=1e-3``. Returns a read-only structured ``DictConfig``.
    Raises ``ConfigError`` naming the offending key and where it came from (the recipe file or
    the command line), and ``FileNotFoundError`` for a missing recipe.
    """
    cfg = OmegaConf.structured(Config)
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"config recipe not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml.YAMLError and OmegaConf's own parse errors
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        cfg = _merge(cfg, loaded, str(path))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"command line: override '{bad[0]}' is not of the form key=value")
    cfg = _merge(cfg, OmegaConf.from_dotlist(list(overrides)), "command line")
    validate(cfg, source=str(recipe) if recipe else "config")
    if cfg.run_dir is None:
        cfg.run_dir = str(Path("runs") / cfg.name)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def validate(cfg: DictConfig, source: str = "config") -> None:
    """Check values that the schema's types cannot; raise ``ConfigError`` naming the key."""
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{source}: key '{key}' = {value!r}; expected one of {list(choices)}")
    positive = ["train.max_steps", "train.global_batch_size", "train.micro_batch_size",
                "train.log_every", "model.image_size", "model.patch_size", "eval.k"]
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"{source}: key '{key}' must be > 0")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"{source}: key 'data.num_workers' must be >= 0")
    if cfg.checkpoint.keep_last < 0 or cfg.checkpoint.keep_every < 0:
        raise ConfigError(f"{source}: keys 'checkpoint.keep_last'/'checkpoint.keep_every' must be >= 0")
    if cfg.data.num_streams < 1:
        raise ConfigError(f"{source}: key 'data.num_streams' must be >= 1")
    if not 0.0 <= cfg.objective.mask_ratio < 1.0:
        raise ConfigError(f"{source}: key 'objective.mask_ratio' must be in [0, 1)")
    probs = ["objective.mlm_probability", "objective.mask_replace_prob",
             "objective.random_replace_prob", "objective.color_jitter_prob", "objective.grayscale_prob"]
    for key in probs + [f"objective.{k}[{i}]" for k in ("blur_prob", "solarize_prob") for i in (0, 1)]:
        if not 0.0 <= OmegaConf.select(cfg, key, default=0.0) <= 1.0:
            raise ConfigError(f"{source}: key '{key}' must be a probability in [0, 1]")
    if cfg.objective.mask_replace_prob + cfg.objective.random_replace_prob > 1.0:
        raise ConfigError(f"{source}: keys 'objective.mask_replace_prob' + "
                          "'objective.random_replace_prob' must be <= 1")
    if len(cfg.objective.blur_prob) != 2 or len(cfg.objective.solarize_prob) != 2:
        raise ConfigError(f"{source}: keys 'objective.blur_prob'/'objective.solarize_prob' need "
                          "one value per view (2)")
    if cfg.objective.temperature <= 0 or not 0.0 <= cfg.objective.momentum <= 1.0:
        raise ConfigError(f"{source}: key 'objective.temperature' must be > 0 and "
                          "'objective.momentum' in [0, 1]")
    if cfg.model.image_size % cfg.model.patch_size:
        raise ConfigError(f"{source}: key 'model.image_size' must be a multiple of model.patch_size")
    if len(cfg.data.mean) != cfg.model.num_channels or len(cfg.data.std) != cfg.model.num_channels:
        raise ConfigError(f"{source}: keys 'data.mean'/'data.std' need model.num_channels="
                          f"{cfg.model.num_channels} values")


def grad_accum_steps(cfg: DictConfig, world_size: int) -> int:
    """``global_batch_size / (micro_batch_size * world_size)``; ``ConfigError`` if not whole."""
    per_step = cfg.train.micro_batch_size * world_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"key 'train.global_batch_size' = {cfg.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x world_size = {cfg.train.micro_batch_size} x {world_size}")
    return cfg.train.global_batch_size // per_step


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (temp file + rename, so a reader never sees half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, path)


def to_dict(cfg: DictConfig) -> dict:
    """A plain, resolved ``dict`` copy (for checkpoints and wandb)."""
    return OmegaConf.to_container(cfg, resolve=True)
