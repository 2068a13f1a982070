"""Reading headers with checks, and writing files atomically.

Every writer in volad goes through :func:`atomic_path`: the file is written under
a temporary name in the destination folder and renamed into place, so a crash
never leaves a truncated NIfTI, checkpoint or report behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from volad.errors import VoladConfigError, VoladDataError

#: How :func:`atomic_path` names its temporaries: ``.<name>.<8 random chars>.tmp<suffix>``.
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9.]+)?$")


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of an image file: shape and voxel-to-world (RAS) affine."""

    shape: tuple[int, ...]
    affine: np.ndarray

    def matches(self, other: "Geometry", atol: float = 1e-3) -> bool:
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol)

    @property
    def orientation(self) -> str:
        """Where the voxel axes point, as three letters (``RAS``, ``LPS``, ...; nibabel's axis codes)."""
        return "".join(nib.orientations.aff2axcodes(self.affine))

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each voxel axis."""
        return tuple(float(v) for v in np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0))


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


def _disk_full(exc: BaseException, folder: Path) -> str | None:
    """A "no space left" explanation when ``exc`` came from a full disk, else ``None``.

    ``torch.save`` reports a full disk as ``basic_ios::clear: iostream error``
    without an errno, so the free space is checked as well.
    """
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "no space left on device"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free < 64 * 2**20 or "No space left" in str(exc):
        return f"no space left on device ({free / 2**20:.1f} MB free in {folder})"
    return None


def make_output_dir(folder: str | Path) -> Path:
    """Create an output folder, or say clearly why it cannot be created."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VoladConfigError(f"{folder}: output folder cannot be created ({exc.strerror or exc})") from exc
    return folder


def ensure_writable(folder: str | Path) -> Path:
    """Check, before any work starts, that files can be written into ``folder``.

    Raises:
        VoladConfigError: the folder cannot be created or written (read-only, not a folder, full disk).
    """
    folder = make_output_dir(folder)
    try:
        with atomic_path(folder / ".volad_write_check") as tmp:
            tmp.write_bytes(b"ok")
        (folder / ".volad_write_check").unlink()
    except (OSError, VoladDataError) as exc:
        raise VoladConfigError(f"{folder}: output folder is not writable ({getattr(exc, 'problem', None) or exc})") from exc
    return folder


@contextlib.contextmanager
def waiting_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` for a one-time job (building ``what``), waiting for any other
    process that holds it: torchrun's other ranks, or another command started at the same moment.

    The lock is the kernel's (``flock``): a killed holder releases it, so nothing stale is left to take over.
    Where ``fcntl`` does not exist (Windows), nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - POSIX only
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"volad: waiting for another process to finish building {what} (lock {path})", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary name keeps the file's suffix (``.nii.gz``, ``.json``, ...) so that
    writers choosing a format by extension behave as they would on ``path``.
    On error the temporary file is removed and ``path`` is left untouched; a full
    disk becomes a :class:`VoladDataError` that names ``path`` and says so.
    Temporaries of a killed process are removed by :func:`clean_temporaries`.
    """
    path = Path(path)
    make_output_dir(path.parent)
    suffix = _nifti_suffix(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    except OSError as exc:
        raise VoladDataError(path, f"cannot be written ({_disk_full(exc, path.parent) or exc.strerror or exc})") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp creates 0600; give the file the usual permissions
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as exc:
        full = _disk_full(exc, path.parent)
        if full is None:
            raise
        raise VoladDataError(path, f"could not be written: {full}; free some space and run the command again") from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def clean_temporaries(folder: str | Path) -> list[tuple[Path, int]]:
    """Remove temporaries that a killed writer left in ``folder`` (recursively).

    Only files named the way :func:`atomic_path` names them are touched. Call it
    only while holding the folder's run lock (:mod:`volad.utils.rundir`), so that no
    live writer's temporary is removed.

    Returns:
        The files removed, with their sizes in bytes.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.rglob(".*.tmp*"):
        if p.is_file() and _TEMPORARY.match(p.name):
            size = p.stat().st_size
            p.unlink(missing_ok=True)
            removed.append((p, size))
    return removed


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes (the identity of a checkpoint that made some maps; a downloaded weights file's check)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
        data, affine = _read_nifti(path)
    else:
        from torchio.data.io import read_image as tio_read

        if not path.is_file():
            raise VoladDataError(path, "file not found")
        try:
            tensor, affine = tio_read(path)
        except Exception as exc:  # ITK raises RuntimeError, others vary
            raise VoladDataError(path, f"cannot be read as an image ({_first_line(exc)})") from exc
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1]}" if text else type(exc).__name__


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and affine of a NIfTI file; a missing, truncated or corrupt file is an error naming it."""
    if not path.is_file():
        raise VoladDataError(path, "file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types
        raise VoladDataError(path, f"cannot be read as NIfTI ({_first_line(exc)})") from exc
    try:
        data = np.asarray(img.dataobj)
    except Exception as exc:  # EOFError, zlib.error, OSError, ValueError for short files
        raise VoladDataError(path, f"cannot be read: the file is truncated or corrupt ({_first_line(exc)})") from exc
    return data, np.asarray(img.affine, dtype=np.float64)


def read_map(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A 3D float32 map (anomaly map, reconstruction) and its affine, with the file named in every error."""
    path = Path(path)
    data, affine = _read_nifti(path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VoladDataError(path, f"is {data.ndim}D with shape {data.shape}; expected a 3D map")
    return np.asarray(data, dtype=np.float32), affine

# -- writing NIfTI -------------------------------------------------------------------
# NIfTI writing with unambiguous geometry, atomically.
# 
# ITK (and so 3D Slicer) reads the qform when ``sform_code`` is 2–4 and
# ``qform_code`` is 1, while nibabel (and so TorchIO) reads the sform. A map whose
# header disagrees with itself can therefore sit in the right place in Python and
# be shifted in Slicer. volad writes new images with sform and qform set to the
# same matrix, both with code 1. A map on an input's grid copies the input's two
# forms and codes exactly (:func:`write_like`), so every reader places the map
# wherever it places the input, even when the input's own header is inconsistent.


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path, dtype: type | str = np.float32) -> Path:
    """Write ``array`` with ``affine`` as sform and qform (code 1), atomically."""
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return Path(path)


def write_like(
    array: np.ndarray,
    reference: str | Path,
    path: str | Path,
    dtype: type | str = np.float32,
    fallback_affine: np.ndarray | None = None,
) -> Path:
    """Write ``array`` on the voxel grid of ``reference``, copying its geometry header.

    Args:
        array: Spatial array with exactly the reference's 3D shape.
        reference: The input image the array lines up with. A non-NIfTI reference
            (NRRD, MHA, ...) is read with SimpleITK and written as a consistent NIfTI.
        path: Destination (``.nii`` or ``.nii.gz``).
        dtype: Voxel type written.
        fallback_affine: Voxel-to-RAS affine used when the reference is neither
            NIfTI nor readable by SimpleITK (fastMRI ``.h5``); its reader's affine.
    """
    reference = Path(reference)
    array = np.asarray(array, dtype=dtype)
    try:
        ref = nib.load(str(reference))
        header_shape = ref.shape[:3]
    except Exception:  # not a NIfTI: fall back to ITK's geometry, then to the given affine
        if fallback_affine is not None and reference.suffix.lower() in (".h5", ".hdf5", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
            return write_nifti(array, np.asarray(fallback_affine, dtype=np.float64), path, dtype)
        geom = read_geometry(reference)
        if array.shape[:3] != geom.shape:
            raise ValueError(f"{path}: array shape {array.shape} does not match {reference} {geom.shape}")
        return write_nifti(array, geom.affine, path, dtype)
    if array.shape[:3] != tuple(header_shape):
        raise ValueError(f"{path}: array shape {array.shape} does not match {reference} {tuple(header_shape)}")
    hdr = ref.header
    img = nib.Nifti1Image(array, ref.affine)
    sform, scode = hdr.get_sform(coded=True)
    qform, qcode = hdr.get_qform(coded=True)
    if sform is None and qform is None:
        img.set_sform(ref.affine, code=1)
        img.set_qform(ref.affine, code=1)
    else:
        img.set_sform(sform if sform is not None else ref.affine, code=int(scode) if sform is not None else 0)
        img.set_qform(qform if qform is not None else ref.affine, code=int(qcode) if qform is not None else 0)
    img.header.set_xyzt_units(*hdr.get_xyzt_units())
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return Path(path)
