"""volad bench: methods as their bundles build them, the quality table, the budget study."""

import json

import pytest

from volad.errors import VoladConfigError
from volad.pipelines.cost import build_method
from volad.pipelines.quality import fused_members, quality


def test_bench_builds_bundle_methods():
    ae = build_method("ae3d")
    assert ae.hparams["skip_connections"] and ae.hparams["coarse_noise_std"] == 0.2
    assert build_method("vae3d", spatial_dims=2).spatial_dims == 2
    assert build_method("intensity").hparams["kind"] == "IntensityBaseline"


def test_bench_quality_table_on_synthetic(tmp_path, monkeypatch):
    """Rows per method; a method given its own contrasts (``NAME:contrasts=...``) reads them, whatever the bench's, in a run
    folder and a row of its own."""
    monkeypatch.setenv("VOLAD_CACHE", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    rows = quality(["intensity", "normative", "normative:contrasts=all"], dataset="synthetic", runs_dir=str(runs), patch_size=16)
    assert [r["method"] for r in rows] == ["intensity", "normative", "normative_all"]
    for r in rows:
        assert 0 <= r["auprc"] <= 1 and r["dice_oracle"] >= r["dice_val_threshold"] - 1e-9
        assert r["threshold_chosen_on"] == "val"
    channels = {n: json.loads((runs / n / "report.json").read_text())["method_hparams"]["in_channels"] for n in ("intensity", "normative", "normative_all")}
    assert channels == {"intensity": 1, "normative": 1, "normative_all": 3}  # the synthetic set's three contrasts
    assert json.loads((runs / "normative_all" / "report.json").read_text())["method"] == "normative_all"


def test_a_bench_method_entry_names_a_method_and_at_most_its_contrasts():
    from volad.pipelines.quality import method_spec

    assert method_spec("ae3d") == ("ae3d", None, "ae3d")
    assert method_spec("ae3d:contrasts=all") == ("ae3d", ["all"], "ae3d_all")
    assert method_spec("intensity:contrasts=flair+t1") == ("intensity", ["flair", "t1"], "intensity_flair+t1")
    for bad in ("ae3d:max_epochs=3", "ae3d:contrasts=", ":contrasts=all", "ae3d:contrasts"):
        with pytest.raises(VoladConfigError, match="NAME:contrasts=C1"):
            method_spec(bad)
    with pytest.raises(VoladConfigError, match="reads the contrasts of its members"):
        quality(["intensity", "fusion3d:contrasts=all"], dataset="synthetic")


def test_bench_fusion_fuses_the_bundles_default_members_among_the_runs_before_it(tmp_path, capsys):
    """The bench's fusion row is the fusion a user of the bundle builds: a benchmarked run that is not one of
    fusion3d's default members (zscore, the yardstick, the FLAIR-bright normative_signed, or ae3d on FLAIR where its
    member is ae3d on every contrast) is not fused; with no default member among them, all are. A default member
    missing from the bench is named."""
    runs = [tmp_path / n for n in ("intensity", "zscore", "pii3d", "normative_views", "ae3d_all", "normative_signed", "ae3d")]
    assert fused_members("fusion3d", runs) == [runs[0], runs[3], runs[4], runs[2]]  # in the bundle's order
    assert "were not benchmarked" not in capsys.readouterr().out
    assert fused_members("fusion3d", [runs[0], runs[6]]) == [runs[0]]
    assert "default members normative_views, ae3d_all, pii3d were not benchmarked" in capsys.readouterr().out
    assert fused_members("fusion3d", [tmp_path / "zscore", tmp_path / "vae3d_2d"]) == [tmp_path / "zscore", tmp_path / "vae3d_2d"]
    assert fused_members("fusion3d", [tmp_path / "ae3d_2d"]) == [tmp_path / "ae3d_2d"]
    with pytest.raises(VoladConfigError, match="list the methods it fuses before it"):
        fused_members("fusion3d", [])


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
    test is unchanged, and the table gives each method's figures on the left-out kind beside the strongest baseline's. The
    left-out runs read the contrasts the bench was given, as the runs they stand beside do (they read the bundle's own before)."""
    from volad.data.manifest import load_dataset
    from volad.pipelines.bench import main

    runs = tmp_path / "runs"
    main(["quality", "--methods", "intensity", "--dataset", "phantom_kinds", "--data_root", str(kinds_root),
          "--runs_dir", str(runs), "--leave_out_kind", "stroke", "--patch_size", "16", "--contrasts", "t2"])
    out = capsys.readouterr().out
    assert "## leave one kind out" in out
    lines = [line for line in out.splitlines() if line.startswith("| stroke |")]
    assert [line.split("|")[2].strip() for line in lines] == ["intensity"] and "intensity " in lines[0].split("|")[-2]  # the baseline to beat on it
    report = json.loads((runs / "without_stroke" / "intensity" / "report.json").read_text())
    assert report["threshold"]["chosen_on"] == "val"
    assert report["contrasts"] == json.loads((runs / "intensity" / "report.json").read_text())["contrasts"] == ["t2"]
    original = load_dataset("phantom_kinds", kinds_root)
    without = [sid for sid in original.split_ids("val") if original.status(sid)[1] != "stroke"]
    record = json.loads((runs / "without_stroke" / "intensity" / "maps" / "index.json").read_text())
    assert [e["subject_id"] for e in record["subjects"] if e["split"] == "val"] == without
    assert report["threshold"]["n_subjects"] == len(without) == len(original.split_ids("val")) - 1
    assert "stroke" in report["by_kind"]["kinds"]  # test still holds the kind
    assert [e["subject_id"] for e in record["subjects"] if e["split"] == "test"] == original.split_ids("test")


def test_seed_spread_gives_each_methods_auprc_per_seed_and_its_range():
    from volad.pipelines.bench import seed_spread_rows

    def row(method, auprc, small):
        return {"method": method, "role": "method", "auprc": auprc, "auprc[small_wml]": small, "auprc[small_wml]_ci95": [0.0, 1.0]}

    spread = seed_spread_rows({0: [row("ae3d", 0.30, 0.05), row("pii3d", 0.40, 0.01)], 1: [row("ae3d", 0.36, 0.02), row("pii3d", 0.38, 0.01)],
                               2: [row("ae3d", 0.33, 0.08)]})
    ae, pii = spread
    assert ae["method"] == "ae3d" and ae["auprc_by_seed"] == [0.30, 0.36, 0.33]
    assert ae["auprc_spread"] == pytest.approx(0.06) and ae["auprc[small_wml]_spread"] == pytest.approx(0.06)
    assert "auprc[small_wml]_ci95_spread" not in ae
    assert pii["auprc_by_seed"] == [0.40, 0.38] and pii["auprc_spread"] is None  # a seed without the method: no spread claimed


def test_a_published_protocol_trains_on_one_dataset_tests_on_the_other_and_prints_the_published_rows(tmp_path, capsys):
    """``volad bench quality --protocol ixi_t2_brats2021_t2`` on fake copies of both layouts: every method trains on IXI's
    healthy T2 in slice mode, is thresholded and tested on BraTS 2021, and the published rows stand beside volad's with their
    source; a second call reuses the finished runs."""
    from volad.data.fakes import make_fake
    from volad.evaluation.published import published_protocol
    from volad.pipelines.bench import main

    ixi = make_fake("ixi", tmp_path / "ixi", n=6)
    brats = make_fake("brats2021", tmp_path / "brats", n=10)
    argv = ["quality", "--protocol", "ixi_t2_brats2021_t2", "--data_root", str(ixi), "--val_data_root", str(brats),
            "--methods", "intensity", "normative_signed", "normative:contrasts=all", "--runs_dir", str(tmp_path / "runs"), "--patch_size", "16"]
    main(argv)
    out = capsys.readouterr().out
    hparams = json.loads((tmp_path / "runs" / "normative_all_2d" / "report.json").read_text())["method_hparams"]
    assert hparams["in_channels"] == 1  # "all" of a protocol is all it reads (T2), not every contrast IXI has
    for name in ("intensity", "normative_signed"):
        report = json.loads((tmp_path / "runs" / f"{name}_2d" / "report.json").read_text())
        assert report["dataset"] == "brats2021" and report["trained_on"]["train_dataset"] == "ixi"
        assert report["threshold"]["chosen_on"] == "val" and report["threshold"]["chosen_on_dataset"] == "brats2021"
        post = report["postprocessing"]  # the published chain for every method, not each method's own median
        assert (post["median_mm"], post["min_component_voxels"], post["median_from"]) == (5.0, 7, "given")
    spec = published_protocol("ixi_t2_brats2021_t2")
    assert "## published beside measured: IXI T2 (healthy) → BraTS 2021 T2" in out and spec["source"] in out and "What differs" in out
    assert "| pDDPM | published | 0.4940 | 0.5470 |" in out and "| normative_all | baseline to beat |" in out
    main([*argv, "--by", "site"])  # resumable: the finished runs are reused, not retrained; a bias table by the scans' site
    again = capsys.readouterr().out
    assert "reused" in again and "| pDDPM | published |" in again
    assert "## by site" in again and "no report has subgroups of 'site'" in again  # BraTS records no site: said, not an empty table


def test_published_figures_live_in_the_data_file_with_their_sources():
    from volad.evaluation.published import protocol_names, published_protocol, published_rows

    assert protocol_names("voxel") == ["ixi_t1_atlas_t1", "ixi_t2_brats2021_t2", "ixi_t2_mslub_t2"]
    assert protocol_names("image") == ["br35h_image", "brain_tumor_mri_image"]
    for name in protocol_names():
        spec = published_protocol(name)
        assert spec["source"] and spec["differs"] and spec["rows"]
        for row in published_rows(name):
            assert row["role"] == "published" and row["source"] == spec["cite"]
            assert all(0 <= row[m] <= 1 for m in spec["metrics"])
    from volad.errors import VoladConfigError

    with pytest.raises(VoladConfigError, match="no published protocol 'ixi_brats'.*ixi_t2_brats2021_t2"):
        published_protocol("ixi_brats")


def test_subgroup_rows_lay_out_each_methods_figures_per_subgroup():
    from volad.pipelines.bench import subgroup_rows

    rows = [{"method": "ae3d", "role": "method", "subgroups": {"sex": {
        "female · healthy": {"status": "healthy", "n": 3, "fpr": 0.02, "flagged_volumes": 1.0, "ci95": {"fpr": [0.01, 0.03]}},
        "female · lesioned": {"status": "anomalous", "n": 2, "auprc": 0.4, "dice": 0.3, "ci95": {"auprc": [0.2, 0.6]}}}}},
        {"method": "intensity", "role": "baseline to beat", "subgroups": {}}]
    table = subgroup_rows(rows, "sex")
    assert [(r["method"], r["sex"], r["n"]) for r in table] == [("ae3d", "female · healthy", 3), ("ae3d", "female · lesioned", 2)]
    assert table[0]["fpr_ci95"] == [0.01, 0.03] and table[1]["auprc"] == 0.4 and table[1]["fpr"] is None
    assert subgroup_rows(rows, "age") == []


def test_leave_one_kind_out_with_another_val_dataset_is_refused_before_anything_trains(tmp_path):
    from volad.errors import VoladConfigError
    from volad.pipelines.bench import main

    with pytest.raises(VoladConfigError, match="does not combine with --val_dataset"):
        main(["quality", "--dataset", "ixi", "--val_dataset", "brats2021", "--leave_out_kind", "all", "--runs_dir", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()
