"""File formats a manifest can point at, each read as a ``(1, W, H, D)`` volume with an affine.

* ``nifti`` (default): NIfTI, NRRD, MHA, ... through :func:`volad.io.read_image`.
* ``fastmri_h5``: fastMRI brain ``.h5`` files, dataset ``reconstruction_rss``
  (slices × rows × columns). Voxel size comes from the ISMRMRD header's
  reconstruction field of view when present (else 1 mm).
* ``image2d``: PNG/JPEG/BMP slices (Br35H, Brain Tumor MRI), converted to
  grey, resized to ``size``² and scaled to [0, 1] by the pixel type's range
  (255 for 8-bit), read as depth-1 volumes.

2D sources share one orientation convention: an image of ``rows × columns``
becomes ``volume[x = column, y = rows − 1 − row, z = slice]``, so that ``y``
grows upwards as the picture is shown and Slicer displays it upright. Labels made
from pixel boxes (:mod:`volad.data.fastmri`) go through the same mapping.
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import torch

from volad.errors import VoladConfigError, VoladDataError
from volad.io import Geometry, read_geometry, read_image


def rows_to_volume(array: np.ndarray) -> np.ndarray:
    """Map ``(slices, rows, columns)`` to volad's ``(x, y, z)`` (columns, flipped rows, slices)."""
    return np.ascontiguousarray(np.flip(np.transpose(array, (2, 1, 0)), axis=1))


@dataclass(frozen=True)
class Reader:
    """How one file format is read.

    Attributes:
        name: Format name used in manifests.
        read: ``path -> ((1, W, H, D) array, 4×4 affine)``; a TorchIO reader.
        geometry: ``path -> Geometry`` without reading voxel data where possible.
    """

    name: str
    read: Callable[[str | Path], tuple[np.ndarray, np.ndarray]]
    geometry: Callable[[str | Path], Geometry]


# -- fastMRI ------------------------------------------------------------------------
def _h5(path: str | Path):
    import h5py

    path = Path(path)
    if not path.is_file():
        raise VoladDataError(path, "file not found")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise VoladDataError(path, f"cannot be read as HDF5 ({exc})") from exc


def _fastmri_spacing(handle) -> tuple[float, float, float]:
    """In-plane voxel size and slice thickness from the ISMRMRD header (1 mm when absent)."""
    raw = handle.get("ismrmrd_header")
    if raw is None:
        return (1.0, 1.0, 1.0)
    try:
        text = np.asarray(raw[()]).tobytes().decode("utf-8", "ignore").strip("\x00")
        root = ET.fromstring(text)
        for el in root.iter():  # drop the ISMRMRD namespace so plain paths work
            el.tag = el.tag.rsplit("}", 1)[-1]
        recon = root.find("encoding/reconSpace")
        fx, fy, fz = (float(recon.find(f"fieldOfView_mm/{a}").text) for a in "xyz")
        mx, my = (float(recon.find(f"matrixSize/{a}").text) for a in "xy")
        return (fx / mx, fy / my, fz)
    except (ET.ParseError, AttributeError, TypeError, ValueError, ZeroDivisionError):
        return (1.0, 1.0, 1.0)


def read_fastmri(path: str | Path, key: str = "reconstruction_rss") -> tuple[np.ndarray, np.ndarray]:
    """fastMRI ``.h5`` → ``(1, columns, rows, slices)`` float32 volume and a spacing-only affine."""
    with _h5(path) as f:
        if key not in f:
            raise VoladDataError(path, f"has no dataset {key!r} (has: {', '.join(f.keys())})")
        data = np.asarray(f[key], dtype=np.float32)
        spacing = _fastmri_spacing(f)
    if data.ndim != 3:
        raise VoladDataError(path, f"{key} is {data.ndim}D with shape {data.shape}; expected slices × rows × columns")
    if not np.isfinite(data).all():
        raise VoladDataError(path, f"{key} contains {int((~np.isfinite(data)).sum())} NaN or Inf voxels")
    return rows_to_volume(data)[None], np.diag([*spacing, 1.0])


def fastmri_geometry(path: str | Path, key: str = "reconstruction_rss") -> Geometry:
    with _h5(path) as f:
        if key not in f:
            raise VoladDataError(path, f"has no dataset {key!r} (has: {', '.join(f.keys())})")
        slices, rows, cols = f[key].shape
        spacing = _fastmri_spacing(f)
    return Geometry(shape=(int(cols), int(rows), int(slices)), affine=np.diag([*spacing, 1.0]))


# -- 2D image files -----------------------------------------------------------------
def _read_picture(path: Path) -> np.ndarray:
    if not path.is_file():
        raise VoladDataError(path, "file not found")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise VoladDataError(path, f"cannot be read as an image ({str(exc).strip().splitlines()[-1]})") from exc
    arr = sitk.GetArrayFromImage(img)  # (rows, cols) or (rows, cols, components)
    kind = arr.dtype
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and img.GetNumberOfComponentsPerPixel() > 1:
        arr = arr[..., :3].astype(np.float64).mean(axis=-1)  # drop alpha, average colours
    elif arr.ndim != 2:
        raise VoladDataError(path, f"is not a 2D picture (array shape {arr.shape})")
    scale = float(np.iinfo(kind).max) if kind.kind in "ui" else max(float(np.max(arr)), 1.0)
    return np.asarray(arr, dtype=np.float32) / scale


def read_image2d(path: str | Path, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A picture as a ``(1, size, size, 1)`` volume in [0, 1] (grey, bilinear resize with antialiasing)."""
    path = Path(path)
    pic = torch.from_numpy(_read_picture(path))[None, None]
    if tuple(pic.shape[-2:]) != (size, size):
        pic = torch.nn.functional.interpolate(pic, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    arr = pic[0].clamp(0.0, 1.0).numpy()  # (1, rows, cols) = (slices, rows, cols)
    return rows_to_volume(arr)[None], np.eye(4)


def image2d_geometry(path: str | Path, size: int = 256) -> Geometry:
    path = Path(path)
    if not path.is_file():
        raise VoladDataError(path, "file not found")
    return Geometry(shape=(size, size, 1), affine=np.eye(4))


def nifti_geometry(path: str | Path) -> Geometry:
    return read_geometry(path)


def make_reader(spec: dict[str, Any] | str | None) -> Reader:
    """Reader for a manifest's ``reader`` entry (``None``: NIfTI and friends).

    Raises:
        VoladConfigError: unknown format.
    """
    spec = {"format": spec} if isinstance(spec, str) else dict(spec or {"format": "nifti"})
    fmt = spec.pop("format", "nifti")
    if fmt == "nifti":
        return Reader("nifti", read_image, nifti_geometry)
    if fmt == "fastmri_h5":
        return Reader(fmt, functools.partial(read_fastmri, **spec), functools.partial(fastmri_geometry, **spec))
    if fmt == "image2d":
        return Reader(fmt, functools.partial(read_image2d, **spec), functools.partial(image2d_geometry, **spec))
    raise VoladConfigError(f"unknown reader format {fmt!r} (known: nifti, fastmri_h5, image2d)")
