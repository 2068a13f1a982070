import json

import nibabel as nib
import numpy as np
import pytest
import torch

from volad.data import load_dataset
from volad.data.manifest import channel_count
from volad.data.preprocessing import denormalize, preprocessing
from volad.data.synthetic import generate_synthetic
from volad.data.views import patch_shape, to_batch, training_loader
from volad.errors import VoladConfigError


def test_synthetic_is_deterministic(tmp_path):
    a = generate_synthetic(tmp_path / "a", shape=16, n_train=1, n_val=2, n_test=2, seed=3)
    b = generate_synthetic(tmp_path / "b", shape=16, n_train=1, n_val=2, n_test=2, seed=3)
    for f in ("syn-test-001/syn-test-001_flair.nii.gz", "syn-test-001/syn-test-001_seg.nii.gz"):
        assert np.array_equal(nib.load(a / f).get_fdata(), nib.load(b / f).get_fdata())
    assert nib.load(a / "syn-test-001/syn-test-001_seg.nii.gz").get_fdata().any()
    assert not nib.load(a / "syn-train-000/syn-train-000_seg.nii.gz").get_fdata().any()


def test_manifest_splits_and_channels(syn_dataset):
    assert syn_dataset.split_ids("train") == [f"syn-train-{i:03d}" for i in range(6)]
    assert len(syn_dataset.subjects("test")) == 3
    ds = load_dataset("synthetic", syn_dataset.root, contrasts=["t1", "flair"])
    s = preprocessing()(ds.subjects("val")[1])
    assert s["image"].data.shape[0] == 2
    assert channel_count("synthetic", ["t1", "flair"]) == 2 and channel_count("synthetic") == 1
    every = load_dataset("synthetic", syn_dataset.root, contrasts="all")  # what normative_views reads by default
    assert every.contrasts == ["t1", "t2", "flair"] and channel_count("synthetic", "all") == 3 == channel_count("synthetic", ["all"])


def test_normalisation_inverts(syn_dataset):
    subject = syn_dataset.subjects("val")[1]
    raw = subject["image"].data.clone().float()
    s = preprocessing()(subject)
    mask = s["brain_mask"].data.bool()
    inside = s["image"].data[mask]
    assert 0 <= inside.min() and np.isclose(np.percentile(inside.numpy(), 99), 1.0, atol=0.02)
    back = denormalize(s["image"].data, s["normalization"])
    # Inside the brain and below the clip, the inverse recovers the input.
    lo, hi = s["normalization"]["low"][0], s["normalization"]["high"][0]
    ok = mask & (raw > lo) & (raw < hi)
    assert torch.allclose(back[ok], raw[ok], atol=1e-2)


def test_unknown_dataset_and_contrast(syn_root):
    with pytest.raises(VoladConfigError, match="unknown dataset 'nope'"):
        load_dataset("nope")
    with pytest.raises(VoladConfigError, match="no contrast 'dwi'"):
        load_dataset("synthetic", syn_root, contrasts=["dwi"])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_training_loader_patches_inside_brain(syn_dataset, spatial_dims):
    loader = training_loader(
        syn_dataset.subjects("train"), preprocessing(), spatial_dims=spatial_dims, patch_size=12, batch_size=4, samples_per_volume=4
    )
    batch = to_batch(next(iter(loader)), spatial_dims)
    expected = (4, 1, 12, 12) if spatial_dims == 2 else (4, 1, 12, 12, 12)
    assert tuple(batch.image.shape) == expected
    # LabelSampler centres patches on brain voxels.
    centre = (slice(None), 0, 6, 6) if spatial_dims == 2 else (slice(None), 0, 6, 6, 6)
    assert bool(batch.mask[centre].all())
    assert patch_shape(12, 2) == (12, 12, 1) and patch_shape([8, 10, 12], 3) == (8, 10, 12)


def test_patch_larger_than_volume_is_refused(syn_dataset):
    with pytest.raises(VoladConfigError, match="larger than subject"):
        training_loader(syn_dataset.subjects("train"), preprocessing(), spatial_dims=3, patch_size=40, batch_size=2)


def test_manifest_patterns_with_fields_and_alternatives(tmp_path):
    """An ATLAS-like nested layout with an extra field and .nii/.nii.gz alternatives."""
    from volad.export import write_nifti

    for site, sub, ext in (("R001", "sub-r001s001", ".nii.gz"), ("R002", "sub-r002s003", ".nii")):
        d = tmp_path / "Training" / site / sub / "ses-1" / "anat"
        arr = np.zeros((8, 8, 8), np.float32)
        arr[2:6, 2:6, 2:6] = 100
        write_nifti(arr, np.eye(4), d / f"{sub}_ses-1_T1w{ext}")
        write_nifti((arr > 0).astype(np.uint8), np.eye(4), d / f"{sub}_ses-1_mask{ext}")
    manifest = {
        "name": "nested",
        "contrasts": {"t1": ["Training/{site}/{subject}/ses-1/anat/{subject}_ses-1_T1w.nii.gz", "Training/{site}/{subject}/ses-1/anat/{subject}_ses-1_T1w.nii"]},
        "brain_mask": {"derive": "nonzero"},
        "label": {"pattern": ["Training/{site}/{subject}/ses-1/anat/{subject}_ses-1_mask.nii.gz", "Training/{site}/{subject}/ses-1/anat/{subject}_ses-1_mask.nii"]},
        "splits": {"test": ["sub-r001s001", "sub-r002s003"]},
    }
    mpath = tmp_path / "nested.json"
    mpath.write_text(json.dumps(manifest))
    ds = load_dataset(mpath, tmp_path)
    assert sorted(ds.discover()) == ["sub-r001s001", "sub-r002s003"]
    s = preprocessing()(ds.subjects("test")[1])
    assert s["label"].data.sum() == 64 and s["brain_mask"].data.sum() == 64
