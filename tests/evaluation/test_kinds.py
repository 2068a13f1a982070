"""Reporting by kind on the harder benchmark, and the signed normative baseline."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from volad.data.manifest import load_dataset
from volad.data.preprocessing import EnsureMasks
from volad.engine.inferer import Inferer
from volad.evaluation.compare import leaderboard
from volad.evaluation.evaluate import Evaluator
from volad.evaluation.report import report_schema
from volad.io import read_map
from volad.methods import IntensityBaseline, NormativeBaseline
from volad.types import Batch


def test_reports_give_every_kind_with_intervals_and_match_scikit_learn(kinds_root, tmp_path):
    run = tmp_path / "intensity"
    Inferer(output_dir=str(run), method=IntensityBaseline(), dataset="phantom_kinds", data_root=str(kinds_root), device="cpu").run()
    Evaluator(output_dir=str(run), erosion_mm=0.0, median_mm=0.0, bootstrap=50, montage_cases=0).run()
    report = json.loads((run / "report.json").read_text())
    jsonschema.validate(report, report_schema())
    kinds = report["by_kind"]["kinds"]
    assert list(kinds)[:4] == ["isointense_mass", "small_wml", "stroke", "tumour"]  # lesion kinds first
    assert set(kinds) == {"isointense_mass", "small_wml", "stroke", "tumour", "healthy", "artefact"}
    ds = load_dataset("phantom_kinds", kinds_root)
    for name, k in kinds.items():
        subjects = [s for s in ds.subjects("test") if s["category"] == name]
        assert k["n"] == len(subjects)
        if k["status"] == "anomalous":
            scores, labels = [], []
            for s in subjects:
                s = EnsureMasks()(s)
                brain = s["brain_mask"].numpy()[0].astype(bool)
                amap = read_map(run / "maps" / f"{s['subject_id']}_anomaly.nii.gz")[0]
                scores.append(amap[brain])
                labels.append(s["label"].numpy()[0].astype(bool)[brain])
            assert k["auprc"] == pytest.approx(average_precision_score(np.concatenate(labels), np.concatenate(scores)), abs=1e-6)
            assert k["dice_oracle"] >= k["dice"] - 1e-9
            assert k["ci95"] == {}  # one volume of the kind: no interval, rather than a degenerate one
        else:
            assert 0 <= k["fpr"] <= 1 and 0 <= k["flagged_volumes"] <= 1
    md = (run / "report.md").read_text()
    assert "## By kind" in md and "| small_wml (anomalous) | 1 |" in md
    rows, _ = leaderboard([run])
    assert rows[0]["role"] == "baseline to beat" and "auprc[stroke]" in rows[0] and "fpr[artefact]" in rows[0]


def test_signed_normative_fires_on_hyperintensities_only_and_ignores_global_shifts():
    g = torch.Generator().manual_seed(0)
    healthy = torch.rand(6, 1, 12, 12, 12, generator=g) * 0.1 + 0.5
    mask = torch.ones(6, 1, 12, 12, 12)
    models = {p: NormativeBaseline(polarity=p, volume_norm="robust") for p in ("both", "bright")}
    for m in models.values():
        m.optimization_step(Batch(healthy, mask), "fit", {})
    x = healthy[:1].clone()
    x[..., 2:4, 2:4, 2:4] += 1.0  # a hyperintense lesion
    x[..., 8:10, 8:10, 8:10] -= 1.0  # a dark region (CSF, partial volume): not a FLAIR lesion
    absolute, signed = (models[p].predict(x, mask[:1]).anomaly_map[0, 0] for p in ("both", "bright"))
    assert absolute[8:10, 8:10, 8:10].mean() > 5 and signed[8:10, 8:10, 8:10].max() == 0
    assert signed[2:4, 2:4, 2:4].mean() > 5
    shifted = models["bright"].predict(x * 1.7 + 0.3, mask[:1]).anomaly_map[0, 0]  # another scanner's gain and offset
    assert torch.allclose(shifted, signed, atol=1e-4)
    with pytest.raises(Exception, match="polarity must be"):
        NormativeBaseline(in_channels=2, polarity=["bright"])
    legacy = NormativeBaseline()  # the absolute default is unchanged: mean |z| over contrasts
    legacy.optimization_step(Batch(healthy, mask), "fit", {})
    z = ((x - legacy.mean) / legacy.std).abs()
    assert torch.allclose(legacy.predict(x, mask[:1]).anomaly_map, z, atol=1e-6)


def test_kind_intervals_bracket_their_estimates():
    from volad.evaluation.bootstrap import quantile_edges
    from volad.evaluation.kinds import KindSummary

    rng = np.random.default_rng(0)
    summary = KindSummary(quantile_edges(rng.normal(size=5000)))
    for i in range(6):
        lesioned = i < 4
        labels = np.zeros(2000, dtype=bool)
        labels[: 100 if lesioned else 0] = True
        scores = rng.normal(size=2000) + 2.0 * labels
        pred = scores > 1.5
        counts = {"tp": int((pred & labels).sum()), "fp": int((pred & ~labels).sum()), "fn": int((~pred & labels).sum()), "tn": int((~pred & ~labels).sum())}
        summary.add(category="wml" if lesioned else "healthy", status="anomalous" if lesioned else "healthy", scores=scores, labels=labels,
                    counts=counts, dice=0.5, volume_score=float(scores.max()), lesions=(1, 1, 1, 1), fp_components=int(pred[~labels].sum() > 0))
    kinds = summary.as_dict(n_boot=200, seed=0)
    wml, healthy = kinds["wml"], kinds["healthy"]
    assert list(kinds) == ["wml", "healthy"] and wml["n"] == 4 and healthy["n"] == 2
    lo, hi = wml["ci95"]["auprc"]
    assert lo <= wml["auprc"] + 0.02 and wml["auprc"] - 0.02 <= hi and lo < hi
    lo, hi = healthy["ci95"]["fpr"]
    assert lo <= healthy["fpr"] <= hi


def test_every_report_stands_beside_the_baselines_next_to_it(kinds_root, tmp_path):
    runs = tmp_path / "runs"
    for name, polarity in (("intensity", "bright"), ("intensity_dark", "dark")):
        Inferer(output_dir=str(runs / name), method=IntensityBaseline(polarity=polarity), dataset="phantom_kinds", data_root=str(kinds_root), device="cpu").run()
        Evaluator(output_dir=str(runs / name), bootstrap=0, montage_cases=0).run()
    report = json.loads((runs / "intensity_dark" / "report.json").read_text())
    beside = report["baselines"]
    assert [r["method"] for r in beside["runs"]] == ["intensity"] and beside["runs"][0]["role"] == "baseline to beat"
    assert beside["to_beat"] == str((runs / "intensity").resolve())
    assert "## Beside the baselines" in (runs / "intensity_dark" / "report.md").read_text()
    alone = json.loads((runs / "intensity" / "report.json").read_text())["baselines"]
    assert alone["runs"] == [] and "no baseline run" in alone["note"]  # evaluated first: nothing beside it yet
