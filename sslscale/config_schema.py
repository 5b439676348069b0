"""Per-objective and per-model-family config schemas: the ``objective`` and ``model`` sections.

``objective.name`` selects one dataclass of ``OBJECTIVE_SCHEMAS`` (each objective's builder is
registered with it: ``OBJECTIVES.register("mae", schema=MAEConfig)``) and ``model.name`` one of
``MODEL_SCHEMAS`` (``vit``, ``bert``, ``gpt2``), as solo-learn's per-method arguments and torchtitan's
per-section job config do. ``select_schemas`` picks both for a recipe and its overrides
(inferring ``model.name`` when unset) and drops the keys of other objectives or families that
are merely present; one set to a value of its own is a ``ConfigError`` naming its owner
(``owners``). ``validate_objective`` checks the objectives' ranges. The defaults equal those of
the flat schema before 2026-12 (one ``ObjectiveConfig`` with every objective's keys), so a recipe
resolves to the same values. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf


# ------------------------------------------------------------------------------------ objectives
@dataclass
class ObjectiveBase:
    """Keys every objective has."""
    name: str = "mae"  # mae | mlm | clm | simclr | moco_v3 | simsiam | rotnet | dae | vae | wav2vec2 | gan | bigan | cyclegan | classify


@dataclass
class _ImageViews(ObjectiveBase):
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # random resized crop
    hflip: bool = True


@dataclass
class MAEConfig(_ImageViews):
    """MAE (He et al. 2022): ``sslscale.objectives.mae``."""
    name: str = "mae"
    mask_ratio: float = 0.75  # fraction of patches hidden from the encoder
    norm_pix_loss: bool = True  # per-patch normalized pixel targets


@dataclass
class MLMConfig(ObjectiveBase):
    """BERT's masked language modeling (80/10/10): of the selected tokens, ``mask_replace_prob``
    -> [MASK], ``random_replace_prob`` -> a random token, the rest unchanged."""
    name: str = "mlm"
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1


@dataclass
class CLMConfig(ObjectiveBase):
    """GPT's causal language modeling (Radford et al. 2018, 2019): next-token cross-entropy on
    every position of the token blocks, ``sslscale.objectives.clm``. No keys of its own."""
    name: str = "clm"


@dataclass
class _TwoView(_ImageViews):
    """The two-view objectives' views (SimCLR color-jitter strength, per-view blur / solarize
    probabilities), pooling and projector."""
    color_jitter: float = 0.5
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: list[float] = field(default_factory=lambda: [1.0, 0.1])
    solarize_prob: list[float] = field(default_factory=lambda: [0.0, 0.2])
    pooling: str = "cls"  # cls | mean: the encoder's representation (also the kNN feature)
    projection_hidden_dim: int = 2048
    projection_dim: int = 256
    # global: negatives (and BatchNorm statistics) over all ranks' micro-batches; local: own rank
    negatives: str = "global"


@dataclass
class SimCLRConfig(_TwoView):
    """SimCLR (Chen et al. 2020): ``sslscale.objectives.contrastive``."""
    name: str = "simclr"
    temperature: float = 0.1  # NT-Xent


@dataclass
class MoCoV3Config(_TwoView):
    """MoCo v3 (Chen, Xie & He 2021): ``sslscale.objectives.contrastive``."""
    name: str = "moco_v3"
    predictor_hidden_dim: int = 512
    temperature: float = 0.1  # InfoNCE
    momentum: float = 0.99  # EMA at step 0, cosine to 1.0 at max_steps


@dataclass
class SimSiamConfig(_TwoView):
    """SimSiam (Chen & He 2021): ``sslscale.objectives.contrastive``."""
    name: str = "simsiam"
    predictor_hidden_dim: int = 512


@dataclass
class ClassifyConfig(_ImageViews):
    """Supervised fine-tuning: ``sslscale.objectives.classify`` (images use the crop and flip)."""
    name: str = "classify"
    pooling: str = "cls"  # cls | mean (MAE's fine-tuning: mean behind a LayerNorm)
    num_classes: int = 0  # 0: from the training shards' manifest (meta.classes)
    label_smoothing: float = 0.1
    drop_path_rate: float = 0.0  # stochastic depth of the deepest block (MAE fine-tunes ViT-B with 0.1)


@dataclass
class RotNetConfig(_ImageViews):
    """RotNet (Gidaris et al. 2018): ``sslscale.objectives.rotnet``."""
    name: str = "rotnet"
    rotations_per_image: int = 4  # 4: all four turns of each image in the batch (the paper's); 1-3: seeded
    pooling: str = "cls"  # cls | mean: what the 4-way head (and kNN) sees


@dataclass
class DAEConfig(_ImageViews):
    """Denoising autoencoder (Vincent et al. 2008): ``sslscale.objectives.autoencoders``."""
    name: str = "dae"
    noise: str = "masking"  # masking: pixels set to black; gaussian: additive N(0, noise_level)
    noise_level: float = 0.5  # masking: the fraction of pixels; gaussian: the std in [0, 1] units


@dataclass
class VAEConfig(_ImageViews):
    """VAE (Kingma & Welling 2014): ``sslscale.objectives.autoencoders``."""
    name: str = "vae"
    latent_dim: int = 64
    beta: float = 1.0  # weight of the KL term (beta-VAE when != 1)


@dataclass
class Wav2Vec2Config(ObjectiveBase):
    """wav2vec 2.0 (Baevski et al. 2020, arXiv 2006.11477): ``sslscale.objectives.wav2vec2``;
    the names and defaults are transformers' ``Wav2Vec2Config`` / the paper's BASE (§4.2)."""
    name: str = "wav2vec2"
    mask_time_prob: float = 0.65  # p: the fraction of frames that start a span (before overlaps)
    mask_time_length: int = 10  # M: frames per masked span
    mask_time_min_masks: int = 2  # spans per clip at least (where they fit)
    num_negatives: int = 100  # K: distractors per masked frame, from the same clip's masked frames
    contrastive_logits_temperature: float = 0.1  # kappa
    diversity_loss_weight: float = 0.1  # alpha
    # Gumbel-softmax temperature: max * decay**step, floored at min (a pure function of the step)
    max_gumbel_temperature: float = 2.0
    min_gumbel_temperature: float = 0.5
    gumbel_temperature_decay: float = 0.999995
    # codebook entries at init: "uniform" U(0, 1) (transformers' and fairseq's: all entries share
    # a large positive mean, so every frame's target has cosine ~0.85 with every other frame's and
    # the logits of the positive and the distractors differ by < 1.5 at temperature 0.1) or
    # "centered" U(-0.5, 0.5) with project_q's bias 0 (targets of different entries near orthogonal)
    codevector_init: str = "uniform"
    # learning-rate multiplier of the convolutional feature encoder (fairseq's BASE scales its
    # gradient by feature_grad_mult 0.1; under Adam a gradient scale barely changes the update, an
    # lr scale does); 1: none
    feature_encoder_lr_scale: float = 1.0


@dataclass
class GANConfig(_ImageViews):
    """GAN (Goodfellow et al. 2014) with a DCGAN-style generator (Radford et al. 2016) against a
    ViT discriminator whose pooled features are the encoder: ``sslscale.objectives.adversarial``.
    The generator and the discriminator are separate DeepSpeed engines (own optimizers)."""
    name: str = "gan"
    latent_dim: int = 64  # z ~ N(0, I), drawn from the sample seeds
    generator_width: int = 64  # channels of the generator's last hidden layer (x2 per level up)
    d_steps_per_g: int = 1  # discriminator optimizer steps per generator step
    d_lr: float = 0.0  # the discriminator's peak lr; 0: optim.lr
    g_lr: float = 0.0  # the generator's (BiGAN: generator + encoder) peak lr; 0: optim.lr
    diff_augment: bool = False  # crop / flip the generated images as the real ones (DiffAugment)
    r1_gamma: float = 0.0  # R1 penalty gamma / 2 * |grad_x D(x)|^2 on real images (Mescheder et al. 2018); 0: off
    pooling: str = "cls"  # cls | mean: the discriminator's (encoder's) pooled features


@dataclass
class BiGANConfig(GANConfig):
    """BiGAN (Donahue, Kraehenbuehl & Darrell 2017): an encoder E trained jointly with the
    generator against a discriminator on (x, E(x)) vs (G(z), z); E's ViT is exported."""
    name: str = "bigan"
    discriminator: str = "vit"  # vit | dcgan: the discriminator's image branch (a ViT, or DCGAN's strided convolutions)
    unary_scores: bool = False  # BigBiGAN (Donahue & Simonyan 2019): D also scores x alone and z alone; the losses sum
    reconstruction_weight: float = 0.0  # weight of ALICE's ||G(E(x)) - x||^2 (normalized pixels) in G and E's loss; 0: off


@dataclass
class CycleGANConfig(ObjectiveBase):
    """CycleGAN (Zhu, Park, Isola & Efros 2017): generators G: A -> B and F: B -> A (small
    ResNet-style convolutional networks) against ViT discriminators D_A, D_B with one logit per
    patch token (a PatchGAN), on two unpaired domains of the training shards' classes, each read
    from its own streams: ``sslscale.objectives.cyclegan``. Two DeepSpeed engines: G + F
    (``generator``) and D_A + D_B (``discriminator``), as the paper's code has one optimizer each.
    D_A's ViT is the exported encoder."""
    name: str = "cyclegan"
    domain_a_classes: list[int] = field(default_factory=lambda: [7])  # Fashion-MNIST: sneaker
    domain_b_classes: list[int] = field(default_factory=lambda: [9])  # ankle boot
    adversarial_loss: str = "lsgan"  # lsgan (the paper's least squares) | nonsaturating
    lambda_cyc: float = 10.0  # cycle-consistency weight (L1)
    lambda_id: float = 0.5  # identity loss weight, as a fraction of lambda_cyc (the paper's 0.5)
    generator_width: int = 32  # channels of the generators' first convolution (x2 at 1/2 scale)
    generator_blocks: int = 3  # residual blocks at 1/4 scale
    d_steps_per_g: int = 1  # discriminator optimizer steps per generator step
    d_lr: float = 0.0  # the discriminators' peak lr; 0: optim.lr
    g_lr: float = 0.0  # the generators' peak lr; 0: optim.lr
    pooling: str = "cls"  # cls | mean: D_A's pooled features (kNN, export)
    image_every_steps: int = 100  # a PNG grid of translations into RUN_DIR/images/ (rank 0); 0: off
    image_grid_size: int = 8  # images per row of that grid


OBJECTIVE_SCHEMAS: dict[str, type] = {
    "bigan": BiGANConfig, "cyclegan": CycleGANConfig, "gan": GANConfig, "classify": ClassifyConfig, "clm": CLMConfig, "dae": DAEConfig, "mae": MAEConfig, "mlm": MLMConfig,
    "moco_v3": MoCoV3Config, "rotnet": RotNetConfig, "simclr": SimCLRConfig,
    "simsiam": SimSiamConfig, "vae": VAEConfig, "wav2vec2": Wav2Vec2Config}
# the keys of the one flat ObjectiveConfig before per-objective schemas (old saved config.yaml files)
_FLAT_KEYS = frozenset(f.name for schema in (ClassifyConfig, MAEConfig, MLMConfig, MoCoV3Config,
                                             SimCLRConfig, SimSiamConfig) for f in dataclasses.fields(schema))


# -------------------------------------------------------------------------------- model families
@dataclass
class ModelBase:
    """Keys every model family has: the transformer encoder's sizes."""
    name: str = "vit"  # vit | bert | gpt2; inferred from the objective (and data) when not set
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    attn_implementation: str = "sdpa"


@dataclass
class ViTModelConfig(ModelBase):
    """A ViT on images (the decoder keys: MAE's decoder)."""
    name: str = "vit"
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    decoder_hidden_size: int = 512
    decoder_num_hidden_layers: int = 8
    decoder_num_attention_heads: int = 16
    decoder_intermediate_size: int = 2048


@dataclass
class BertModelConfig(ModelBase):
    """BERT on token blocks."""
    name: str = "bert"
    vocab_size: int = 0  # 0: the tokenizer's vocabulary size (the data's manifest)
    max_position_embeddings: int = 512  # positions >= the data's seq_len


@dataclass
class GPT2ModelConfig(ModelBase):
    """GPT-2 on token blocks (transformers' ``GPT2Config``: ``hidden_size`` -> ``n_embd``,
    ``num_hidden_layers`` -> ``n_layer``, ``num_attention_heads`` -> ``n_head``,
    ``intermediate_size`` -> ``n_inner``, ``max_position_embeddings`` -> ``n_positions``); the
    defaults are GPT-2 small's (124M parameters with a 50,257-token vocabulary)."""
    name: str = "gpt2"
    vocab_size: int = 0  # 0: the tokenizer's vocabulary size (the data's manifest)
    max_position_embeddings: int = 1024  # positions >= the data's seq_len


@dataclass
class Wav2Vec2ModelConfig(ModelBase):
    """wav2vec 2.0 on 16 kHz waveforms (transformers' ``Wav2Vec2Config``, same key names): the
    convolutional feature encoder (``conv_*``: 320x down-sampling, 49 frames per second, 25 ms
    receptive field, by default), the transformer (``ModelBase``'s sizes), the convolutional
    relative positions and the product quantizer (``num_codevector_groups`` G x
    ``num_codevectors_per_group`` V entries of ``codevector_dim / G``). ``feat_extract_norm:
    layer`` with ``do_stable_layer_norm`` (the paper's LARGE arrangement) normalizes every frame
    of every conv layer on its own, so padding changes nothing; ``group`` without it (BASE) has
    a GroupNorm over the time of the first conv layer (padded zeros count in its statistics)
    that keeps each frame's energy: the small demo's contrastive loss falls below chance only
    with it (``configs/demo/wav2vec2_tiny_ktuberling.yaml``). ``layerdrop`` is 0 (dropped
    layers would leave parameters without gradients)."""
    name: str = "wav2vec2"
    conv_dim: list[int] = field(default_factory=lambda: [512] * 7)
    conv_kernel: list[int] = field(default_factory=lambda: [10, 3, 3, 3, 3, 2, 2])
    conv_stride: list[int] = field(default_factory=lambda: [5, 2, 2, 2, 2, 2, 2])
    feat_extract_norm: str = "layer"  # layer | group
    do_stable_layer_norm: bool = True
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    num_codevector_groups: int = 2
    num_codevectors_per_group: int = 320
    codevector_dim: int = 256
    proj_codevector_dim: int = 256
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    feat_proj_dropout: float = 0.1
    layerdrop: float = 0.0


MODEL_SCHEMAS: dict[str, type] = {"bert": BertModelConfig, "gpt2": GPT2ModelConfig, "vit": ViTModelConfig,
                                  "wav2vec2": Wav2Vec2ModelConfig}
# the model families each objective runs on; the first is the default (classify: from the data)
OBJECTIVE_MODELS: dict[str, tuple[str, ...]] = {
    "bigan": ("vit",), "cyclegan": ("vit",), "gan": ("vit",), "classify": ("vit", "bert"), "clm": ("gpt2",), "dae": ("vit",), "mae": ("vit",), "mlm": ("bert",),
    "moco_v3": ("vit",), "rotnet": ("vit",), "simclr": ("vit",), "simsiam": ("vit",), "vae": ("vit",),
    "wav2vec2": ("wav2vec2",)}
SCHEMAS = {"objective": OBJECTIVE_SCHEMAS, "model": MODEL_SCHEMAS}


def defaults(schema: type) -> dict[str, Any]:
    """``{key: default}`` of a schema dataclass (lists and dicts as fresh copies)."""
    return {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING  # type: ignore[misc]
                     else f.default) for f in dataclasses.fields(schema)}


def owners(section: str, key: str) -> list[str]:
    """The names (sorted) whose schema in ``section`` (``objective`` or ``model``) has ``key``;
    empty for a key no schema has."""
    return sorted(name for name, schema in SCHEMAS[section].items()
                  if key in {f.name for f in dataclasses.fields(schema)})


def default_of(section: str, key: str) -> list[Any]:
    """The defaults of ``key`` in the schemas of ``section`` that have it."""
    return [defaults(SCHEMAS[section][name])[key] for name in owners(section, key)]


# ------------------------------------------------------------------------ choosing the schemas
class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, belongs to another objective or model
    family, or holds an invalid value."""


def _section(node: dict, name: str) -> dict:
    value = node.get(name)
    return value if isinstance(value, dict) else {}


def _modality(shards: Any) -> str | None:
    """``modality`` of the manifest at ``shards`` (``image`` when it has none), None when
    there is no readable manifest there (yet)."""
    if not isinstance(shards, str) or not shards or "${" in shards:
        return None
    from sslscale.data.shards import _read_json, manifest_file

    try:
        return str(_read_json(manifest_file(shards)).get("modality", "image"))
    except (OSError, ValueError):
        return None


def _infer_model(objective: str, recipe: dict, dotted: dict) -> str:
    """The model family of a config that does not name one: the objective's only family; for
    ``classify``, ``bert`` on text shards (``data.train_shards``' manifest), else the family of
    the objective the recipe was written for (a pretraining run's config.yaml being fine-tuned),
    else ``bert`` when a text model's key (one ``vit`` lacks) is set away from its default, else
    ``vit``."""
    families = OBJECTIVE_MODELS[objective]
    if len(families) == 1:
        return families[0]
    shards = _section(dotted, "data").get("train_shards", _section(recipe, "data").get("train_shards"))
    modality = _modality(shards)
    if modality is not None:
        return "bert" if modality == "text" else "vit"
    previous = _section(recipe, "objective").get("name")
    if previous in OBJECTIVE_MODELS and len(OBJECTIVE_MODELS[previous]) == 1:
        return OBJECTIVE_MODELS[previous][0]
    for node in (dotted, recipe):
        for key, value in _section(node, "model").items():
            if owners("model", key) and "vit" not in owners("model", key) \
                    and value not in default_of("model", key):
                return "bert"
    return families[0]


def _drop_foreign(node: dict, chosen: dict[str, str], source: str, lenient: set[str]) -> None:
    """Remove from ``node`` (a recipe or the overrides, as a plain dict) the keys of sections
    ``objective`` / ``model`` that belong to another objective or family than ``chosen``:
    silently when their value is that owner's default or the section is in ``lenient``, else
    ``ConfigError``. Keys no schema has stay (the merge names them, with a did-you-mean)."""
    for section, name in chosen.items():
        values = _section(node, section)
        own = {f.name for f in dataclasses.fields(SCHEMAS[section][name])}
        for key in [k for k in values if k not in own and owners(section, k)]:
            if section in lenient or values[key] in default_of(section, key):
                del values[key]
                continue
            raise ConfigError(f"{source}: key '{section}.{key}' belongs to {section} "
                              f"{' / '.join(owners(section, key))}, not {name}")


def _name(section: str, recipe: dict, dotted: dict, source: str, default: str | None) -> str | None:
    """``section.name`` from the overrides, else the recipe, else ``default``; ``ConfigError``
    naming where it came from when no schema has that name."""
    value = _section(dotted, section).get("name", _section(recipe, section).get("name", default))
    if value is not None and (not isinstance(value, str) or value not in SCHEMAS[section]):
        where = "command line" if "name" in _section(dotted, section) else source
        raise ConfigError(f"{where}: key '{section}.name' = {value!r}; expected one of "
                          f"{sorted(SCHEMAS[section])}")
    return value


def select_schemas(recipe: dict, dotted: dict, source: str) -> tuple[str, str]:
    """``(objective.name, model.name)`` of a recipe (a plain dict; ``source`` names it in
    errors) and its ``dotted`` overrides (a plain dict), and drop from both the keys of other
    objectives and model families that are merely present: at their default value, or in a
    recipe written for another objective or family than the command line picks (a run's
    config.yaml fine-tuned with ``objective.name=classify``), or in a resolved config.yaml from
    before per-objective schemas (it lists every objective's keys). Raises ``ConfigError`` for
    an unknown name, a model family the objective does not run on, or another objective's (or
    family's) key set to a value of its own, naming the key and its owner."""
    objective = _name("objective", recipe, dotted, source, "mae")
    model = _name("model", recipe, dotted, source, None) or _infer_model(objective, recipe, dotted)
    if model not in OBJECTIVE_MODELS[objective]:
        where = "command line" if {"name"} & (_section(dotted, "model").keys()
                                              | _section(dotted, "objective").keys()) else source
        raise ConfigError(f"{where}: key 'model.name' = {model!r}; objective {objective} runs on "
                          f"model {' / '.join(OBJECTIVE_MODELS[objective])}")
    written_for = _section(recipe, "objective").get("name", "mae")
    written_on = _section(recipe, "model").get("name", OBJECTIVE_MODELS.get(written_for, (None,))[0])
    lenient = set()
    if _FLAT_KEYS <= set(_section(recipe, "objective")) or (  # a flat config.yaml, or another objective
            "name" in _section(dotted, "objective") and written_for != objective):
        lenient = {"objective", "model"}
    elif "name" in _section(dotted, "model") and written_on != model:
        lenient = {"model"}
    _drop_foreign(recipe, {"objective": objective, "model": model}, source, lenient)
    _drop_foreign(dotted, {"objective": objective, "model": model}, "command line", set())
    return objective, model


# key -> (low, high, whether high is allowed) for the objectives' fractions and probabilities
_RANGES = {"objective.mask_ratio": (0.0, 1.0, False), "objective.label_smoothing": (0.0, 1.0, False),
           "objective.drop_path_rate": (0.0, 1.0, False),
           "objective.momentum": (0.0, 1.0, True), "objective.rotations_per_image": (1, 4, True),
           "objective.noise_level": (0.0, 1.0, True), "objective.latent_dim": (1, 1 << 20, True),
           "objective.beta": (0.0, 1e6, True), "objective.mask_time_prob": (0.0, 1.0, True),
           "objective.mask_time_length": (1, 1 << 20, True), "objective.mask_time_min_masks": (0, 1 << 20, True),
           "objective.num_negatives": (1, 1 << 20, True),
           "objective.contrastive_logits_temperature": (1e-6, 1e6, True),
           "objective.diversity_loss_weight": (0.0, 1e6, True),
           "objective.feature_encoder_lr_scale": (0.0, 1e6, True),
           "objective.min_gumbel_temperature": (1e-6, 1e6, True),
           "objective.max_gumbel_temperature": (1e-6, 1e6, True),
           "objective.gumbel_temperature_decay": (0.0, 1.0, True),
           "objective.d_steps_per_g": (1, 1 << 10, True), "objective.generator_width": (1, 1 << 14, True),
           "objective.d_lr": (0.0, 1e3, True), "objective.g_lr": (0.0, 1e3, True),
           "objective.r1_gamma": (0.0, 1e6, True), "objective.reconstruction_weight": (0.0, 1e6, True)}
_PROBABILITIES = ["objective.mlm_probability", "objective.mask_replace_prob",
                  "objective.random_replace_prob", "objective.color_jitter_prob",
                  "objective.grayscale_prob"] + [f"objective.{k}[{i}]" for k in ("blur_prob", "solarize_prob")
                                                 for i in (0, 1)]


def validate_objective(cfg: DictConfig, where) -> None:
    """Check the ``objective`` section's ranges, for the keys the chosen objective has; raise
    ``ConfigError`` naming the key, its value and ``where(*keys)`` (the source of ``keys``)."""
    o = cfg.objective
    for key, (low, high, closed) in _RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not (low <= value <= high if closed else low <= value < high):
            raise ConfigError(f"{where(key)}: key '{key}' must be in [{low:g}, {high:g}{']' if closed else ')'}"
                              f", got {value}")
    if "blur_prob" in o and (len(o.blur_prob) != 2 or len(o.solarize_prob) != 2):
        raise ConfigError(f"{where('objective.blur_prob', 'objective.solarize_prob')}: keys "
                          "'objective.blur_prob'/'objective.solarize_prob' need one value per view "
                          f"(2), got {list(o.blur_prob)} / {list(o.solarize_prob)}")
    for key in _PROBABILITIES:
        value = OmegaConf.select(cfg, key)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"{where(key)}: key '{key}' must be a probability in [0, 1], got {value}")
    if "mask_replace_prob" in o and o.mask_replace_prob + o.random_replace_prob > 1.0:
        raise ConfigError(f"{where('objective.mask_replace_prob', 'objective.random_replace_prob')}: "
                          "keys 'objective.mask_replace_prob' + 'objective.random_replace_prob' must "
                          f"be <= 1, got {o.mask_replace_prob} + {o.random_replace_prob}")


def image_input(cfg) -> dict[str, int | None]:
    """``{"image_size", "num_channels"}`` of the config's model (a ViT); both None for a family
    without images (BERT), whose evaluations read text and never use them."""
    m = cfg.model
    return {"image_size": m.get("image_size"), "num_channels": m.get("num_channels")}
