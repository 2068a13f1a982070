"""The median filter a method's maps are smoothed by (:attr:`volad.methods.base.AnomalyMethod.median_mm`).

Evaluation applies it to a method's maps (:mod:`volad.evaluation.postprocess`), and a
fusion to each member's map before calibration (:mod:`volad.methods.fusion`): one
definition, so the two cannot drift apart.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def median_smooth(anomaly_map: np.ndarray, kernel: int) -> np.ndarray:
    """Median-filter a map over a cube of ``kernel`` voxels (its last three axes; 1: unchanged), edges repeated."""
    if kernel <= 1:
        return anomaly_map
    size = (1,) * (anomaly_map.ndim - 3) + (int(kernel),) * min(anomaly_map.ndim, 3)
    return ndimage.median_filter(anomaly_map, size=size, mode="nearest")
