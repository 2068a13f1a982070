"""Noise generators for any ``spatial_dims``, reproducible from a ``torch.Generator``."""

from __future__ import annotations

import math
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


def _simplex(coords: torch.Tensor, grads: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Simplex noise (Perlin 2001; Gustavson 2005) at points ``coords`` ``(N, d)``, any ``d``."""
    n, d = coords.shape
    skew = (math.sqrt(d + 1) - 1) / d
    unskew = (1 - 1 / math.sqrt(d + 1)) / d
    cell = torch.floor(coords + coords.sum(-1, keepdim=True) * skew)
    offset = coords - (cell - cell.sum(-1, keepdim=True) * unskew)
    order = torch.argsort(offset, dim=-1, descending=True)
    corner = torch.zeros_like(cell)
    radius2 = 0.5 if d == 2 else 0.6
    total = torch.zeros(n, dtype=coords.dtype, device=coords.device)
    icell = cell.long()
    for k in range(d + 1):
        if k > 0:  # step along the k-th largest offset axis: the next simplex corner
            corner.scatter_(1, order[:, k - 1 : k], 1.0)
        off = offset - corner + k * unskew
        h = torch.zeros(n, dtype=torch.long, device=coords.device)
        for axis in range(d):
            h = perm[(h + icell[:, axis] + corner[:, axis].long()) & 255]
        falloff = (radius2 - (off * off).sum(-1)).clamp_min(0)
        total = total + falloff**4 * (grads[h] * off).sum(-1)
    return total * (70.0 if d == 2 else 32.0)


def simplex_noise(
    shape: Sequence[int],
    *,
    period: float = 64.0,
    octaves: int = 6,
    persistence: float = 0.8,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Multi-octave simplex noise, normalised to zero mean and unit variance per sample and channel.

    The structured noise of AnoDDPM (Wyatt et al., CVPR Workshops 2022) that pDDPM
    (Behrendt et al., MIDL 2024) adds in training: octave ``o`` has period
    ``period / 2**o`` voxels and weight ``persistence**o``. Normalised so that it
    can replace Gaussian ε in the forward process.

    Args:
        shape: ``(B, C, *spatial)`` with 2 or 3 spatial axes.
        period: Period of the first octave in voxels.
        octaves: Number of octaves.
        persistence: Weight ratio between successive octaves.
        generator: Seeds the gradient table and the per-sample offsets.
        device: Output device.
    """
    b, c, *spatial = shape
    d = len(spatial)
    grads = torch.randn((256, d), generator=generator)
    grads = (grads / grads.norm(dim=-1, keepdim=True)).to(device)
    perm = torch.randperm(256, generator=generator).to(device)
    axes = torch.meshgrid(*[torch.arange(s, dtype=torch.float32, device=device) for s in spatial], indexing="ij")
    grid = torch.stack([a.reshape(-1) for a in axes], dim=-1)
    shifts = (torch.rand((b * c, d), generator=generator) * 1000.0).to(device)
    out = torch.zeros((b * c, grid.shape[0]), dtype=torch.float32, device=device)
    for i in range(b * c):
        for o in range(octaves):
            out[i] += persistence**o * _simplex(grid * (2**o / period) + shifts[i], grads, perm)
    out = (out - out.mean(dim=1, keepdim=True)) / out.std(dim=1, keepdim=True).clamp_min(1e-6)
    return out.reshape(b, c, *spatial)


def synomaly_noise(
    shape: Sequence[int],
    *,
    blob_sigma: float = 3.0,
    blob_fraction: float = 0.04,
    amplitude: tuple[float, float] = (0.5, 2.0),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Gaussian noise plus lesion-like blobs (Synomaly noise, Bi et al., arXiv 2411.04004).

    Blobs are white noise blurred with σ = ``blob_sigma`` voxels, thresholded so
    that about ``blob_fraction`` of the voxels are inside, and blurred again to
    soften their edges; each sample's blobs get one random amplitude in
    ``amplitude`` with a random sign (hyper- or hypo-intense).

    Args:
        shape: ``(B, C, *spatial)``.
        blob_sigma: Blob scale in voxels.
        blob_fraction: Expected fraction of voxels inside blobs.
        amplitude: Range of blob amplitudes (in units of the Gaussian σ).
        generator: Random generator for reproducibility.
        device: Output device.
    """
    from monai.networks.layers import GaussianFilter

    b, c, *spatial = shape
    d = len(spatial)
    gauss = torch.randn(tuple(shape), generator=generator).to(device)
    raw = torch.randn((b, 1, *spatial), generator=generator).to(device)
    blur = GaussianFilter(d, sigma=blob_sigma).to(device)
    smooth = blur(raw)
    flat = smooth.reshape(b, -1)
    cut = torch.quantile(flat, 1 - blob_fraction, dim=1).reshape(b, *([1] * (d + 1)))
    blobs = GaussianFilter(d, sigma=max(blob_sigma / 2, 0.5)).to(device)((smooth > cut).float())
    lo, hi = amplitude
    amp = (torch.rand((b,), generator=generator) * (hi - lo) + lo) * torch.where(torch.rand((b,), generator=generator) < 0.5, -1.0, 1.0)
    return gauss + amp.to(device).reshape(b, *([1] * (d + 1))) * blobs / blobs.amax(dim=tuple(range(1, d + 2)), keepdim=True).clamp_min(1e-6)
