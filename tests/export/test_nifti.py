"""Maps line up with the input in nibabel and in ITK (3D Slicer's reader)."""

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from volad.export import write_like, write_nifti


def _oblique_affine():
    a = np.eye(4)
    th = np.deg2rad(10)
    a[:3, :3] = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]]) @ np.diag([0.9, 1.1, 1.3])
    a[:3, 3] = [-40.5, 12.0, 7.25]
    return a


def _same_sitk(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    assert np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    assert np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)


def test_write_nifti_sets_both_forms(tmp_path):
    aff = _oblique_affine()
    p = write_nifti(np.random.rand(5, 6, 7), aff, tmp_path / "x.nii.gz")
    img = nib.load(p)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert np.allclose(img.header.get_sform(), aff, atol=1e-5) and np.allclose(img.header.get_qform(), aff, atol=1e-5)


def test_map_lines_up_with_consistent_input(tmp_path):
    aff = _oblique_affine()
    src = write_nifti(np.random.rand(9, 8, 7).astype(np.float32), aff, tmp_path / "in.nii.gz")
    amap = np.random.rand(9, 8, 7).astype(np.float32)
    out = write_like(amap, src, tmp_path / "map.nii.gz")
    _same_sitk(sitk.ReadImage(str(src)), sitk.ReadImage(str(out)))
    assert np.allclose(nib.load(out).affine, nib.load(src).affine)
    # Voxel values are where they were put, in both readers.
    assert np.array_equal(nib.load(out).get_fdata(dtype=np.float32), amap)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))).transpose(2, 1, 0), amap)


def test_map_lines_up_with_inconsistent_input(tmp_path):
    """sform code 2 and a different qform code 1: ITK and nibabel disagree on the input;
    the map must follow the input in each reader."""
    q = _oblique_affine()
    s = q.copy()
    s[:3, 3] += [3.0, -2.0, 1.0]
    img = nib.Nifti1Image(np.random.rand(6, 6, 6).astype(np.float32), s)
    img.set_sform(s, code=2)
    img.set_qform(q, code=1)
    src = tmp_path / "in.nii.gz"
    nib.save(img, src)
    out = write_like(np.zeros((6, 6, 6), np.float32), src, tmp_path / "map.nii.gz")
    _same_sitk(sitk.ReadImage(str(src)), sitk.ReadImage(str(out)))
    assert np.allclose(nib.load(out).affine, nib.load(src).affine)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    import pytest

    from volad.io import atomic_path

    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "m.nii.gz") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
