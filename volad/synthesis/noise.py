"""Noise generators for any ``spatial_dims``, reproducible from a ``torch.Generator``."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from volad.types import linear_mode


def coarse_noise(
    shape: Sequence[int],
    *,
    factor: int = 8,
    std: float = 0.2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Low-resolution Gaussian noise upsampled to ``shape`` (Kascenas et al., MIDL 2022).

    Kascenas, O'Neil, Tsaftaris, "Denoising autoencoders for unsupervised anomaly
    detection in brain MRI", MIDL 2022: noise drawn at 16×16 and upsampled to 128²
    (``factor`` 8), σ = 0.2, added inside the foreground.

    Args:
        shape: ``(B, C, *spatial)`` of the output.
        factor: Spatial downsampling of the noise grid.
        std: Noise standard deviation.
        generator: Random generator for reproducibility.
        device: Output device.
    """
    b, c, *spatial = shape
    coarse_shape = [max(1, -(-s // factor)) for s in spatial]
    noise = torch.randn((b, c, *coarse_shape), generator=generator, device=device) * std
    return F.interpolate(noise, size=tuple(spatial), mode=linear_mode(len(spatial)), align_corners=False)
