"""f-AnoGAN in 2D and 3D: a WGAN-GP on healthy patches, then an izi_f encoder.

Reference:
    Schlegl, Seeböck, Waldstein, Langs & Schmidt-Erfurth. "f-AnoGAN: Fast
    unsupervised anomaly detection with generative adversarial networks."
    Medical Image Analysis 54, 2019.
    The GAN is a Wasserstein GAN with gradient penalty (Gulrajani, Ahmed,
    Arjovsky, Dumoulin & Courville, "Improved training of Wasserstein GANs",
    NeurIPS 2017).

Stage ``gan``: the critic D is updated on every batch with
``D(G(z)) − D(x) + λ·(‖∇D(x̂)‖₂ − 1)²`` (x̂ on random lines between real and
fake, λ = 10), the generator G every ``n_critic`` batches with ``−D(G(z))``;
z ~ U(−1, 1), Adam with β = (0, 0.9). Stage ``encoder``: G and D are frozen
and the encoder E learns ``izi_f = ‖x − G(E(x))‖²/n + κ·‖f(x) − f(G(E(x)))‖²/n_f``
with f the critic's last convolutional map (κ = 1).

Map: ``(x − G(E(x)))²`` (mean over channels) plus κ times the per-location
feature residual ``mean_c (f(x) − f(G(E(x))))²``, upsampled (linearly) to the
image grid. Because upsampling keeps the mean, the map's mean over a patch is
the paper's anomaly score ``A(x) = A_R(x) + κ·A_D(x)``; the bundle's volume
score is the map's mean over the brain. Pseudo-healthy image: ``G(E(x))``.
The networks take patches of exactly ``image_size``: inference runs on a patch
grid of that size.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from volad.methods.base import AnomalyMethod, Batch
from volad.nn.gan import Critic, Encoder, Generator
from volad.types import AnomalyOutput, linear_mode


def gradient_penalty(critic: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP's penalty ``mean((‖∇D(x̂)‖₂ − 1)²)`` at ``x̂ = ε·real + (1 − ε)·fake`` (without λ).

    Args:
        critic: The critic D.
        real, fake: Batches of one shape.
        eps: Per-sample mixing weights ``(B,)`` (default: uniform random).
    """
    b = real.shape[0]
    if eps is None:
        eps = torch.rand(b, device=real.device)
    eps = eps.view(b, *([1] * (real.ndim - 1))).to(real)
    mixed = (eps * real + (1 - eps) * fake).detach().requires_grad_(True)
    out = critic(mixed)
    (grad,) = torch.autograd.grad(out.sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()


class CriticObjective(torch.nn.Module):
    """The critic's WGAN-GP terms ``(D(fake) − D(real), penalty)`` in one forward pass (so DDP can follow it)."""

    def __init__(self, gan: "FAnoGAN"):
        super().__init__()
        self.critic = gan.critic

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.critic(fake).mean() - self.critic(real).mean(), gradient_penalty(self.critic, real, fake)


class GeneratorObjective(torch.nn.Module):
    """The generator's loss ``−D(G(z))``; the critic is used, not trained (not a submodule, so DDP leaves it out)."""

    def __init__(self, gan: "FAnoGAN"):
        super().__init__()
        self.generator = gan.generator
        object.__setattr__(self, "critic", gan.critic)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return -self.critic(self.generator(z)).mean()


class FAnoGAN(AnomalyMethod):
    """f-AnoGAN (see module docstring).

    Args:
        spatial_dims: 2 (slice mode) or 3.
        in_channels: Input contrasts.
        image_size: Edge of the training patches (and of the inference patch grid).
        latent_dim: Length of z.
        generator_channels: Generator channels, coarsest first.
        critic_channels: Critic and encoder channels, finest first.
        n_critic: Critic updates per generator update.
        gp_weight: λ of the gradient penalty.
        kappa: κ, weight of the feature residual in the encoder loss and the map.
        lr: Adam learning rate of all three networks.
    """

    stages: ClassVar[tuple[str, ...]] = ("gan", "encoder")
    amp_safe: ClassVar[bool] = False  # the gradient penalty differentiates twice; kept in float32
    volume_score_mode: ClassVar[str] = "mean"  # the paper's anomaly score: the map's mean over the image

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        image_size: int = 32,
        latent_dim: int = 128,
        generator_channels: Sequence[int] = (64, 32, 16),
        critic_channels: Sequence[int] = (16, 32, 64),
        n_critic: int = 5,
        gp_weight: float = 10.0,
        kappa: float = 1.0,
        lr: float = 1e-4,
    ):
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels, lr=lr)
        self.image_size, self.latent_dim = int(image_size), int(latent_dim)
        self.n_critic, self.gp_weight, self.kappa = int(n_critic), float(gp_weight), float(kappa)
        self.generator = Generator(spatial_dims, in_channels, self.latent_dim, self.image_size, generator_channels)
        self.critic = Critic(spatial_dims, in_channels, self.image_size, critic_channels)
        self.encoder = Encoder(spatial_dims, in_channels, self.latent_dim, self.image_size, critic_channels)
        self._steps = 0
        self._frozen = False
        object.__setattr__(self, "_objectives", None)  # under DDP: the wrapped objectives (not submodules)

    @property
    def required_patch_size(self) -> int | None:
        return self.image_size

    # -- training ------------------------------------------------------------------
    def train(self, mode: bool = True) -> "FAnoGAN":
        super().train(mode)
        if self._frozen:  # stage encoder: G and D stay in inference mode (fixed batch-norm statistics)
            self.generator.eval()
            self.critic.eval()
        return self

    def configure_optimizers(self, stage: str) -> dict[str, torch.optim.Optimizer]:
        if stage == "gan":
            self._frozen = False
            for p in self.parameters():
                p.requires_grad_(True)
            return {
                "generator": torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=(0.0, 0.9)),
                "critic": torch.optim.Adam(self.critic.parameters(), lr=self.lr, betas=(0.0, 0.9)),
            }
        if stage == "encoder":
            self.freeze_gan()
            return {"main": torch.optim.Adam(self.encoder.parameters(), lr=self.lr, betas=(0.5, 0.999))}  # the default step minimises izi_f
        raise ValueError(f"unknown stage {stage!r}")

    def freeze_gan(self) -> None:
        """Freeze G and D for stage ``encoder``."""
        self._frozen = True
        for p in list(self.generator.parameters()) + list(self.critic.parameters()):
            p.requires_grad_(False)
        self.generator.eval()
        self.critic.eval()

    def sample_latent(self, n: int, device) -> torch.Tensor:
        return torch.rand(n, self.latent_dim, device=device) * 2 - 1

    def _check_size(self, x: torch.Tensor) -> None:
        if tuple(x.shape[2:]) != (self.image_size,) * self.spatial_dims:
            raise ValueError(
                f"f-AnoGAN was built for {self.image_size}^{self.spatial_dims} inputs, got {tuple(x.shape[2:])}; "
                "train with --patch_size equal to image_size"
            )

    def izi_f(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The encoder loss and its two terms."""
        rec = self.generator(self.encoder(x))
        image = F.mse_loss(rec, x)
        feature = F.mse_loss(self.critic.features(rec), self.critic.features(x))
        return {"loss": image + self.kappa * feature, "image": image, "feature": feature}

    def distribute(self, stage: str, wrap) -> None:
        """The GAN stage's two objectives each go through DDP (one forward, one backward per update)."""
        if stage != "gan":
            return super().distribute(stage, wrap)
        objectives = (CriticObjective(self), GeneratorObjective(self))
        object.__setattr__(self, "_objectives", None if wrap is None else tuple(wrap(o) for o in objectives))

    def optimization_step(self, batch: Batch, stage: str, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        x = batch.image
        self._check_size(x)
        if stage == "encoder":
            return super().optimization_step(batch, stage, optimizers)
        critic_objective, generator_objective = self._objectives or (CriticObjective(self), GeneratorObjective(self))
        b = x.shape[0]
        fake = self.generator(self.sample_latent(b, x.device)).detach()
        wasserstein, gp = critic_objective(x, fake)
        d_loss = wasserstein + self.gp_weight * gp
        optimizers["critic"].zero_grad(set_to_none=True)
        d_loss.backward()
        optimizers["critic"].step()
        out = {"critic": float(d_loss.detach()), "wasserstein": float(-wasserstein.detach()), "gp": float(gp.detach())}
        self._steps += 1
        if self._steps % self.n_critic == 0:
            for p in self.critic.parameters():
                p.requires_grad_(False)
            g_loss = generator_objective(self.sample_latent(b, x.device))
            optimizers["generator"].zero_grad(set_to_none=True)
            g_loss.backward()
            optimizers["generator"].step()
            for p in self.critic.parameters():
                p.requires_grad_(True)
            out["generator"] = float(g_loss.detach())
        return out

    def training_step(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        if stage != "encoder":
            raise RuntimeError("stage gan alternates optimisers in optimization_step")
        return self.izi_f(batch.image)

    # -- inference -----------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> AnomalyOutput:
        self._check_size(x)
        rec = self.generator(self.encoder(x))
        image_term = ((x - rec) ** 2).mean(dim=1, keepdim=True)
        feat = ((self.critic.features(x) - self.critic.features(rec)) ** 2).mean(dim=1, keepdim=True)
        feat = F.interpolate(feat, size=tuple(x.shape[2:]), mode=linear_mode(self.spatial_dims), align_corners=False)
        amap = image_term + self.kappa * feat
        if mask is not None:
            amap = amap * mask
        return AnomalyOutput(anomaly_map=amap, reconstruction=rec)

    def anomaly_score(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's per-image score ``A(x) = A_R(x) + κ·A_D(x)`` ``(B,)``."""
        with torch.no_grad():
            rec = self.generator(self.encoder(x))
            a_r = ((x - rec) ** 2).flatten(1).mean(1)
            a_d = ((self.critic.features(x) - self.critic.features(rec)) ** 2).flatten(1).mean(1)
        return a_r + self.kappa * a_d
