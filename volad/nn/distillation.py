"""Networks of reverse distillation (RD4AD), for any ``spatial_dims``.

Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class
Embedding", CVPR 2022. A frozen teacher encoder gives features at three scales
(strides 4, 8, 16). The one-class bottleneck embedding (:class:`OneClassBottleneck`,
OCBE) fuses them into one compact map at stride 32. A student decoder
(:class:`ReverseStudent`) mirrors the teacher in reverse and must rebuild the
teacher's three feature maps from that embedding alone. On healthy anatomy it
can; where the input is anomalous the teacher's features carry something the
compact embedding of healthy training data does not, and the two disagree.

The student matches each output to the teacher's feature size exactly, so any
input whose sizes are multiples of 16 works (patches and whole volumes alike).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from volad.types import crop_spatial


def _conv(spatial_dims: int, cin: int, cout: int, stride: int = 1, transposed: bool = False) -> Convolution:
    kernel = 2 if transposed else 3
    return Convolution(
        spatial_dims, cin, cout, strides=stride, kernel_size=kernel, act="RELU", norm="BATCH", is_transposed=transposed, padding=0 if transposed else None
    )


def _res(spatial_dims: int, cin: int, cout: int, stride: int = 1) -> ResidualUnit:
    return ResidualUnit(spatial_dims, cin, cout, strides=stride, kernel_size=3, subunits=2, act="RELU", norm="BATCH")


def match_size(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop or zero-pad the spatial axes of ``x`` (at the far end) to ``size``."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    x = crop_spatial(x, size)
    pad: list[int] = []
    for have, want in reversed(list(zip(x.shape[2:], size))):
        pad += [0, want - have]
    return F.pad(x, pad)


class OneClassBottleneck(nn.Module):
    """Multi-scale feature fusion into a one-class embedding (OCBE).

    Following the paper's code: the stride-4 features go through two stride-2
    convolutions and the stride-8 features through one, to reach the stride-16
    scale; the three maps are concatenated and compressed by residual blocks, the
    first with stride 2, into the embedding at stride 32.

    Args:
        spatial_dims: 2 or 3.
        channels: Teacher channels at strides 4, 8 and 16.
        out_channels: Embedding channels (the paper uses twice the deepest teacher scale).
        num_blocks: Residual blocks in the compression.
        stride: Stride of the first compression block: 2 (the paper: embedding at
            stride 32) or 1 (embedding at stride 16).
    """

    def __init__(self, spatial_dims: int, channels: Sequence[int], out_channels: int, num_blocks: int = 1, stride: int = 2):
        super().__init__()
        c1, c2, c3 = channels
        self.down1 = nn.Sequential(_conv(spatial_dims, c1, c2, 2), _conv(spatial_dims, c2, c3, 2))
        self.down2 = _conv(spatial_dims, c2, c3, 2)
        blocks: list[nn.Module] = [_res(spatial_dims, 3 * c3, out_channels, stride)]
        blocks += [_res(spatial_dims, out_channels, out_channels) for _ in range(num_blocks - 1)]
        self.fuse = nn.Sequential(*blocks)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3 = features
        size = f3.shape[2:]
        fused = torch.cat([match_size(self.down1(f1), size), match_size(self.down2(f2), size), f3], dim=1)
        return self.fuse(fused)


class ReverseStudent(nn.Module):
    """Student decoder: the teacher's stages in reverse, from the embedding back to strides 16, 8, 4.

    Each stage upsamples by 2 (a 2-wide transposed convolution, as the paper's
    ``deconv2x2``) and refines with residual blocks.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Embedding channels.
        channels: Teacher channels at strides 4, 8 and 16 (the student's outputs).
        num_blocks: Residual blocks per stage.
        embedding_stride: Stride of the embedding relative to the deepest teacher
            scale: 2 (the paper) or 1, where the first stage keeps the resolution.
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int], num_blocks: int = 2, embedding_stride: int = 2):
        super().__init__()
        stages, cin = [], in_channels
        for i, c in enumerate(reversed(list(channels))):
            blocks = [_res(spatial_dims, c, c) for _ in range(num_blocks)]
            up = _conv(spatial_dims, cin, c, 1) if (i == 0 and embedding_stride == 1) else _conv(spatial_dims, cin, c, 2, transposed=True)
            stages.append(nn.ModuleDict({"up": up, "refine": nn.Sequential(*blocks)}))
            cin = c
        self.stages = nn.ModuleList(stages)

    def forward(self, embedding: torch.Tensor, sizes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Student features matching the teacher's, finest first.

        Args:
            embedding: OCBE output.
            sizes: Spatial sizes of the teacher's features, finest first.
        """
        out, x = [], embedding
        for stage, size in zip(self.stages, reversed(list(sizes))):
            x = stage["refine"](match_size(stage["up"](x), size))
            out.append(x)
        return out[::-1]


def cosine_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``1 − cos`` along channels at every position: ``(B, 1, *spatial)``."""
    return 1.0 - F.cosine_similarity(teacher, student, dim=1, eps=1e-6).unsqueeze(1)


def standardized_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the squared difference, ``(B, 1, *spatial)``, for standardised features."""
    return (teacher - student).pow(2).mean(dim=1, keepdim=True)


class FeatureStandardizer(nn.Module):
    """Per-channel mean and standard deviation of feature maps, fitted in one pass.

    The statistics are sums in float64 buffers, so they travel with checkpoints
    and can be accumulated over any number of batches. Unfitted, it is the identity.

    Args:
        channels: Feature channels.
        eps: Floor on the standard deviation.
    """

    summed_buffers = ("total", "total_sq", "count")  # sums: they add up over processes under DDP

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = float(eps)
        self.register_buffer("total", torch.zeros(channels, dtype=torch.float64))
        self.register_buffer("total_sq", torch.zeros(channels, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, features: torch.Tensor, weight: torch.Tensor) -> None:
        """Add the positions where ``weight`` (``(B, 1, *spatial)``, 0/1) is set."""
        f = features.double().transpose(0, 1).reshape(features.shape[1], -1)
        w = weight.double().transpose(0, 1).reshape(1, -1)
        self.total += (f * w).sum(1)
        self.total_sq += (f * f * w).sum(1)
        self.count += w.sum()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.count <= 0:
            return features
        mean = self.total / self.count
        std = (self.total_sq / self.count - mean * mean).clamp_min(0).sqrt().clamp_min(self.eps)
        shape = (1, -1) + (1,) * (features.ndim - 2)
        return (features - mean.to(features.dtype).view(shape)) / std.to(features.dtype).view(shape)
