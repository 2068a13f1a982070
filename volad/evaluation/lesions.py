"""Lesion-wise detection: connected components of the label, hit or missed by a thresholded map.

A lesion (a connected component of the label, 26-connectivity in 3D) is
*detected* when the thresholded map covers at least ``min_overlap`` of its
voxels. A predicted component that touches no lesion is a false-positive
component. From these come per-lesion sensitivity, false-positive components per
volume and lesion-wise F1 (precision = predicted components touching a lesion /
all predicted components), stratified by lesion size.

Sizes are in mm³ so that bins mean the same at every resolution; the ATLAS v2.0
bins (small < 71, medium, large ≥ 570 voxels at 1 mm) are the default.

Box labels (FastMRI+) use the same machinery per 2D slice with a strict
``> fraction`` rule: a box is hit when more than that fraction of it fires.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

ATLAS_BINS_MM3: dict[str, tuple[float, float | None]] = {"small": (0.0, 71.0), "medium": (71.0, 570.0), "large": (570.0, None)}


def components(mask: np.ndarray, per_slice: bool = False) -> tuple[np.ndarray, int]:
    """Label connected components (full connectivity), in 3D or in each axial slice."""
    mask = mask.astype(bool)
    if not per_slice:
        return ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    out = np.zeros(mask.shape, dtype=np.int32)
    total = 0
    for k in range(mask.shape[-1]):
        lab, n = ndimage.label(mask[..., k], structure=np.ones((3, 3), dtype=bool))
        out[..., k] = np.where(lab > 0, lab + total, 0)
        total += n
    return out, total


@dataclass
class VolumeLesions:
    """Lesion-wise outcome of one volume.

    Attributes:
        sizes_mm3: Size of each label component.
        covered: Fraction of each lesion's voxels the prediction covers.
        detected: Whether each lesion counts as detected.
        n_pred: Predicted components.
        n_pred_hits: Predicted components that touch a lesion.
    """

    sizes_mm3: np.ndarray
    covered: np.ndarray
    detected: np.ndarray
    n_pred: int
    n_pred_hits: int

    @property
    def n_fp(self) -> int:
        return self.n_pred - self.n_pred_hits


def match_lesions(
    pred: np.ndarray,
    label: np.ndarray,
    voxel_mm3: float,
    *,
    min_overlap: float = 0.1,
    per_slice: bool = False,
    strict: bool = False,
) -> VolumeLesions:
    """Match label components with a binary prediction.

    Args:
        pred: Thresholded map (bool).
        label: Binary label.
        voxel_mm3: Volume of one voxel.
        min_overlap: Fraction of a lesion that must be covered.
        per_slice: Components per axial slice (box labels).
        strict: ``covered > min_overlap`` instead of ``>=``.
    """
    lab, n = components(label, per_slice)
    if n:
        sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.float64)
        hits = np.bincount(lab[pred.astype(bool)].ravel(), minlength=n + 1)[1:].astype(np.float64)
        covered = hits / np.maximum(sizes, 1)
    else:
        sizes = covered = np.zeros(0)
    detected = covered > min_overlap if strict else covered >= min_overlap
    plab, n_pred = components(pred, per_slice)
    if n_pred:
        touching = np.unique(plab[(plab > 0) & label.astype(bool)])
        n_hits = int(touching.size)
    else:
        n_hits = 0
    return VolumeLesions(sizes * voxel_mm3, covered, detected, int(n_pred), n_hits)


@dataclass
class LesionSummary:
    """Lesion-wise figures pooled over volumes."""

    min_overlap: float
    bins_mm3: Mapping[str, tuple[float, float | None]]
    rows: list[VolumeLesions] = field(default_factory=list)

    def add(self, v: VolumeLesions) -> None:
        self.rows.append(v)

    def _bin_of(self, sizes: np.ndarray) -> np.ndarray:
        out = np.full(sizes.shape, "", dtype=object)
        for name, (lo, hi) in self.bins_mm3.items():
            sel = (sizes >= lo) & (sizes < (np.inf if hi is None else hi))
            out[sel] = name
        return out

    def as_dict(self) -> dict:
        sizes = np.concatenate([r.sizes_mm3 for r in self.rows]) if self.rows else np.zeros(0)
        detected = np.concatenate([r.detected for r in self.rows]) if self.rows else np.zeros(0, bool)
        n_pred = sum(r.n_pred for r in self.rows)
        n_hits = sum(r.n_pred_hits for r in self.rows)
        n_les = int(sizes.size)
        sens = float(detected.mean()) if n_les else float("nan")
        prec = n_hits / n_pred if n_pred else float("nan")
        f1 = 2 * prec * sens / (prec + sens) if n_les and n_pred and prec + sens > 0 else (0.0 if n_les else float("nan"))
        bins = self._bin_of(sizes)
        by_size = {}
        for name, (lo, hi) in self.bins_mm3.items():
            sel = bins == name
            k = int(sel.sum())
            by_size[name] = {
                "range_mm3": [lo, hi],
                "n_lesions": k,
                "detected": int(detected[sel].sum()),
                "sensitivity": float(detected[sel].mean()) if k else float("nan"),
            }
        return {
            "min_overlap": self.min_overlap,
            "n_volumes": len(self.rows),
            "n_lesions": n_les,
            "detected": int(detected.sum()),
            "sensitivity": sens,
            "predicted_components": n_pred,
            "fp_components": n_pred - n_hits,
            "fp_components_per_volume": (n_pred - n_hits) / len(self.rows) if self.rows else float("nan"),
            "precision": prec,
            "f1": f1,
            "by_size": by_size,
        }


def bins_from_manifest(spec: Mapping[str, Sequence] | None) -> dict[str, tuple[float, float | None]]:
    """Size bins (mm³) from a manifest's ``lesion_size_bins`` (defaults to the ATLAS bins)."""
    if not spec:
        return dict(ATLAS_BINS_MM3)
    return {k: (float(v[0]), None if v[1] is None else float(v[1])) for k, v in spec.items()}
