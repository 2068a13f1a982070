"""Region shapes for synthetic anomalies: rotated ellipsoids and irregular blobs, 2D and 3D.

Every shape is a pure function of its parameters (centre, radii, seed), so a
synthetic case is rebuilt exactly from what was recorded.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

SHAPES = ("ellipsoid", "irregular")
RADIUS_PRIORS = ("uniform", "log_uniform")
ASPECT = 1.5  # log_uniform: each semi-axis is the drawn scale times a factor in [1/ASPECT, ASPECT]


def _rotation(ndim: int, rng: np.random.Generator) -> np.ndarray:
    if ndim == 3:
        return Rotation.random(random_state=rng).as_matrix()
    a = rng.uniform(0, 2 * np.pi)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def ellipsoid_distance(shape: Sequence[int], centre: Sequence[float], radii: Sequence[float], seed: int) -> np.ndarray:
    """Normalised ellipsoid distance (1 on the surface) of a randomly rotated ellipsoid."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    rel = (grid - np.asarray(centre, dtype=np.float64)) @ _rotation(len(shape), rng)
    return np.sqrt(((rel / np.maximum(np.asarray(radii, dtype=np.float64), 0.5)) ** 2).sum(-1))


def region_mask(shape: Sequence[int], *, kind: str, centre: Sequence[float], radii: Sequence[float], seed: int) -> np.ndarray:
    """Boolean region of one synthetic anomaly.

    Args:
        shape: Array shape (2 or 3 axes).
        kind: ``ellipsoid`` (randomly rotated) or ``irregular`` (the ellipsoid's
            surface displaced by smooth random noise, up to ±45 % of the radius).
        centre: Centre in voxels.
        radii: Semi-axes in voxels.
        seed: Seed of the rotation and of the irregular surface.
    """
    if kind not in SHAPES:
        raise ValueError(f"unknown shape {kind!r}; choose from {SHAPES}")
    d = ellipsoid_distance(shape, centre, radii, seed)
    if kind == "ellipsoid":
        return d <= 1.0
    rng = np.random.default_rng(seed + 1)
    noise = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)), sigma=max(1.0, float(np.mean(radii)) / 2))
    noise /= np.abs(noise).max() + 1e-12
    region = d <= 1.0 + 0.45 * noise
    labels, n = ndimage.label(region)
    if n > 1:  # keep the piece that holds the centre's neighbourhood (the largest)
        sizes = ndimage.sum(region, labels, range(1, n + 1))
        region = labels == (int(np.argmax(sizes)) + 1)
    return region


def checked_radius_prior(radius_prior: str) -> str:
    """``radius_prior`` if it is one of :data:`RADIUS_PRIORS`.

    Raises:
        ValueError: any other value.
    """
    if radius_prior not in RADIUS_PRIORS:
        raise ValueError(f"unknown radius_prior {radius_prior!r}; choose from {RADIUS_PRIORS}")
    return str(radius_prior)


def random_region_params(
    shape: Sequence[int],
    brain: np.ndarray | None,
    rng: np.random.Generator,
    radius_range: tuple[float, float] = (0.08, 0.3),
    radius_prior: str = "uniform",
) -> dict:
    """Centre (a brain voxel, away from the border), radii and shape seed of a random region.

    Radii are fractions ``radius_range`` of each axis' length (at least one voxel).

    Args:
        shape: Array shape (2 or 3 axes).
        brain: Brain mask the centre is drawn from (``None``: anywhere inside the margin).
        rng: Generator of every draw.
        radius_range: Smallest and largest semi-axis as fractions of each axis.
        radius_prior: ``uniform`` draws each semi-axis uniformly in the range. ``log_uniform``
            draws one scale log-uniformly in the range (every octave of size equally often,
            so millimetre lesions are as common as centimetre ones), and each semi-axis is
            that scale times a log-uniform factor in ``[1/ASPECT, ASPECT]``.
    """
    checked_radius_prior(radius_prior)
    lo, hi = float(radius_range[0]), float(radius_range[1])
    if not 0 < lo <= hi:
        raise ValueError(f"radius_range must satisfy 0 < low <= high, got {list(radius_range)}")
    shape = tuple(int(n) for n in shape)
    margin = [max(1, int(0.1 * n)) for n in shape]
    inner = np.zeros(shape, dtype=bool)
    inner[tuple(slice(m, n - m) for m, n in zip(margin, shape))] = True
    candidates = np.argwhere(inner & (brain > 0)) if brain is not None and (brain > 0).any() else np.argwhere(inner)
    centre = candidates[rng.integers(len(candidates))]
    if radius_prior == "uniform":
        radii = [float(rng.uniform(lo, hi) * n) for n in shape]
    else:
        scale = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        radii = [scale * float(np.exp(rng.uniform(-np.log(ASPECT), np.log(ASPECT)))) * n for n in shape]
    return {
        "kind": str(rng.choice(SHAPES)),
        "centre": [int(c) for c in centre],
        "radii": [max(1.0, r) for r in radii],
        "shape_seed": int(rng.integers(2**31 - 1)),
    }
