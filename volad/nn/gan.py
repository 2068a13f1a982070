"""Generator, critic and encoder for f-AnoGAN, built from MONAI blocks for any ``spatial_dims``.

DCGAN-style networks for one fixed input size (``image_size``, e.g. 64² slices
or 32³–64³ patches): the generator maps a latent vector through a dense layer
to a ``(channels[-1], image_size / 2^L, …)`` map and upsamples it ``L`` times;
the critic and the encoder downsample ``L`` times with strided convolutions.
The critic has no batch normalisation, as WGAN-GP requires (the penalty is per
sample); it is plain strided convolutions with LeakyReLU, and its last convolutional map is
the feature space of f-AnoGAN's feature residual.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn


def _check_size(image_size: int, levels: int) -> int:
    if image_size % (2**levels):
        raise ValueError(f"image_size {image_size} must be divisible by 2^{levels} (one halving per channel level)")
    return image_size // 2**levels


class Generator(nn.Module):
    """Latent vector → image.

    Args:
        spatial_dims: 2 or 3.
        out_channels: Image channels (contrasts).
        latent_dim: Length of the latent vector.
        image_size: Edge of the square/cubic output.
        channels: Channels from the coarsest to the finest level (one 2× upsampling each).
    """

    def __init__(self, spatial_dims: int, out_channels: int, latent_dim: int, image_size: int, channels: Sequence[int] = (64, 32, 16)):
        super().__init__()
        channels = [int(c) for c in channels]
        self.spatial_dims, self.latent_dim = spatial_dims, latent_dim
        self.base = _check_size(image_size, len(channels))
        self.channels0 = channels[0]
        self.fc = nn.Linear(latent_dim, channels[0] * self.base**spatial_dims)
        ups: list[nn.Module] = []
        cin = channels[0]
        for c in channels[1:] + [channels[-1]]:
            ups.append(Convolution(spatial_dims, cin, c, strides=2, kernel_size=3, is_transposed=True, act=("relu", {}), norm="BATCH"))
            cin = c
        self.up = nn.Sequential(*ups)
        self.out = Convolution(spatial_dims, cin, out_channels, kernel_size=3, conv_only=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], self.channels0, *([self.base] * self.spatial_dims))
        return self.out(self.up(torch.relu(h)))


class Critic(nn.Module):
    """Image → scalar (WGAN critic); :meth:`features` gives the last convolutional map.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        image_size: Edge of the square/cubic input.
        channels: Channels after each 2× downsampling.
        out_features: Length of the output (1 for the critic; the latent size for the encoder).
    """

    def __init__(self, spatial_dims: int, in_channels: int, image_size: int, channels: Sequence[int] = (16, 32, 64), out_features: int = 1):
        super().__init__()
        channels = [int(c) for c in channels]
        self.base = _check_size(image_size, len(channels))
        self.image_size = image_size
        layers: list[nn.Module] = []
        cin = in_channels
        for c in channels:
            layers.append(Convolution(spatial_dims, cin, c, strides=2, kernel_size=3, act=("leakyrelu", {"negative_slope": 0.2}), norm=None))
            cin = c
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(cin * self.base**spatial_dims, out_features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if any(s != self.image_size for s in x.shape[2:]):
            raise ValueError(f"expected inputs of edge {self.image_size}, got {tuple(x.shape[2:])}; infer on patches of the training size")
        return self.conv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class Encoder(Critic):
    """Image → latent vector in (−1, 1) (tanh), the critic's architecture with ``latent_dim`` outputs."""

    def __init__(self, spatial_dims: int, in_channels: int, latent_dim: int, image_size: int, channels: Sequence[int] = (16, 32, 64)):
        super().__init__(spatial_dims, in_channels, image_size, channels, out_features=latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x))
