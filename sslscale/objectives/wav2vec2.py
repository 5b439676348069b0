"""wav2vec 2.0: contrastive prediction of quantized speech latents behind span masks.

Follows Baevski, Zhou, Mohamed & Auli, "wav2vec 2.0: A Framework for Self-Supervised Learning
of Speech Representations" (NeurIPS 2020, arXiv 2006.11477) on transformers'
``Wav2Vec2ForPreTraining`` (its feature encoder, feature projection, transformer, quantizer and
the two projections; sizes from the recipe's ``model`` section, ``model.name: wav2vec2``):

- §3.1 / §4.2 masking: spans of ``mask_time_length`` frames (``mask_time_prob`` x frames /
  length starts) of the latent sequence are replaced by a learned vector before the
  transformer. Masks and distractors are drawn per clip from its sample seed in the data
  workers (``sslscale.data.masking.SpanMasking``), so they do not depend on the rank, the world
  size or a resume (transformers' own draws use NumPy's global generator).
- §2 quantization: a product quantizer of ``num_codevector_groups`` G codebooks of
  ``num_codevectors_per_group`` V entries, chosen with a straight-through Gumbel softmax whose
  noise is drawn per sample from its seed too (``sslscale.data.augment.uniform``, tag
  ``GUMBEL``) and whose temperature anneals as a pure function of the step (:func:`gumbel_temperature`).
  ``objective.codevector_init: centered`` draws the codebooks from U(-0.5, 0.5) (project_q's bias
  0) instead of the reference U(0, 1), whose shared positive mean makes all targets alike at init.
- §3.2 loss: ``L = L_m + alpha L_d``. ``L_m``: for each masked frame, cross-entropy of the
  cosine similarities / ``contrastive_logits_temperature`` between the transformer output (after
  ``project_hid``) and its true quantized latent against ``num_negatives`` distractors
  (quantized latents of other masked frames of the same clip; candidates equal to the positive
  are left out, as in the reference), averaged over the masked frames of the micro-batch.
  ``L_d = (GV - perplexity) / GV`` with the perplexity of the batch-averaged softmax over each
  codebook (masked frames), summed over groups; weight ``diversity_loss_weight``.
- ``objective.feature_encoder_lr_scale`` (``lr_scale_of``) slows the convolutional feature encoder
  (fairseq's ``feature_grad_mult`` 0.1 scales its gradient, which Adam undoes). With per-frame
  LayerNorms in the conv layers (``model.feat_extract_norm: layer``) the contrastive term pulls
  the features of all frames together early on and the codebooks collapse; a slower encoder
  keeps them, but then the targets stay unpredictable and ``L_m`` at chance. The demo recipe
  uses BASE's GroupNorm arrangement at the full rate instead (``Wav2Vec2ModelConfig``).

The per-frame candidate sets (K sampled distractors per row) are gathered as ``(B, T, K+1)``
logits: no ``(rows x columns)`` matrix is shared by the rows, so the tiled InfoNCE of
``sslscale.kernels`` does not apply. The forward runs the transformer parts itself (the same
modules and order as ``Wav2Vec2Model.forward``) with masks applied by ``torch.where``, so no
boolean indexing makes the device wait on the host. The export is the ``Wav2Vec2Model``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining
from transformers.masking_utils import create_bidirectional_mask

from sslscale.config_schema import Wav2Vec2Config as Wav2Vec2ObjectiveConfig
from sslscale.data.augment import GUMBEL, uniform
from sslscale.objectives.base import ObjectiveOutput
from sslscale.objectives.mlm import mean_over_tokens
from sslscale.registry import OBJECTIVES


def wav2vec2_config(cfg) -> Wav2Vec2Config:
    """The ``Wav2Vec2Config`` of the recipe's ``model`` section (``model.name: wav2vec2``); its
    ``mask_time_*`` stay transformers' fine-tuning defaults (pretraining passes its masks)."""
    m = cfg.model
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "feat_extract_norm", "do_stable_layer_norm", "num_conv_pos_embeddings",
            "num_conv_pos_embedding_groups", "num_codevector_groups", "num_codevectors_per_group",
            "codevector_dim", "proj_codevector_dim", "hidden_dropout", "attention_dropout",
            "feat_proj_dropout", "layerdrop")
    return Wav2Vec2Config(conv_dim=list(m.conv_dim), conv_kernel=list(m.conv_kernel),
                          conv_stride=list(m.conv_stride), num_feat_extract_layers=len(m.conv_dim),
                          num_negatives=cfg.objective.num_negatives,
                          contrastive_logits_temperature=cfg.objective.contrastive_logits_temperature,
                          diversity_loss_weight=cfg.objective.diversity_loss_weight,
                          attn_implementation=m.attn_implementation, **{k: m[k] for k in keys})


def gumbel_temperature(step: int, *, max_temperature: float, min_temperature: float, decay: float) -> float:
    """The Gumbel-softmax temperature at optimizer step ``step`` (§4.2: 2 -> 0.5, decayed by
    0.999995 per update): ``max(max_temperature * decay ** step, min_temperature)``."""
    return max(max_temperature * decay ** step, min_temperature)


def encode(model, input_values: torch.Tensor, attention_mask: torch.Tensor | None,
           mask_time_indices: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``Wav2Vec2Model.forward`` of ``model`` (a ``Wav2Vec2Model``) without host syncs:
    ``(last_hidden_state (B, T, H), extract_features (B, T, C) (the normalized convolutional
    features, the quantizer's input), frame_mask (B, T) bool or None)`` for ``input_values``
    ``(B, N)`` float, ``attention_mask`` ``(B, N)`` (1 = audio) and ``mask_time_indices``
    ``(B, T)`` bool (frames replaced by the learned mask vector)."""
    features = model.feature_extractor(input_values).transpose(1, 2)
    frame_mask = None
    if attention_mask is not None:
        frame_mask = model._get_feature_vector_attention_mask(features.shape[1], attention_mask, add_adapter=False)
    hidden, extract_features = model.feature_projection(features)
    if mask_time_indices is not None:
        hidden = torch.where(mask_time_indices[..., None], model.masked_spec_embed.to(hidden.dtype), hidden)
    encoder = model.encoder
    if frame_mask is not None:
        hidden = hidden * frame_mask[..., None].to(hidden.dtype)  # padded frames are 0, as transformers'
    attention = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=frame_mask)
    hidden = hidden + encoder.pos_conv_embed(hidden)
    if not model.config.do_stable_layer_norm:
        hidden = encoder.layer_norm(hidden)
    hidden = encoder.dropout(hidden)
    for layer in encoder.layers:  # layerdrop is 0 (model.layerdrop): every layer runs
        hidden = layer(hidden, attention_mask=attention)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    if model.config.do_stable_layer_norm:
        hidden = encoder.layer_norm(hidden)
    return hidden, extract_features, frame_mask


def gumbel_noise(seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log(u))`` of shape ``(B, *shape)`` from each sample's seed
    (``sslscale.data.augment.uniform``, tag ``GUMBEL``): finite everywhere (u in [2^-25, 1 - 2^-24],
    the uniforms' own range with 0 lifted; ``u + eps`` would round the largest to 1.0 in float32)."""
    n = 1
    for size in shape:
        n *= size
    u = uniform(seeds, n, GUMBEL).clamp_min(2.0 ** -25).view(len(seeds), *shape)
    return -torch.log(-torch.log(u))


def codebook_perplexity(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over groups of ``exp(entropy)`` of the mean of ``probs`` ``(B, T, G, V)`` over the
    frames ``mask`` ``(B, T)`` selects (scalar float32; between G and G x V)."""
    weights = mask[..., None, None].to(probs.dtype)
    marginal = (probs * weights).sum((0, 1)) / weights.sum((0, 1)).clamp_min(1)
    return torch.exp(-torch.xlogy(marginal, marginal).sum(-1)).sum()


class Wav2Vec2Objective(nn.Module):
    """wav2vec 2.0 pretraining on ``batch`` = ``{"input_values": (B, N) float32 (16 kHz, zero
    mean / unit variance per clip), "attention_mask": (B, N) int64, "mask_time_indices": (B, T)
    bool, "sampled_negative_indices": (B, T, K) int64 (frame indices in the same clip),
    "sample_seeds": (B,) int64}`` (``sslscale.data.audio.AudioDecoder`` with ``SpanMasking``).
    ``forward``: ``L_m + alpha L_d`` (scalar) and the metrics ``contrastive_loss``,
    ``contrastive_chance`` (the ``L_m`` of a uniform guess: ``ln(1 + K')`` with ``K'`` the
    distractors unlike the positive, averaged over the masked frames: ``L_m`` also falls below
    ``ln(K + 1)`` when codebooks collapse and distractors drop out, only learning takes it below
    this), ``contrastive_accuracy`` (the fraction of masked frames whose positive scores above all
    their distractors; by chance 1 / (1 + the distinct distractors): drawn with replacement, 20
    of a clip's ~22 masked frames give ~13, and the demo model scores 0.07-0.08 while at chance),
    ``diversity_loss``, ``codebook_perplexity`` (of the soft assignments, summed over groups),
    ``gumbel_temperature``, ``masked_fraction`` (all detached, on the device: no host
    sync).
    ``features``: the mean of the last hidden states over a clip's frames ``(B, hidden_size)``."""

    def __init__(self, cfg):
        super().__init__()
        o = cfg.objective
        self.model = Wav2Vec2ForPreTraining(wav2vec2_config(cfg))
        if o.codevector_init == "centered":  # see config_schema.Wav2Vec2Config.codevector_init
            with torch.no_grad():
                self.model.quantizer.codevectors.uniform_(-0.5, 0.5)
                self.model.project_q.bias.zero_()
        self.temperature, self.alpha = o.contrastive_logits_temperature, o.diversity_loss_weight
        self.feature_encoder_lr_scale = o.feature_encoder_lr_scale
        self.schedule = dict(max_temperature=o.max_gumbel_temperature, min_temperature=o.min_gumbel_temperature,
                             decay=o.gumbel_temperature_decay)
        # a buffer so that the step's value reaches the device without a recompile or a sync
        self.register_buffer("gumbel_tau", torch.tensor(gumbel_temperature(0, **self.schedule)), persistent=False)

    def lr_scale_of(self, name: str) -> float:
        """``objective.feature_encoder_lr_scale`` for the convolutional feature encoder's
        parameters, 1 for the others (``sslscale.engine.param_groups``)."""
        return self.feature_encoder_lr_scale if name.startswith("model.wav2vec2.feature_extractor.") else 1.0

    def on_step_start(self, step: int, max_steps: int) -> None:
        """Set the Gumbel temperature of optimizer step ``step`` (the trainer calls this first)."""
        self.gumbel_tau.fill_(gumbel_temperature(step, **self.schedule))

    def quantize(self, features: torch.Tensor, mask: torch.Tensor,
                 seeds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codevectors (B, T, codevector_dim), perplexity (scalar))`` of ``features`` ``(B, T,
        C)``: training: hard Gumbel-softmax choices (straight-through) with noise from ``seeds``
        ``(B,)`` and the perplexity of the soft assignments over the ``mask`` ``(B, T)`` frames;
        eval: the argmax entries and their perplexity."""
        q = self.model.quantizer
        b, t, _ = features.shape
        logits = q.weight_proj(features).float().view(b, t, q.num_groups, q.num_vars)
        if self.training:
            soft = F.softmax((logits + gumbel_noise(seeds, logits.shape[1:])) / self.gumbel_tau.float(), dim=-1)
            hard = F.one_hot(soft.argmax(-1), q.num_vars).to(soft.dtype)
            choice, perplexity = hard - soft.detach() + soft, codebook_perplexity(F.softmax(logits, -1), mask)
        else:
            choice = F.one_hot(logits.argmax(-1), q.num_vars).to(logits.dtype)
            perplexity = codebook_perplexity(choice, mask)
        books = q.codevectors.view(q.num_groups, q.num_vars, -1)
        return torch.einsum("btgv,gvd->btgd", choice.to(books.dtype), books).reshape(b, t, -1), perplexity

    def contrastive_logits(self, context: torch.Tensor, targets: torch.Tensor,
                           negatives: torch.Tensor) -> torch.Tensor:
        """float32 ``(B, T, K+1)``: cosine similarity / temperature of ``context`` ``(B, T, P)``
        with each frame's positive ``targets[b, t]`` (column 0) and its distractors
        ``targets[b, negatives[b, t, k]]`` ``(B, T, K)``; a distractor equal to the positive
        (itself, or the same quantized vector) gets ``-inf``."""
        b, t, k = negatives.shape
        picked = targets.gather(1, negatives.reshape(b, t * k, 1).expand(-1, -1, targets.shape[-1])).view(b, t, k, -1)
        candidates = torch.cat([targets.unsqueeze(2), picked], dim=2).float()
        logits = F.cosine_similarity(context.float().unsqueeze(2), candidates, dim=-1) / self.temperature
        same = (picked.detach() == targets.detach().unsqueeze(2)).all(-1)
        same |= negatives == torch.arange(t, device=negatives.device)[None, :, None]
        return torch.cat([logits[..., :1], logits[..., 1:].masked_fill(same, float("-inf"))], dim=-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        mask = batch["mask_time_indices"].bool()
        hidden, extract, _ = encode(self.model.wav2vec2, batch["input_values"], batch.get("attention_mask"), mask)
        context = self.model.project_hid(hidden)
        quantized, perplexity = self.quantize(self.model.dropout_features(extract), mask, batch["sample_seeds"])
        targets = self.model.project_q(quantized.to(self.model.project_q.weight.dtype))
        logits = self.contrastive_logits(context, targets, batch["sampled_negative_indices"])
        per_frame = -F.log_softmax(logits, dim=-1)[..., 0]
        weights = mask.to(per_frame.dtype)
        contrastive = (per_frame * weights).sum() / weights.sum().clamp_min(1)
        # a uniform guess among each frame's candidates: ln(1 + distractors unlike the positive)
        chance = (torch.log(torch.isfinite(logits).sum(-1).to(weights.dtype)) * weights).sum() / weights.sum().clamp_min(1)
        # the positive scores above every distractor
        correct = (logits[..., 0] > logits[..., 1:].amax(-1)).to(weights.dtype)
        accuracy = (correct * weights).sum() / weights.sum().clamp_min(1)
        entries = self.model.quantizer.num_groups * self.model.quantizer.num_vars
        diversity = (entries - perplexity) / entries
        metrics = {"contrastive_loss": contrastive.detach(), "diversity_loss": diversity.detach(),
                   "codebook_perplexity": perplexity.detach(), "gumbel_temperature": self.gumbel_tau.float(),
                   "contrastive_chance": chance.detach(), "contrastive_accuracy": accuracy.detach(),
                   "masked_fraction": weights.mean().detach()}
        return ObjectiveOutput(loss=contrastive + self.alpha * diversity, metrics=metrics)

    def encoder(self) -> nn.Module:
        return self.model.wav2vec2

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden, _, frame_mask = encode(self.model.wav2vec2, batch["input_values"], batch.get("attention_mask"), None)
        return mean_over_tokens(hidden, frame_mask)


@OBJECTIVES.register("wav2vec2", schema=Wav2Vec2ObjectiveConfig)
def build_wav2vec2(cfg) -> Wav2Vec2Objective:
    return Wav2Vec2Objective(cfg)
