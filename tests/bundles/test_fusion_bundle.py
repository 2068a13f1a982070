"""fusion3d end to end: members trained by their own bundles, then train (calibrate and choose; through
``python -m monai.bundle run``) → inference → evaluate (in-process, from the same config files), with the choice
recorded in the report."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from tests.conftest import bundle_cli, bundle_inprocess


def test_fusion_bundle_end_to_end(tmp_path, syn_root, capfd):
    from volad.bundle.config import bundle_config

    members = []
    for baseline in ("normative_views", "intensity"):  # trained in this process: the members' own bundles are tested elsewhere
        out = tmp_path / baseline
        bundle_config(baseline, "train", dataset="synthetic", data_root=str(syn_root), output_dir=str(out), device="cpu").get_parsed_content(
            "trainer", instantiate=True
        ).run()
        members.append(str(out))
    views = [f"normative_views:{c}{s}" for c in ("t1", "t2", "flair") for s in "+-"]  # every contrast of the dataset, both signs
    from volad.bundle.overrides import check_overrides

    config = json.loads(open("bundles/baseline3d/inference.json").read())  # "all" names what the run resolved it to
    assert "the run's own setting" in check_overrides({"contrasts": "all", "output_dir": members[0]}, config, "bundles/baseline3d/inference.json")[0]
    fusion = tmp_path / "fusion"
    train = bundle_cli("fusion3d", "train", members=",".join(members), output_dir=fusion, device="cpu")
    # The synthetic val split has no healthy subject, so calibration falls back to the training scans, and says so.
    assert "calibrated on train (healthy training subjects)" in train.stdout
    assert "normative_views:flair-: this member trained on calibration scans: its tail is optimistic" in train.stdout
    assert "fused (nothing chosen on val): rms of every member" in train.stdout  # the default: no member dropped on val's few cases
    record = json.loads((fusion / "fusion.json").read_text())
    chosen = record["selection"]["chosen"]
    assert chosen["members"] == [*views, "intensity"] and chosen["rule"] == "rms" and chosen["chosen_on"].startswith("nothing")
    # The six views are one method's and share its vote; the fusion reads every contrast, each view its own.
    assert chosen["weights"] == {**{v: 0.5 / 6 for v in views}, "intensity": 0.5}
    assert [m["contrasts"] for m in record["members"]] == [["t1"], ["t1"], ["t2"], ["t2"], ["flair"], ["flair"], ["flair"]]
    from volad.engine.fusion_builder import FusionBuilder

    whole = FusionBuilder(output_dir=str(tmp_path / "whole"), members=members, split_views=False, device="cpu")
    assert whole.names == ["normative_views", "intensity"] and whole.weights_of([0, 1]) == [0.5, 0.5]  # its own map, the mean over contrasts
    assert record["calibration"]["split"].startswith("train")
    assert all(m["held_out_of_training"] is False for m in record["calibration"]["members"].values())  # each member says so
    assert {(m["train_dataset"], m["train_root"]) for m in record["members"]} == {("synthetic", str(syn_root.resolve()))}
    assert "test labels are not read" in record["selection"]["on"]

    bundle_inprocess("fusion3d", "inference", capfd, output_dir=fusion, device="cpu")
    index = json.loads((fusion / "maps" / "index.json").read_text())
    assert {e["split"] for e in index["subjects"]} == {"val", "test"}
    for entry in index["subjects"]:
        src, amap = nib.load(entry["image_paths"][0]), nib.load(fusion / "maps" / entry["anomaly_map"])
        assert amap.shape == src.shape and np.allclose(amap.affine, src.affine)
        assert np.isfinite(amap.get_fdata()).all() and amap.get_fdata().min() >= 0  # surprisals
    bundle_inprocess("fusion3d", "evaluate", capfd, output_dir=fusion)
    report = json.loads((fusion / "report.json").read_text())
    assert report["method_hparams"]["kind"] == "Fusion"
    assert report["checkpoint"]["selection"]["chosen"] == chosen  # the choice and its provenance travel into the report
    assert "**Fused, nothing chosen on val**: rms of every member" in (fusion / "report.md").read_text()
    assert report["threshold"]["chosen_on"] == "val" and 0 <= report["voxel"]["auprc"] <= 1
