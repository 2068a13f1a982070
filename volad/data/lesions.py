"""Lesion shapes for generated data: tumours (core, rim, oedema) and small white-matter lesions.

Shapes are irregular ellipsoids: a normalised ellipsoidal distance perturbed by
a smooth random field. Fractions are soft at the border (partial volume).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from volad.data.tissue import smooth_field

# Label values written to the ``_seg`` files.
LABELS = {"core": 1, "oedema": 2, "rim": 3, "wml": 4}


def _distance(shape: Sequence[int], center: Sequence[float], radii: Sequence[float], rng, irregularity: float) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    d2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii))
    d = np.sqrt(d2)
    if irregularity > 0:
        d = d * (1 + irregularity * smooth_field(shape, 5, rng).astype(np.float32))
    return d


def _soft(d: np.ndarray, edge: float, width: float = 0.08) -> np.ndarray:
    return np.clip((edge - d) / width + 0.5, 0, 1).astype(np.float32)


def tumour(
    shape: Sequence[int],
    center: Sequence[float],
    radius_vox: float,
    rng: np.random.Generator,
    wm: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Fractions of a tumour's necrotic core, rim and surrounding oedema.

    Args:
        shape: Grid shape.
        center: Centre in voxels.
        radius_vox: Outer (oedema) radius in voxels.
        rng: Random generator.
        wm: White-matter fraction; oedema spreads preferentially along it.
    """
    radii = radius_vox * rng.uniform(0.75, 1.25, size=len(shape))
    d = _distance(shape, center, radii, rng, irregularity=0.18)
    core_edge, rim_edge = rng.uniform(0.2, 0.4), rng.uniform(0.5, 0.65)
    whole = _soft(d, 1.0)
    if wm is not None:
        # Oedema beyond the inner shell follows white matter.
        whole = np.where(d < 0.8, whole, whole * np.clip(wm * 1.5, 0, 1))
    core = _soft(d, core_edge) if rng.uniform() < 0.8 else np.zeros_like(d)
    solid = _soft(d, rim_edge)
    rim = np.clip(solid - core, 0, 1)
    oedema = np.clip(whole - solid, 0, 1)
    return {"core": core, "rim": rim, "oedema": oedema}


def small_lesion(shape: Sequence[int], center: Sequence[float], radius_vox: float, rng: np.random.Generator) -> np.ndarray:
    """Fraction map of one small, slightly elongated white-matter lesion."""
    radii = radius_vox * rng.uniform(0.6, 1.4, size=len(shape))
    return _soft(_distance(shape, center, radii, rng, irregularity=0.1), 1.0, width=0.25)


def mass(shape: Sequence[int], center: Sequence[float], radius_vox: float, rng: np.random.Generator) -> np.ndarray:
    """Fraction map of one solid, roughly spherical mass (radius varies ±20 % per axis)."""
    radii = radius_vox * rng.uniform(0.8, 1.2, size=len(shape))
    return _soft(_distance(shape, center, radii, rng, irregularity=0.12), 1.0, width=0.15)


def paint(fractions: dict[str, np.ndarray], lesion: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Replace healthy tissue by lesion classes so that fractions still sum to the brain fraction."""
    total = np.clip(sum(lesion.values()), 0, 1)
    out = {k: v * (1 - total) for k, v in fractions.items()}
    for k, v in lesion.items():
        out[k] = out.get(k, 0) + v
    return out


def label_map(lesion: dict[str, np.ndarray], threshold: float = 0.5) -> np.ndarray:
    """Integer label (values in :data:`LABELS`) where a lesion class holds most of the voxel."""
    label = np.zeros(next(iter(lesion.values())).shape, dtype=np.uint8)
    stack = np.stack([lesion[k] for k in lesion])
    winner = stack.argmax(axis=0)
    present = stack.sum(axis=0) >= threshold
    for i, k in enumerate(lesion):
        label[(winner == i) & present] = LABELS[k]
    return label
