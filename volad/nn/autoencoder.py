"""Fully convolutional encoder/decoder with a spatial bottleneck, for any ``spatial_dims``.

The bottleneck is a low-resolution feature map with few channels (a "spatial"
bottleneck in the terms of Baur et al., "Autoencoders for unsupervised anomaly
segmentation in brain MR images: a comparative study", Medical Image Analysis
69, 2021). Being fully convolutional, the network applies unchanged to patches
and to whole volumes, so inference needs no patch grid unless memory asks for one.

``norm`` defaults to batch normalisation: its statistics are fixed at
inference, so a network trained on patches behaves the same on a whole
volume. Instance normalisation would renormalise by each input's own
statistics, which differ between a brain-centred patch and a mostly-background
volume.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn


def _block(spatial_dims: int, cin: int, cout: int, stride: int, num_res_units: int, norm: str, transposed: bool = False) -> nn.Module:
    layers: list[nn.Module] = [
        Convolution(spatial_dims, cin, cout, strides=stride, kernel_size=3, act="PRELU", norm=norm, is_transposed=transposed)
    ]
    for _ in range(num_res_units):
        layers.append(ResidualUnit(spatial_dims, cout, cout, kernel_size=3, subunits=1, act="PRELU", norm=norm))
    return nn.Sequential(*layers)


class ConvEncoder(nn.Module):
    """Strided-convolution encoder.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels (contrasts).
        channels: Channels after each downsampling stage.
        out_channels: Channels of the bottleneck map (a 1×1 projection).
        num_res_units: Residual units after each strided convolution.
        norm: Normalisation layer (MONAI name); see the module notes.
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int], out_channels: int, num_res_units: int = 1, norm: str = "BATCH"):
        super().__init__()
        stages, cin = [], in_channels
        for c in channels:
            stages.append(_block(spatial_dims, cin, c, 2, num_res_units, norm))
            cin = c
        self.stages = nn.Sequential(*stages)
        self.project = Convolution(spatial_dims, cin, out_channels, kernel_size=1, conv_only=True)
        self.downsampling = 2 ** len(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.stages(x))


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder` with transposed convolutions.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Bottleneck channels.
        channels: Encoder channels (reversed internally).
        out_channels: Output channels (contrasts).
        num_res_units: Residual units after each upsampling.
        norm: Normalisation layer (MONAI name).
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int], out_channels: int, num_res_units: int = 1, norm: str = "BATCH"):
        super().__init__()
        rev = list(channels)[::-1]
        self.lift = Convolution(spatial_dims, in_channels, rev[0], kernel_size=1, act="PRELU", norm=norm)
        stages, cin = [], rev[0]
        for c in rev[1:]:
            stages.append(_block(spatial_dims, cin, c, 2, num_res_units, norm, transposed=True))
            cin = c
        self.stages = nn.Sequential(*stages)
        # The last upsampling writes the output directly: no full-resolution feature maps.
        self.head = Convolution(spatial_dims, cin, out_channels, strides=2, kernel_size=3, conv_only=True, is_transposed=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.lift(z)))
