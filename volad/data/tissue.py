"""Tissue-class rendering shared by the synthetic and phantom generators.

An image is rendered from per-voxel tissue fractions (partial volume) as
``sum_k p_k * mean_k(contrast)``, then given texture, a smooth multiplicative bias
field and Rician noise. Mean intensities are relative to white matter on T1 and
follow the usual ordering of healthy tissue and of tumour compartments:

==============  =====  =====  =====  =====
class            T1    T1ce    T2    FLAIR
==============  =====  =====  =====  =====
CSF              0.25   0.25   1.00   0.15
GM               0.62   0.62   0.62   0.68
WM               0.85   0.85   0.42   0.52
oedema           0.60   0.60   0.82   0.86
rim              0.70   1.15   0.70   0.80
core             0.30   0.30   0.92   0.42
WM lesion        0.62   0.62   0.78   0.84
isointense mass  0.62   0.62   0.62   0.68
infarct          0.45   0.47   0.88   0.80
==============  =====  =====  =====  =====

Lesion FLAIR intensities overlap with healthy grey matter once bias and noise
are added, so that intensity thresholding is a fair but beatable baseline. The
T1ce-like contrast is the T1 with an enhancing tumour rim (gadolinium leaks
where the blood-brain barrier is broken). The isointense mass has grey matter's
means in every contrast and differs only by its coarser texture and the mass
effect it exerts; the infarct is dark on T1 and bright on T2/FLAIR, with one
intensity for what was grey and white matter (the contrast between them is erased).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from volad.types import linear_mode

CONTRASTS = ("t1", "t2", "flair")
CLASSES = ("csf", "gm", "wm", "oedema", "rim", "core", "wml", "iso", "infarct")
MEANS = {
    "t1": {"csf": 0.25, "gm": 0.62, "wm": 0.85, "oedema": 0.60, "rim": 0.70, "core": 0.30, "wml": 0.62, "iso": 0.62, "infarct": 0.45},
    "t1ce": {"csf": 0.25, "gm": 0.62, "wm": 0.85, "oedema": 0.60, "rim": 1.15, "core": 0.30, "wml": 0.62, "iso": 0.62, "infarct": 0.47},
    "t2": {"csf": 1.00, "gm": 0.62, "wm": 0.42, "oedema": 0.82, "rim": 0.70, "core": 0.92, "wml": 0.78, "iso": 0.62, "infarct": 0.88},
    "flair": {"csf": 0.15, "gm": 0.68, "wm": 0.52, "oedema": 0.86, "rim": 0.80, "core": 0.42, "wml": 0.84, "iso": 0.68, "infarct": 0.80},
}


def smooth_field(shape: Sequence[int], n_ctrl: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std random field: ``n_ctrl`` random control points per axis, interpolated.

    Control values are pre-smoothed and interpolated (bi/trilinear), which is
    two orders of magnitude faster than a cubic spline at this size and smooth
    enough for bias fields, texture and deformations.
    """
    coarse = ndimage.gaussian_filter(rng.standard_normal([n_ctrl + 2] * len(shape)), 0.7)[(slice(1, -1),) * len(shape)]
    mode = linear_mode(len(shape))
    t = torch.from_numpy(np.ascontiguousarray(coarse, dtype=np.float32))[None, None]
    field = F.interpolate(t, size=tuple(int(s) for s in shape), mode=mode, align_corners=True)[0, 0].numpy()
    field = field - field.mean()
    return field / (field.std() + 1e-8)


def render(
    fractions: dict[str, np.ndarray],
    brain: np.ndarray,
    rng: np.random.Generator,
    *,
    contrasts: Sequence[str] = CONTRASTS,
    contrast_jitter: float = 0.06,
    texture: float = 0.03,
    bias: float = 0.12,
    noise: float = 0.03,
    n_ctrl: int = 4,
    class_texture: dict[str, tuple[float, int]] | None = None,
) -> dict[str, np.ndarray]:
    """Render contrasts from tissue fractions.

    Args:
        fractions: Class name → fraction map (missing classes count as zero).
        brain: Boolean brain mask; the images are zero outside it (skull-stripped).
        rng: Random generator (all randomness of a subject comes from it).
        contrast_jitter: Relative std of per-subject class means.
        texture: Relative std of smooth within-tissue texture.
        bias: Std of the log bias field.
        noise: Rician noise std relative to the white-matter level.
        n_ctrl: Control points per axis of the smooth fields.
        class_texture: ``(relative std, control points per axis)`` of the texture
            of some classes, instead of ``texture`` (a coarse-grained mass).
    """
    shape = brain.shape
    # Texture is a property of the tissue, shared by all contrasts.
    special = class_texture or {}
    tex = {
        cls: 1 + special.get(cls, (texture, 0))[0] * smooth_field(shape, special.get(cls, (0, max(n_ctrl * 3, 6)))[1], rng)
        for cls in fractions
    }
    out = {}
    for contrast in contrasts:
        img = np.zeros(shape, dtype=np.float32)
        for cls, frac in fractions.items():
            mean = MEANS[contrast][cls] * (1 + contrast_jitter * rng.standard_normal())
            img += frac * mean * tex[cls]
        img *= np.exp(bias * smooth_field(shape, n_ctrl, rng)).astype(np.float32)
        sigma = noise * MEANS[contrast]["wm"]
        n1 = rng.normal(0, sigma, shape).astype(np.float32)
        n2 = rng.normal(0, sigma, shape).astype(np.float32)
        img = np.sqrt((img + n1) ** 2 + n2**2)
        out[contrast] = np.where(brain, img, 0).astype(np.float32)
    return out
