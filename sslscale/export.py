"""The encoder in Hugging Face format: gathered from the engine (ZeRO-3 included), checked,
converted to the published architecture, given its preprocessing, and round-trip checked.

Two writers live here:

- ``save_encoder`` (called by ``checkpoint.save`` at every save) writes the training encoder as
  it is (``checkpoints/step-X/encoder/``: e.g. a ``ViTMAEModel``) after ``check_encoder_state``.
  Under ZeRO-3 the parameters are partitioned across ranks; saving ``module.state_dict()``
  there writes empty tensors (DeepSpeed #3841), so ``gather_encoder_state`` gathers first. An
  export whose tensors are missing, shaped unlike the architecture, or all zero is an error.
- ``publishable_model`` (``publishable_encoder`` for the encoder alone) + ``save_preprocessing``
  + ``round_trip_check`` build what ``sslscale export`` / ``push`` publish (orchestrated in
  ``sslscale/hub.py``); no documented load path of the result creates a random weight:

  * MAE's ``ViTMAEModel`` is published as a ``ViTModel`` (same weights, same tensor names).
    A ``ViTMAEModel`` masks ``config.mask_ratio`` of the patches at random and shuffles the
    kept tokens on every forward, also at inference: loaded with ``AutoModel`` it would return
    different features for the same image on every call. The ``ViTModel`` sees every patch in
    order, i.e. exactly what sslscale's kNN evaluation uses (MAE paper, Sec. 4: the encoder is
    applied to the full set of patches after pretraining).
  * Contrastive objectives' ``ViTModel`` is published as it is. MLM's ``BertModel`` is
    published with its trained MLM head, as the ``BertForMaskedLM`` it is part of during
    training (``publishable_model``; the decoder tied to the word embeddings, as BERT), so
    ``AutoModel`` (a ``BertModel`` from the same weights under ``bert.``),
    ``AutoModelForMaskedLM`` and ``pipeline("fill-mask")`` all load trained weights. Training
    runs the head on the masked positions only; the head is per position, so the full-sequence
    head of the export computes the same logits there. CLM's ``GPT2Model`` is published with its
    LM head, as the ``GPT2LMHeadModel`` it is trained in (the head tied to the token embeddings,
    as GPT-2), so ``AutoModel`` loads the ``GPT2Model``, ``AutoModelForCausalLM`` and
    ``pipeline("text-generation")`` the language model; its config carries the tokenizer's
    ``[CLS]`` / ``[SEP]`` / ``[PAD]`` as bos / eos / pad (generation stops at a document's end)
    and its tokenizer is saved without ``token_type_ids`` (GPT-2 would add the embedding of
    token 0 to every position for them). GPT-2 has no pooler.
  * wav2vec 2.0's ``Wav2Vec2Model`` (the feature encoder and transformer, without the quantizer
    and the projections) is published as it is, with a ``Wav2Vec2FeatureExtractor`` (16 kHz,
    zero-mean / unit-variance per clip, attention mask), so ``AutoModel`` and
    ``pipeline("feature-extraction")`` load it. It has no pooler.
  * Every published ViT / BERT (not GPT-2) carries a fixed **identity pooler** (``pooler.dense`` = I, bias
    0): ``AutoModel`` and the pipelines build a pooler whatever the config says, and without
    saved weights it would be random on every load. ViTs get ``pooler_act="linear"``, so
    ``pooler_output`` is the final-norm CLS token (``last_hidden_state[:, 0]``, what
    ``objective.pooling=cls`` uses); BERT's pooler always applies tanh, so its
    ``pooler_output`` is ``tanh`` of the CLS token's hidden state. Nothing trains it.
  * Gray-image encoders (``num_channels == 1``) are published with 3 input channels: the patch
    projection's weight is split over R, G, B with the ITU-R 601-2 luma weights (0.299, 0.587,
    0.114, summing to 1, as PIL's ``convert("L")``) and the normalization is repeated, so an RGB
    copy of a gray image gives the trained features (to float rounding), a color image is seen
    as its PIL gray conversion, and the model works in ``pipeline("image-feature-extraction")``,
    which converts every image to RGB.

Dispatch is on the encoder's class (``isinstance``), never on names.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (AutoFeatureExtractor, AutoImageProcessor, AutoModel, AutoModelForCausalLM,
                          AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM, BertModel, GPT2LMHeadModel,
                          GPT2Model, PreTrainedModel, ViTConfig, ViTMAEModel, ViTModel,
                          Wav2Vec2FeatureExtractor, Wav2Vec2Model)
from transformers.models.bert.modeling_bert import BertPooler
from transformers.models.vit.modeling_vit import ViTPooler

# ViTConfig fields that a ViTMAEConfig shares (the rest are MAE decoder / masking settings).
_VIT_FIELDS = ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
               "num_attention_heads", "intermediate_size", "hidden_act", "hidden_dropout_prob",
               "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps", "qkv_bias")
_GPT2 = (GPT2Model, GPT2LMHeadModel)  # no pooler, no token_type_ids
_NO_POOLER = (*_GPT2, Wav2Vec2Model)
ROUND_TRIP_ATOL = 1e-5  # max |difference| of last_hidden_state, fp32
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's RGB -> "L"
# Fixed sentences for the text round trip (any text works; these exercise padding lengths).
_SENTENCES = ("The encoder was pretrained with masked language modeling.",
              "Shards are read as resumable streams.",
              "A checkpoint counts only once every rank has written it, and the latest pointer "
              "moves after the completion marker exists.")


class ExportError(RuntimeError):
    """The encoder to export is empty, incomplete, misshapen, of an unsupported class, or its
    exported folder does not reproduce the training model's features (or MLM logits), or
    loading it would initialize weights at random."""


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
    if getattr(encoder, "pooler", True) is None:  # built without its pooler (add_pooling_layer=False)
        expected = {k: s for k, s in expected.items() if not k.startswith("pooler.")}
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


# ------------------------------------------------------------------------------ published form
def is_image_encoder(model: PreTrainedModel) -> bool:
    """True for encoders that take ``pixel_values``, False for ``input_ids`` (transformers'
    ``main_input_name``)."""
    return model.main_input_name == "pixel_values"


def is_audio_encoder(model: PreTrainedModel) -> bool:
    """True for encoders that take waveforms (``input_values``: wav2vec 2.0)."""
    return model.main_input_name == "input_values"


def _vit_from_vit_mae(encoder: ViTMAEModel) -> ViTModel:
    config = ViTConfig(**{k: getattr(encoder.config, k) for k in _VIT_FIELDS})
    vit = ViTModel(config, add_pooling_layer=False)
    vit.load_state_dict(encoder.state_dict(), strict=True)  # identical tensor names and shapes
    return vit


def _gray_to_rgb(vit: ViTModel) -> ViTModel:
    """The same ViT taking 3 channels: ``W_rgb[:, c] = LUMA[c] * W_gray``, shape (D, 3, p, p)."""
    config = copy.deepcopy(vit.config)
    config.num_channels = 3
    rgb = ViTModel(config, add_pooling_layer=vit.pooler is not None)
    state = dict(vit.state_dict())
    key = "embeddings.patch_embeddings.projection.weight"
    state[key] = state[key] * torch.tensor(LUMA, dtype=state[key].dtype).view(1, 3, 1, 1)
    rgb.load_state_dict(state, strict=True)
    return rgb


@torch.no_grad()
def _with_identity_pooler(model: ViTModel | BertModel) -> ViTModel | BertModel:
    """``model`` (changed in place) with a pooler whose dense layer is the identity, bias 0:
    ``pooler_output`` ``(B, D)`` is the CLS token's last hidden state (ViT, ``pooler_act`` set to
    ``linear``) or its ``tanh`` (BERT, whose pooler activation is fixed)."""
    if isinstance(model, ViTModel):
        model.config.pooler_act, model.config.pooler_output_size = "linear", model.config.hidden_size
        model.pooler = ViTPooler(model.config)
    else:
        model.pooler = BertPooler(model.config)
    model.pooler.dense.weight.copy_(torch.eye(model.config.hidden_size))
    model.pooler.dense.bias.zero_()
    return model


def publishable_encoder(encoder: nn.Module) -> PreTrainedModel:
    """A new fp32 model in eval mode holding ``encoder``'s weights in its published form (see
    the module docstring): ``ViTMAEModel`` -> ``ViTModel``; ``ViTModel`` / ``BertModel`` copied;
    gray ViTs get 3 input channels; all get the identity pooler. A ``GPT2Model`` is copied as
    it is (no pooler), a ``Wav2Vec2Model`` too. ``ExportError`` for any other class."""
    if isinstance(encoder, (GPT2Model, Wav2Vec2Model)):
        return copy.deepcopy(encoder).float().eval()
    if isinstance(encoder, ViTMAEModel):
        model = _vit_from_vit_mae(encoder)
    elif isinstance(encoder, (ViTModel, BertModel)):
        model = copy.deepcopy(encoder)
    else:
        raise ExportError(f"cannot publish a {type(encoder).__name__}: supported encoders are "
                          "ViTMAEModel (MAE), ViTModel (contrastive), BertModel (MLM), GPT2Model (CLM) and "
                          "Wav2Vec2Model (wav2vec2)")
    if is_image_encoder(model) and model.config.num_channels == 1:
        model = _gray_to_rgb(model)
    return _with_identity_pooler(model).float().eval()


def masked_lm_of(objective: nn.Module) -> BertForMaskedLM | None:
    """The ``BertForMaskedLM`` inside ``objective`` whose ``bert`` is ``objective.encoder()``
    (MLM), or None (no MLM head to publish)."""
    encoder = objective.encoder()
    return next((m for m in objective.modules() if isinstance(m, BertForMaskedLM) and m.bert is encoder),
                None)


def causal_lm_of(objective: nn.Module) -> GPT2LMHeadModel | None:
    """The ``GPT2LMHeadModel`` inside ``objective`` whose ``transformer`` is
    ``objective.encoder()`` (CLM), or None (no causal LM head to publish)."""
    encoder = objective.encoder()
    return next((m for m in objective.modules()
                 if isinstance(m, GPT2LMHeadModel) and m.transformer is encoder), None)


def publishable_model(objective: nn.Module) -> PreTrainedModel:
    """What ``sslscale export`` publishes for ``objective``: its ``BertForMaskedLM`` (a copy,
    fp32, eval, the identity pooler on its ``bert``; the decoder stays tied to the word
    embeddings) or its ``GPT2LMHeadModel`` (a copy, fp32, eval, the head tied to the token
    embeddings) when it has one, else ``publishable_encoder(objective.encoder())``."""
    causal_lm = causal_lm_of(objective)
    if causal_lm is not None:
        model = copy.deepcopy(causal_lm).float().eval()
        if model.config.tie_word_embeddings:
            model.tie_weights()
        return model
    masked_lm = masked_lm_of(objective)
    if masked_lm is None:
        return publishable_encoder(objective.encoder())
    model = copy.deepcopy(masked_lm).float().eval()
    _with_identity_pooler(model.bert)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model


def save_preprocessing(model: PreTrainedModel, out_dir: Path, *, image_size: int | None = None,
                       mean=None, std=None, tokenizer_dir: str | Path | None = None,
                       sampling_rate: int | None = None) -> None:
    """Write what ``AutoImageProcessor`` / ``AutoTokenizer`` load next to the model.

    Images: a ``ViTImageProcessor`` that resizes to ``image_size`` (bilinear), rescales to
    [0, 1], converts to RGB and normalizes with the training ``mean`` / ``std`` ([0, 1] pixel
    units, repeated to 3 channels for gray-trained models). Text: the tokenizer saved by the
    data preparation at ``tokenizer_dir``, re-saved with ``model_max_length`` capped at the
    model's ``max_position_embeddings`` (GPT-2: without ``token_type_ids`` among its
    ``model_input_names``). Audio: a ``Wav2Vec2FeatureExtractor`` at ``sampling_rate`` Hz that
    normalizes each clip to zero mean and unit variance and returns the attention mask (what
    ``sslscale.data.audio.AudioDecoder`` feeds the model). ``ExportError`` names a missing
    tokenizer folder.
    """
    if is_audio_encoder(model):
        Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=sampling_rate, padding_value=0.0,
                                 do_normalize=True, return_attention_mask=True).save_pretrained(str(out_dir))
        return
    if is_image_encoder(model):
        from transformers import ViTImageProcessor  # its backend is chosen (and logged) on import

        channels = model.config.num_channels
        mean, std = list(mean), list(std)
        if len(mean) == 1 and channels == 3:
            mean, std = mean * 3, std * 3
        ViTImageProcessor(do_resize=True, size={"height": image_size, "width": image_size},
                          do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                          image_mean=mean, image_std=std, do_convert_rgb=True).save_pretrained(out_dir)
        return
    if tokenizer_dir is None or not Path(tokenizer_dir).is_dir():
        raise ExportError(f"no tokenizer folder at {tokenizer_dir} (the MLM data preparation "
                          "saves one at <data.train_shards>/tokenizer)")
    kwargs = {"model_input_names": ["input_ids", "attention_mask"]} if isinstance(model, _GPT2) else {}
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), **kwargs)
    tokenizer.model_max_length = min(tokenizer.model_max_length,
                                     model.config.max_position_embeddings)
    tokenizer.save_pretrained(str(out_dir))


# --------------------------------------------------------------------------------- round trip
def fixed_images(num_channels: int, image_size: int, n: int = 4) -> torch.Tensor:
    """A fixed uint8 batch ``(n, C, S, S)``: seeded noise plus an all-black and an all-white
    image (the extremes of the normalization)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, num_channels, image_size, image_size), generator=g,
                           dtype=torch.uint8)
    images[0], images[-1] = 0, 255
    return images


@contextlib.contextmanager
def _unmasked(encoder: ViTMAEModel):
    ratio, encoder.config.mask_ratio = encoder.config.mask_ratio, 0.0
    try:
        yield
    finally:
        encoder.config.mask_ratio = ratio


@torch.no_grad()
def training_features(encoder: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``last_hidden_state`` ``(B, T, D)`` of the training encoder on ``inputs``, every patch
    kept and in order for a ``ViTMAEModel`` (increasing noise, mask ratio 0), fp32. Puts
    ``encoder`` in fp32 and eval mode (in place)."""
    encoder = encoder.float().eval()
    if isinstance(encoder, ViTMAEModel):
        x = inputs["pixel_values"]
        n = encoder.embeddings.patch_embeddings.num_patches
        noise = torch.arange(n, dtype=torch.float32).expand(len(x), -1)
        with _unmasked(encoder):
            return encoder(pixel_values=x, noise=noise).last_hidden_state
    return encoder(**inputs).last_hidden_state


def _image_inputs(encoder, folder: Path, image_size: int, mean, std):
    """(training inputs, inputs from the exported AutoImageProcessor) for ``fixed_images``."""
    from PIL import Image

    channels = encoder.config.num_channels
    images = fixed_images(channels, image_size)
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    train = {"pixel_values": (images.float() / 255.0 - m) / s}
    mode = "L" if channels == 1 else "RGB"
    pil = [Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).squeeze(-1).numpy()), mode)
           for img in images]
    processor = AutoImageProcessor.from_pretrained(str(folder))
    return train, dict(processor(pil, return_tensors="pt"))


def _text_inputs(folder: Path, tokenizer_dir: Path, max_positions: int):
    """(inputs from the training tokenizer, inputs from the exported AutoTokenizer), on the
    exported tokenizer's inputs (GPT-2's: no ``token_type_ids``); ``ExportError`` if the two
    tokenize ``_SENTENCES`` differently."""
    kwargs = dict(padding=True, truncation=True, max_length=min(64, max_positions), return_tensors="pt")
    exported = dict(AutoTokenizer.from_pretrained(str(folder))(list(_SENTENCES), **kwargs))
    train = dict(AutoTokenizer.from_pretrained(str(tokenizer_dir))(list(_SENTENCES), **kwargs))
    train = {k: v for k, v in train.items() if k in exported}
    if train.keys() != exported.keys() or any(not torch.equal(train[k], exported[k]) for k in train):
        raise ExportError(f"the exported tokenizer in {folder} tokenizes differently from {tokenizer_dir}")
    return train, exported


def _audio_inputs(folder: Path, sampling_rate: int):
    """(training inputs, inputs from the exported AutoFeatureExtractor) for three fixed clips
    of different lengths (seeded noise plus a tone), padded to the longest."""
    from sslscale.data.audio import normalize

    g = np.random.default_rng(0)
    seconds = (1.0, 0.6, 0.35)
    clips = [(0.1 * g.standard_normal(int(s * sampling_rate)) + 0.5 * np.sin(
        2 * np.pi * 220 * np.arange(int(s * sampling_rate)) / sampling_rate)).astype(np.float32) for s in seconds]
    n = max(len(c) for c in clips)
    values, mask = torch.zeros(len(clips), n), torch.zeros(len(clips), n, dtype=torch.long)
    for i, c in enumerate(clips):
        values[i, :len(c)], mask[i, :len(c)] = torch.from_numpy(normalize(c)), 1
    extractor = AutoFeatureExtractor.from_pretrained(str(folder))
    exported = extractor(clips, sampling_rate=sampling_rate, padding=True, return_tensors="pt")
    return {"input_values": values, "attention_mask": mask}, dict(exported)


@contextlib.contextmanager
def _quiet_loads():
    """Silence transformers' load reports (the round trip reads ``output_loading_info``)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _load_without_new_weights(auto_class, folder: Path) -> PreTrainedModel:
    """``auto_class.from_pretrained(folder)`` in fp32, eval mode, exactly as a user loads it;
    ``ExportError`` if that initializes any weight at random (missing from the folder)."""
    with _quiet_loads():
        model, info = auto_class.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    missing = sorted(info["missing_keys"]) + sorted(info["mismatched_keys"])
    if missing:
        raise ExportError(f"round trip: {auto_class.__name__}.from_pretrained({folder}) initializes "
                          f"{len(missing)} tensor(s) at random, e.g. {missing[:3]}")
    return model.eval()


def _check_close(got: torch.Tensor, want: torch.Tensor, what: str, folder: Path, atol: float) -> float:
    if got.shape != want.shape:
        raise ExportError(f"round trip: {folder} gives {what} of shape {tuple(got.shape)}, the "
                          f"training model {tuple(want.shape)}")
    diff = (got - want).abs().max().item()
    # fp32 rounding grows with magnitude: MLM logits of ~30 differ by ~1e-5 between two correct
    # implementations, so the tolerance scales with the largest value (features are O(1)).
    tol = atol * max(1.0, want.abs().max().item())
    if not diff <= tol:  # also catches NaN
        raise ExportError(f"round trip: {what} from {folder} differ from the training encoder's "
                          f"by {diff:.3g} (> {tol:.3g}, fp32)")
    return diff


def round_trip_check(encoder: nn.Module, folder: str | Path, *, image_size: int | None = None,
                     mean=None, std=None, tokenizer_dir: str | Path | None = None,
                     masked_lm: BertForMaskedLM | None = None, causal_lm: GPT2LMHeadModel | None = None,
                     sampling_rate: int | None = None, atol: float = ROUND_TRIP_ATOL) -> float:
    """Load ``folder`` fresh as a user does (``AutoModel``, fp32, pooler included, and
    ``AutoImageProcessor`` / ``AutoTokenizer`` / ``AutoFeatureExtractor``), run a fixed batch through it and through the
    training ``encoder`` (with the training normalization or tokenizer), and return the max
    absolute difference of ``last_hidden_state`` ``(B, T, D)``. Also checks that
    ``pooler_output`` ``(B, D)`` is the (identity-pooled) CLS token, and with ``masked_lm`` (the
    training ``BertForMaskedLM``) that ``AutoModelForMaskedLM`` gives its head's logits
    ``(B, T, V)`` (to ``atol`` as well), with ``causal_lm`` (the training ``GPT2LMHeadModel``)
    that ``AutoModelForCausalLM`` gives its LM head's logits ``(B, T, V)``; a ``GPT2Model`` and
    a ``Wav2Vec2Model`` (fixed clips at ``sampling_rate`` Hz) have no pooler to check. ``ExportError`` if a load would initialize any weight at random, a difference
    exceeds ``atol`` or shapes differ (e.g. an empty or zero export, a wrong conversion, a wrong
    normalization)."""
    folder = Path(folder)
    if is_image_encoder(encoder):
        train, exported = _image_inputs(encoder, folder, image_size, mean, std)
    elif is_audio_encoder(encoder):
        train, exported = _audio_inputs(folder, sampling_rate)
    elif tokenizer_dir is None:
        raise ExportError("round trip of a text encoder needs the training tokenizer folder")
    else:
        train, exported = _text_inputs(folder, Path(tokenizer_dir), encoder.config.max_position_embeddings)
    loaded = _load_without_new_weights(AutoModel, folder)
    with torch.no_grad():
        out = loaded(**exported)
    want = training_features(encoder, train)
    diff = _check_close(out.last_hidden_state, want, "features", folder, atol)
    if not isinstance(loaded, _NO_POOLER):
        cls = out.last_hidden_state[:, 0]
        pooled = cls if is_image_encoder(loaded) else torch.tanh(cls)
        _check_close(out.pooler_output, pooled, "pooler outputs (identity-pooled CLS)", folder, atol)
    if masked_lm is not None:
        head = _load_without_new_weights(AutoModelForMaskedLM, folder)
        with torch.no_grad():
            logits = head(**exported).logits
            want_logits = masked_lm.float().eval().cls(want)
        _check_close(logits, want_logits, "MLM logits", folder, atol)
    if causal_lm is not None:
        head = _load_without_new_weights(AutoModelForCausalLM, folder)
        with torch.no_grad():
            logits = head(**exported).logits
            want_logits = causal_lm.float().eval().lm_head(want)
        _check_close(logits, want_logits, "LM logits", folder, atol)
    return diff
