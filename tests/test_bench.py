"""volad bench: methods as their bundles build them, and the quality table."""

from volad.bench import build_method, quality


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
