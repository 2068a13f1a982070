"""``volad preprocess``: registration accuracy, outputs, resumability and refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from volad.data.fakes import make_fake
from volad.data.manifest import load_dataset
from volad.data.prepare import preprocess_dataset
from volad.data.registration import dice, template, to_ras
from volad.errors import VoladConfigError

MANIFEST = {
    "name": "moved",
    "contrasts": {"t1": "{subject}/{subject}_t1.nii.gz"},
    "subjects": "{subject}/{subject}_t1.nii.gz",
    "brain_mask": {"pattern": "{subject}/{subject}_brainmask.nii.gz"},
    "health": "healthy",
    "splits": {"train": ["moved-000"]},
}


def _deformed_phantom(tmp_path: Path) -> tuple[Path, Path]:
    """A 3 mm phantom T1 moved by a known affine (rotation, scaling, shift), as a one-subject dataset."""
    from volad.data.phantom import generate_phantom

    ph = generate_phantom(tmp_path / "ph", spacing=3.0, seed=0, n_train=1, n_val=0, n_test=0)
    src = ph / "ph-train-000"
    t1 = sitk.ReadImage(str(src / "ph-train-000_t1.nii.gz"), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(src / "ph-train-000_brainmask.nii.gz"))
    moved = sitk.AffineTransform(3)
    moved.SetCenter((0.0, -18.0, 18.0))
    rot = sitk.Euler3DTransform((0.0, -18.0, 18.0), np.deg2rad(8), np.deg2rad(-5), np.deg2rad(6))
    moved.SetMatrix((np.array(rot.GetMatrix()).reshape(3, 3) * np.array([1.08, 0.95, 1.04])).ravel().tolist())
    moved.SetTranslation((9.0, -7.0, 5.0))
    root = tmp_path / "moved"
    (root / "moved-000").mkdir(parents=True)
    sitk.WriteImage(sitk.Resample(t1, t1, moved, sitk.sitkLinear, 0.0), str(root / "moved-000" / "moved-000_t1.nii.gz"))
    sitk.WriteImage(sitk.Resample(mask, mask, moved, sitk.sitkNearestNeighbor, 0), str(root / "moved-000" / "moved-000_brainmask.nii.gz"))
    manifest = tmp_path / "moved.json"
    manifest.write_text(json.dumps(MANIFEST))
    return manifest, root


def test_registration_brings_a_deformed_phantom_back_onto_the_template(tmp_path):
    manifest, root = _deformed_phantom(tmp_path)
    _, tmask = template(3.0)
    tmask_arr, taffine = to_ras(tmask)
    moved_mask = sitk.ReadImage(str(root / "moved-000" / "moved-000_brainmask.nii.gz"))
    before = dice(to_ras(sitk.Resample(moved_mask, tmask, sitk.Transform(), sitk.sitkNearestNeighbor, 0))[0], tmask_arr)
    out = preprocess_dataset(manifest, root, tmp_path / "out", register=True, spacing=3.0)
    ds = load_dataset(out)
    img = nib.load(str(out / "moved-000" / "moved-000_brainmask.nii.gz"))
    after = dice(np.asarray(img.dataobj), tmask_arr)
    assert before < 0.85 and after > 0.92, (before, after)
    np.testing.assert_allclose(img.affine, taffine, atol=1e-4)  # on the template's 3 mm grid
    t1 = np.asarray(nib.load(str(out / "moved-000" / "moved-000_t1.nii.gz")).dataobj)
    inside = t1[np.asarray(img.dataobj) > 0]
    assert np.percentile(inside, 1) == pytest.approx(0.0, abs=0.02) and np.percentile(inside, 99) == pytest.approx(1.0, abs=0.02)
    assert ds.name == "moved_preprocessed" and ds.split_ids("train") == ["moved-000"]


def test_preprocess_writes_a_dataset_that_resumes_and_crops_around_the_brain(tmp_path):
    src = make_fake("mslub", tmp_path / "mslub", n=4)
    out = tmp_path / "pp"
    preprocess_dataset("mslub", src, out, contrasts=["flair", "t2"], spacing=2.0, shape=(10, 12, 10), workers=2)
    ds = load_dataset(out)
    import jsonschema

    from volad.data.manifest import manifests_dir

    jsonschema.validate(json.loads((out / "manifest.json").read_text()), json.loads((manifests_dir() / "schema.json").read_text()))
    assert ds.contrasts == ["flair"] and set(ds.manifest["contrasts"]) == {"flair", "t2"}
    assert ds.split_table() == load_dataset("mslub", src).split_table()  # same subjects in the same splits
    s = ds.transform()(ds.subject("patient01", "test"))
    assert tuple(s["image"].spatial_shape) == (10, 12, 10) and s["label"].data.any()
    # Crop kept world positions: the label's centre of mass sits where it was in the source.
    src_lab = nib.load(str(src / "patient01" / "patient01_consensus_gt.nii.gz"))
    out_lab = nib.load(str(out / "patient01" / "patient01_seg.nii.gz"))
    com = lambda img: img.affine[:3, :3] @ np.argwhere(np.asarray(img.dataobj) > 0).mean(0) + img.affine[:3, 3]  # noqa: E731
    assert np.abs(com(src_lab) - com(out_lab)).max() < 1.5

    done = {p: p.stat().st_mtime_ns for p in out.glob("patient0[2-4]/*.nii.gz")}
    import shutil

    shutil.rmtree(out / "patient01")  # lost subject
    (out / ".volad_partial" / "patient03").mkdir(parents=True)  # scratch of an interrupted run
    preprocess_dataset("mslub", src, out, contrasts=["flair", "t2"], spacing=2.0, shape=(10, 12, 10))
    assert (out / "patient01" / ".done").is_file() and not (out / ".volad_partial").exists()
    assert {p: p.stat().st_mtime_ns for p in out.glob("patient0[2-4]/*.nii.gz")} == done  # finished ones untouched
    with pytest.raises(VoladConfigError, match="other preprocessing settings"):
        preprocess_dataset("mslub", src, out, contrasts=["flair", "t2"], spacing=3.0)


def test_preprocess_refuses_picture_datasets(tmp_path):
    src = make_fake("br35h", tmp_path / "br", n=3)
    with pytest.raises(VoladConfigError, match="2D"):
        preprocess_dataset("br35h", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_preprocess_cli_shows_progress_and_reports_failures_by_subject(tmp_path):
    import subprocess
    import sys

    src = make_fake("brats2021", tmp_path / "b", n=3)
    (src / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz").write_bytes(b"not a nifti")
    run = subprocess.run(
        [sys.executable, "-m", "volad.cli", "preprocess", "--dataset", "brats2021", "--root", str(src), "--out", str(tmp_path / "o"), "--workers", "1"],
        capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "0"},
    )
    assert run.returncode == 2
    assert "FAILED BraTS2021_00001" in run.stdout and "BraTS2021_00001_flair.nii.gz" in run.stdout
    assert "1 subject(s) failed" in run.stderr
    assert not (tmp_path / "o" / "BraTS2021_00001").exists() and (tmp_path / "o" / "BraTS2021_00000" / ".done").is_file()
    assert not (tmp_path / "o" / "manifest.json").exists()  # incomplete: no manifest until every subject is done


def test_preprocess_keeps_each_subjects_metadata_for_bias_reports(tmp_path):
    """Site, sex and age travel with the subjects: the preprocessed folder gets a participants table its manifest reads."""
    from volad.data.manifest import read_manifest

    src = make_fake("mslub", tmp_path / "mslub", n=2)
    (src / "people.csv").write_text("id,sex,age\npatient01,F,41\n")
    manifest, _ = read_manifest("mslub")
    manifest["participants"] = {"file": "people.csv", "id_column": "id", "columns": {"sex": "sex", "age": "age"}, "values": {"sex": {"F": "female"}}}
    spec = tmp_path / "mslub_people.json"
    spec.write_text(json.dumps(manifest))
    out = tmp_path / "pp"
    preprocess_dataset(str(spec), src, out, contrasts=["flair"], spacing=3.0, shape=(8, 8, 8))
    ds = load_dataset(out)
    assert ds.metadata("patient01") == {"age": "41", "sex": "female"} and ds.metadata("patient02") == {"age": "", "sex": ""}
    assert (out / "participants.tsv").read_text().splitlines()[0] == "subject_id\tage\tsex"
