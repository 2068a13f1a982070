"""Self-supervised pretext objectives that train the ``"ssl"`` teacher (and cDDPM's condition encoder) on healthy data."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from volad.synthesis.noise import coarse_noise
from volad.types import linear_mode


class MaskedReconstruction(nn.Module):
    """Self-supervised teacher objective: rebuild the whole image from a block-masked copy.

    Random cubes (squares in 2D) of the input are zeroed, and a light decoder
    must rebuild every voxel from the teacher's three feature scales. Inside
    the cubes this is inpainting, which makes the features encode healthy
    anatomy from context; outside them it is plain reconstruction, which keeps
    the local intensity information that lesions change. The masked-image
    modelling family this follows (e.g. Xie et al., "SimMIM", CVPR 2022) needs
    no labels or augmentation pairs. A contrastive objective would instead
    teach invariance to intensity changes, the very changes a lesion makes.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels to rebuild.
        teacher_channels: Teacher channels at strides 4, 8, 16.
        width: Decoder channels.
        block: Side of the masked blocks, in voxels.
        mask_ratio: Fraction of blocks masked.
    """

    def __init__(self, spatial_dims: int, in_channels: int, teacher_channels: tuple[int, ...], width: int = 32, block: int = 8, mask_ratio: float = 0.3):
        super().__init__()
        self.spatial_dims, self.block, self.mask_ratio = spatial_dims, int(block), float(mask_ratio)
        self.build_head(spatial_dims, in_channels, teacher_channels, width)

    def build_head(self, spatial_dims: int, in_channels: int, teacher_channels: tuple[int, ...], width: int) -> None:
        """The light decoder from the teacher's three scales back to the image."""
        self.lateral = nn.ModuleList(Convolution(spatial_dims, c, width, kernel_size=1, conv_only=True) for c in teacher_channels)
        self.head = nn.Sequential(
            Convolution(spatial_dims, width, width, strides=2, kernel_size=2, is_transposed=True, padding=0, act="RELU", norm="BATCH"),
            Convolution(spatial_dims, width, width // 2, strides=2, kernel_size=2, is_transposed=True, padding=0, act="RELU", norm="BATCH"),
            Convolution(spatial_dims, width // 2, in_channels, kernel_size=3, conv_only=True),
        )

    def corrupt(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Zero a random ``mask_ratio`` of ``block``-sized blocks (``mask`` unused: kept for the shared signature)."""
        b, _, *spatial = x.shape
        grid = [max(1, -(-s // self.block)) for s in spatial]
        keep = (torch.rand((b, 1, *grid), device=x.device) >= self.mask_ratio).float()
        keep = F.interpolate(keep, size=tuple(spatial), mode="nearest")
        return x * keep

    def forward(self, features: list[torch.Tensor], size: tuple[int, ...]) -> torch.Tensor:
        """Reconstruction of size ``size`` from the teacher's features (finest first)."""
        mode = linear_mode(self.spatial_dims)
        top = None
        for lat, f in reversed(list(zip(self.lateral, features))):
            y = lat(f)
            top = y if top is None else y + F.interpolate(top, size=y.shape[2:], mode=mode, align_corners=False)
        out = self.head(top)
        return F.interpolate(out, size=size, mode=mode, align_corners=False) if tuple(out.shape[2:]) != tuple(size) else out


class DenoisingReconstruction(MaskedReconstruction):
    """Self-supervised teacher objective: rebuild the clean image from a copy with coarse noise inside the brain.

    The objective of ae3d, volad's strongest single method (the denoising
    autoencoder of Kascenas, O'Neil and Tsaftaris, MIDL 2022), asked of the
    teacher's features: to undo smooth intensity deviations, they must encode
    what healthy tissue looks like at each place, and a lesion is such a deviation.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels to rebuild.
        teacher_channels: Teacher channels at strides 4, 8, 16.
        width: Decoder channels.
        noise_std: σ of the coarse noise.
        noise_factor: Downsampling factor of the noise grid.
    """

    def __init__(self, spatial_dims: int, in_channels: int, teacher_channels: tuple[int, ...], width: int = 32, noise_std: float = 0.2, noise_factor: int = 8):
        nn.Module.__init__(self)
        self.spatial_dims, self.noise_std, self.noise_factor = spatial_dims, float(noise_std), int(noise_factor)
        self.build_head(spatial_dims, in_channels, teacher_channels, width)

    def corrupt(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` plus coarse Gaussian noise inside ``mask``."""
        noise = coarse_noise(x.shape, factor=self.noise_factor, std=self.noise_std, device=x.device)
        return x + (noise if mask is None else noise * mask)
