"""Synthetic anomaly tasks (2D/3D): each turns a healthy image and a region into an anomalous image and a label.

The tasks follow Baugh, Tan, Müller, Dombrowski, Batten & Kainz, "Many tasks make
light work: learning to localise medical anomalies from multiple synthetic
tasks", MICCAI 2023:

* ``pii``: Poisson image interpolation of a patch from another healthy image
  (Tan et al., MICCAI 2021); label = the interpolation factor α on the region.
* ``intensity``: a smooth additive intensity change; label = the smooth weight.
* ``deformation``: a sink (shrinks the content, γ < 1) or source (magnifies it,
  γ > 1) radial deformation of the region; label = the displacement normalised
  to its maximum.
* ``cutout``: the region replaced by a constant; label = 1 on the region.

Labels lie in [0, 1], are 0 outside the region, and the image is unchanged
outside the region (the Poisson solve keeps the region's border fixed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from volad.synthesis.poisson import poisson_interpolate
from volad.synthesis.shapes import ellipsoid_distance

TASKS = ("pii", "intensity", "deformation", "cutout")


def strength_range(task: str) -> tuple[float, float]:
    """Range the random transform draws a task's strength from (sign drawn separately where it matters)."""
    return {"pii": (0.05, 1.0), "intensity": (0.3, 1.5), "deformation": (1.5, 3.0), "cutout": (0.0, 1.0)}[task]


def apply_task(task: str, target: np.ndarray, source: np.ndarray | None, region: np.ndarray, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Apply one task.

    Args:
        task: One of :data:`TASKS`.
        target: Healthy image (2D or 3D).
        source: Another healthy image on the same grid (``pii`` only).
        region: Boolean region of the anomaly.
        params: ``strength`` (α for ``pii``; signed intensity change; γ or 1/γ
            for ``deformation``; fill value as a quantile of the target's
            intensities for ``cutout``) and the region's ``centre``, ``radii``,
            ``shape_seed`` (``deformation`` uses its ellipsoid distance).

    Returns:
        (image, label), both shaped like ``target``.
    """
    region = np.asarray(region, dtype=bool)
    target = np.asarray(target, dtype=np.float32)
    s = float(params["strength"])
    if not region.any():
        return target.copy(), np.zeros_like(target, dtype=np.float32)
    if task == "pii":
        if source is None:
            raise ValueError("the pii task needs a source image")
        return poisson_interpolate(target, np.asarray(source, dtype=np.float32), region, s)
    if task == "intensity":
        radius = float(np.mean(params["radii"]))
        w = ndimage.gaussian_filter(region.astype(np.float32), sigma=max(0.5, radius / 4)) * region
        w /= w.max() + 1e-12
        return target + np.float32(s) * w.astype(np.float32), w.astype(np.float32)
    if task == "deformation":
        d = ellipsoid_distance(target.shape, params["centre"], params["radii"], int(params["shape_seed"]))
        inside = region & (d < 1.0)
        scale = np.ones_like(d)
        scale[inside] = np.power(np.maximum(d[inside], 1e-6), s - 1.0)  # sample at c + (p − c)·d^(γ−1)
        centre = np.asarray(params["centre"], dtype=np.float64).reshape([-1] + [1] * target.ndim)
        grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in target.shape], indexing="ij"))
        coords = centre + (grid - centre) * scale
        warped = ndimage.map_coordinates(target, coords, order=1, mode="nearest").astype(np.float32)
        shift = np.sqrt(((coords - grid) ** 2).sum(0)) * inside
        label = shift / (shift.max() + 1e-12)
        return np.where(inside, warped, target), label.astype(np.float32)
    if task == "cutout":
        fill = float(np.quantile(target, np.clip(s, 0.0, 1.0)))
        return np.where(region, np.float32(fill), target), region.astype(np.float32)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
