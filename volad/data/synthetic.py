"""Tiny deterministic brain-like volumes with lesions, for tests and quick checks.

Each subject is an ellipsoidal "brain" with a grey-matter shell, white-matter
core and two ventricles, rendered in T1/T2/FLAIR with texture, bias and noise
(:mod:`volad.data.tissue`). Lesion cases carry one to two tumour-like lesions.
Everything follows from ``seed``; files are written in the ``synthetic``
manifest's layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from volad.data import lesions as L
from volad.data.layout import building, write_splits, write_subject
from volad.data.tissue import render


def synthetic_subject(shape: tuple[int, int, int], rng: np.random.Generator, n_lesions: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """One subject: (contrast images ×1000, brain mask, label)."""
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    center = [s / 2 - 0.5 + rng.uniform(-0.5, 0.5) for s in shape]
    radii = [s * rng.uniform(0.36, 0.42) for s in shape]
    r = np.sqrt(sum(((g - c) / rr) ** 2 for g, c, rr in zip(grids, center, radii)))
    brain = r <= 1.0
    shell = np.clip((r - 0.7) / 0.1, 0, 1)  # outer part is grey matter
    vent = np.zeros(shape, dtype=np.float32)
    for side in (-1, 1):
        vc = [center[0] + side * shape[0] * 0.09, center[1], center[2]]
        vr = [shape[0] * 0.05, shape[1] * 0.14, shape[2] * 0.07]
        dv = np.sqrt(sum(((g - c) / rr) ** 2 for g, c, rr in zip(grids, vc, vr)))
        vent = np.maximum(vent, np.clip((1 - dv) / 0.3 + 0.5, 0, 1))
    csf_out = np.clip((r - 0.93) / 0.07, 0, 1)
    b = brain.astype(np.float32)
    fr = {
        "csf": b * np.maximum(csf_out, vent),
        "gm": b * shell * (1 - csf_out) * (1 - vent),
        "wm": b * (1 - shell) * (1 - vent),
    }
    lesion: dict[str, np.ndarray] = {}
    inner = np.argwhere(r < 0.6)
    for _ in range(n_lesions):
        c = inner[rng.integers(len(inner))]
        t = L.tumour(shape, c, rng.uniform(0.1, 0.16) * min(shape), rng, wm=fr["wm"])
        for k, v in t.items():
            lesion[k] = np.maximum(lesion.get(k, 0), v * b)
    if lesion:
        fr = L.paint(fr, lesion)
        label = L.label_map(lesion)
    else:
        label = np.zeros(shape, dtype=np.uint8)
    images = render(fr, brain, rng, n_ctrl=3)
    return {k: np.round(v * 1000) for k, v in images.items()}, brain.astype(np.uint8), label


def generate_synthetic(
    root: str | Path,
    *,
    shape: tuple[int, int, int] | int = 24,
    n_train: int = 8,
    n_val: int = 3,
    n_test: int = 4,
    seed: int = 0,
) -> Path:
    """Write a tiny synthetic dataset (``synthetic`` manifest layout) into ``root``.

    Args:
        root: Destination folder (created; must be new or empty).
        shape: Volume shape, 16–32 per axis is the intended range.
        n_train: Healthy training subjects.
        n_val: Labelled validation subjects (the first is healthy, the rest have lesions).
        n_test: Test subjects (the first is healthy, the rest have lesions).
        seed: Everything is reproducible from it.
    """
    shape = (shape,) * 3 if isinstance(shape, int) else tuple(int(s) for s in shape)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = [-s * 0.75 for s in shape]
    settings = {"generator": "synthetic", "shape": shape, "n_train": n_train, "n_val": n_val, "n_test": n_test, "seed": seed}
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    with building(root, settings) as scratch:
        for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
            for i in range(count):
                sid = f"syn-{split}-{i:03d}"
                rng = np.random.default_rng([seed, ("train", "val", "test").index(split), i])
                n_les = 0 if split == "train" or i == 0 else int(rng.integers(1, 3))
                images, brain, label = synthetic_subject(shape, rng, n_les)
                write_subject(scratch, sid, affine, images, brain, label)
                splits[split].append(sid)
        write_splits(scratch, splits)
    return Path(root)
