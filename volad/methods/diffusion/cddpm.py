"""Conditioned diffusion (cDDPM) for 2D slices and 3D volumes.

Reference:
    Behrendt, Bhattacharya, Mieling, Maack, Krüger, Opfer, Schlaefer. "Guided
    reconstruction with conditioned diffusion models for unsupervised anomaly
    detection in brain MRIs." Computers in Biology and Medicine 186, 2025
    (arXiv 2312.04215).

A denoiser restores a noised image in one pass, as pDDPM does, but without
patches: the whole input is noised, and what keeps the restoration faithful to
this patient's intensities is a **condition**, a latent vector an encoder
computes from the clean input. The latent is projected and added to the
denoiser's time embedding (the authors add it to their OpenAI U-Net's class
embedding). A lesion is a local change, so a global latent carries the scan's
contrast and brightness but not the lesion, and the denoiser still restores
healthy tissue there.

Stages, in order:

1. ``"encoder"`` (with ``pretrain="masked"``, the default): the encoder is
   trained self-supervised on the healthy training split by masked-image
   modelling, rebuilding block-masked inputs through a light decoder
   (:class:`~volad.nn.pretext.MaskedReconstruction`). The authors
   pre-train a ResNet-50 with SparK, a sparse masked-modelling objective on
   the same healthy data; volad's is the dense variant of that family.
2. ``"main"``: encoder and denoiser train together. Each healthy patch is
   noised at a random t (simplex noise, as in the authors' code), the encoder
   sees the clean patch, and the denoiser predicts the clean patch (L1 inside
   the brain).

Testing: the input is noised at each ``t_test`` level (default 250, 500 and
750, the authors' noise-level ensemble; one level is the plain cDDPM), each
with its own seeded noise, restored in one pass per level (over a sliding
window, the encoder seeing each clean window), and the reconstructions are
averaged. The map is the L1 residual.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

from volad.errors import VoladConfigError
from volad.methods.base import Batch
from volad.methods.diffusion.base import DiffusionMethod, check_noise_kind, draw_noise, noise_levels
from volad.methods.losses import masked_l1
from volad.nn.pretext import MaskedReconstruction
from volad.nn.teachers import ARCHITECTURES, ResNetTeacher
from volad.types import AnomalyOutput

#: Window edge when not given: the authors' 96×96 slices in 2D; 48³ in 3D (volad's extension, a CPU-sized window).
WINDOW = {2: 96, 3: 48}


class LatentEncoder(nn.Module):
    """ResNet features of the clean input pooled into one latent vector per image.

    Args:
        arch: MONAI ResNet (``resnet10``, ``resnet18``, ``resnet34``, ``resnet50``).
        spatial_dims: 2 or 3.
        in_channels: Input contrasts.
    """

    def __init__(self, arch: str = "resnet18", *, spatial_dims: int = 3, in_channels: int = 1):
        super().__init__()
        self.backbone = ResNetTeacher(arch, spatial_dims=spatial_dims, in_channels=in_channels)
        self.dim = int(self.backbone.channels[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, dim)``: the deepest features (stride 16), averaged over space."""
        return self.backbone(x)[-1].flatten(2).mean(dim=2)


class ConditionedDiffusion(DiffusionMethod):
    """cDDPM: one-step restoration of the noised input, conditioned on a latent of the clean input.

    ``t_test``, ``window`` and ``window_batch`` only change inference: a trained
    checkpoint loads with any value of them.

    Args:
        spatial_dims: 2 (slice mode, the paper's setting) or 3.
        in_channels: Input contrasts.
        encoder_arch: ResNet of the encoder (the paper: ResNet-50 in 2D; here
            ``resnet18`` by default, for CPU budgets).
        pretrain: ``"masked"``: a self-supervised ``"encoder"`` stage first (the
            paper's setting); ``"none"``: the encoder starts random.
        pretrain_block: Side (voxels) of the blocks masked in pre-training.
        pretrain_mask_ratio: Fraction of blocks masked in pre-training.
        pretrain_lr: Adam learning rate of the encoder stage.
        t_test: Noise level at test time, or a list whose reconstructions are averaged.
        noise: ``simplex`` (the authors') or ``gaussian``.
        window: Edge of the window the encoder and denoiser see (``None``: :data:`WINDOW`).
            A run that names no ``patch_size`` trains on windows of this edge; at test
            time the input is restored over a sliding window of it (0: the whole input
            in one pass).
        window_batch: Windows per network pass at test time.
        channels, num_res_blocks, num_train_timesteps, beta_schedule, prediction, lr, seed:
            see :class:`~volad.methods.diffusion.base.DiffusionMethod`.
    """

    inference_hparams = ("t_test", "window", "window_batch")
    stat_names = ("passes", "levels")

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        encoder_arch: str = "resnet18",
        pretrain: Literal["masked", "none"] = "masked",
        pretrain_block: int = 8,
        pretrain_mask_ratio: float = 0.3,
        pretrain_lr: float = 1e-3,
        t_test: int | Sequence[int] = (250, 500, 750),
        noise: str = "simplex",
        window: int | None = None,
        window_batch: int = 4,
        channels: Sequence[int] = (8, 16, 32),
        num_res_blocks: int = 1,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        prediction: str = "sample",
        lr: float = 1e-4,
        seed: int = 0,
    ):
        if encoder_arch not in ARCHITECTURES:
            raise VoladConfigError(f"encoder_arch must be one of {', '.join(ARCHITECTURES)}, got {encoder_arch!r}")
        encoder = LatentEncoder(encoder_arch, spatial_dims=spatial_dims, in_channels=in_channels)
        super().__init__(
            spatial_dims=spatial_dims, in_channels=in_channels, channels=channels, num_res_blocks=num_res_blocks,
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction=prediction, lr=lr, seed=seed,
            condition_dim=encoder.dim,
        )
        self.encoder = encoder
        if pretrain not in ("masked", "none"):
            raise VoladConfigError(f"pretrain must be 'masked' or 'none', got {pretrain!r}")
        self.t_test, self.noise_kind = noise_levels(t_test, num_train_timesteps), check_noise_kind(noise)
        if spatial_dims not in WINDOW:
            raise VoladConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.window = WINDOW[spatial_dims] if window is None else int(window)
        self.window_batch = int(window_batch)
        self.pretrain_lr = float(pretrain_lr)
        self.stages = ("encoder", "main") if pretrain == "masked" else ("main",)
        if pretrain == "masked":
            self.pretext = MaskedReconstruction(spatial_dims, in_channels, self.encoder.backbone.channels, block=pretrain_block, mask_ratio=pretrain_mask_ratio)

    @property
    def training_patch_size(self) -> int | None:
        """The window: the encoder learns latents of the field of view it conditions on at test time."""
        return self.window or None

    def resolved_hparams(self) -> dict:
        return {"window": self.window}

    def _noise(self, shape, generator: torch.Generator | None, device) -> torch.Tensor:
        return draw_noise(self.noise_kind, shape, generator, device)

    # -- training ------------------------------------------------------------------
    def configure_optimizers(self, stage: str) -> dict[str, torch.optim.Optimizer]:
        if stage == "encoder":
            params = list(self.encoder.parameters()) + list(self.pretext.parameters())
            return {"main": torch.optim.Adam(params, lr=self.pretrain_lr)}
        if stage == "main":  # encoder and denoiser together, as the authors fine-tune the pre-trained encoder
            params = list(self.encoder.parameters()) + list(self.net.parameters())
            return {"main": torch.optim.Adam(params, lr=self.lr)}
        raise VoladConfigError(f"{type(self).__name__} has no stage {stage!r} (stages: {self.stages})")

    def training_step(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        x, mask = batch.image, batch.mask
        if stage == "encoder":
            recon = self.pretext(self.encoder.backbone(self.pretext.corrupt(x, mask)), tuple(x.shape[2:]))
            loss = masked_l1(recon, x, mask)
            return {"loss": loss, "l1": loss.detach()}
        t = self._timesteps(x.shape[0], 1, self.schedule.num_train_timesteps, x.device)
        noise = self._noise(x.shape, None, x.device)
        out = self.network(self.schedule.add_noise(x, noise, t), t, self.encoder(x))
        loss = masked_l1(out, self.target(x, noise), mask)
        return {"loss": loss}

    # -- inference -----------------------------------------------------------------
    def restore(self, x_t: torch.Tensor, x: torch.Tensor, t: int) -> tuple[torch.Tensor, int]:
        """x0 from ``x_t`` at level ``t``, conditioned on the clean ``x``, over windows of edge ``window``.
        Returns (restoration, network passes)."""
        if not self.window or all(s <= self.window for s in x.shape[2:]):
            return self.denoise(x_t, self.timesteps_like(t, x.shape[0], x.device), self.encoder(x)), 1
        from monai.inferers import sliding_window_inference

        calls = [0]
        c = x.shape[1]

        def net(pair: torch.Tensor) -> torch.Tensor:  # each window: noised channels, then the clean ones
            calls[0] += 1
            noised, clean = pair[:, :c], pair[:, c:]
            return self.denoise(noised, self.timesteps_like(t, pair.shape[0], pair.device), self.encoder(clean))

        size = [min(self.window, s) for s in x.shape[2:]]
        out = sliding_window_inference(torch.cat([x_t, x], dim=1), size, sw_batch_size=self.window_batch, predictor=net, overlap=0.25, mode="gaussian")
        return out, calls[0]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> AnomalyOutput:
        mask = torch.ones_like(x[:, :1]) if mask is None else mask
        generator = self._generator()  # each level draws its own noise, in order, so maps repeat
        recon = torch.zeros_like(x)
        passes = 0
        for level in self.t_test:
            x_t = self.schedule.add_noise(x, self._noise(x.shape, generator, x.device), self.timesteps_like(level, x.shape[0], x.device))
            out, n = self.restore(x_t, x, level)
            recon += out
            passes += n
        recon = recon / len(self.t_test) * mask + x * (1 - mask)
        self.record(passes=passes, levels=len(self.t_test))
        amap = (x - recon).abs().mean(dim=1, keepdim=True) * mask
        return AnomalyOutput(anomaly_map=amap, reconstruction=recon)
