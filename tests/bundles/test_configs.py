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
