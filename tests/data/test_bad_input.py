"""Bad input gets a clear error naming the file and the problem."""

import json

import numpy as np
import pytest

from volad.data import load_dataset
from volad.data.preprocessing import preprocessing
from volad.errors import VoladDataError
from volad.export import write_nifti


def _dataset(tmp_path, image=None, mask=None, label=None, mask_affine=None):
    root = tmp_path / "d"
    img = np.full((10, 10, 10), 100.0, np.float32) if image is None else image
    write_nifti(img, np.eye(4), root / "s1" / "s1_t1.nii.gz") if img.ndim == 3 else None
    if img.ndim == 4:
        import nibabel as nib

        (root / "s1").mkdir(parents=True)
        nib.save(nib.Nifti1Image(img, np.eye(4)), root / "s1" / "s1_t1.nii.gz")
    m = np.ones((10, 10, 10), np.uint8) if mask is None else mask
    write_nifti(m, np.eye(4) if mask_affine is None else mask_affine, root / "s1" / "s1_mask.nii.gz", dtype=np.uint8)
    if label is not None:
        write_nifti(label, np.eye(4), root / "s1" / "s1_seg.nii.gz", dtype=np.uint8)
    manifest = {
        "name": "bad",
        "contrasts": {"t1": "{subject}/{subject}_t1.nii.gz"},
        "brain_mask": {"pattern": "{subject}/{subject}_mask.nii.gz"},
        "label": {"pattern": "{subject}/{subject}_seg.nii.gz", "missing": "error"},
        "splits": {"test": ["s1"]},
    }
    (tmp_path / "bad.json").write_text(json.dumps(manifest))
    return load_dataset(tmp_path / "bad.json", root)


def test_missing_file(tmp_path):
    ds = _dataset(tmp_path)
    with pytest.raises(VoladDataError, match=r"s1_seg\.nii\.gz: lesion label of subject 's1' not found"):
        ds.subjects("test")


def test_geometry_mismatch(tmp_path):
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    ds = _dataset(tmp_path, label=np.zeros((10, 10, 10), np.uint8), mask_affine=shifted)
    with pytest.raises(VoladDataError, match=r"s1_mask\.nii\.gz: geometry differs from s1_t1\.nii\.gz"):
        ds.subjects("test")


def test_shape_mismatch(tmp_path):
    ds = _dataset(tmp_path, label=np.zeros((10, 10, 9), np.uint8))
    with pytest.raises(VoladDataError, match=r"s1_seg\.nii\.gz: geometry differs"):
        ds.subjects("test")


def test_nan_voxels(tmp_path):
    img = np.full((10, 10, 10), 100.0, np.float32)
    img[3, 3, 3] = np.nan
    ds = _dataset(tmp_path, image=img, label=np.zeros((10, 10, 10), np.uint8))
    subject = ds.subjects("test")[0]
    with pytest.raises(VoladDataError, match=r"s1_t1\.nii\.gz: contains 1 NaN or Inf voxels"):
        preprocessing()(subject)
    img[3, 3, 3] = np.inf
    ds = _dataset(tmp_path / "inf", image=img, label=np.zeros((10, 10, 10), np.uint8))
    with pytest.raises(VoladDataError, match=r"s1_t1\.nii\.gz: contains 1 NaN or Inf voxels"):
        preprocessing()(ds.subjects("test")[0])


def test_4d_image(tmp_path):
    ds = _dataset(tmp_path, image=np.ones((10, 10, 10, 3), np.float32), label=np.zeros((10, 10, 10), np.uint8))
    with pytest.raises(VoladDataError, match=r"s1_t1\.nii\.gz: is 4D with shape \(10, 10, 10, 3\); expected a 3D volume"):
        ds.subjects("test")


def test_empty_brain_mask(tmp_path):
    ds = _dataset(tmp_path, mask=np.zeros((10, 10, 10), np.uint8), label=np.zeros((10, 10, 10), np.uint8))
    with pytest.raises(VoladDataError, match=r"s1_mask\.nii\.gz: brain mask is empty"):
        preprocessing()(ds.subjects("test")[0])


def test_missing_data_root(tmp_path):
    with pytest.raises(VoladDataError, match="data root of dataset"):
        (tmp_path / "m.json").write_text(json.dumps({"name": "m", "contrasts": {"t1": "{subject}.nii"}, "splits": {}}))
        load_dataset(tmp_path / "m.json", tmp_path / "nowhere")


def test_whole_volumes_of_different_sizes_are_not_batched(tmp_path):
    from volad.data.synthetic import generate_synthetic
    from volad.data.views import training_loader

    generate_synthetic(tmp_path / "a", shape=16, n_train=2, n_val=1, n_test=1, seed=0)
    generate_synthetic(tmp_path / "b", shape=20, n_train=2, n_val=1, n_test=1, seed=1)
    subjects = load_dataset("synthetic", tmp_path / "a").subjects("train") + load_dataset("synthetic", tmp_path / "b").subjects("train")
    odd = subjects[2]["image_paths"][0]
    with pytest.raises(VoladDataError, match="differs from.*--batch_size 1") as e:
        training_loader(subjects, preprocessing(), spatial_dims=3, patch_size=None, batch_size=2)
    assert odd in str(e.value)
    assert training_loader(subjects, preprocessing(), spatial_dims=3, patch_size=None, batch_size=1) is not None
