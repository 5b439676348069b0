"""Model FLOPs of self-supervised training steps, GPU peak throughput, and MFU.

Owns the analytic count of training FLOPs per sample for every objective, done the way the SSL
papers' compute actually runs (not "6 x parameters x tokens", which is wrong for all of them):

- MAE (He et al., arXiv 2111.06377): the patch embedding on all patches, the encoder on the
  *visible* tokens (+ CLS) only, the decoder on all tokens.
- MLM (BERT, arXiv 1810.04805, head as NVIDIA's dense_seq_output / MosaicBERT): the encoder on
  every position, the prediction head (transform + vocabulary projection) on the masked
  positions only.
- CLM (GPT, Radford et al. 2018/2019): the decoder on every position and the LM head
  (vocabulary projection, tied to the embeddings) on every position too.
- Two-view objectives (SimCLR arXiv 2002.05709, MoCo v3 arXiv 2104.02057, SimSiam arXiv
  2011.10566): both views through encoder and heads, MoCo's momentum encoder + projector forward
  only, and the contrastive logits against all gathered columns.
- RotNet (arXiv 1803.07728): ``rotations_per_image`` rotated copies through encoder and head.
- Autoencoders (DAE, VAE): the encoder on all tokens, the decoder (its input embedding, the
  transformer and the pixel projection) on all patches; the VAE's posterior layer.
- wav2vec 2.0 (arXiv 2006.11477): the convolutional feature encoder on the (padded) waveform
  (with its input gradient in the first layer too: transformers' feature encoder marks the
  waveform as requiring a gradient in training), then per frame (49 per second
  with the default strides: ``sslscale.data.masking.feature_frames``) the feature projection,
  the grouped convolutional position embedding, the transformer, the quantizer's logits, the
  two projections and the ``K + 1`` cosine logits of every frame (all frames are computed; the
  loss keeps the masked ones).

Conventions (those of the PaLM paper's MFU, arXiv 2204.02311, appendix B): only matrix
multiplications count (2 FLOPs per multiply-add), attention included (``4 T^2 h`` per layer);
a backward pass costs twice its forward, except where the input needs no gradient (the patch
embedding of the pixels: weight gradient only, 1x) or nothing is trained (momentum branch: 0x).
Recomputation (the tiled InfoNCE's second pass, activation checkpointing) is not model FLOPs.
``tests/unit/test_flops.py`` checks these counts against ``torch.utils.flop_counter``.
"""

from __future__ import annotations

import os

TRAIN, FROZEN = 3.0, 1.0  # forward + backward (input and weight gradients); forward only
PATCH_TRAIN = 2.0  # forward + weight gradient: the pixels need no gradient

# Dense peaks from NVIDIA's datasheets, in TFLOP/s, by device-name fragment: bf16 (= fp16) and
# TF32 on tensor cores, fp32 on CUDA cores. Checked in order: the first fragment found in
# ``torch.cuda.get_device_name()`` wins.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    ("GH200", {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    ("B200", {"bf16": 2250.0, "tf32": 1100.0, "fp32": 75.0}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("A10G", {"bf16": 70.0, "tf32": 35.0, "fp32": 31.2}),
    ("L40S", {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
]
PEAK_ENV = "SSLSCALE_PEAK_TFLOPS"


def transformer_flops(tokens: int, hidden: int, intermediate: int, layers: int) -> float:
    """Forward FLOPs of ``layers`` pre/post-norm transformer layers on one sequence of ``tokens``.

    Per layer: Q, K, V and output projections ``2 T 4h^2``, MLP ``2 T 2hi``, attention scores
    and weighted values ``4 T^2 h``."""
    t, h = float(tokens), float(hidden)
    return layers * (2 * t * (4 * h * h + 2 * h * intermediate) + 4 * t * t * h)


def linear_flops(tokens: float, d_in: int, d_out: int) -> float:
    """Forward FLOPs of a linear layer ``(tokens, d_in) -> (tokens, d_out)``."""
    return 2.0 * tokens * d_in * d_out


def _patches(m) -> tuple[int, int]:
    """(number of patches, pixels per patch x channels) of the recipe's ViT."""
    if m.image_size % m.patch_size:
        raise ValueError(f"model.image_size={m.image_size} is not a multiple of "
                         f"model.patch_size={m.patch_size}")
    return (m.image_size // m.patch_size) ** 2, m.patch_size ** 2 * m.num_channels


def mae_flops_per_sample(cfg) -> float:
    """Training FLOPs per image of MAE (transformers ``ViTMAEForPreTraining``'s computation).

    Encoder tokens ``int(N (1 - mask_ratio)) + 1`` (the CLS token), decoder tokens ``N + 1``."""
    m = cfg.model
    n, patch_dim = _patches(m)
    visible = int(n * (1 - cfg.objective.mask_ratio)) + 1
    encoder = transformer_flops(visible, m.hidden_size, m.intermediate_size, m.num_hidden_layers)
    decoder = (linear_flops(visible, m.hidden_size, m.decoder_hidden_size)
               + transformer_flops(n + 1, m.decoder_hidden_size, m.decoder_intermediate_size,
                                   m.decoder_num_hidden_layers)
               + linear_flops(n + 1, m.decoder_hidden_size, patch_dim))
    return PATCH_TRAIN * linear_flops(n, patch_dim, m.hidden_size) + TRAIN * (encoder + decoder)


def classify_flops_per_sample(cfg, seq_len: int | None = None) -> float:
    """Training FLOPs per sample of fine-tuning (``classify``): the ViT on all ``N + 1`` tokens
    (a BERT, ``model.name=bert``: on ``seq_len`` tokens) and the linear head on the pooled
    representation. Raises ``ValueError`` for a BERT without ``seq_len``."""
    m = cfg.model
    if m.name == "bert":
        if not seq_len:
            raise ValueError("classify_flops_per_sample: a BERT needs seq_len")
        return TRAIN * (transformer_flops(seq_len, m.hidden_size, m.intermediate_size, m.num_hidden_layers)
                        + linear_flops(1, m.hidden_size, cfg.objective.num_classes))
    n, patch_dim = _patches(m)
    encoder = transformer_flops(n + 1, m.hidden_size, m.intermediate_size, m.num_hidden_layers)
    head = linear_flops(1, m.hidden_size, cfg.objective.num_classes)
    return PATCH_TRAIN * linear_flops(n, patch_dim, m.hidden_size) + TRAIN * (encoder + head)


def mlm_flops_per_sample(cfg, *, seq_len: int, vocab_size: int,
                         masked_per_sample: float | None = None) -> float:
    """Training FLOPs per sequence of BERT MLM with the head on the masked positions only.

    ``seq_len``: tokens per sequence as computed (padded length); ``vocab_size``: the output
    vocabulary; ``masked_per_sample``: predicted tokens per sequence (measured from the labels;
    default ``objective.mlm_probability * seq_len``). Raises ``ValueError`` for ``seq_len < 1``."""
    if seq_len < 1 or vocab_size < 1:
        raise ValueError(f"mlm_flops_per_sample: seq_len={seq_len} and vocab_size={vocab_size} "
                         "must be >= 1")
    m = cfg.model
    k = cfg.objective.mlm_probability * seq_len if masked_per_sample is None else masked_per_sample
    encoder = transformer_flops(seq_len, m.hidden_size, m.intermediate_size, m.num_hidden_layers)
    head = linear_flops(k, m.hidden_size, m.hidden_size) + linear_flops(k, m.hidden_size, vocab_size)
    return TRAIN * (encoder + head)


def clm_flops_per_sample(cfg, *, seq_len: int, vocab_size: int) -> float:
    """Training FLOPs per block of causal language modeling (``GPT2LMHeadModel``): the
    transformer on all ``seq_len`` positions (full ``T^2`` attention, as the kernels compute it,
    causal mask or not) and the vocabulary projection on all of them. Raises ``ValueError``
    for ``seq_len < 1`` or ``vocab_size < 1``."""
    if seq_len < 1 or vocab_size < 1:
        raise ValueError(f"clm_flops_per_sample: seq_len={seq_len} and vocab_size={vocab_size} "
                         "must be >= 1")
    m = cfg.model
    decoder = transformer_flops(seq_len, m.hidden_size, m.intermediate_size, m.num_hidden_layers)
    return TRAIN * (decoder + linear_flops(seq_len, m.hidden_size, vocab_size))


def _vit_flops(m) -> float:
    """Training FLOPs of the patch embedding + ViT encoder on all ``N + 1`` tokens."""
    n, patch_dim = _patches(m)
    encoder = transformer_flops(n + 1, m.hidden_size, m.intermediate_size, m.num_hidden_layers)
    return PATCH_TRAIN * linear_flops(n, patch_dim, m.hidden_size) + TRAIN * encoder


def rotnet_flops_per_sample(cfg) -> float:
    """Training FLOPs per image of RotNet: each of its ``rotations_per_image`` copies through
    the ViT and the 4-way head."""
    head = linear_flops(1, cfg.model.hidden_size, 4)
    return cfg.objective.rotations_per_image * (_vit_flops(cfg.model) + TRAIN * head)


def autoencoder_flops_per_sample(cfg) -> float:
    """Training FLOPs per image of ``dae`` / ``vae``: the ViT, then the patch decoder on ``N``
    tokens (embedding from the encoder width or the latent, transformer, pixel projection)."""
    m = cfg.model
    n, patch_dim = _patches(m)
    d = m.decoder_hidden_size
    decoder_in = cfg.objective.latent_dim if cfg.objective.name == "vae" else m.hidden_size
    decoder = (linear_flops(n, decoder_in, d) + linear_flops(n, d, patch_dim)
               + transformer_flops(n, d, m.decoder_intermediate_size, m.decoder_num_hidden_layers))
    posterior = linear_flops(1, m.hidden_size, 2 * cfg.objective.latent_dim) if cfg.objective.name == "vae" else 0.0
    return _vit_flops(m) + TRAIN * (decoder + posterior)


def adversarial_flops_per_sample(cfg) -> float:
    """Training FLOPs per real image read by ``gan`` / ``bigan``, counting the ViTs only (the
    DCGAN generator's convolutions and the small heads are left out). Per discriminator step and
    image: the discriminator on a real and a fake image (``bigan``: and E's forward); the
    generator step (on the last discriminator step's images) sends a fake image (``bigan``: and
    the real pair, through E) through the discriminator. Divided by ``d_steps_per_g``, the
    discriminator steps that read data. ``bigan`` with a convolutional discriminator: E's ViT only."""
    vit, d = _vit_flops(cfg.model), cfg.objective.d_steps_per_g
    if cfg.objective.name == "bigan" and cfg.objective.get("discriminator", "vit") == "dcgan":
        return (d / TRAIN + 1) * vit / d  # E alone: its forward per discriminator step, trained once
    if cfg.objective.name == "bigan":
        return (d * (2 + 1 / TRAIN) + 3) * vit / d
    return (2 * d + 1) * vit / d


def cyclegan_flops_per_sample(cfg) -> float:
    """Training FLOPs per pair of images (one of each domain) read by ``cyclegan``, counting the
    ViT discriminators only (the convolutional generators are left out): per discriminator step,
    D_A and D_B each on a real and a generated image; the generator step sends G(a) and F(b)
    through them (divided by ``d_steps_per_g``, the steps that read data)."""
    vit, d = _vit_flops(cfg.model), cfg.objective.d_steps_per_g
    return (4 * d + 2) * vit / d


def wav2vec2_flops_per_sample(cfg, num_samples: int | None = None) -> float:
    """Training FLOPs per clip of wav2vec 2.0 on ``num_samples`` waveform samples (the padded
    length the batch has; default ``data.max_audio_seconds`` at 16 kHz)."""
    from sslscale.data.masking import feature_frames

    m, o = cfg.model, cfg.objective
    n = int(round(cfg.data.max_audio_seconds * 16_000)) if num_samples is None else num_samples
    conv, length, c_in = 0.0, n, 1
    for i, (c_out, kernel, stride) in enumerate(zip(m.conv_dim, m.conv_kernel, m.conv_stride)):
        length = max((length - kernel) // stride + 1, 0)
        conv += TRAIN * linear_flops(length, c_in * kernel, c_out)
        c_in = c_out
    t, h = feature_frames(n, m.conv_kernel, m.conv_stride), m.hidden_size
    groups, entries = m.num_codevector_groups, m.num_codevector_groups * m.num_codevectors_per_group
    k = m.num_conv_pos_embeddings  # padded by k // 2 each side: t + 1 outputs for an even k (the last dropped)
    per_frame = (linear_flops(t, c_in, h) + linear_flops(t + 1 - k % 2, h // m.num_conv_pos_embedding_groups * k, h)
                 + linear_flops(t, c_in, entries) + linear_flops(t, entries // groups, m.codevector_dim // groups) * groups
                 + linear_flops(t, h, m.proj_codevector_dim) + linear_flops(t, m.codevector_dim, m.proj_codevector_dim)
                 + linear_flops(t, m.proj_codevector_dim, o.num_negatives + 1))
    return conv + TRAIN * (transformer_flops(t, h, m.intermediate_size, m.num_hidden_layers) + per_frame)


def _mlp_flops(dims: list[int]) -> float:
    return sum(linear_flops(1, a, b) for a, b in zip(dims, dims[1:]))


def two_view_flops_per_sample(cfg, *, columns: int) -> float:
    """Training FLOPs per image (two views) of ``simclr``, ``moco_v3`` or ``simsiam``.

    ``columns``: images whose embeddings the loss compares against (the gathered micro-batch:
    ``micro_batch_size x world_size`` with ``objective.negatives=global``). SimCLR's logits are
    ``2B x 2N`` with gradients to both sides; MoCo v3's two losses ``B x N`` each with gradients
    to the queries only. Raises ``ValueError`` for an objective that is not two-view."""
    m, o = cfg.model, cfg.objective
    n, patch_dim = _patches(m)
    h, p, d, q = m.hidden_size, o.projection_hidden_dim, o.projection_dim, o.get("predictor_hidden_dim")
    backbone = transformer_flops(n + 1, h, m.intermediate_size, m.num_hidden_layers)
    patch = linear_flops(n, patch_dim, h)
    view = PATCH_TRAIN * patch + TRAIN * backbone
    if o.name == "simclr":
        view += TRAIN * _mlp_flops([h, p, d])
        # logits 2B x 2N x d: forward + both gradients, per image (2 rows each)
        return 2 * view + TRAIN * 2 * 2 * linear_flops(1, d, columns)
    if o.name not in ("moco_v3", "simsiam"):
        raise ValueError(f"two_view_flops_per_sample: objective.name={o.name!r} is not one of "
                         "simclr, moco_v3, simsiam")
    view += TRAIN * (_mlp_flops([h, p, p, d]) + _mlp_flops([d, q, d]))
    if o.name == "simsiam":
        return 2 * view
    momentum = FROZEN * (patch + backbone + _mlp_flops([h, p, p, d]))
    # two losses, each B query rows x N keys x d: forward + the queries' gradient
    return 2 * (view + momentum) + 2 * 2.0 * linear_flops(1, d, columns)


def flops_per_sample(cfg, **data) -> float:
    """Training FLOPs per sample for ``cfg.objective.name``; ``data`` holds what the data decides:
    ``seq_len``, ``vocab_size`` (and optionally ``masked_per_sample``) for MLM (CLM: ``seq_len``,
    ``vocab_size``), ``columns`` for
    two-view objectives. Raises ``ValueError`` naming ``objective.name`` if unknown."""
    name = cfg.objective.name
    if name == "mae":
        return mae_flops_per_sample(cfg)
    if name == "mlm":
        return mlm_flops_per_sample(cfg, **data)
    if name == "clm":
        return clm_flops_per_sample(cfg, **data)
    if name in ("simclr", "moco_v3", "simsiam"):
        return two_view_flops_per_sample(cfg, **data)
    if name == "classify":
        return classify_flops_per_sample(cfg, **data)
    if name == "rotnet":
        return rotnet_flops_per_sample(cfg)
    if name in ("dae", "vae"):
        return autoencoder_flops_per_sample(cfg)
    if name == "wav2vec2":
        return wav2vec2_flops_per_sample(cfg, **data)
    if name in ("gan", "bigan"):
        return adversarial_flops_per_sample(cfg)
    if name == "cyclegan":
        return cyclegan_flops_per_sample(cfg)
    raise ValueError(f"flops_per_sample: no FLOP count for objective.name={name!r} "
                     "(known: mae, mlm, clm, simclr, moco_v3, simsiam, classify, rotnet, dae, vae, wav2vec2, gan, bigan, cyclegan)")


def flops_per_sample_of_batch(cfg, batch: dict, *, world_size: int,
                              vocab_size: int | None = None) -> float:
    """:func:`flops_per_sample` with what the data decides read from one micro-batch.

    MLM: ``seq_len`` from ``input_ids`` ``(B, L)``, ``masked_per_sample`` from ``labels != -100``
    (a host sync: call it on logging steps), ``vocab_size`` from the argument or
    ``model.vocab_size``. Two-view: ``columns`` = ``B x world_size`` with
    ``objective.negatives=global``, else ``B``. Raises ``ValueError`` for an MLM batch without
    a known vocabulary size. CLM: ``seq_len`` from ``input_ids`` (no host sync)."""
    name = cfg.objective.name
    if name == "clm":
        vocab = vocab_size or cfg.model.vocab_size
        if not vocab:
            raise ValueError("flops_per_sample_of_batch: pass vocab_size (model.vocab_size is 0)")
        return clm_flops_per_sample(cfg, seq_len=batch["input_ids"].shape[1], vocab_size=vocab)
    if name == "mlm":
        ids, labels = batch["input_ids"], batch["labels"]
        vocab = vocab_size or cfg.model.vocab_size
        if not vocab:
            raise ValueError("flops_per_sample_of_batch: pass vocab_size (model.vocab_size is 0)")
        masked = (labels != -100).sum().item() / max(len(labels), 1)
        return mlm_flops_per_sample(cfg, seq_len=ids.shape[1], vocab_size=vocab,
                                    masked_per_sample=masked)
    if name in ("simclr", "moco_v3", "simsiam"):
        local = len(batch["pixel_values"])
        columns = local * world_size if cfg.objective.negatives == "global" else local
        return two_view_flops_per_sample(cfg, columns=columns)
    if name == "wav2vec2":  # the padded clip length (no host sync)
        return wav2vec2_flops_per_sample(cfg, num_samples=batch["input_values"].shape[1])
    if name == "classify" and "input_ids" in batch:  # text: the block length
        return classify_flops_per_sample(cfg, seq_len=batch["input_ids"].shape[1])
    return flops_per_sample(cfg)


def peak_tflops(device_name: str | None = None, override: float | None = None,
                precision: str = "bf16") -> float | None:
    """Peak dense TFLOP/s of one device at the run's ``precision`` (``bf16`` / ``fp16``: the
    tensor-core bf16 peak; ``fp32``: the TF32 tensor-core peak when PyTorch allows TF32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32``), else the CUDA-core fp32 peak), so an fp32 run's
    MFU is not measured against a bf16 peak it cannot reach. ``override``, else
    ``$SSLSCALE_PEAK_TFLOPS``, else the ``PEAK_TFLOPS`` entry whose fragment is in
    ``device_name`` (default: the current CUDA device's name). ``None`` when unknown (CPU, an
    unlisted GPU): MFU is then not reported. Raises ``ValueError`` for another precision."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"peak_tflops: precision must be bf16, fp16 or fp32, got {precision!r}")
    if override:
        return float(override)
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV])
    import torch

    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    column = "bf16" if precision in ("bf16", "fp16") else \
        "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in device_name:
            return peaks[column]
    return None


def mfu(flops_per_sample: float, samples_per_sec: float, *, num_devices: int,
        peak_tflops_per_device: float) -> float:
    """Model FLOPs utilization in [0, 1]: achieved model FLOP/s over the devices' peak.

    ``samples_per_sec``: global training throughput; ``num_devices``: devices sharing it.
    Raises ``ValueError`` for a non-positive peak or device count."""
    if peak_tflops_per_device <= 0 or num_devices < 1:
        raise ValueError(f"mfu: peak_tflops_per_device={peak_tflops_per_device} and "
                         f"num_devices={num_devices} must be positive")
    return flops_per_sample * samples_per_sec / (num_devices * peak_tflops_per_device * 1e12)
