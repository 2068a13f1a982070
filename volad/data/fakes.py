"""Tiny fake copies of real datasets, in their exact on-disk layouts, for testing loaders.

Real datasets cannot be downloaded here, so every shipped manifest has a
generator that writes a miniature dataset with the real folder structure, file
names, formats, label values and quirks (BraTS 2020's misnamed segmentation of
case 355, IXI's T1 and T2/PD on different grids, FastMRI+ zero-size boxes and
study-level rows, ...). Volumes are small brain-like phantoms
(:func:`volad.data.synthetic.synthetic_subject`); only layouts are real.

``volad data fake --dataset NAME --out DIR`` writes one.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from volad.data.layout import building
from volad.data.synthetic import synthetic_subject
from volad.errors import VoladConfigError
from volad.io import write_nifti

SHAPE = (24, 28, 24)


def _mni_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """A coarse grid over the MNI152 2009 field of view (so template masks overlap it)."""
    spacing = [197 / shape[0], 233 / shape[1], 189 / shape[2]]
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = [-98.0, -134.0, -72.0]
    return aff


def _subject(rng: np.random.Generator, lesions: int, shape=SHAPE):
    images, brain, label = synthetic_subject(shape, rng, lesions)
    return images, brain, label


def _brats_label(label: np.ndarray, enhancing: int) -> np.ndarray:
    """volad phantom labels (core 1, oedema 2, rim 3) → BraTS values (NCR 1, ED 2, ET 3 or 4)."""
    out = np.zeros_like(label)
    out[label == 1] = 1
    out[label == 2] = 2
    out[label == 3] = enhancing
    out[label == 4] = 2
    return out


def fake_atlas_v2(root: Path, n: int = 6, seed: int = 0) -> Path:
    """``Training/R00k/sub-r00ksNNN/ses-1/anat/..._T1w.nii.gz`` + lesion masks (and a Testing/ without masks)."""
    aff = _mni_affine(SHAPE)
    with building(root, {"fake": "atlas_v2", "n": n, "seed": seed}) as out:
        for i in range(n):
            site = f"R{1 + i % 2:03d}"
            sid = f"sub-r{1 + i % 2:03d}s{i + 1:03d}"
            images, brain, label = _subject(np.random.default_rng([seed, i]), 1)
            head = images["t1"] + 300 * (~brain.astype(bool))  # not skull-stripped: signal outside the brain
            anat = out / "Training" / site / sid / "ses-1" / "anat"
            write_nifti(head, aff, anat / f"{sid}_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz", dtype=np.int16)
            write_nifti((label > 0).astype(np.uint8), aff, anat / f"{sid}_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz", dtype=np.uint8)
        images, _, _ = _subject(np.random.default_rng([seed, 999]), 1)
        test = out / "Testing" / "R003" / "sub-r003s001" / "ses-1" / "anat"
        write_nifti(images["t1"], aff, test / "sub-r003s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz", dtype=np.int16)
    return Path(root)


def _brats(root: Path, n: int, seed: int, *, name: Callable[[int], str], sep: str, contrasts: dict[str, str], ext: str, enhancing: int, kind: str) -> list[str]:
    aff = np.diag([-1.0, -1.0, 1.0, 1.0])  # the BraTS header: x and y flipped, 1 mm
    aff[:3, 3] = [0.0, 239.0, 0.0]
    ids = []
    with building(root, {"fake": kind, "n": n, "seed": seed}) as out:
        for i in range(n):
            sid = name(i)
            images, brain, label = _subject(np.random.default_rng([seed, i]), 1)
            for theirs, source in contrasts.items():  # file suffix -> phantom contrast drawn
                write_nifti(images[source] * brain, aff, out / sid / f"{sid}{sep}{theirs}{ext}", dtype=np.int16)
            seg = f"{sid}{sep}seg{ext}"
            if kind == "brats2020" and sid == "BraTS20_Training_355":
                seg = "W39_1998.09.19_Segm.nii"  # the real dataset's misnamed file
            write_nifti(_brats_label(label, enhancing), aff, out / sid / seg, dtype=np.uint8)
            ids.append(sid)
    return ids


def fake_brats2020(root: Path, n: int = 4, seed: int = 0) -> Path:
    """``BraTS20_Training_NNN/BraTS20_Training_NNN_{t1,t1ce,t2,flair,seg}.nii``; includes case 355."""
    numbers = [1, 2, 355, 3, 4, 5, 6, 7][: max(n, 3)]
    _brats(root, len(numbers), seed, name=lambda i: f"BraTS20_Training_{numbers[i]:03d}", sep="_",
           contrasts={"t1": "t1", "t1ce": "t1", "t2": "t2", "flair": "flair"}, ext=".nii", enhancing=4, kind="brats2020")
    return Path(root)


def fake_brats2021(root: Path, n: int = 4, seed: int = 0) -> Path:
    """``BraTS2021_NNNNN/BraTS2021_NNNNN_{flair,t1,t1ce,t2,seg}.nii.gz``."""
    _brats(root, n, seed, name=lambda i: f"BraTS2021_{i:05d}", sep="_",
           contrasts={"t1": "t1", "t1ce": "t1", "t2": "t2", "flair": "flair"}, ext=".nii.gz", enhancing=4, kind="brats2021")
    return Path(root)


def fake_brats2023_gli(root: Path, n: int = 4, seed: int = 0) -> Path:
    """``BraTS-GLI-NNNNN-TTT/BraTS-GLI-NNNNN-TTT-{t1n,t1c,t2w,t2f,seg}.nii.gz``; patient 0 has two time points."""
    names = ["BraTS-GLI-00000-000", "BraTS-GLI-00000-001"] + [f"BraTS-GLI-{k:05d}-000" for k in range(2, 2 + max(n - 2, 1))]
    _brats(root, len(names), seed, name=lambda i: names[i], sep="-",
           contrasts={"t1n": "t1", "t1c": "t1", "t2w": "t2", "t2f": "flair"}, ext=".nii.gz", enhancing=3, kind="brats2023_gli")
    return Path(root)


def fake_ixi(root: Path, n: int = 6, seed: int = 0) -> Path:
    """Flat ``IXI{num}-{site}-{scan}-{T1,T2,PD}.nii.gz``: raw heads, T1 sagittal and T2/PD axial grids."""
    sites = ["Guys", "HH", "IOP"]
    with building(root, {"fake": "ixi", "n": n, "seed": seed}) as out:
        for i in range(n):
            sid = f"IXI{2 + i:03d}-{sites[i % 3]}-{828 + i:04d}"
            images, brain, _ = _subject(np.random.default_rng([seed, i]), 0)
            b = brain.astype(bool)
            skull = ndimage.binary_dilation(b, iterations=2) & ~b
            noise = np.random.default_rng([seed, i, 1]).normal(20, 5, b.shape).clip(0)
            t1 = images["t1"] + 900 * skull + noise
            # Real IXI voxels are 0.94 x 0.94 x 1.2 mm; the fake's are 7.5x larger so that a
            # 24-voxel head has a real head's size (registration to MNI152 needs it).
            axial = np.diag([7.05, 7.05, 9.0, 1.0])
            axial[:3, 3] = [-81.0, -95.0, -103.0]
            # T1 is acquired sagittally: voxel axes (k, i, j) of the axial grid, same world.
            sag = np.array([[0, 7.05, 0, -81.0], [0, 0, 7.05, -95.0], [9.0, 0, 0, -103.0], [0, 0, 0, 1]])
            write_nifti(np.transpose(t1, (2, 0, 1)), sag, out / f"{sid}-T1.nii.gz", dtype=np.int16)
            if i != n - 1:  # real IXI has fewer T2 than T1 scans
                write_nifti(images["t2"] + 400 * skull + noise, axial, out / f"{sid}-T2.nii.gz", dtype=np.int16)
                write_nifti(images["t2"] * 0.6 + 600 * skull + noise, axial, out / f"{sid}-PD.nii.gz", dtype=np.int16)
    return Path(root)


def _ismrmrd_header(rows: int, cols: int) -> bytes:
    return (
        '<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding><reconSpace>'
        f"<matrixSize><x>{cols}</x><y>{rows}</y><z>1</z></matrixSize>"
        f"<fieldOfView_mm><x>{cols * 0.6875}</x><y>{rows * 0.6875}</y><z>5</z></fieldOfView_mm>"
        "</reconSpace></encoding></ismrmrdHeader>"
    ).encode()


def fastmri_picture(slices: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Head-like ``(slices, rows, columns)`` magnitude images with background noise."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    r = np.sqrt(((yy - size / 2) / (size * 0.38)) ** 2 + ((xx - size / 2) / (size * 0.32)) ** 2)
    head = np.where(r < 1, 1.0 - 0.3 * r, 0.0).astype(np.float32)
    vols = [head * rng.uniform(0.9, 1.1) + rng.normal(0.02, 0.01, head.shape).astype(np.float32) for _ in range(slices)]
    return np.abs(np.stack(vols)) * 1e-4


def fake_fastmri_plus_brain(root: Path, n: int = 8, seed: int = 0, size: int = 32, slices: int = 4) -> Path:
    """``multicoil_{train,val}/file_brain_{ACQ}_{system}_{id}.h5`` with ``reconstruction_rss`` + ``brain.csv``.

    Abnormal studies get a bright square where their (flipped-coordinate) box says;
    the CSV also holds study-level rows, a zero-size box, a study with only a
    study-level finding, and an AXT2 study outside the contrast filter.
    """
    import h5py

    acqs = ["AXFLAIR", "AXFLAIR", "AXT1POST", "AXFLAIR", "AXT1", "AXFLAIR", "AXFLAIR", "AXFLAIR"]
    rows: list[dict] = []
    with building(root, {"fake": "fastmri_plus_brain", "n": n, "seed": seed}) as out:
        for i in range(n + 2):
            rng = np.random.default_rng([seed, i])
            acq = "AXT2" if i == n + 1 else acqs[i % len(acqs)]
            stem = f"file_brain_{acq}_{200 + i % 3}_{6002400 + i}"
            folder = "multicoil_train" if i % 4 else "multicoil_val"
            data = fastmri_picture(slices, size, rng)
            kind = "only_study" if i == n else ("healthy" if i % 2 == 0 else "abnormal")
            if kind == "healthy":
                rows.append(dict(file=stem, slice="", study_level="Yes", x="", y="", width="", height="", label="Normal for age"))
            elif kind == "only_study":
                rows.append(dict(file=stem, slice="", study_level="Yes", x="", y="", width="", height="", label="Motion artifact"))
            else:
                s = int(rng.integers(0, slices))
                x, y, w, h = int(rng.integers(4, size // 2)), int(rng.integers(4, size // 2)), 6, 5
                r0, c0 = size - y - h, x  # the unflipped rows of a box given in flipped coordinates
                data[s, r0 : r0 + h, c0 : c0 + w] = data.max() * 1.5
                rows.append(dict(file=stem, slice=s, study_level="No", x=x, y=y, width=w, height=h, label="Nonspecific white matter lesion"))
                rows.append(dict(file=stem, slice=(s + 1) % slices, study_level="No", x=x, y=y, width=0, height=0, label="Nonspecific white matter lesion"))
                rows.append(dict(file=stem, slice="", study_level="Yes", x="", y="", width="", height="", label="Nonspecific white matter lesion"))
            path = out / folder / f"{stem}.h5"
            path.parent.mkdir(parents=True, exist_ok=True)
            with h5py.File(path, "w") as f:
                f.create_dataset("reconstruction_rss", data=data.astype(np.float32))
                f.create_dataset("ismrmrd_header", data=np.bytes_(_ismrmrd_header(size, size)))
        with open(out / "brain.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["file", "slice", "study_level", "x", "y", "width", "height", "label"])
            writer.writeheader()
            writer.writerows(rows)
    return Path(root)


def fake_mslub(root: Path, n: int = 5, seed: int = 0) -> Path:
    """``patientNN/patientNN_{T1W,T2W,FLAIR,brainmask,consensus_gt}.nii.gz``."""
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    with building(root, {"fake": "mslub", "n": n, "seed": seed}) as out:
        for i in range(n):
            sid = f"patient{i + 1:02d}"
            images, brain, label = _subject(np.random.default_rng([seed, i]), 1)
            for ours, theirs in (("t1", "T1W"), ("t2", "T2W"), ("flair", "FLAIR")):
                write_nifti(images[ours] * brain, aff, out / sid / f"{sid}_{theirs}.nii.gz", dtype=np.int16)
            write_nifti(brain, aff, out / sid / f"{sid}_brainmask.nii.gz", dtype=np.uint8)
            write_nifti((label > 0).astype(np.uint8), aff, out / sid / f"{sid}_consensus_gt.nii.gz", dtype=np.uint8)
    return Path(root)


def _picture(path: Path, rng: np.random.Generator, tumour: bool, size: int = 12) -> None:
    yy, xx = np.mgrid[:size, :size]
    r = np.sqrt(((yy - size / 2) / (size * 0.4)) ** 2 + ((xx - size / 2) / (size * 0.33)) ** 2)
    img = np.where(r < 1, 120 + 60 * r, 0) + rng.normal(0, 4, r.shape)
    if tumour:
        cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
        img[cy - 1 : cy + 2, cx - 1 : cx + 2] = 250
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:  # real collections mix grey and RGB pictures
        arr = np.repeat(arr[..., None], 3, axis=-1)
        sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=True), str(path))
    else:
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))


def fake_br35h(root: Path, n: int = 1500, seed: int = 0) -> Path:
    """``yes/yK.jpg`` and ``no/noK.jpg`` (``n`` each; the real set has 1500) plus an unlabelled ``pred/``."""
    rng = np.random.default_rng(seed)
    with building(root, {"fake": "br35h", "n": n, "seed": seed}) as out:
        for k in range(n):
            _picture(out / "yes" / f"y{k}.jpg", rng, True)
            _picture(out / "no" / f"no{k}.jpg", rng, False)
        for k in range(3):
            _picture(out / "pred" / f"pred{k}.jpg", rng, bool(k % 2))
    return Path(root)


def fake_brain_tumor_mri(root: Path, n: int | None = None, seed: int = 0) -> Path:
    """``{Training,Testing}/{glioma,meningioma,notumor,pituitary}/{Tr,Te}-{gl,me,no,pi}_NNNN.jpg``.

    Holds just enough pictures for the protocol's splits (1700 notumor, 350
    glioma, 350 meningioma) plus a few pituitary ones; ``n`` scales nothing and
    exists for a uniform signature.
    """
    del n
    rng = np.random.default_rng(seed)
    counts = {"notumor": 1700, "glioma": 350, "meningioma": 350, "pituitary": 6}
    short = {"notumor": "no", "glioma": "gl", "meningioma": "me", "pituitary": "pi"}
    with building(root, {"fake": "brain_tumor_mri", "seed": seed}) as out:
        for cls, count in counts.items():
            for k in range(count):
                part, tag = ("Testing", "Te") if k % 4 == 0 else ("Training", "Tr")
                _picture(out / part / cls / f"{tag}-{short[cls]}_{k:04d}.jpg", rng, cls != "notumor")
    return Path(root)


FAKES: dict[str, Callable[..., Path]] = {
    "atlas_v2": fake_atlas_v2,
    "brats2020": fake_brats2020,
    "brats2021": fake_brats2021,
    "brats2023_gli": fake_brats2023_gli,
    "ixi": fake_ixi,
    "fastmri_plus_brain": fake_fastmri_plus_brain,
    "mslub": fake_mslub,
    "br35h": fake_br35h,
    "brain_tumor_mri": fake_brain_tumor_mri,
}


def make_fake(dataset: str, root: str | Path, *, n: int | None = None, seed: int = 0) -> Path:
    """Write a fake copy of ``dataset`` (a shipped manifest name) into ``root``.

    Raises:
        VoladConfigError: no generator for that dataset.
    """
    if dataset not in FAKES:
        raise VoladConfigError(f"no fake layout for {dataset!r} (have: {', '.join(sorted(FAKES))})")
    kwargs = {"seed": seed}
    if n is not None:
        kwargs["n"] = n
    return FAKES[dataset](Path(root), **kwargs)
