"""Scans given by path, without a manifest: a file, a case folder, or a folder of cases.

A clinical scientist with a trained run and new patient scans points
``inference.json --input`` at them. The scans are read the way the run's
training dataset was read (its reader, contrasts and brain-mask rule); this
module only finds which file is which:

* a **file** (``patient7_flair.nii.gz``) is one case of a one-contrast run;
* a **case folder** holds one image per contrast of the run, each named with
  its contrast (``t1``, ``flair``, ... in any case; a one-contrast run also takes
  the folder's only image), plus a brain mask named ``*mask*`` when the training
  manifest gives masks rather than deriving them;
* a **folder of cases** holds case folders, or, for a one-contrast run, image
  files that are one case each (unless exactly one of them is named with the
  run's contrast: then it is a case folder holding other contrasts too).

Case IDs are the file name without extension, or the case folder's name.
"""

from __future__ import annotations

import re
from pathlib import Path

import torchio as tio

from volad.data.manifest import Dataset
from volad.errors import VoladConfigError, VoladDataError

#: File endings read as images (NIfTI and what SimpleITK reads).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_MASK = re.compile(r"(brain)?[_-]?mask", re.IGNORECASE)


def case_id(path: Path) -> str:
    """A case's ID: the file name without its image extension, or the folder's name."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.startswith("."))


def _is_mask(path: Path) -> bool:
    return bool(_MASK.search(case_id(path)))


def _names(dataset: Dataset, contrast: str) -> list[str]:
    """Names a file of ``contrast`` may carry: the contrast and its aliases, lower case."""
    aliases = [a for a, c in dataset.manifest.get("contrast_aliases", {}).items() if c == contrast]
    return sorted({contrast.lower(), *(a.lower() for a in aliases)}, key=len, reverse=True)


def _contrast_file(dataset: Dataset, contrast: str, candidates: list[Path], folder: Path) -> Path:
    words = _names(dataset, contrast)
    tokens = {p: set(re.split(r"[^a-z0-9]+", case_id(p).lower())) for p in candidates}
    hits = [p for p in candidates if any(w in tokens[p] for w in words)] or [p for p in candidates if any(w in case_id(p).lower() for w in words)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise VoladDataError(folder, f"no image of contrast {contrast} (the run was trained on {', '.join(dataset.contrasts)}); "
                                     f"name the file with its contrast, e.g. {folder.name}_{contrast.lower()}.nii.gz")
    raise VoladDataError(folder, f"several images could be contrast {contrast}: {', '.join(p.name for p in hits)}")


def _names_one(dataset: Dataset, images: list[Path]) -> bool:
    """Whether exactly one of the images is named with the (one) contrast of the run: a case folder, not a folder of cases."""
    words = _names(dataset, dataset.contrasts[0])
    return sum(any(w in set(re.split(r"[^a-z0-9]+", case_id(p).lower())) for w in words) for p in images) == 1


def _case(dataset: Dataset, folder: Path, files: list[Path]) -> tio.Subject:
    """One case folder's subject (``files``: its images)."""
    masks = [p for p in files if _is_mask(p)]
    images = [p for p in files if not _is_mask(p)]
    if len(dataset.contrasts) == 1 and len(images) == 1:
        chosen = images
    else:
        chosen = [_contrast_file(dataset, c, images, folder) for c in dataset.contrasts]
    mask = None
    if dataset.mask_is_given:
        if len(masks) != 1:
            found = ", ".join(p.name for p in masks) or "none"
            raise VoladDataError(folder, f"needs one brain mask file named *mask* (the run's dataset {dataset.name!r} gives masks rather than deriving them); found {found}")
        mask = masks[0]
    return tio.Subject(dataset.image_entries(folder.name, chosen, mask, "input"))


def _file_case(dataset: Dataset, path: Path) -> tio.Subject:
    if len(dataset.contrasts) != 1:
        raise VoladDataError(path, f"is one file, but the run was trained on {len(dataset.contrasts)} contrasts ({', '.join(dataset.contrasts)}); "
                                   "put one file per contrast in a case folder and pass the folder")
    if dataset.mask_is_given:
        raise VoladDataError(path, f"the run's dataset {dataset.name!r} gives brain masks rather than deriving them; "
                                   "put the scan and its *mask* file in a case folder and pass the folder")
    return tio.Subject(dataset.image_entries(case_id(path), [path], None, "input"))


def scan_subjects(dataset: Dataset, path: str | Path) -> list[tio.Subject]:
    """The cases under ``path`` (see the module notes), read as ``dataset`` reads its subjects.

    Raises:
        VoladDataError: the path is missing or holds no image, a contrast or mask is
            missing or ambiguous, a file is not 3D, or files of a case are off one grid.
    """
    path = Path(path)
    if not path.exists():
        raise VoladDataError(path, "input not found")
    if path.is_file():
        if not path.name.lower().endswith(IMAGE_SUFFIXES):
            raise VoladDataError(path, f"is not an image file ({', '.join(IMAGE_SUFFIXES)})")
        return [_file_case(dataset, path)]
    folders = sorted(p for p in path.iterdir() if p.is_dir() and _images(p))
    files = _images(path)
    if folders and files:
        raise VoladConfigError(f"{path}: holds both case folders ({folders[0].name}, ...) and images ({files[0].name}, ...); pass one case folder or a folder of case folders")
    if folders:
        return [_case(dataset, f, _images(f)) for f in folders]
    if not files:
        raise VoladDataError(path, f"holds no image files ({', '.join(IMAGE_SUFFIXES)}) and no case folders with images")
    images = [p for p in files if not _is_mask(p)]
    one_case = len(dataset.contrasts) > 1 or dataset.mask_is_given or len(images) == 1 or _names_one(dataset, images)
    if one_case:
        return [_case(dataset, path, files)]
    return [_file_case(dataset, p) for p in images]  # a one-contrast run: every image is a case
