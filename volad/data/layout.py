"""Writing generated datasets in the layout their manifests describe.

Generation is atomic at dataset level: files go to a hidden sibling folder that
is renamed onto the root once complete, and a ``.volad_complete`` marker records
the generator's settings. An interrupted generation leaves no half dataset.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from volad.errors import VoladDataError
from volad.io import write_nifti


def write_subject(
    root: Path,
    subject_id: str,
    affine: np.ndarray,
    contrasts: dict[str, np.ndarray],
    brain_mask: np.ndarray,
    label: np.ndarray,
) -> None:
    """Write ``{subject}/{subject}_{contrast|brainmask|seg}.nii.gz``."""
    folder = root / subject_id
    for name, arr in contrasts.items():
        write_nifti(arr, affine, folder / f"{subject_id}_{name}.nii.gz", dtype=np.int16)
    write_nifti(brain_mask, affine, folder / f"{subject_id}_brainmask.nii.gz", dtype=np.uint8)
    write_nifti(label, affine, folder / f"{subject_id}_seg.nii.gz", dtype=np.uint8)


@contextlib.contextmanager
def building(root: str | Path, settings: dict[str, Any]) -> Iterator[Path]:
    """Yield a scratch folder; on success it becomes ``root`` with a completion marker."""
    root = Path(root)
    if (root / ".volad_complete").exists():
        raise VoladDataError(root, "already holds a generated dataset")
    if root.exists() and any(root.iterdir()):
        raise VoladDataError(root, "exists and is not empty; choose an empty or new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    scratch = root.parent / f".{root.name}.partial-{os.getpid()}"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    try:
        yield scratch
        (scratch / ".volad_complete").write_text(json.dumps(settings, indent=2) + "\n")
        if root.exists():
            root.rmdir()
        os.replace(scratch, root)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)


def write_splits(root: Path, splits: dict[str, list[str]]) -> None:
    (root / "splits.json").write_text(json.dumps(splits, indent=2) + "\n")
