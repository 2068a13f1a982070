"""Autoencoder and variational autoencoder with a spatial bottleneck, 2D or 3D.

References:
    Baur, Denner, Wiestler, Navab, Albarqouni. "Autoencoders for unsupervised
    anomaly segmentation in brain MR images: a comparative study." Medical Image
    Analysis 69:101952, 2021.
    Kingma & Welling. "Auto-Encoding Variational Bayes." ICLR 2014.
    Kascenas, O'Neil, Tsaftaris. "Denoising autoencoders for unsupervised anomaly
    detection in brain MRI." MIDL 2022 (the coarse-noise option).

The anomaly map is the L1 residual ``mean_c |x - x̂|``; the reconstruction x̂ is
the pseudo-healthy image. With ``coarse_noise_std > 0`` the network is trained to
remove coarse Gaussian noise added inside the brain (a denoising AE), which keeps
it from learning the identity. With ``anatomy="coordinates"`` the network also
reads each voxel's template coordinates (:mod:`volad.data.anatomy`) and still
reconstructs only the contrasts.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.nets import UNet

from volad.data.anatomy import anatomy_channels
from volad.errors import VoladConfigError
from volad.methods.base import AnomalyMethod, Batch
from volad.methods.losses import masked_l1
from volad.nn.autoencoder import ConvDecoder, ConvEncoder
from volad.synthesis.noise import coarse_noise
from volad.types import AnomalyOutput, spatial_axes


class AutoEncoder(AnomalyMethod):
    """Convolutional autoencoder; residual map.

    Args:
        spatial_dims: 2 (slice mode) or 3.
        in_channels: Input contrasts.
        channels: Channels after each stride-2 stage (the depth sets the downsampling).
        latent_channels: Channels of the spatial bottleneck.
        num_res_units: Residual units per stage.
        norm: Normalisation layer (MONAI name); batch norm keeps patch-trained
            networks consistent on whole volumes.
        skip_connections: Use a U-Net (MONAI ``UNet``) instead of the bottleneck
            autoencoder. Only meaningful with ``coarse_noise_std > 0``: skips let
            the network copy its input, and denoising training is what stops it
            copying anomalies (the DAE of Kascenas et al.).
        coarse_noise_std: σ of coarse training noise (0 disables denoising).
        coarse_noise_factor: Downsampling factor of the noise grid, or several:
            one noise field of σ ``coarse_noise_std`` per factor, summed. A fine
            scale next to the coarse one ([8, 2]) corrupts at the scale of small
            lesions too; on phantom_kinds it did not help ae3d find them (model card).
        anatomy: ``"coordinates"``: also read each voxel's template coordinates
            (registered subjects only; :mod:`volad.data.anatomy`), so what is normal
            can depend on where it is. ``None``: intensities only.
        lr: Adam learning rate.
    """

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64),
        latent_channels: int = 16,
        num_res_units: int = 1,
        norm: str = "BATCH",
        skip_connections: bool = False,
        coarse_noise_std: float = 0.0,
        coarse_noise_factor: int | Sequence[int] = 8,
        anatomy: str | None = None,
        lr: float = 1e-3,
    ):
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels, lr=lr)
        located = anatomy_channels(anatomy)
        self.anatomy = anatomy if located else None
        net_in = in_channels + located
        self.coarse_noise_std = float(coarse_noise_std)
        factors = [coarse_noise_factor] if isinstance(coarse_noise_factor, (int, float)) else list(coarse_noise_factor)
        if not factors or any(int(f) < 1 for f in factors):
            raise VoladConfigError(f"coarse_noise_factor must be one or more factors >= 1, got {coarse_noise_factor!r}")
        self.noise_factors = [int(f) for f in factors]
        if skip_connections:
            self.unet = UNet(
                spatial_dims=spatial_dims,
                in_channels=net_in,
                out_channels=in_channels,
                channels=(*channels, 2 * channels[-1]),
                strides=(2,) * len(channels),
                num_res_units=num_res_units,
                norm=norm,
            )
            self._divisor = 2 ** len(channels)
        else:
            self.encoder = ConvEncoder(spatial_dims, net_in, channels, self._latent_out(latent_channels), num_res_units, norm)
            self.decoder = ConvDecoder(spatial_dims, latent_channels, channels, in_channels, num_res_units, norm)
            self._divisor = self.encoder.downsampling

    def _latent_out(self, latent_channels: int) -> int:
        return latent_channels

    @property
    def size_divisor(self) -> int:
        return self._divisor

    def contrasts(self, x: torch.Tensor) -> torch.Tensor:
        """The contrast channels of an input (without anatomy channels): what is reconstructed."""
        return x[:, : self.in_channels]

    def corrupt(self, batch: Batch) -> torch.Tensor:
        """Training input: the image, plus coarse noise inside the brain on its contrasts if enabled."""
        if self.coarse_noise_std <= 0:
            return batch.image
        image = self.contrasts(batch.image)
        noise = sum(coarse_noise(image.shape, factor=f, std=self.coarse_noise_std, device=image.device) for f in self.noise_factors)
        return torch.cat([image + noise * batch.mask, batch.image[:, self.in_channels :]], dim=1)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "unet"):
            return self.unet(x)
        return self.decoder(self.encoder(x))

    def training_step(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        recon = self.reconstruct(self.corrupt(batch))
        loss = masked_l1(recon, self.contrasts(batch.image), batch.mask)
        return {"loss": loss, "l1": loss.detach()}

    def predict(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> AnomalyOutput:
        recon = self.reconstruct(x)
        if mask is not None:
            recon = recon * mask
        return AnomalyOutput((self.contrasts(x) - recon).abs().mean(dim=1, keepdim=True), recon)


class VariationalAutoEncoder(AutoEncoder):
    """VAE with a spatial Gaussian latent (per-position mean and log-variance).

    The training loss is the masked L1 reconstruction plus ``kl_weight`` × KL
    divergence to N(0, I), averaged per latent element. Prediction decodes the
    posterior mean.

    Args:
        kl_weight: Weight of the KL term.
        **kwargs: As :class:`AutoEncoder`.
    """

    def __init__(self, *, kl_weight: float = 1e-3, **kwargs):
        if kwargs.get("skip_connections"):
            raise ValueError("a VAE has no skip connections: its latent must carry all information")
        super().__init__(**kwargs)
        self.kl_weight = float(kl_weight)

    def _latent_out(self, latent_channels: int) -> int:
        return 2 * latent_channels

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-10, 10)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x)[0])

    def training_step(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        mu, logvar = self.encode(self.corrupt(batch))
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        recon = self.decoder(z)
        rec = masked_l1(recon, self.contrasts(batch.image), batch.mask)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean(dim=(1, *spatial_axes(mu))).mean()
        loss = rec + self.kl_weight * kl
        return {"loss": loss, "l1": rec.detach(), "kl": kl.detach()}
