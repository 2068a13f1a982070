"""Method facts live in the methods: every bundle's inference.json, evaluate.json and logging.conf are one template."""

from __future__ import annotations

import json
from pydoc import locate

from volad.bundle.config import bundle_config, bundle_dir, combines_runs, discover_bundles


def _method_class(name: str):
    """The class a bundle's train.json builds (``None`` for a factory, such as the baselines', or a fusion)."""
    if combines_runs(name):
        from volad.methods.fusion import Fusion

        return Fusion
    target = locate(bundle_config(name, "train").config["method"]["_target_"])
    return target if isinstance(target, type) else None


def test_inference_evaluate_and_logging_are_the_template_but_for_the_run_folder_and_the_methods_own_settings():
    template = {role: json.loads((bundle_dir() / "ae3d" / f"{role}.json").read_text()) for role in ("inference", "evaluate")}
    logging_conf = (bundle_dir() / "ae3d" / "logging.conf").read_text()
    for name in discover_bundles():
        folder = bundle_dir() / name
        assert (folder / "logging.conf").read_text() == logging_conf, f"{folder / 'logging.conf'} differs from the template"
        evaluate = json.loads((folder / "evaluate.json").read_text())
        assert evaluate == {**template["evaluate"], "output_dir": f"runs/{name}"}, f"{folder / 'evaluate.json'} differs from the template"
        # inference-only settings are the method's own declaration (inference_hparams), passed on as method_settings
        own = tuple(getattr(_method_class(name), "inference_hparams", ()))
        expected = {**template["inference"], "output_dir": f"runs/{name}", **{h: None for h in own}}
        if own:
            expected["inferer"] = {**template["inference"]["inferer"], "method_settings": {h: f"@{h}" for h in own}}
        assert json.loads((folder / "inference.json").read_text()) == expected, f"{folder / 'inference.json'} differs from the template"


def test_a_methods_volume_score_is_its_own_and_reaches_the_evaluation():
    from volad.methods import FAnoGAN, ReverseDistillation
    from volad.methods.base import AnomalyMethod
    from volad.methods.registry import method_volume_score

    assert (ReverseDistillation.volume_score_mode, FAnoGAN.volume_score_mode, AnomalyMethod.volume_score_mode) == ("max", "mean", "top1")
    assert method_volume_score({"kind": "ReverseDistillation"}) == "max" and method_volume_score({}) == "top1"


def test_paper_overlays_set_only_ids_the_bundle_has_and_merge_as_monai_merges_config_files():
    """``--config_file "['bundles/X/train.json','bundles/X/paper_2d.json']"``: the overlay's IDs replace the bundle's, and nothing else."""
    from monai.bundle import ConfigParser

    from volad.bundle.config import bundle_overlays

    shipped = {name: bundle_overlays(name) for name in discover_bundles()}
    assert shipped["rd4ad3d"] == ["paper_2d"] and shipped["pddpm3d"] == ["paper_2d"] and shipped["cddpm3d"] == ["paper_2d"]
    for name, overlays in shipped.items():
        train = json.loads((bundle_dir() / name / "train.json").read_text())
        for overlay in overlays:
            values = json.loads((bundle_dir() / name / f"{overlay}.json").read_text())
            unknown = sorted(set(values) - set(train))
            assert not unknown, f"bundles/{name}/{overlay}.json sets IDs train.json does not have: {unknown}"
            merged = bundle_config(name, "train", [overlay], output_dir="runs/x")
            monai = ConfigParser()
            monai.read_config([str(bundle_dir() / name / "train.json"), str(bundle_dir() / name / f"{overlay}.json")])
            for key, value in values.items():
                assert merged.get(key) == value == monai.get(key)
            assert merged.get("method") == train["method"] and merged.get("output_dir") == "runs/x"
    paper = bundle_config("rd4ad3d", "train", ["paper_2d"])
    assert [paper.get(k) for k in ("spatial_dims", "teacher", "teacher_arch", "distance", "lr", "batch_size", "max_epochs")] == [
        2, "imagenet", "wide_resnet50_2", "cosine", 0.005, 16, 200]


def test_an_unknown_overlay_is_refused_naming_what_the_bundle_has():
    import pytest

    from volad.errors import VoladConfigError

    with pytest.raises(VoladConfigError, match="bundle 'rd4ad3d' has no overlay 'paper_3d'.*it has: paper_2d"):
        bundle_config("rd4ad3d", "train", ["paper_3d"])


def test_the_protocol_trains_with_the_bundles_paper_overlay_unless_told_otherwise(tmp_path, monkeypatch):
    """``volad protocol --bundle rd4ad3d``: the paper's settings are read after train.json; ``--overlay`` with no name drops them."""
    import pytest

    from volad.data.fakes import make_fake
    from volad.data.manifest import read_manifest
    from volad.pipelines import protocol

    calls = []

    class Stop(Exception):
        """Stands for the training, which this test need not run: what it was asked to train is recorded."""

    def record(name, role, overlays=(), **overrides):
        calls.append((name, role, list(overlays), overrides))
        raise Stop

    monkeypatch.setattr(protocol, "run_bundle", record)
    root = make_fake("br35h", tmp_path / "br", n=30)
    manifest, _ = read_manifest("br35h")
    manifest["splits"]["rule"]["assign"] = {"train": {"healthy": 16}, "val": {"healthy": 4, "anomalous": 4}, "test": {"healthy": 10, "anomalous": 10}}
    small = tmp_path / "br35h_small.json"
    small.write_text(json.dumps(manifest))
    for argv, expected in ((["--bundle", "rd4ad3d"], ["paper_2d"]), (["--bundle", "rd4ad3d", "--overlay"], []), (["--bundle", "ae3d"], [])):
        calls.clear()
        with pytest.raises(Stop):
            protocol.main([*argv, "--dataset", str(small), "--data_root", str(root), "--out", str(tmp_path / "p"), "--seeds", "1", "--set", "max_epochs=1"])
        name, role, overlays, overrides = calls[0]
        assert role == "train" and overlays == expected and overrides["spatial_dims"] == 2 and overrides["max_epochs"] == 1


def test_bundles_are_found_from_any_working_directory(tmp_path, monkeypatch):
    """``volad bench`` run outside the repository still finds the source tree's bundles (it looked in volad/bundles, then the cwd)."""
    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    assert bundle_dir() == REPO / "bundles" and "rd4ad3d" in discover_bundles()
