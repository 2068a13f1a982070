"""Reading headers with checks, and writing files atomically.

Every writer in volad goes through :func:`atomic_path`: the file is written under
a temporary name in the destination folder and renamed into place, so a crash
never leaves a truncated NIfTI, checkpoint or report behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import SimpleITK as sitk

from volad.errors import VoladDataError


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of an image file: shape and voxel-to-world (RAS) affine."""

    shape: tuple[int, ...]
    affine: np.ndarray

    def matches(self, other: "Geometry", atol: float = 1e-3) -> bool:
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol)


def _nifti_suffix(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".seg.nrrd", ".tar.gz"):
        if name.endswith(suffix):
            return suffix
    return path.suffix


def read_geometry(path: str | Path, *, expect_3d: bool = True) -> Geometry:
    """Read a file's header only and check that it is a usable volume.

    Args:
        path: Image file (NIfTI, NRRD, MHA: anything SimpleITK reads).
        expect_3d: Refuse files with more than three axes (a trailing axis of
            length one is accepted, as scanners often write it).

    Raises:
        VoladDataError: the file is missing, unreadable, or not 3D.
    """
    path = Path(path)
    if not path.is_file():
        raise VoladDataError(path, "file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise VoladDataError(path, f"cannot be read as an image ({str(exc).strip().splitlines()[-1]})") from exc
    size = tuple(int(s) for s in reader.GetSize())
    if reader.GetNumberOfComponents() > 1:
        raise VoladDataError(path, f"has {reader.GetNumberOfComponents()} components per voxel; expected a scalar 3D image")
    if expect_3d:
        if len(size) == 4 and size[3] == 1:
            size = size[:3]
        if len(size) != 3:
            raise VoladDataError(path, f"is {len(size)}D with shape {size}; expected a 3D volume")
    spacing = np.array(reader.GetSpacing()[:3])
    direction = np.array(reader.GetDirection()).reshape(len(reader.GetSpacing()), -1)[:3, :3]
    origin = np.array(reader.GetOrigin()[:3])
    affine = np.eye(4)
    # ITK is LPS; convert to RAS like nibabel and TorchIO.
    flip = np.diag([-1.0, -1.0, 1.0])
    affine[:3, :3] = flip @ direction @ np.diag(spacing)
    affine[:3, 3] = flip @ origin
    return Geometry(shape=size, affine=affine)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary name keeps the file's suffix (``.nii.gz``, ``.json``, ...) so that
    writers choosing a format by extension behave as they would on ``path``.
    On error the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = _nifti_suffix(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp creates 0600; give the file the usual permissions
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(obj: Any, path: str | Path) -> Path:
    """Write JSON atomically (NaN written as null)."""

    def clean(o: Any) -> Any:
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, (np.floating, float)):
            return None if not np.isfinite(o) else float(o)
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.ndarray):
            return clean(o.tolist())
        if isinstance(o, Path):
            return str(o)
        return o

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(clean(obj), indent=2) + "\n")
    return Path(path)


def read_image(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """TorchIO reader that refuses NaN/Inf voxels and non-3D files, naming the file.

    TorchIO's own reader silently sanitises NaNs, which would hide corrupt inputs.

    Returns:
        ``(1, W, H, D)`` array and the 4×4 RAS affine (as nibabel/TorchIO read it).
    """
    path = Path(path)
    name = path.name
    if name.endswith((".nii", ".nii.gz", ".hdr", ".img")):
        import nibabel as nib

        try:
            img = nib.load(str(path))
        except Exception as exc:  # nibabel raises several types
            raise VoladDataError(path, f"cannot be read as NIfTI ({exc})") from exc
        data = np.asarray(img.dataobj)
        affine = img.affine
    else:
        from torchio.data.io import read_image as tio_read

        tensor, affine = tio_read(path)
        data = np.asarray(tensor)[0] if tensor.ndim == 4 and tensor.shape[0] == 1 else np.asarray(tensor)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VoladDataError(path, f"is {data.ndim}D with shape {data.shape}; expected a 3D volume")
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise VoladDataError(path, f"contains {bad} NaN or Inf voxels")
    if data.dtype.kind == "u" and data.dtype.itemsize >= 2:  # torch lacks wide unsigned types
        data = data.astype(np.int32 if data.dtype.itemsize == 2 else np.int64)
    return data[None], np.asarray(affine, dtype=np.float64)
