"""Training on one dataset's healthy split and evaluating on another's lesions; the 2D protocol.

The bundles run in-process from their config files here (the commands themselves are tested in tests/bundles)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import bundle_inprocess
from volad.data.fakes import make_fake


def test_bundle_trains_on_ixi_and_evaluates_on_brats_with_brats_val_threshold(tmp_path, capfd):
    ixi = make_fake("ixi", tmp_path / "ixi", n=6)
    brats = make_fake("brats2021", tmp_path / "brats", n=10)
    run = tmp_path / "run"
    common = dict(
        dataset="ixi", data_root=ixi, val_dataset="brats2021", val_data_root=brats,
        contrasts="t2", output_dir=run, patch_size=16, device="cpu",
    )
    train = bundle_inprocess("ae3d", "train", capfd, max_epochs=2, batch_size=2, val_interval=1, seed=0, **common)
    assert "val AUPRC" in train.stdout  # validation ran on brats2021's labelled val split
    bundle_inprocess("ae3d", "inference", capfd, output_dir=run, device="cpu")  # maps the run's validation dataset, brats2021
    index = json.loads((run / "maps" / "index.json").read_text())
    assert {e["split"] for e in index["subjects"]} == {"val", "test"}
    assert all("BraTS2021_" in e["subject_id"] for e in index["subjects"])
    assert index["checkpoint"]["data"]["train_dataset"] == "ixi" and index["checkpoint"]["data"]["val_dataset"] == "brats2021"
    bundle_inprocess("ae3d", "evaluate", capfd, output_dir=run)
    report = json.loads((run / "report.json").read_text())
    assert report["dataset"] == "brats2021" and report["trained_on"]["train_dataset"] == "ixi"
    assert report["threshold"]["chosen_on"] == "val" and report["threshold"]["chosen_on_dataset"] == "brats2021"
    assert report["n_subjects"] == 9 and np.isfinite(report["voxel"]["auprc"])


def test_image_metrics_match_scikit_learn():
    from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score

    from volad.evaluation.image_level import detection_metrics, max_f1_threshold

    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.4
    s = rng.normal(size=300) + 1.2 * y
    s[:20] = np.round(s[:20], 1)  # ties
    t, f1 = max_f1_threshold(s, y)
    p, r, th = precision_recall_curve(y, s)
    f = 2 * p * r / np.maximum(p + r, 1e-12)
    assert f1 == pytest.approx(f[:-1].max()) and t == pytest.approx(th[np.argmax(f[:-1])])
    m = detection_metrics(s, y, t)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert m["f1"] == pytest.approx(f1_score(y, s >= t)) and m["acc"] == pytest.approx(np.mean((s >= t) == y))


def test_protocol_reseeds_splits_trains_and_averages(tmp_path):
    from volad.data.manifest import read_manifest
    from volad.pipelines.protocol import run_protocol

    root = make_fake("br35h", tmp_path / "br", n=30)
    manifest, _ = read_manifest("br35h")
    manifest["reader"]["size"] = 16  # tiny pictures for CI; the shipped manifest uses 256
    manifest["splits"]["rule"]["assign"] = {"train": {"healthy": 16}, "val": {"healthy": 4, "anomalous": 4}, "test": {"healthy": 10, "anomalous": 10}}
    path = tmp_path / "br35h_small.json"
    path.write_text(json.dumps(manifest))
    out = tmp_path / "proto"
    summary = run_protocol(
        bundle="ae3d", dataset=path, data_root=root, out=out, seeds=2,
        overrides={"max_epochs": 1, "batch_size": 8, "val_interval": 0, "device": "cpu"},
    )
    splits = [json.loads((out / f"seed{k}" / "data" / "splits.json").read_text()) for k in (0, 1)]
    assert splits[0]["test"] != splits[1]["test"]
    for table in splits:
        assert not set(table["val"]) & set(table["test"]) and not set(table["train"]) & set(table["test"])
        assert all(s.startswith("no_") for s in table["train"])
    assert [r["seed"] for r in summary["seeds"]] == [0, 1]
    assert all(r["threshold_chosen_on"] == "val (max F1)" and r["n_normal"] == 10 and r["n_anomalous"] == 10 for r in summary["seeds"])
    assert summary["mean"]["auroc"] == pytest.approx(np.mean([r["auroc"] for r in summary["seeds"]]))
    assert (out / "protocol.md").is_file() and (out / "protocol_roc.png").stat().st_size > 1000
    # Br35H has published figures: the review's rows stand beside volad's, labelled as published, in both outputs.
    assert summary["published"]["protocol"] == "br35h_image" and summary["published"]["rows"][0] == {
        "method": "RD4AD", "role": "published", "source": "seed review, Table 3", "auroc": 0.9977}
    assert "| RD4AD | 0.9977 | published: seed review, Table 3 |" in (out / "protocol.md").read_text()


def test_fastmri_h5_runs_end_to_end_in_slice_mode_and_maps_line_up(tmp_path, capfd):
    import nibabel as nib

    from volad.data.manifest import load_dataset

    root = make_fake("fastmri_plus_brain", tmp_path / "fm", n=24)  # enough studies for a healthy val scan
    run = tmp_path / "run"
    common = dict(dataset="fastmri_plus_brain", data_root=root, output_dir=run, spatial_dims=2, patch_size=0, device="cpu")
    bundle_inprocess("ae3d", "train", capfd, max_epochs=1, batch_size=2, **common)
    bundle_inprocess("ae3d", "inference", capfd, output_dir=run, device="cpu")
    bundle_inprocess("ae3d", "evaluate", capfd, output_dir=run)
    ds = load_dataset("fastmri_plus_brain", root)
    index = json.loads((run / "maps" / "index.json").read_text())
    for e in index["subjects"]:
        subject = ds.subject(e["subject_id"], e["split"])
        amap = nib.load(str(run / "maps" / e["anomaly_map"]))
        assert amap.shape == tuple(subject["image"].spatial_shape)
        np.testing.assert_allclose(amap.affine, subject["image"].affine, atol=1e-6)
    report = json.loads((run / "report.json").read_text())
    assert report["n_lesioned"] >= 1 and np.isfinite(report["voxel"]["auroc"])
    boxes = report["boxes"]  # FastMRI+ labels are boxes: hit rates at a healthy-scan FPR threshold
    assert boxes["n_lesions"] >= 2 and boxes["threshold"]["mode"] == "fpr_on_healthy_scans" and boxes["threshold"]["chosen_on"] == "val"
