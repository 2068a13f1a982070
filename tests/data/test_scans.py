"""Scans given by path (``inference.json --input``): which file is which, and clear errors."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from volad.data.manifest import load_dataset, manifests_dir
from volad.data.scans import scan_subjects
from volad.errors import VoladConfigError, VoladDataError


def _derived_mask_dataset(syn_root, tmp_path, contrasts=None):
    """The synthetic dataset read with a brain mask derived from the image (as IXI, BraTS, ATLAS manifests say)."""
    manifest = json.loads((manifests_dir() / "synthetic.json").read_text())
    manifest.pop("generator", None)
    manifest["brain_mask"] = {"derive": "nonzero"}
    path = tmp_path / "derived.json"
    path.write_text(json.dumps(manifest))
    return load_dataset(path, syn_root, contrasts)


def _case(syn_root, tmp_path, name, files):
    folder = tmp_path / name
    folder.mkdir()
    for f in files:
        shutil.copy(syn_root / "syn-test-000" / f, folder / f.replace("syn-test-000", name))
    return folder


def test_a_case_folder_gives_each_contrast_by_name_and_its_mask(syn_root, tmp_path):
    ds = load_dataset("synthetic", syn_root, ["t1", "flair"])
    folder = _case(syn_root, tmp_path, "p7", ["syn-test-000_flair.nii.gz", "syn-test-000_t1.nii.gz", "syn-test-000_t2.nii.gz", "syn-test-000_brainmask.nii.gz"])
    (s,) = scan_subjects(ds, folder)
    assert s["subject_id"] == "p7" and s["split"] == "input"
    assert [p.split("/")[-1] for p in s["image_paths"]] == ["p7_t1.nii.gz", "p7_flair.nii.gz"]  # the run's contrast order
    assert s["brain_mask"].path.name == "p7_brainmask.nii.gz"


def test_a_folder_of_cases_and_single_files(syn_root, tmp_path):
    ds = _derived_mask_dataset(syn_root, tmp_path)
    cases = tmp_path / "cases"
    cases.mkdir()
    for i in (1, 2):
        _case(syn_root, cases, f"c{i}", ["syn-test-000_flair.nii.gz"])
    assert [s["subject_id"] for s in scan_subjects(ds, cases)] == ["c1", "c2"]
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in (1, 2):
        shutil.copy(syn_root / "syn-test-000" / "syn-test-000_flair.nii.gz", loose / f"patient{i}.nii.gz")
    assert [s["subject_id"] for s in scan_subjects(ds, loose)] == ["patient1", "patient2"]  # one-contrast run: a file is a case
    (single,) = scan_subjects(ds, loose / "patient1.nii.gz")
    assert single["subject_id"] == "patient1" and single["derive_mask"] == "nonzero"


def test_scan_errors_name_the_file_and_the_problem(syn_root, tmp_path):
    ds = load_dataset("synthetic", syn_root, ["t1", "flair"])
    no_t1 = _case(syn_root, tmp_path, "a", ["syn-test-000_flair.nii.gz", "syn-test-000_brainmask.nii.gz"])
    with pytest.raises(VoladDataError, match=r"a: no image of contrast t1 \(the run was trained on t1, flair\)"):
        scan_subjects(ds, no_t1)
    no_mask = _case(syn_root, tmp_path, "b", ["syn-test-000_flair.nii.gz", "syn-test-000_t1.nii.gz"])
    with pytest.raises(VoladDataError, match="b: needs one brain mask file named \\*mask\\*"):
        scan_subjects(ds, no_mask)
    with pytest.raises(VoladDataError, match="is one file, but the run was trained on 2 contrasts"):
        scan_subjects(ds, no_mask / "b_t1.nii.gz")
    with pytest.raises(VoladDataError, match="input not found"):
        scan_subjects(ds, tmp_path / "missing")

    flair_only = _derived_mask_dataset(syn_root, tmp_path)
    img = nib.load(syn_root / "syn-test-000" / "syn-test-000_flair.nii.gz")
    four_d = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([img.get_fdata()] * 3, -1).astype(np.float32), img.affine), four_d)
    with pytest.raises(VoladDataError, match=r"four_d.nii.gz.*is 4D with shape"):
        scan_subjects(flair_only, four_d)
    shifted = _case(syn_root, tmp_path, "c", ["syn-test-000_flair.nii.gz", "syn-test-000_t1.nii.gz", "syn-test-000_brainmask.nii.gz"])
    t1 = nib.load(shifted / "c_t1.nii.gz")
    affine = t1.affine.copy()
    affine[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj), affine), shifted / "c_t1.nii.gz")
    with pytest.raises(VoladDataError, match=r"c_flair.nii.gz.*geometry differs from c_t1.nii.gz"):
        scan_subjects(ds, shifted)
    mixed = tmp_path / "mixed"
    _case(syn_root, mixed.parent, "mixed", ["syn-test-000_flair.nii.gz"])
    _case(syn_root, mixed, "inner", ["syn-test-000_flair.nii.gz"])
    with pytest.raises(VoladConfigError, match="holds both case folders"):
        scan_subjects(flair_only, mixed)


def test_a_case_folder_with_other_contrasts_is_one_case_for_a_one_contrast_run(syn_root, tmp_path):
    ds = _derived_mask_dataset(syn_root, tmp_path)  # a FLAIR-only run
    folder = _case(syn_root, tmp_path, "p9", ["syn-test-000_flair.nii.gz", "syn-test-000_t1.nii.gz", "syn-test-000_t2.nii.gz"])
    (s,) = scan_subjects(ds, folder)
    assert s["subject_id"] == "p9" and s["image_paths"][0].endswith("p9_flair.nii.gz")
