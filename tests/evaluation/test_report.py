"""Threshold modes, lesion-wise, volume-level and bootstrap figures, reports and the leaderboard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from volad.data.manifest import load_dataset
from volad.data.preprocessing import EnsureMasks
from volad.errors import VoladConfigError
from volad.evaluation.evaluate import Evaluator
from volad.evaluation.lesions import LesionSummary, match_lesions
from volad.evaluation.postprocess import PostProcessing, postprocess
from volad.evaluation.thresholds import at_fpr, parse_mode
from volad.evaluation.voxel import ScoreAccumulator
from volad.io import write_like

NO_POST = dict(erosion_mm=0.0, median_mm=0.0, min_component_voxels=0)  # the independent implementations keep every component


def _maps(syn_root: Path, folder: Path, make) -> Path:
    """Write ``make(label, brain, rng)`` as ``<subject>_anomaly.nii.gz`` for every val/test subject (maps from 'any tool')."""
    ds = load_dataset("synthetic", syn_root)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("val", "test"):
        for sid in ds.split_ids(split):
            s = EnsureMasks()(ds.subject(sid, split))
            lab, brain = s["label"].numpy()[0].astype(bool), s["brain_mask"].numpy()[0].astype(bool)
            write_like(make(lab, brain, rng), s["image_paths"][0], folder / f"{sid}_anomaly.nii.gz")
    return folder


def _noisy(lab, brain, rng):
    return (lab * 1.0 + rng.normal(0, 0.3, lab.shape)).astype(np.float32) * brain


def _run(tmp_path, syn_root, make=_noisy, **kwargs) -> dict:
    maps = _maps(syn_root, tmp_path / "maps", make)
    Evaluator(output_dir=str(tmp_path), maps_dir=str(maps), dataset="synthetic", data_root=str(syn_root), bootstrap=200, **{**NO_POST, **kwargs}).run()
    return json.loads((tmp_path / "report.json").read_text())


# -- units ------------------------------------------------------------------------------
def test_threshold_at_healthy_fpr_by_hand():
    acc = ScoreAccumulator()
    acc.add(np.arange(100, dtype=np.float32), np.zeros(100, bool))
    t, fpr = at_fpr(acc.curve(), 0.05)
    assert t == 95 and fpr == 0.05  # scores 95..99 fire: 5 of 100
    t, fpr = at_fpr(acc.curve(), 0.001)
    assert t > 99 and fpr == 0.0  # nothing may fire
    assert parse_mode("healthy_fpr@0.01") == ("healthy_fpr", 0.01)
    with pytest.raises(VoladConfigError):
        parse_mode("healthy_fpr@5")
    with pytest.raises(VoladConfigError):
        parse_mode("best_on_test")


def test_lesion_matching_by_hand():
    label = np.zeros((20, 20, 20), bool)
    label[2:6, 2:6, 2:6] = True  # 64 voxels, half covered
    label[10:12, 10:12, 10:12] = True  # 8 voxels, none covered
    pred = np.zeros_like(label)
    pred[2:6, 2:6, 2:4] = True
    pred[15:17, 15:17, 15:17] = True  # a false-positive component
    v = match_lesions(pred, label, voxel_mm3=8.0, min_overlap=0.1)
    np.testing.assert_allclose(v.covered, [0.5, 0.0])
    assert v.detected.tolist() == [True, False] and v.n_pred == 2 and v.n_fp == 1
    np.testing.assert_allclose(v.sizes_mm3, [512.0, 64.0])
    summary = LesionSummary(0.1, {"small": (0.0, 71.0), "medium": (71.0, 570.0), "large": (570.0, None)})
    summary.add(v)
    summary.add(match_lesions(np.zeros_like(label), np.zeros_like(label), 8.0))  # empty prediction, empty label
    d = summary.as_dict()
    assert d["sensitivity"] == 0.5 and d["precision"] == 0.5 and d["f1"] == pytest.approx(0.5)
    assert d["fp_components_per_volume"] == 0.5
    assert d["by_size"]["small"]["n_lesions"] == 1 and d["by_size"]["medium"]["detected"] == 1 and d["by_size"]["large"]["n_lesions"] == 0
    # Boxes: per-slice components and a strict "more than" rule.
    box = np.zeros((10, 10, 2), bool)
    box[2:6, 2:4, 0] = True
    hit = np.zeros_like(box)
    hit[2:4, 2:3, 0] = True  # exactly 2/8 = 0.25 fires
    assert match_lesions(hit, box, 1.0, min_overlap=0.25, per_slice=True, strict=True).detected.tolist() == [False]
    assert match_lesions(hit, box, 1.0, min_overlap=0.2, per_slice=True, strict=True).detected.tolist() == [True]


# -- end to end on the synthetic set ----------------------------------------------------------
def test_report_cross_checks_against_independent_implementations(tmp_path, syn_root):
    rep = _run(tmp_path, syn_root)
    ds = load_dataset("synthetic", syn_root)
    scores, labels, vol_s, vol_y = [], [], [], []
    pooled = {"tp": 0, "fp": 0, "fn": 0}
    t = rep["threshold"]["value"]
    for r in rep["per_volume"]:
        s = EnsureMasks()(ds.subject(r["subject_id"], "test"))
        brain, lab = s["brain_mask"].numpy()[0].astype(bool), s["label"].numpy()[0].astype(bool)
        import nibabel as nib

        amap = postprocess(np.asarray(nib.load(str(tmp_path / "maps" / f"{r['subject_id']}_anomaly.nii.gz")).dataobj), brain, (1.5,) * 3, PostProcessing(**NO_POST))
        scores.append(amap[brain])
        labels.append(lab[brain])
        pred = amap[brain] >= t
        pooled["tp"] += int((pred & lab[brain]).sum())
        pooled["fp"] += int((pred & ~lab[brain]).sum())
        pooled["fn"] += int((~pred & lab[brain]).sum())
        vol_s.append(r["volume_score"])
        vol_y.append(r["lesion_voxels"] > 0)
    s, y = np.concatenate(scores), np.concatenate(labels)
    assert rep["voxel"]["auprc"] == pytest.approx(average_precision_score(y, s), abs=1e-6)
    assert rep["voxel"]["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert rep["voxel"]["dice"] == pytest.approx(2 * pooled["tp"] / (2 * pooled["tp"] + pooled["fp"] + pooled["fn"]))
    assert rep["volume"]["auroc"] == pytest.approx(roc_auc_score(vol_y, vol_s))
    assert rep["voxel"]["dice_oracle"] >= rep["voxel"]["dice"] - 1e-9
    assert rep["thresholds"]["oracle"]["mode"] == "oracle_on_test"
    for key in ("dice", "auprc", "auroc"):
        lo, hi = rep["ci95"][key]
        assert lo <= rep["voxel"][key] + 1e-6 and rep["voxel"][key] <= hi + 0.05  # binned curves may shift the interval slightly
    assert rep["lesion"]["n_lesions"] >= 1 and 0 <= rep["lesion"]["sensitivity"] <= 1
    import jsonschema

    from volad.evaluation.report import report_schema

    jsonschema.validate(rep, report_schema())
    for f in [rep["figures"]["curves"], rep["figures"]["lesion_sizes"], *rep["figures"]["montages"]]:
        assert (tmp_path / f).stat().st_size > 2000
    md = (tmp_path / "report.md").read_text()
    assert "oracle" in md and "val (synthetic)" in md


def test_healthy_fpr_threshold_holds_on_the_healthy_scans_it_came_from(tmp_path, syn_root):
    rep = _run(tmp_path, syn_root, threshold_modes=["healthy_fpr@0.05", "val_dice"])
    t = rep["threshold"]
    assert t["name"] == "healthy_fpr@0.05" and t["mode"] == "fpr_on_healthy_scans" and t["chosen_on"] == "val" and t["n_subjects"] == 1
    ds = load_dataset("synthetic", syn_root)
    import nibabel as nib

    healthy = ds.split_ids("val")[0]  # the synthetic val split's first subject is healthy
    s = EnsureMasks()(ds.subject(healthy, "val"))
    brain = s["brain_mask"].numpy()[0].astype(bool)
    amap = np.asarray(nib.load(str(tmp_path / "maps" / f"{healthy}_anomaly.nii.gz")).dataobj)[brain]
    assert np.mean(amap >= t["value"]) <= 0.05 < np.mean(amap >= np.nextafter(np.float32(t["value"]), np.float32(-np.inf)) - 1e-3)
    assert set(rep["thresholds"]) == {"healthy_fpr@0.05", "val_dice", "oracle"}


def test_empty_predictions_and_all_healthy_test_sets_are_reported_not_crashed(tmp_path, syn_root):
    zero = lambda lab, brain, rng: np.zeros(lab.shape, np.float32)  # noqa: E731
    rep = _run(tmp_path / "empty", syn_root, make=zero, threshold=1.0)
    assert rep["threshold"]["mode"] == "user" and rep["voxel"]["dice"] == 0.0
    assert rep["lesion"]["detected"] == 0 and rep["lesion"]["f1"] == 0.0 and rep["lesion"]["predicted_components"] == 0
    healthy_rows = [r for r in rep["per_volume"] if r["lesion_voxels"] == 0]
    assert healthy_rows and all(r["dice"] == 1.0 for r in healthy_rows)  # nothing to find, nothing found
    # All-healthy test split: a copy of the dataset whose test split keeps only the healthy volume.
    root = tmp_path / "healthy_only"
    shutil.copytree(syn_root, root)
    splits = json.loads((root / "splits.json").read_text())
    splits["test"] = splits["test"][:1]
    (root / "splits.json").write_text(json.dumps(splits))
    rep = _run(tmp_path / "h", root)
    assert rep["n_lesioned"] == 0 and rep["voxel"]["auprc"] is None and rep["lesion"]["n_lesions"] == 0
    assert "auroc" not in rep["volume"] and rep["ci95"].get("dice") is None


def test_by_default_specks_under_seven_voxels_are_not_counted_as_findings(tmp_path, syn_root):
    """The published protocol's component rule is the default: the single-voxel specks of a noisy map thresholded low are
    dropped from the binary map (fewer false-positive components, Dice no worse), while AUPRC, which ranks voxels, is unchanged."""
    keep_all = _run(tmp_path / "all", syn_root, threshold_modes=["healthy_fpr@0.05"], min_component_voxels=0)
    default = _run(tmp_path / "default", syn_root, threshold_modes=["healthy_fpr@0.05"], min_component_voxels=None)
    assert default["postprocessing"]["min_component_voxels"] == 7
    assert default["lesion"]["fp_components_per_volume"] < 0.5 * keep_all["lesion"]["fp_components_per_volume"]
    assert default["voxel"]["dice"] >= keep_all["voxel"]["dice"] and default["voxel"]["auprc"] == keep_all["voxel"]["auprc"]


def test_threshold_splits_must_be_disjoint_from_test(tmp_path, syn_root):
    maps = _maps(syn_root, tmp_path / "maps", _noisy)
    with pytest.raises(VoladConfigError, match="must differ from the test split"):
        Evaluator(output_dir=str(tmp_path), maps_dir=str(maps), dataset="synthetic", data_root=str(syn_root), threshold_split="test").run()
    with pytest.raises(VoladConfigError, match="must differ from the test split"):
        Evaluator(output_dir=str(tmp_path), maps_dir=str(maps), dataset="synthetic", data_root=str(syn_root), threshold_modes=["healthy_fpr@0.05"], healthy_split="test").run()


def test_compare_merges_runs_and_flags_other_protocols(tmp_path, syn_root, capsys):
    """A median filter is the method's own (like its volume score): runs that differ only there share a protocol; a different
    brain-mask erosion does not."""
    from volad.cli import main as cli

    a, b, c, d = (tmp_path / n for n in "abcd")
    _run(a, syn_root)
    _run(b, syn_root, make=lambda lab, brain, rng: (lab * 0.5 + rng.normal(0, 0.3, lab.shape)).astype(np.float32) * brain)
    for run, post in ((c, dict(NO_POST, median_mm=3.0)), (d, dict(NO_POST, erosion_mm=2.0))):
        maps = _maps(syn_root, run / "maps", _noisy)
        Evaluator(output_dir=str(run), maps_dir=str(maps), dataset="synthetic", data_root=str(syn_root), bootstrap=0, **post).run()
    assert json.loads((c / "report.json").read_text())["postprocessing"]["median_from"] == "given"
    assert cli(["compare", str(a), str(b), str(c), str(d), "--out", str(tmp_path / "lb")]) == 0
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| run |")]
    order = [ln.split(" | ")[0].strip("| ") for ln in lines]
    assert [r for r in order if r != str(d)] == [str(c), str(a), str(b)]  # by AUPRC (c's median filter helps)
    flagged = [ln.split(" | ")[0].strip("| ") for ln in lines if "⚠" in ln]
    assert flagged == [str(d)] and "postprocessing" in md and "not directly comparable" in md
    import csv

    rows = list(csv.DictReader((tmp_path / "lb" / "leaderboard.csv").open()))
    assert len(rows) == 4 and float(rows[0]["auprc"]) >= float(rows[1]["auprc"])
