"""``cyclegan``: unpaired image-to-image translation with two generators and two discriminators.

Zhu, Park, Isola & Efros, "Unpaired Image-to-Image Translation using Cycle-Consistent
Adversarial Networks" (ICCV 2017, arXiv 1703.10593). Generators G: A -> B and F: B -> A,
discriminators D_A (real A against F(b)) and D_B (real B against G(a)); the generators minimise
the adversarial losses plus ``lambda_cyc`` times the cycle-consistency loss
``|F(G(a)) - a|_1 + |G(F(b)) - b|_1`` (their eq. 2) plus the identity loss
``|G(b) - b|_1 + |F(a) - a|_1`` (their section 5.2) weighted ``lambda_id * lambda_cyc`` (the
paper's 0.5 lambda). Adversarial loss: least squares (LSGAN, Mao et al. 2017, the paper's
section 4: D pushed to 1 on real and 0 on fake, the generators' outputs to 1), or the
non-saturating loss of ``sslscale.objectives.adversarial``.

Networks, scaled to 28x28 Fashion-MNIST on CPU: the generators are the paper's ResNet-style
network (their appendix 7.2: c7s1-w, d2w, d4w, residual blocks, u2w, uw, c7s1-C; instance
norm, reflection padding, tanh), ``generator_width`` wide with ``generator_blocks`` blocks; the
discriminators are ViTs (``model.*``) with one logit per patch token: the PatchGAN idea (their
70x70 patches) on a transformer, as in ``gan``. D_A's ``ViTModel`` is the exported encoder and
its pooled tokens are the kNN features (as ``gan`` exports its discriminator's); the generators
stay in the checkpoint (``sslscale samples`` does not draw cyclegan runs: the training run
writes its translation grids itself).

Several networks (``sslscale.engine_set``): ``generator`` (G and F, ``a_to_b`` / ``b_to_a``)
and ``discriminator`` (D_A and D_B, ``a`` / ``b``), each one DeepSpeed engine with its own
optimizer, as the paper's code steps G and F with one Adam and D_A and D_B with another. A
trainer step is ``d_steps_per_g`` discriminator steps on fresh pairs of micro-batches, then one
generator step on the last pair. Differences from the paper: the discriminators see the
generators' current outputs (no history pool of 50 fakes: it would be per-rank state outside
the checkpoint), and no random resize-and-crop (the images are 28x28).

Batches (``sslscale.data.domains``): ``pixel_values`` uint8 ``(B, C, S, S)`` of domain A and
``pixel_values_b`` of domain B, from independent streams (unpaired). Images are in [-1, 1]
inside the objective.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTModel

from sslscale.config_schema import CycleGANConfig
from sslscale.objectives.adversarial import Phase, discriminator_loss, generator_loss
from sslscale.objectives.base import ObjectiveOutput
from sslscale.objectives.contrastive import vit_config
from sslscale.registry import OBJECTIVES

LOSSES = ("lsgan", "nonsaturating")


# ------------------------------------------------------------------------------------- losses
def lsgan_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """``((D(x) - 1)^2 + D(G(z))^2) / 2``, meaned over any shape (fp32 scalar); the paper halves
    the discriminator's objective."""
    return 0.5 * ((real.float() - 1).pow(2).mean() + fake.float().pow(2).mean())


def lsgan_generator_loss(fake: torch.Tensor) -> torch.Tensor:
    """``(D(G(z)) - 1)^2``, meaned over any shape."""
    return (fake.float() - 1).pow(2).mean()


def cycle_loss(x: torch.Tensor, reconstructed: torch.Tensor) -> torch.Tensor:
    """The L1 cycle-consistency (or identity) loss, meaned over ``(B, C, S, S)``."""
    return (reconstructed.float() - x.float()).abs().mean()


def patch_accuracies(real: torch.Tensor, fake: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The discriminator's accuracy on real (output > ``threshold``) and on fake (below) patches."""
    return (real.detach() > threshold).float().mean(), (fake.detach() < threshold).float().mean()


# ------------------------------------------------------------------------------------ networks
class ResidualBlock(nn.Module):
    """Two 3x3 convolutions (reflection padding, instance norm, ReLU between) plus the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNetGenerator(nn.Module):
    """Images ``(B, C, S, S)`` in [-1, 1] -> images of the same shape in [-1, 1] (the paper's
    appendix 7.2 network, two down- and two up-sampling levels): 7x7 conv to ``width``, two
    stride-2 3x3 convs (x2 channels each), ``blocks`` residual blocks, two fractionally-strided
    3x3 convs back, 7x7 conv to C, tanh. Instance norm without running statistics (no buffers).
    ``ValueError`` unless S is a multiple of 4."""

    def __init__(self, channels: int, width: int, blocks: int, image_size: int):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"model.image_size={image_size} must be a multiple of 4 for cyclegan's generators")

        def norm_relu(c):
            return [nn.InstanceNorm2d(c), nn.ReLU()]
        self.net = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(channels, width, 7), *norm_relu(width),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), *norm_relu(2 * width),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), *norm_relu(4 * width),
            *[ResidualBlock(4 * width) for _ in range(blocks)],
            nn.ConvTranspose2d(4 * width, 2 * width, 3, stride=2, padding=1, output_padding=1), *norm_relu(2 * width),
            nn.ConvTranspose2d(2 * width, width, 3, stride=2, padding=1, output_padding=1), *norm_relu(width),
            nn.ReflectionPad2d(3), nn.Conv2d(width, channels, 7), nn.Tanh())
        for m in self.modules():  # the paper's code: N(0, 0.02) weights
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.net[1].weight.dtype))


class PatchViTDiscriminator(nn.Module):
    """Images ``(B, C, S, S)`` in [-1, 1] -> one output per patch token ``(B, N)`` fp32 (a linear
    head on each of the ViT's patch tokens: a PatchGAN). ``pooled``: the final-norm CLS token
    or the mean of the patch tokens ``(B, hidden_size)``."""

    def __init__(self, cfg):
        super().__init__()
        m = cfg.model
        if m.image_size % m.patch_size:
            raise ValueError(f"model.image_size={m.image_size} must be a multiple of model.patch_size={m.patch_size}")
        if cfg.objective.pooling not in ("cls", "mean"):
            raise ValueError(f"objective.pooling={cfg.objective.pooling!r}: use cls or mean")
        self.backbone = ViTModel(vit_config(cfg), add_pooling_layer=False)
        self.head = nn.Linear(m.hidden_size, 1)
        self.pooling = cfg.objective.pooling

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.backbone.embeddings.patch_embeddings.projection.weight.dtype
        return self.backbone(pixel_values=x.to(dtype)).last_hidden_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._hidden(x)[:, 1:]).squeeze(-1).float()

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self._hidden(x)
        return hidden[:, 0] if self.pooling == "cls" else hidden[:, 1:].mean(dim=1)


# --------------------------------------------------------------------------------- objective
def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, C, S, S)`` (or [0, 1] float) -> float in [-1, 1]."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    return x * 2 - 1


class CycleGAN(nn.Module):
    """``cyclegan`` on ``batch["pixel_values"]`` (domain A) and ``batch["pixel_values_b"]``
    (domain B), uint8 ``(B, C, S, S)`` each.

    ``discriminator_loss``: D_A's and D_B's adversarial losses, summed; metrics ``d_loss``,
    ``d_a_loss``, ``d_b_loss``, ``d_{a,b}_{real,fake}_accuracy`` (per patch). ``generator_loss``:
    the adversarial losses of G and F plus the weighted cycle and identity losses; metrics
    ``g_loss`` (the total), ``g_adv_loss``, ``cycle_loss``, ``identity_loss``. ``features``: D_A's
    pooled tokens ``(B, hidden_size)``. ``ValueError`` for an unknown adversarial loss, an empty
    or overlapping pair of class lists, or image sizes the networks cannot take."""

    def __init__(self, cfg):
        super().__init__()
        o, m = cfg.objective, cfg.model
        if o.adversarial_loss not in LOSSES:
            raise ValueError(f"objective.adversarial_loss={o.adversarial_loss!r}: use one of {', '.join(LOSSES)}")
        a, b = set(o.domain_a_classes), set(o.domain_b_classes)
        if not a or not b or a & b:
            raise ValueError(f"objective.domain_a_classes={sorted(a)} and domain_b_classes={sorted(b)}: "
                             "both must be non-empty and disjoint")
        self.lsgan, self.d_steps = o.adversarial_loss == "lsgan", o.d_steps_per_g
        self.lambda_cyc, self.lambda_id = o.lambda_cyc, o.lambda_id * o.lambda_cyc
        self.lr = {"discriminator": o.d_lr or None, "generator": o.g_lr or None}
        self.image_every_steps, self.image_grid_size = o.image_every_steps, o.image_grid_size
        self.generator = nn.ModuleDict({
            name: ResNetGenerator(m.num_channels, o.generator_width, o.generator_blocks, m.image_size)
            for name in ("a_to_b", "b_to_a")})
        self.discriminator = nn.ModuleDict({name: PatchViTDiscriminator(cfg) for name in ("a", "b")})

    # the several-networks protocol (sslscale.engine_set, sslscale.trainer)
    def networks(self) -> dict[str, nn.Module]:
        return {"discriminator": self.discriminator, "generator": self.generator}

    def phases(self) -> list[Phase]:
        d = Phase("discriminator", self.discriminator_loss, reads_data=True, logs_loss=False)
        return [d] * self.d_steps + [Phase("generator", self.generator_loss, reads_data=False, logs_loss=True)]

    # losses
    def _d_terms(self, name: str, real: torch.Tensor, fake: torch.Tensor, metrics: dict) -> torch.Tensor:
        net = self.discriminator[name]
        real_out, fake_out = net(real), net(fake)
        loss = (lsgan_discriminator_loss if self.lsgan else discriminator_loss)(real_out.flatten(), fake_out.flatten())
        metrics[f"d_{name}_loss"] = loss.detach()
        metrics[f"d_{name}_real_accuracy"], metrics[f"d_{name}_fake_accuracy"] = \
            patch_accuracies(real_out, fake_out, 0.5 if self.lsgan else 0.0)
        return loss

    def discriminator_loss(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        a, b = to_unit_range(batch["pixel_values"]), to_unit_range(batch["pixel_values_b"])
        with torch.no_grad():
            fake_b, fake_a = self.generator["a_to_b"](a), self.generator["b_to_a"](b)
        metrics: dict[str, torch.Tensor] = {}
        loss = self._d_terms("a", a, fake_a, metrics) + self._d_terms("b", b, fake_b, metrics)
        metrics["d_loss"] = loss.detach()
        return ObjectiveOutput(loss=loss, metrics=metrics)

    def generator_loss(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        a, b = to_unit_range(batch["pixel_values"]), to_unit_range(batch["pixel_values_b"])
        g, f = self.generator["a_to_b"], self.generator["b_to_a"]
        fake_b, fake_a = g(a), f(b)
        adv = lsgan_generator_loss if self.lsgan else (lambda out: generator_loss(out.flatten()))
        adversarial = adv(self.discriminator["b"](fake_b)) + adv(self.discriminator["a"](fake_a))
        cycle = cycle_loss(a, f(fake_b)) + cycle_loss(b, g(fake_a))
        loss = adversarial + self.lambda_cyc * cycle
        metrics = {"g_adv_loss": adversarial.detach(), "cycle_loss": cycle.detach()}
        if self.lambda_id:
            identity = cycle_loss(b, g(b)) + cycle_loss(a, f(a))
            loss = loss + self.lambda_id * identity
            metrics["identity_loss"] = identity.detach()
        metrics["g_loss"] = loss.detach()
        return ObjectiveOutput(loss=loss, metrics=metrics)

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        """The discriminators' loss (the trainer steps each network through ``phases()``)."""
        return self.discriminator_loss(batch)

    # pictures
    @torch.no_grad()
    def translate(self, batch: dict[str, torch.Tensor], n: int | None = None) -> dict[str, torch.Tensor]:
        """Rows of ``n`` images in [0, 1]: ``a``, ``G(a)``, ``F(G(a))``, ``b``, ``F(b)``, ``G(F(b))``
        (``(n, C, S, S)`` each) of the first ``n`` images of each domain in ``batch``."""
        n = n or self.image_grid_size
        a, b = to_unit_range(batch["pixel_values"][:n]), to_unit_range(batch["pixel_values_b"][:n])
        g, f = self.generator["a_to_b"], self.generator["b_to_a"]
        fake_b, fake_a = g(a), f(b)
        rows = {"a": a, "G(a)": fake_b, "F(G(a))": f(fake_b), "b": b, "F(b)": fake_a, "G(F(b))": g(fake_a)}
        return {k: ((v.float() + 1) / 2).clamp(0, 1).cpu() for k, v in rows.items()}

    def write_images(self, batch: dict[str, torch.Tensor], out: str | Path) -> Path:
        """The translation grid of ``batch`` (``translate``) as a PNG at ``out`` (PIL)."""
        from sslscale.samples import image_grid

        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = self.translate(batch)
        image_grid(list(rows.values()), scale=max(1, 64 // rows["a"].shape[-1])).save(out)
        return out

    # the Objective protocol
    def encoder(self) -> nn.Module:
        return self.discriminator["a"].backbone

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.discriminator["a"].pooled(to_unit_range(batch["pixel_values"])).float()


@OBJECTIVES.register("cyclegan", schema=CycleGANConfig)
def build_cyclegan(cfg) -> CycleGAN:
    return CycleGAN(cfg)
