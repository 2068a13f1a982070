"""The harder benchmark: reproducible, every kind in val and test, artefact scans healthy."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import KINDS_TINY as TINY
from volad.data.manifest import load_dataset
from volad.data.phantom_kinds import HEALTHY_KINDS, LESION_KINDS, VERSION, generate_phantom_kinds
from volad.errors import VoladDataError


def test_every_kind_is_in_val_and_test_and_artefacts_are_healthy(kinds_root):
    ds = load_dataset("phantom_kinds", kinds_root, ["t1", "t1ce", "t2", "flair"])
    assert len(ds.split_ids("train")) == 2
    expected_labels = {"tumour": {1, 2, 3}, "isointense_mass": {5}, "small_wml": {4}, "stroke": {6}}
    for split in ("val", "test"):
        seen = {}
        for s in ds.subjects(split):
            label = s["label"].numpy()[0]
            seen.setdefault(s["category"], []).append((s["status"], set(np.unique(label)) - {0}))
        assert set(seen) == set(LESION_KINDS) | set(HEALTHY_KINDS), (split, sorted(seen))
        for kind in LESION_KINDS:
            for status, values in seen[kind]:
                assert status == "anomalous" and values and values <= expected_labels[kind], (kind, values)
        for kind in HEALTHY_KINDS:
            assert all(status == "healthy" and not values for status, values in seen[kind]), kind
    train = ds.subjects("train")
    assert {s["category"] for s in train} == {"healthy"} and all(not s["label"].numpy().any() for s in train)


def test_the_benchmark_repeats_from_its_seed(kinds_root, tmp_path):
    again = generate_phantom_kinds(tmp_path / "again", progress=False, **TINY)
    files = sorted(p.relative_to(kinds_root) for p in kinds_root.rglob("*.nii.gz"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.nii.gz")) and len(files) == 14 * 6
    for rel in files[::7]:
        assert np.array_equal(np.asarray(nib.load(kinds_root / rel).dataobj), np.asarray(nib.load(again / rel).dataobj)), rel
    other = generate_phantom_kinds(tmp_path / "other", progress=False, seed=1, **TINY)
    rel = next(r for r in files if r.name.endswith("_flair.nii.gz"))
    assert not np.array_equal(np.asarray(nib.load(kinds_root / rel).dataobj), np.asarray(nib.load(other / rel).dataobj))


def test_an_artefact_scan_is_its_clean_scan_corrupted(kinds_root):
    """The same subject rendered clean has the same anatomy and mask; the artefact changed some contrast's voxels."""
    from volad.data.phantom_kinds import kinds_subject, kinds_template

    ds = load_dataset("phantom_kinds", kinds_root, ["t1", "t1ce", "t2", "flair"])
    (case,) = [s for s in ds.subjects("test") if s["category"] == "artefact"]
    index = ds.split_ids("test").index(case["subject_id"])
    clean, brain, label = kinds_subject(kinds_template(3.0), np.random.default_rng([0, 2, index]), "healthy")
    stored = {c: np.asarray(nib.load(p).dataobj) for c, p in zip(ds.contrasts, case["image_paths"])}
    assert np.array_equal(np.asarray(case["brain_mask"].numpy()[0]), brain) and not label.any()
    changed = [c for c in stored if np.abs(stored[c].astype(float) - clean[c]).mean() > 5]
    assert changed, "no contrast carries the artefact"


def test_a_copy_made_by_another_generator_version_is_refused_not_reused(tmp_path):
    old = tmp_path / "phantom_kinds"
    old.mkdir()
    (old / ".volad_complete").write_text(json.dumps({"generator": "phantom_kinds", "version": VERSION - 1}))
    with pytest.raises(VoladDataError, match=f"made by version {VERSION - 1} of its generator; this volad makes version {VERSION}"):
        load_dataset("phantom_kinds", old)
