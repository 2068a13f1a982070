"""FastMRI+ brain annotations: bounding boxes on fastMRI ``reconstruction_rss`` slices.

The annotation CSV (Zhao et al., "fastMRI+: Clinical pathology annotations for
knee and brain fully sampled magnetic resonance imaging data", Sci. Data 2022)
has the columns ``file,slice,study_level,x,y,width,height,label``.

* Study-level rows (``study_level`` = ``Yes``) describe the whole study; they
  have no usable coordinates and never enter a mask.
* Boxes are in pixels of the image after an up/down flip: ``x`` is the column and
  ``y`` the row of the flipped image. In the stored (unflipped) image a box covers
  rows ``[H − y − h, H − y)`` and columns ``[x, x + w)``.
* Some boxes have zero width or height; they are clamped to at least one pixel.
* A study is healthy when every one of its rows is labelled "Normal for age",
  and anomalous when it has at least one slice-level box with another label.
  Anything else (not annotated, or only study-level findings) has no status and
  is left out of every split.
"""

from __future__ import annotations

import csv
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from volad.data.readers import fastmri_geometry, rows_to_volume
from volad.errors import VoladDataError

COLUMNS = ("file", "slice", "study_level", "x", "y", "width", "height", "label")
NORMAL_LABELS = ("Normal for age",)


@dataclass(frozen=True)
class Annotation:
    """One CSV row; coordinates are ``None`` for study-level rows."""

    file: str
    slice: int | None
    study_level: bool
    x: int | None
    y: int | None
    width: int | None
    height: int | None
    label: str


def _int(value: str) -> int | None:
    value = value.strip()
    return int(float(value)) if value else None


@functools.lru_cache(maxsize=8)
def _read(path: str, mtime: float) -> dict[str, tuple[Annotation, ...]]:
    del mtime  # part of the cache key only
    out: dict[str, list[Annotation]] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise VoladDataError(path, f"is not a FastMRI+ annotation CSV: missing column(s) {', '.join(missing)}")
        for n, row in enumerate(reader, start=2):
            try:
                study = row["study_level"].strip().lower() in ("yes", "true", "1")
                ann = Annotation(
                    file=Path(row["file"].strip()).stem,
                    slice=None if study else _int(row["slice"]),
                    study_level=study,
                    x=None if study else _int(row["x"]),
                    y=None if study else _int(row["y"]),
                    width=None if study else _int(row["width"]),
                    height=None if study else _int(row["height"]),
                    label=row["label"].strip(),
                )
            except ValueError as exc:
                raise VoladDataError(path, f"line {n}: unreadable value ({exc})") from exc
            out.setdefault(ann.file, []).append(ann)
    return {k: tuple(v) for k, v in out.items()}


def read_annotations(path: str | Path) -> dict[str, tuple[Annotation, ...]]:
    """Rows of a FastMRI+ CSV grouped by file stem (cached while the file is unchanged).

    Raises:
        VoladDataError: the file is missing or lacks the expected columns.
    """
    path = Path(path)
    if not path.is_file():
        raise VoladDataError(path, "FastMRI+ annotation CSV not found")
    return _read(str(path), os.path.getmtime(path))


def boxes(rows: Sequence[Annotation], normal_labels: Sequence[str] = NORMAL_LABELS) -> list[Annotation]:
    """Slice-level rows that mark a finding (study-level and normal rows left out)."""
    normal = {n.lower() for n in normal_labels}
    return [r for r in rows if not r.study_level and r.x is not None and r.y is not None and r.label.lower() not in normal]


def health_status(rows: Sequence[Annotation] | None, normal_labels: Sequence[str] = NORMAL_LABELS) -> str | None:
    """``"healthy"``, ``"anomalous"`` or ``None`` (no usable status) for one study's rows."""
    if not rows:
        return None
    normal = {n.lower() for n in normal_labels}
    if all(r.label.lower() in normal for r in rows):
        return "healthy"
    if boxes(rows, normal_labels):
        return "anomalous"
    return None


def box_mask(shape: tuple[int, int, int], rows: Sequence[Annotation], normal_labels: Sequence[str] = NORMAL_LABELS) -> np.ndarray:
    """Binary mask ``(slices, rows, columns)`` in the stored image's orientation.

    Args:
        shape: ``reconstruction_rss`` shape.
        rows: The study's annotation rows.
        normal_labels: Labels that are not findings.
    """
    n_slices, height, width = shape
    mask = np.zeros(shape, dtype=np.uint8)
    for b in boxes(rows, normal_labels):
        if b.slice is None or not 0 <= b.slice < n_slices:
            continue
        w, h = max(int(b.width or 0), 1), max(int(b.height or 0), 1)
        r0, r1 = max(height - b.y - h, 0), min(height - b.y, height)
        c0, c1 = max(b.x, 0), min(b.x + w, width)
        if r1 > r0 and c1 > c0:
            mask[b.slice, r0:r1, c0:c1] = 1
    return mask


def read_fastmri_label(
    path: str | Path, *, csv_path: str | Path, key: str = "reconstruction_rss", normal_labels: Sequence[str] = NORMAL_LABELS
) -> tuple[np.ndarray, np.ndarray]:
    """TorchIO reader: the box mask of the study stored at ``path``, on its image's grid."""
    geom = fastmri_geometry(path, key)
    cols, rows_, slices = geom.shape
    rows = read_annotations(csv_path).get(Path(path).stem, ())
    mask = box_mask((slices, rows_, cols), rows, normal_labels)
    return rows_to_volume(mask)[None], geom.affine
