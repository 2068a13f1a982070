"""Post-processing of anomaly maps, identical for every method.

The standard brain-MRI chain (Baur et al. 2021; Kascenas et al. 2022; Behrendt
et al. 2024): restrict to the brain mask eroded by a few millimetres (tissue
borders give false positives), then median-filter. Sizes are in millimetres and
converted with each volume's voxel size, so one setting means the same thing at
1 mm and at 2 mm. The median window is the method's own by default
(:attr:`volad.methods.base.AnomalyMethod.median_mm`: 5 mm for reconstruction
residuals, none for maps without voxel noise), so it belongs to the map, not to
the protocol two reports must share.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from volad.methods.smoothing import median_smooth


@dataclass(frozen=True)
class PostProcessing:
    """Settings of the post-processing chain (all recorded in reports).

    Attributes:
        erosion_mm: Erode the brain mask by this radius before masking the map.
        median_mm: Median-filter window (edge length); 0 disables.
        min_component_voxels: Drop connected components of a thresholded map
            smaller than this (applied at thresholding time; 0 disables).
    """

    erosion_mm: float = 2.0
    median_mm: float = 5.0
    min_component_voxels: int = 0

    def voxels(self, spacing: Sequence[float]) -> dict[str, int]:
        """Erosion iterations and median kernel size in voxels for a voxel size."""
        s = float(np.mean(spacing))
        erosion = int(round(self.erosion_mm / s))
        k = int(round(self.median_mm / s))
        if k > 0 and k % 2 == 0:
            k += 1
        return {"erosion_voxels": erosion, "median_kernel": max(k, 1) if self.median_mm > 0 else 1}

    def as_dict(self) -> dict:
        return asdict(self)


def postprocess(anomaly_map: np.ndarray, brain_mask: np.ndarray, spacing: Sequence[float], settings: PostProcessing) -> np.ndarray:
    """Median-filter the map and zero it outside the eroded brain mask."""
    v = settings.voxels(spacing)
    mask = brain_mask.astype(bool)
    if v["erosion_voxels"] > 0:
        mask = ndimage.binary_erosion(mask, iterations=v["erosion_voxels"])
    out = median_smooth(anomaly_map.astype(np.float32), v["median_kernel"])
    return np.where(mask, out, 0.0).astype(np.float32)


def binarize(anomaly_map: np.ndarray, threshold: float, min_component_voxels: int = 0) -> np.ndarray:
    """Threshold a map (``score >= threshold``) and drop small connected components."""
    pred = anomaly_map >= threshold
    if min_component_voxels > 0 and pred.any():
        lab, n = ndimage.label(pred)
        sizes = np.bincount(lab.ravel())
        small = sizes < min_component_voxels
        small[0] = False
        pred[small[lab]] = False
    return pred


def volume_score(anomaly_map: np.ndarray, brain_mask: np.ndarray, mode: str = "top1") -> float:
    """One score per volume: ``max``, ``mean``, or ``top1`` (mean of the top 1 % brain voxels)."""
    v = anomaly_map[brain_mask.astype(bool)]
    if v.size == 0:
        return float("nan")
    if mode == "max":
        return float(v.max())
    if mode == "mean":
        return float(v.mean())
    if mode == "top1":
        k = max(1, int(0.01 * v.size))
        return float(np.partition(v, -k)[-k:].mean())
    raise ValueError(f"unknown volume score mode {mode!r} (max, mean, top1)")
