"""NIfTI writing with unambiguous geometry, atomically.

ITK (and so 3D Slicer) reads the qform when ``sform_code`` is 2–4 and
``qform_code`` is 1, while nibabel (and so TorchIO) reads the sform. A map whose
header disagrees with itself can therefore sit in the right place in Python and
be shifted in Slicer. volad writes new images with sform and qform set to the
same matrix, both with code 1. A map on an input's grid copies the input's two
forms and codes exactly (:func:`write_like`), so every reader places the map
wherever it places the input, even when the input's own header is inconsistent.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from volad.io import atomic_path, read_geometry


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
