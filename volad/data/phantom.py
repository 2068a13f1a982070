"""Real-anatomy benchmark built offline from nilearn's MNI152 2009 template and tissue maps.

Every subject starts from the MNI152 (2009) grey- and white-matter probability
maps and brain mask shipped in nilearn's wheel, and differs from the others by:

* an affine transform (rotation ±4°, per-axis scale ±6 %, shift ±3 mm);
* a smooth elastic deformation (σ ≈ 2.5 mm on a ~25 mm control grid);
* atrophy: cortical grey matter partly replaced by CSF (0–25 %);
* per-subject contrast jitter, tissue texture, a multiplicative bias field and
  Rician noise (:mod:`volad.data.tissue`).

T1, T2 and FLAIR-like contrasts are rendered from the deformed tissue fractions;
the T1 also borrows the template's own intensities, which carry deep grey-matter
detail the tissue maps lack. Lesion cases have one or two tumours (necrotic core,
rim, oedema following white matter, with mass effect) and, in some cases, small
white-matter lesions. Labels: 1 core, 2 oedema, 3 rim, 4 white-matter lesion.

The grid is MNI152 at 1 mm (197×233×189, the ATLAS v2.0 grid) or 2 mm (99×117×95).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from volad.data import lesions as L
from volad.data.layout import building, write_splits, write_subject
from volad.data.tissue import render, smooth_field


def template(spacing: float) -> dict[str, np.ndarray]:
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    out = {
        "t1": np.asarray(t1.get_fdata(), dtype=np.float32),
        "gm": np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), dtype=np.float32),
        "wm": np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), dtype=np.float32),
        "mask": np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata(), dtype=np.float32),
        "affine_1mm": t1.affine,
    }
    out["wm_core"] = np.argwhere(ndimage.binary_erosion(out["wm"] > 0.6, iterations=4))
    if spacing == 1:
        out["affine"], out["shape"] = t1.affine, t1.shape
    else:
        target = datasets.load_mni152_template(resolution=int(spacing)) if spacing in (2, 3) else None
        if target is None:
            raise ValueError("phantom spacing must be 1, 2 or 3 mm")
        out["affine"], out["shape"] = target.affine, target.shape
    return out


def sample_coordinates(
    tpl: dict,
    rng: np.random.Generator,
    push: list[tuple[np.ndarray, float]],
    *,
    rotation_deg: float = 4.0,
    scale: float = 0.06,
    shift_mm: float = 3.0,
    elastic_mm: float = 2.5,
) -> np.ndarray:
    """Source voxel coordinates (in the 1 mm template) for every target voxel.

    Args:
        tpl: The template (:func:`template`).
        rng: Random generator.
        push: ``(world centre, radius mm)`` of each mass effect: tissue is pushed away from the centre.
        rotation_deg: Rotation range about each axis (±).
        scale: Per-axis scale range (±, relative).
        shift_mm: Translation range (±).
        elastic_mm: Amplitude (σ) of the smooth elastic displacement.
    """
    shape, affine = tpl["shape"], tpl["affine"]
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), axis=0)
    world = np.tensordot(affine[:3, :3].astype(np.float32), idx, axes=1) + affine[:3, 3, None, None, None].astype(np.float32)
    center = np.array([0.0, -18.0, 18.0], dtype=np.float32)[:, None, None, None]
    angles = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rot = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]]) @ np.array(
        [[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]
    )
    lin = (rot @ np.diag(rng.uniform(1 - scale, 1 + scale, 3))).astype(np.float32)
    src = np.tensordot(np.linalg.inv(lin).astype(np.float32), world - center, axes=1) + center
    src -= rng.uniform(-shift_mm, shift_mm, 3).astype(np.float32)[:, None, None, None]
    n_ctrl = max(4, int(round(197 / 25)))
    for a in range(3):
        src[a] += elastic_mm * smooth_field(shape, n_ctrl, rng).astype(np.float32)
    for c_world, radius in push:
        # Mass effect: tissue is pushed away from the lesion centre.
        diff = world - c_world.astype(np.float32)[:, None, None, None]
        dist = np.sqrt((diff**2).sum(0)) + 1e-3
        mag = 0.45 * radius * np.exp(-((dist / (1.6 * radius)) ** 2))
        src -= diff / dist * np.minimum(mag, 0.8 * dist)
    inv1 = np.linalg.inv(tpl["affine_1mm"]).astype(np.float32)
    return np.tensordot(inv1[:3, :3], src, axes=1) + inv1[:3, 3, None, None, None]


def deformed_tissue(tpl: dict, coords: np.ndarray, rng: np.random.Generator, *, max_atrophy: float) -> tuple[dict, np.ndarray, np.ndarray]:
    """Tissue fractions (CSF, GM, WM), brain mask and template T1 at ``coords``, with cortical atrophy.

    Args:
        tpl: The template (:func:`template`).
        coords: Source coordinates from :func:`sample_coordinates`.
        rng: Random generator (draws the atrophy fraction).
        max_atrophy: Cortical grey matter replaced by CSF, drawn in ``[0, max_atrophy)``.
    """
    spacing = float(abs(tpl["affine"][0, 0]))
    sample = lambda vol: ndimage.map_coordinates(vol, coords, order=1, mode="constant", cval=0.0).astype(np.float32)  # noqa: E731
    gm, wm, mask, t1_tpl = sample(tpl["gm"]), sample(tpl["wm"]), sample(tpl["mask"]), sample(tpl["t1"])
    brain = mask > 0.5
    gm, wm = gm * brain, wm * brain
    total = np.clip(gm + wm, 0, 1)
    gm, wm = gm / np.maximum(gm + wm, 1), wm / np.maximum(gm + wm, 1)
    csf = np.clip(brain - total, 0, 1)
    atrophy = rng.uniform(0.0, max_atrophy)
    loss = gm * atrophy * np.clip(1 - ndimage.gaussian_filter(total, 1.5 / spacing), 0, 1) * 2
    loss = np.minimum(loss, gm)
    return {"csf": csf + loss, "gm": gm - loss, "wm": wm}, brain, t1_tpl


def phantom_subject(tpl: dict, rng: np.random.Generator, *, n_tumours: int, n_small: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """One phantom subject: (contrast images ×1000 as float, brain mask, label)."""
    shape, spacing = tpl["shape"], float(abs(tpl["affine"][0, 0]))
    # Lesion centres are drawn in template space, well inside white matter.
    candidates = tpl["wm_core"]
    tumours = []
    for _ in range(n_tumours):
        c1 = candidates[rng.integers(len(candidates))].astype(np.float64)
        radius_mm = rng.uniform(7, 22)
        world = tpl["affine_1mm"][:3, :3] @ c1 + tpl["affine_1mm"][:3, 3]
        tumours.append((world, radius_mm))
    coords = sample_coordinates(tpl, rng, tumours)
    fr, brain, t1_tpl = deformed_tissue(tpl, coords, rng, max_atrophy=0.25)
    lesion: dict[str, np.ndarray] = {}
    inv = np.linalg.inv(tpl["affine"])
    for world, radius_mm in tumours:
        c = inv[:3, :3] @ world + inv[:3, 3]
        t = L.tumour(shape, c, radius_mm / spacing, rng, wm=fr["wm"])
        for k, v in t.items():
            lesion[k] = np.maximum(lesion.get(k, 0), v * brain)
    if n_small:
        wm_idx = np.argwhere(fr["wm"] > 0.8)
        small = np.zeros(shape, dtype=np.float32)
        for _ in range(n_small):
            c = wm_idx[rng.integers(len(wm_idx))]
            small = np.maximum(small, L.small_lesion(shape, c, rng.uniform(1.5, 4.0) / spacing, rng))
        lesion["wml"] = small * brain
    if lesion:
        fr = L.paint(fr, lesion)
        label = L.label_map(lesion)
    else:
        label = np.zeros(shape, dtype=np.uint8)
    images = render(fr, brain, rng, n_ctrl=4, noise=rng.uniform(0.02, 0.045), bias=rng.uniform(0.05, 0.15))
    # Borrow the real template's T1 detail (deep grey matter, cortex folding).
    t1_real = t1_tpl / max(float(np.percentile(t1_tpl[brain], 99)), 1e-3) * 0.85
    healthy = 1 - np.clip(sum(lesion.values()), 0, 1) if lesion else 1.0
    images["t1"] = np.where(brain, 0.5 * images["t1"] + 0.5 * t1_real * healthy + 0.5 * images["t1"] * (1 - healthy), 0)
    return {k: np.round(np.clip(v, 0, None) * 1000) for k, v in images.items()}, brain.astype(np.uint8), label


def generate_phantom(
    root: str | Path,
    *,
    spacing: float = 2.0,
    n_train: int = 24,
    n_val: int = 6,
    n_test: int = 12,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write the phantom dataset (``phantom`` manifest layout) into ``root``.

    Validation and test splits each start with a third healthy subjects; the
    rest carry lesions (one tumour, sometimes two, and small white-matter lesions
    in about a third of the cases).

    Args:
        root: Destination folder (created; must be new or empty).
        spacing: Voxel size in mm: 1 (197×233×189), 2 (99×117×95) or 3.
        n_train: Healthy training subjects.
        n_val: Labelled validation subjects.
        n_test: Test subjects.
        seed: Everything is reproducible from it.
        progress: Show a progress bar.
    """
    tpl = template(spacing)
    settings = {"generator": "phantom", "spacing": spacing, "n_train": n_train, "n_val": n_val, "n_test": n_test, "seed": seed}
    plan = [(s, i) for s, n in (("train", n_train), ("val", n_val), ("test", n_test)) for i in range(n)]
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    with building(root, settings) as scratch:
        for split, i in tqdm(plan, desc=f"phantom {spacing:g} mm -> {root}", disable=not progress):
            rng = np.random.default_rng([seed, ("train", "val", "test").index(split), i])
            n_healthy = 0 if split == "train" else max(1, {"val": n_val, "test": n_test}[split] // 3)
            lesioned = split != "train" and i >= n_healthy
            n_tumours = (1 + int(rng.uniform() < 0.25)) if lesioned else 0
            n_small = int(rng.integers(3, 9)) if lesioned and rng.uniform() < 0.35 else 0
            images, brain, label = phantom_subject(tpl, rng, n_tumours=n_tumours, n_small=n_small)
            sid = f"ph-{split}-{i:03d}"
            write_subject(scratch, sid, tpl["affine"], images, brain, label)
            splits[split].append(sid)
        write_splits(scratch, splits)
    return Path(root)
