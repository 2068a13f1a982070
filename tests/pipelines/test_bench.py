"""volad bench: methods as their bundles build them, the quality table, the budget study."""

import json

import pytest

from volad.pipelines.cost import build_method
from volad.pipelines.quality import quality


def test_bench_builds_bundle_methods():
    ae = build_method("ae3d")
    assert ae.hparams["skip_connections"] and ae.hparams["coarse_noise_std"] == 0.2
    assert build_method("vae3d", spatial_dims=2).spatial_dims == 2
    assert build_method("intensity").hparams["kind"] == "IntensityBaseline"


def test_bench_quality_table_on_synthetic(tmp_path, monkeypatch):
    monkeypatch.setenv("VOLAD_CACHE", str(tmp_path / "cache"))
    rows = quality(["intensity", "normative"], dataset="synthetic", runs_dir=str(tmp_path / "runs"), patch_size=16)
    assert [r["method"] for r in rows] == ["intensity", "normative"]
    for r in rows:
        assert 0 <= r["auprc"] <= 1 and r["dice_oracle"] >= r["dice_val_threshold"] - 1e-9
        assert r["threshold_chosen_on"] == "val"


@pytest.mark.slow
def test_budget_study_scores_each_snapshot_on_val_and_test_beside_the_baselines(tmp_path, monkeypatch):
    """volad bench budget end to end on the synthetic set: snapshots, val/test reports, baselines, the plot."""
    from volad.pipelines.budget import budget_study, score_snapshot, snapshot_name

    monkeypatch.setenv("VOLAD_CACHE", str(tmp_path / "cache"))
    marks = [1e-6, 2e-6]  # both passed in the first steps
    rows, base, plot = budget_study(["ae3d"], minutes=marks, dataset="synthetic", runs_dir=str(tmp_path / "runs"), train_overrides={"patch_size": 16})
    run = tmp_path / "runs" / "ae3d_budget"
    assert all((run / "checkpoints" / snapshot_name(m)).is_file() for m in marks)
    assert [r["budget_minutes"] for r in rows] == marks and all(r["cpu_minutes"] >= r["budget_minutes"] for r in rows)
    for r in rows:
        assert 0 <= r["val_auprc"] <= 1 and 0 <= r["auprc"] <= 1
    val = json.loads((run / "budget" / "1e-06min" / "val" / "report.json").read_text())
    test = json.loads((run / "budget" / "1e-06min" / "report.json").read_text())
    assert val["split"] == "val" and test["split"] == "test" and test["threshold"]["chosen_on"] == "val"
    assert val["threshold"]["value"] == test["threshold"]["value"]  # val is scored at the threshold val chose: test labels read nowhere
    assert [b["method"] for b in base] == ["intensity", "normative_signed"] and plot.is_file()
    before = (run / "budget" / "1e-06min" / "report.json").read_text()
    tuned = score_snapshot("ae3d", run, marks[0], settings={"inference_patch_size": [16, 16, 16]})  # e.g. a value tune chose on val
    assert tuned["method"] == "ae3d inference_patch_size=[16,16,16]" and 0 <= tuned["auprc"] <= 1
    folder = run / "budget" / "1e-06min_inference_patch_size=_16,16,16_"  # its own maps and reports
    assert json.loads((folder / "maps" / "index.json").read_text())["subjects"]
    assert json.loads((folder / "report.json").read_text())["threshold"]["chosen_on"] == "val" and (folder / "val" / "report.json").is_file()
    assert (run / "budget" / "1e-06min" / "report.json").read_text() == before  # the default maps' row is left as it was


def test_leave_one_kind_out_chooses_without_the_kind_and_reports_it_alone(tmp_path, kinds_root, capsys):
    """``volad bench quality --leave_out_kind``: the runs read a val split without the kind (their thresholds are chosen there),
    test is unchanged, and the table gives each method's figures on the left-out kind beside the strongest baseline's."""
    from volad.data.manifest import load_dataset
    from volad.pipelines.bench import main

    runs = tmp_path / "runs"
    main(["quality", "--methods", "intensity", "--dataset", "phantom_kinds", "--data_root", str(kinds_root),
          "--runs_dir", str(runs), "--leave_out_kind", "stroke", "--patch_size", "16"])
    out = capsys.readouterr().out
    assert "## leave one kind out" in out
    lines = [line for line in out.splitlines() if line.startswith("| stroke |")]
    assert [line.split("|")[2].strip() for line in lines] == ["intensity"] and "intensity " in lines[0].split("|")[-2]  # the baseline to beat on it
    report = json.loads((runs / "without_stroke" / "intensity" / "report.json").read_text())
    assert report["threshold"]["chosen_on"] == "val"
    original = load_dataset("phantom_kinds", kinds_root)
    without = [sid for sid in original.split_ids("val") if original.status(sid)[1] != "stroke"]
    record = json.loads((runs / "without_stroke" / "intensity" / "maps" / "index.json").read_text())
    assert [e["subject_id"] for e in record["subjects"] if e["split"] == "val"] == without
    assert report["threshold"]["n_subjects"] == len(without) == len(original.split_ids("val")) - 1
    assert "stroke" in report["by_kind"]["kinds"]  # test still holds the kind
    assert [e["subject_id"] for e in record["subjects"] if e["split"] == "test"] == original.split_ids("test")
