"""The run configuration: a dataclass schema merged as defaults < YAML recipe < dotted overrides.

Owns the common sections of the schema (every key a user may set, with its default; the
``objective`` and ``model`` sections have one dataclass per objective and model family, in
``sslscale.config_schema``), loading and merging through OmegaConf's structured configs, the
checks that name the offending key and its source (a misspelled key names the closest valid one,
another objective's key its owner), the warnings for valid values that are probably a mistake
(``warnings_for``), ``sslscale config show``'s YAML and writing the resolved config to
``RUN_DIR/config.yaml``. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from sslscale.config_schema import (MODEL_SCHEMAS, OBJECTIVE_SCHEMAS, SCHEMAS, ConfigError,
                                    MAEConfig, ModelBase, ObjectiveBase, ViTModelConfig,
                                    select_schemas, validate_objective)


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
    # audio: clips longer than this are cropped (at a per-sample random offset), shorter ones
    # padded to it with an attention mask (seconds; fairseq's wav2vec 2.0 crops at ~15.6 s)
    max_audio_seconds: float = 15.0


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
    layer_decay: float = 1.0  # layer-wise lr decay (fine-tuning, MAE/BEiT 0.65-0.75); 1: none


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps
    global_batch_size: int = 256  # samples per optimizer step, all ranks
    micro_batch_size: int = 64  # samples per rank per forward
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0
    log_every: int = 10
    max_bad_steps: int = 3  # consecutive steps skipped for non-finite losses before rolling back
    compile: bool = False  # torch.compile the objective (through DeepSpeed's engine.compile)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: capture only, for tests)
    # a checkpoint step folder whose model weights start a fresh run (not its optimizer, step or
    # data position; e.g. BERT's seq-512 phase from the seq-128 run); ignored when resuming
    init_from: Optional[str] = None
    # stall watchdog: no step completed for this long -> dump every thread's stack to
    # RUN_DIR/stalls/ and exit with STALLED (sslscale/watchdog.py); None = max(600, 20 x the
    # median step time); 0 = off
    stall_timeout_s: Optional[float] = None


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the DeepSpeed JSON last


@dataclass
class DistConfig:
    timeout_s: int = 600  # process-group timeout (NCCL and gloo): a collective waiting longer fails


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
    # the run's display name; None = `name`, plus the run dir's folder name when that differs
    # (`name-<folder>`), so runs of one recipe in different run dirs are told apart
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    group: Optional[str] = None  # e.g. a sweep: wandb groups its runs together
    notes: Optional[str] = None


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
    # attempts of a run that end in a crash, stall or lost node before the job stops requeueing
    max_failures: int = 3
    # rendezvous port (rank 0's TCPStore) on the first node; 0: 20000 + job id % 20000, or the
    # next free one if another process listens there when an attempt starts
    master_port: int = 0


@dataclass
class Config:
    name: str = "run"
    run_dir: Optional[str] = None  # default: runs/<name>
    resume: str = "auto"  # auto (latest complete checkpoint, if any) | never | PATH to a step dir
    data: DataConfig = field(default_factory=DataConfig)
    # model.name / objective.name select the section's dataclass (sslscale/config_schema.py)
    model: ModelBase = field(default_factory=ViTModelConfig)
    objective: ObjectiveBase = field(default_factory=MAEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


# the names sslscale/objectives registers (tests/unit/test_errors.py keeps the two equal); checked
# with the config, before any rank starts, without importing the objectives' models
OBJECTIVE_NAMES = tuple(sorted(OBJECTIVE_SCHEMAS))
_CHOICES = {
    "objective.name": OBJECTIVE_NAMES,
    "model.name": tuple(sorted(MODEL_SCHEMAS)),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "wandb.mode": ("offline", "online", "disabled"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
    "objective.pooling": ("cls", "mean"),
    "objective.negatives": ("global", "local"),
    "objective.noise": ("masking", "gaussian"),
    "model.feat_extract_norm": ("layer", "group"),
    "objective.codevector_init": ("uniform", "centered"),
}

# key -> (comparison, bound) its value must pass; None (an Optional key left unset) passes
_BOUNDS = {
    "train.max_steps": (">", 0), "train.global_batch_size": (">", 0),
    "train.micro_batch_size": (">", 0), "train.log_every": (">", 0),
    "train.max_bad_steps": (">=", 1), "train.stall_timeout_s": (">=", 0),
    "model.image_size": (">", 0), "model.patch_size": (">", 0),
    "data.num_workers": (">=", 0), "data.num_streams": (">=", 1), "data.max_audio_seconds": (">", 0),
    "optim.lr": (">", 0), "optim.min_lr": (">=", 0), "optim.warmup_steps": (">=", 0),
    "optim.weight_decay": (">=", 0), "optim.weight_decay_end": (">=", 0),
    "optim.eps": (">", 0), "optim.grad_clip": (">=", 0),
    "objective.temperature": (">", 0), "objective.num_classes": (">=", 0),
    "optim.layer_decay": (">", 0),
    "checkpoint.every_steps": (">=", 0), "checkpoint.keep_last": (">=", 0),
    "checkpoint.keep_every": (">=", 0), "eval.every_steps": (">=", 0), "eval.k": (">", 0),
    "dist.timeout_s": (">", 0), "slurm.signal_grace_s": (">=", 1), "slurm.max_failures": (">=", 0),
}
_COMPARE = {">": lambda v, b: v > b, ">=": lambda v, b: v >= b}  # False for NaN: refused
_ABSENT = object()  # OmegaConf.select's answer for a key the chosen schema does not have


def schema_keys(cfg: DictConfig | None = None) -> list[str]:
    """Every dotted key of ``cfg``'s schema (default: ``Config``, i.e. objective ``mae`` on
    model ``vit``): ``train.max_steps``, ``deepspeed.extra``, ...; the leaves, a dict- or
    list-valued key counting as one leaf."""
    keys: list[str] = []

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node:
            child = node._get_node(key)
            if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
                walk(child, f"{prefix}{key}.")
            else:
                keys.append(f"{prefix}{key}")

    walk(OmegaConf.structured(Config) if cfg is None else cfg, "")
    return keys


def _suggest(key: str, keys: list[str]) -> str | None:
    """The key of ``keys``, else of any objective's or model family's schema, closest to the
    misspelled ``key`` (``train.max_step`` -> ``train.max_steps``, ``lr`` -> ``optim.lr``), or
    None when nothing is close."""
    foreign = [f"{section}.{f.name}" for section, table in SCHEMAS.items() for schema in table.values()
               for f in dataclasses.fields(schema)]
    keys = list(dict.fromkeys(keys + foreign))
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if close:
        return close[0]
    # a key without its section, or with a wrong one: compare the last parts
    tails = {k.rsplit(".", 1)[-1]: k for k in reversed(keys)}  # first key wins for a shared tail
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.8)
    return tails[close[0]] if close else None


def _user_key(other: DictConfig | dict, full_key: str) -> str:
    """The dotted leaf key the user wrote under the unknown ``full_key`` (``trian`` in
    ``trian.max_steps=5`` -> ``trian.max_steps``), else ``full_key``."""
    try:
        node = OmegaConf.select(OmegaConf.create(other) if isinstance(other, dict) else other,
                                str(full_key))
    except Exception:  # noqa: BLE001: only for a better message
        return str(full_key)
    key = str(full_key)
    while isinstance(node, DictConfig) and len(node) >= 1:
        first = next(iter(node))
        key, node = f"{key}.{first}", node[first]
    return key


def _merge(base: DictConfig, other: DictConfig | dict, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = _user_key(other, e.full_key)
        suggestion = _suggest(key, schema_keys(base))
        hint = (f"did you mean '{suggestion}'?" if suggestion else
                "check the spelling; sslscale config show RECIPE lists the valid keys")
        raise ConfigError(f"{source}: unknown key '{key}'; {hint}") from None
    except ValidationError as e:
        raise ConfigError(f"{source}: key '{e.full_key}': {e.msg}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e}") from None


def override_keys(overrides: Sequence[str]) -> set[str]:
    """The dotted keys that ``key=value`` overrides set (``optim.lr=1e-3`` -> ``optim.lr``)."""
    return {o.split("=", 1)[0].strip() for o in overrides}


def _overridden(key: str, overridden: Collection[str]) -> bool:
    """Whether ``key``, a section above it or an element of it was set on the command line."""
    return any(key == o or key.startswith((o + ".", o + "[")) or o.startswith((key + ".", key + "["))
               for o in overridden)


def _plain(node: Any, resolve: bool = False) -> Any:
    """A plain ``dict`` / ``list`` of a config node (other values as they are)."""
    return OmegaConf.to_container(node, resolve=resolve) if isinstance(node, (DictConfig, ListConfig)) else node


def load_config(recipe: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Build the run config: schema defaults < the YAML ``recipe`` < dotted ``overrides``.

    ``overrides`` look like ``optim.lr=1e-3``. ``objective.name`` picks the ``objective``
    section's schema and ``model.name`` the ``model`` section's (inferred when unset:
    ``sslscale.config_schema.select_schemas``); the result holds only their keys beside the
    common sections. Keys of other objectives or families that are merely present are dropped
    (at their default value, or in a config.yaml of a run loaded for another objective).
    Returns a read-only structured ``DictConfig``. Raises ``ConfigError`` naming the offending
    key and where it came from (the recipe file or the command line): an unknown key (with the
    closest valid one), a key of another objective or model family set to a value of its own
    (naming its owner), a wrong type or a value out of range; ``FileNotFoundError`` for a
    missing recipe.
    """
    source = str(recipe) if recipe is not None else "config"
    loaded: Any = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"config recipe not found: {path}")
        try:
            loaded = _plain(OmegaConf.load(path))
        except Exception as e:  # yaml.YAMLError and OmegaConf's own parse errors
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"command line: override '{bad[0]}' is not of the form key=value")
    dotted = _plain(OmegaConf.from_dotlist(list(overrides)))
    objective, model = select_schemas(loaded if isinstance(loaded, dict) else {}, dotted, source)
    cfg = OmegaConf.structured(Config)
    cfg.objective = OmegaConf.structured(OBJECTIVE_SCHEMAS[objective])
    cfg.model = OmegaConf.structured(MODEL_SCHEMAS[model])
    if recipe is not None:
        cfg = _merge(cfg, loaded, source)
    cfg = _merge(cfg, dotted, "command line")
    validate(cfg, source=source, overridden=override_keys(overrides))
    if cfg.run_dir is None:
        cfg.run_dir = str(Path("runs") / cfg.name)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def validate(cfg: DictConfig, source: str = "config", overridden: Collection[str] = ()) -> None:
    """Check values that the schema's types cannot; raise ``ConfigError`` naming the key, its
    value and where it came from: ``command line`` for a key in ``overridden`` (dotted keys set
    by overrides), else ``source`` (the recipe path, or ``config`` for the defaults). Keys the
    chosen objective or model family does not have are not checked."""
    def where(*keys: str) -> str:
        return "command line" if any(_overridden(k, overridden) for k in keys) else source

    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and value not in choices:
            raise ConfigError(f"{where(key)}: key '{key}' = {value!r}; expected one of {list(choices)}")
    for key, (op, bound) in _BOUNDS.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not _COMPARE[op](value, bound):
            raise ConfigError(f"{where(key)}: key '{key}' must be {op} {bound}, got {value}")
    betas = list(cfg.optim.betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"{where('optim.betas')}: key 'optim.betas' must be two values in [0, 1), "
                          f"got {betas}")
    if not cfg.optim.layer_decay <= 1.0:
        raise ConfigError(f"{where('optim.layer_decay')}: key 'optim.layer_decay' must be in (0, 1] "
                          f"(1: no decay), got {cfg.optim.layer_decay}")
    validate_objective(cfg, where)
    if "image_size" not in cfg.model:
        return  # not a ViT: no patches, no pixel statistics
    if cfg.model.image_size % cfg.model.patch_size:
        raise ConfigError(f"{where('model.image_size', 'model.patch_size')}: key 'model.image_size' = "
                          f"{cfg.model.image_size} must be a multiple of model.patch_size = "
                          f"{cfg.model.patch_size}")
    channels = cfg.model.num_channels
    if len(cfg.data.mean) != channels or len(cfg.data.std) != channels:
        raise ConfigError(f"{where('data.mean', 'data.std', 'model.num_channels')}: keys "
                          f"'data.mean'/'data.std' need model.num_channels={channels} values, got "
                          f"{list(cfg.data.mean)} / {list(cfg.data.std)}")


def warnings_for(cfg: DictConfig) -> list[str]:
    """Values that are valid but probably not what was meant, one line each (no ``warning:``
    prefix; the CLI prints them to stderr before starting). Pure: reads ``cfg`` only."""
    found = []
    if cfg.optim.warmup_steps > 0 and cfg.train.max_steps <= cfg.optim.warmup_steps:
        found.append(f"train.max_steps = {cfg.train.max_steps} <= optim.warmup_steps = "
                     f"{cfg.optim.warmup_steps}: the whole run is warmup (the learning rate "
                     f"rises toward optim.lr = {cfg.optim.lr} and never decays); lower "
                     "optim.warmup_steps")
    return found


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


def annotated_yaml(cfg: DictConfig) -> str:
    """``cfg`` as YAML (resolved; ``sslscale config show``), every key of its sections listed,
    a ``# default: X`` comment after each value that differs from its schema's default (the
    chosen objective's and model family's for ``objective`` / ``model``)."""
    base = OmegaConf.structured(Config)
    base.objective = OmegaConf.structured(OBJECTIVE_SCHEMAS[cfg.objective.name])
    base.model = OmegaConf.structured(MODEL_SCHEMAS[cfg.model.name])
    lines, section = [], ""
    for line in OmegaConf.to_yaml(cfg, resolve=True).splitlines():
        indent = len(line) - len(line.lstrip(" "))
        if indent <= 2 and ":" in line and not line.lstrip().startswith("- "):
            key = line.strip().split(":", 1)[0]
            section, dotted = (key, key) if indent == 0 else (section, f"{section}.{key}")
            value, default = (_plain(OmegaConf.select(c, dotted), resolve=True) for c in (cfg, base))
            if (indent or not isinstance(value, dict)) and value != default and dotted != "run_dir":
                line = f"{line}  # default: {json.dumps(default)}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def to_dict(cfg: DictConfig) -> dict:
    """A plain, resolved ``dict`` copy (for checkpoints and wandb)."""
    return OmegaConf.to_container(cfg, resolve=True)
