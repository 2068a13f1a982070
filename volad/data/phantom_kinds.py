"""A harder real-anatomy benchmark: four lesion kinds, healthy scans with artefacts, wider anatomy.

Built offline from nilearn's MNI152 2009 template like :mod:`volad.data.phantom`
(same tissue rendering), reproducible from a seed, at 2 mm (1 mm or 3 mm on
request), with T1, T1ce-like, T2 and FLAIR contrasts. Every subject's kind is
the folder it lives in (``{kind}/{subject}/...``), which the manifest's
``health`` entry turns into the subject's category, so reports give figures per
kind (:mod:`volad.evaluation.kinds`).

Lesion kinds (label values in the ``_seg`` files):

* ``tumour``: necrotic core (1), enhancing rim (3, bright on T1ce) and oedema (2)
  following white matter, outer radius 7–22 mm, with mass effect; the range of
  the glioblastomas in BraTS (whole tumour of a few to ~100 cm³).
* ``isointense_mass``: a mass of grey matter's intensity in every contrast (5),
  radius 8–18 mm, centred in grey matter, visible only through its coarser
  texture and the mass effect it exerts, as meningiomas and some low-grade
  gliomas are iso-intense to grey matter on T1 and T2.
* ``small_wml``: 4–10 small white-matter lesions (4) of radius 2–5 mm (3–10 mm
  in diameter, the size of typical MS lesions; MAGNIMS counts lesions from 3 mm,
  Filippi et al., Lancet Neurol 2016), half of them periventricular.
* ``stroke``: a cortical wedge (6), apex deep in white matter and base on the
  cortex, 20–40 mm long with a 15–30° half-angle, the shape of a territorial
  infarct: dark on T1, bright on T2/FLAIR, grey/white contrast erased.

Healthy kinds: ``healthy`` (clean) and ``artefact``: a healthy scan carrying
TorchIO's ``RandomMotion``, ``RandomGhosting`` or ``RandomBiasField`` in one
contrast or all. Artefacts are not lesions; they only count as false positives.

Anatomy varies more than in the default phantom: rotation ±8°, per-axis scale
±10 %, elastic displacement σ 4 mm, cortical atrophy 0–40 % and ventricles
enlarged by up to ~8 mm.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchio as tio
from scipy import ndimage
from tqdm.auto import tqdm

from volad.data import lesions as L
from volad.data.layout import building, write_splits, write_subject
from volad.data.phantom import deformed_tissue, sample_coordinates, template
from volad.data.tissue import render, smooth_field

#: Bumped whenever the same seed would give other images: a cached copy of another version is refused.
VERSION = 3
CONTRASTS = ("t1", "t1ce", "t2", "flair")
LESION_KINDS = ("tumour", "isointense_mass", "small_wml", "stroke")
HEALTHY_KINDS = ("healthy", "artefact")
LABELS = {**L.LABELS, "iso": 5, "infarct": 6}
#: Approximate centres (MNI mm) of the lateral ventricles, where enlargement pushes tissue out.
_VENTRICLES = (np.array([-12.0, -10.0, 18.0]), np.array([12.0, -10.0, 18.0]))


def _cone(shape, apex: np.ndarray, axis: np.ndarray, length: float, half_angle: float, rng) -> np.ndarray:
    """Soft fraction map of a cone (voxel units) from ``apex`` along ``axis``, slightly irregular."""
    grids = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), axis=0)
    rel = grids - apex.astype(np.float32)[:, None, None, None]
    along = np.tensordot(axis.astype(np.float32), rel, axes=1)
    radial = np.sqrt(np.maximum((rel**2).sum(0) - along**2, 0))
    wobble = 1 + 0.15 * smooth_field(shape, 5, rng).astype(np.float32)
    inside_angle = np.clip((np.tan(half_angle) * along * wobble - radial) / 1.0 + 0.5, 0, 1)
    inside_length = np.clip((length - along) / 1.0 + 0.5, 0, 1) * np.clip(along + 0.5, 0, 1)
    return (inside_angle * inside_length).astype(np.float32)


def _artefact(images: dict[str, np.ndarray], affine: np.ndarray, rng: np.random.Generator) -> dict[str, str]:
    """Corrupt one contrast or all with a TorchIO artefact, in place; returns what was applied."""
    kind = str(rng.choice(["motion", "ghosting", "bias"]))
    which = list(images) if rng.random() < 0.5 else [str(rng.choice(list(images)))]
    transform = {
        "motion": tio.RandomMotion(degrees=4, translation=4, num_transforms=2),
        "ghosting": tio.RandomGhosting(num_ghosts=(4, 10), intensity=(0.4, 0.8)),
        "bias": tio.RandomBiasField(coefficients=0.6),
    }[kind]
    for name in which:
        torch.manual_seed(int(rng.integers(2**31)))  # TorchIO draws from torch's generator
        img = tio.ScalarImage(tensor=torch.from_numpy(images[name][None].astype(np.float32)), affine=affine)
        images[name] = np.clip(transform(img).data[0].numpy(), 0, None)
    return {"artefact": kind, "contrasts": ",".join(which)}


def _grey_core(tpl: dict) -> np.ndarray:
    """Template voxels (1 mm) well inside grey matter and at least 10 mm from the brain's edge."""
    inside = ndimage.distance_transform_edt(tpl["mask"] > 0.5) > 10
    return np.argwhere((tpl["gm"] > 0.6) & inside)


def kinds_template(spacing: float) -> dict:
    """The template at ``spacing`` with the candidate centres every kind needs."""
    tpl = template(spacing)
    tpl["gm_core"] = _grey_core(tpl)
    return tpl


def kinds_subject(tpl: dict, rng: np.random.Generator, kind: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """One subject of the given kind (``tpl`` from :func:`kinds_template`): (contrast images ×1000, brain mask, label)."""
    shape, spacing = tpl["shape"], float(abs(tpl["affine"][0, 0]))
    inv = np.linalg.inv(tpl["affine"])
    to_world = lambda c1: tpl["affine_1mm"][:3, :3] @ c1 + tpl["affine_1mm"][:3, 3]  # noqa: E731
    candidates = tpl["wm_core"]
    push = [(v, rng.uniform(0, 8)) for v in _VENTRICLES]  # ventricle enlargement
    masses = []
    if kind == "tumour":
        masses.append(("tumour", to_world(candidates[rng.integers(len(candidates))].astype(np.float64)), rng.uniform(7, 22)))
    elif kind == "isointense_mass":  # centred in grey matter, where its intensity matches its surroundings
        grey = tpl["gm_core"]
        masses.append(("iso", to_world(grey[rng.integers(len(grey))].astype(np.float64)), rng.uniform(8, 18)))
    coords = sample_coordinates(tpl, rng, push + [(w, r) for _, w, r in masses], rotation_deg=8, scale=0.10, shift_mm=4, elastic_mm=4.0)
    fr, brain, t1_tpl = deformed_tissue(tpl, coords, rng, max_atrophy=0.4)
    lesion: dict[str, np.ndarray] = {}
    for what, world, radius_mm in masses:
        c = inv[:3, :3] @ world + inv[:3, 3]
        if what == "tumour":
            lesion.update({k: v * brain for k, v in L.tumour(shape, c, radius_mm / spacing, rng, wm=fr["wm"]).items()})
        else:
            lesion["iso"] = L.mass(shape, c, radius_mm / spacing, rng) * brain
    if kind == "small_wml":
        deep = fr["wm"] > 0.8
        near_ventricles = deep & ndimage.binary_dilation(ndimage.binary_erosion(fr["csf"] > 0.6, iterations=1), iterations=max(1, int(4 / spacing)))
        small = np.zeros(shape, dtype=np.float32)
        n = int(rng.integers(4, 11))
        for i in range(n):
            pool = np.argwhere(near_ventricles if (i % 2 == 0 and near_ventricles.any()) else deep)
            small = np.maximum(small, L.small_lesion(shape, pool[rng.integers(len(pool))], rng.uniform(2.0, 5.0) / spacing, rng))
        lesion["wml"] = small * brain
    if kind == "stroke":
        cortex = np.argwhere((fr["gm"] > 0.5) & (ndimage.distance_transform_edt(brain) * spacing < 6))
        base = cortex[rng.integers(len(cortex))].astype(np.float64)
        centre = np.array(ndimage.center_of_mass(brain))
        axis = (base - centre) / max(np.linalg.norm(base - centre), 1e-6)
        length = rng.uniform(20, 40) / spacing
        apex = base - axis * length * 0.9
        wedge = _cone(shape, apex, axis, length, np.deg2rad(rng.uniform(15, 30)), rng) * (fr["gm"] + fr["wm"]) * brain
        lesion["infarct"] = wedge
    # Grey matter's texture is 3 % at ~1 cm grain; the mass's is 8 % at a finer grain. A coarser, stronger
    # texture makes its bright patches stand out to a plain intensity threshold (measured: FLAIR AUPRC 0.32 vs 0.03).
    texture = {"iso": (0.08, 20)}
    if lesion:
        fr = L.paint(fr, lesion)
        label = _label(lesion)
    else:
        label = np.zeros(shape, dtype=np.uint8)
    images = render(fr, brain, rng, contrasts=CONTRASTS, n_ctrl=4, noise=rng.uniform(0.02, 0.05), bias=rng.uniform(0.05, 0.15),
                    class_texture=texture)
    t1_real = t1_tpl / max(float(np.percentile(t1_tpl[brain], 99)), 1e-3) * 0.85
    healthy = 1 - np.clip(sum(lesion.values()), 0, 1) if lesion else 1.0
    for name in ("t1", "t1ce"):
        images[name] = np.where(brain, 0.5 * images[name] + 0.5 * t1_real * healthy + 0.5 * images[name] * (1 - healthy), 0)
    images = {k: np.clip(v, 0, None) * 1000 for k, v in images.items()}
    if kind == "artefact":
        _artefact(images, tpl["affine"], rng)
        images = {k: np.where(brain, v, 0) for k, v in images.items()}
    return {k: np.round(v) for k, v in images.items()}, brain.astype(np.uint8), label


def _label(lesion: dict[str, np.ndarray], threshold: float = 0.5) -> np.ndarray:
    label = np.zeros(next(iter(lesion.values())).shape, dtype=np.uint8)
    stack = np.stack([lesion[k] for k in lesion])
    winner, present = stack.argmax(axis=0), stack.sum(axis=0) >= threshold
    for i, k in enumerate(lesion):
        label[(winner == i) & present] = LABELS[k]
    return label


def plan_subjects(
    n_train: int = 40, n_val_per_kind: int = 2, n_test_per_kind: int = 4, n_val_healthy: int = 2, n_test_healthy: int = 4, n_test_artefact: int = 4,
    n_val_artefact: int = 1,
) -> list[tuple[str, str]]:
    """``(split, kind)`` of every subject, in generation order."""
    plan = [("train", "healthy")] * n_train
    plan += [("val", k) for k in LESION_KINDS for _ in range(n_val_per_kind)]
    plan += [("val", "healthy")] * n_val_healthy + [("val", "artefact")] * n_val_artefact
    plan += [("test", k) for k in LESION_KINDS for _ in range(n_test_per_kind)]
    plan += [("test", "healthy")] * n_test_healthy + [("test", "artefact")] * n_test_artefact
    return plan


def generate_phantom_kinds(
    root: str | Path,
    *,
    spacing: float = 2.0,
    seed: int = 0,
    progress: bool = True,
    **counts: int,
) -> Path:
    """Write the harder benchmark (``phantom_kinds`` manifest layout) into ``root``.

    Args:
        root: Destination folder (created; must be new or empty).
        spacing: Voxel size in mm: 1, 2 (default) or 3.
        seed: Everything is reproducible from it.
        progress: Show a progress bar.
        **counts: Subjects per split and kind (:func:`plan_subjects`): by default
            40 healthy training scans; val: 2 of each lesion kind, 2 healthy and 1
            with an artefact; test: 4 of each lesion kind, 4 healthy and 4 with artefacts.
    """
    tpl = kinds_template(spacing)
    plan = plan_subjects(**counts)
    settings = {"generator": "phantom_kinds", "version": VERSION, "spacing": spacing, "seed": seed, **counts}
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    seen: dict[str, int] = {}
    with building(root, settings) as scratch:
        for split, kind in tqdm(plan, desc=f"phantom_kinds {spacing:g} mm -> {root}", disable=not progress):
            i = seen[split] = seen.get(split, -1) + 1
            rng = np.random.default_rng([seed, ("train", "val", "test").index(split), i])
            images, brain, label = kinds_subject(tpl, rng, kind)
            sid = f"pk-{split}-{i:03d}"
            write_subject(scratch / kind, sid, tpl["affine"], images, brain, label)
            splits[split].append(sid)
        write_splits(scratch, splits)
    return Path(root)
