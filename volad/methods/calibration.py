"""Healthy calibration: any anomaly score onto one scale, without a lesion label.

Methods score on unrelated scales (a z-score, a reconstruction error, a
probability). Their scores on the brain voxels of healthy scans give each map's
upper-tail distribution; a score ``v`` then becomes its **surprisal**
``-log10 P(S >= v | healthy)`` (a healthy voxel reaches surprisal 3 once in a
thousand voxels), which compares across methods and fuses by averaging (the
mean surprisal is ``-log10`` of the geometric mean of the tail probabilities).

The tail is kept as a table of ``points`` knots at log-spaced tail counts,
interpolated linearly; past the largest healthy score it continues linearly
with the slope of the last decade, so scores beyond anything seen on healthy
scans keep their order instead of all sharing one value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from volad.errors import VoladConfigError


@dataclass
class TailTable:
    """One map's healthy upper tail: ``surprisal[k] = -log10 P(S >= knots[k])``.

    Attributes:
        knots: Strictly increasing scores ``(points,)``.
        surprisal: Their surprisals ``(points,)``, from 0 (the smallest healthy score) upwards.
        slope: Surprisal per score unit past the last knot (> 0).
        voxels: How many healthy voxels the table was fitted on.
    """

    knots: np.ndarray
    surprisal: np.ndarray
    slope: float
    voxels: int


def fit_tail(scores: np.ndarray, points: int = 512, *, what: str = "scores") -> TailTable:
    """Fit the healthy upper tail of ``scores`` (brain voxels of healthy scans).

    Args:
        scores: Healthy scores, any shape (flattened).
        points: Knots of the table.
        what: Named in the error (which method's map).

    Raises:
        VoladConfigError: fewer than 100 finite scores.
    """
    x = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    x = x[np.isfinite(x)]
    n = x.size
    if n < 100:
        raise VoladConfigError(f"{what}: {n} finite healthy voxel scores; calibration needs at least 100 (more healthy scans)")
    tail = np.unique(np.round(np.geomspace(n, 1, points)).astype(np.int64))[::-1]  # tail counts, N ... 1
    tail = np.r_[tail, np.full(points - tail.size, 1, dtype=np.int64)] if tail.size < points else tail
    knots = x[n - tail]
    surprisal = np.log10(n / tail)
    scale = max(float(np.abs(x).max()), 1e-6)
    knots = knots + 1e-7 * scale * np.arange(points)  # ties (many equal scores) become a strictly increasing table
    k = 10  # the last decade: from the 10th largest score (tail count 10) to the largest (tail count 1)
    rise, run = np.log10(k), x[-1] - x[n - k]
    slope = rise / run if run > 0 else 1.0 / max(float(x[-1] - x[0]), 1e-6)
    return TailTable(knots=knots, surprisal=surprisal, slope=float(slope), voxels=int(n))


def surprisal(values: torch.Tensor, knots: torch.Tensor, table: torch.Tensor, slope: torch.Tensor | float) -> torch.Tensor:
    """``-log10 P(S >= values | healthy)`` from a :class:`TailTable` (as tensors on ``values``' device)."""
    knots, table = knots.to(values), table.to(values)
    flat = values.reshape(-1).contiguous()
    i = torch.searchsorted(knots, flat, right=True).clamp(1, knots.numel() - 1)
    x0, x1, s0, s1 = knots[i - 1], knots[i], table[i - 1], table[i]
    out = s0 + (s1 - s0) * ((flat - x0) / (x1 - x0)).clamp(0, 1)
    beyond = flat > knots[-1]
    out = torch.where(beyond, table[-1] + torch.as_tensor(slope).to(values) * (flat - knots[-1]), out)
    return out.reshape(values.shape)
