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
    Evaluator(output_dir=str(run), erosion_mm=0.0, median_mm=0.0, min_component_voxels=0, bootstrap=50, montage_cases=0).run()
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


def test_bias_report_gives_each_subgroup_of_the_participants_table_with_its_size(kinds_root, tmp_path):
    """Subgroups by a participants table's sex and age (binned): healthy ones get FPR and flagged share, lesioned ones AUPRC
    (checked against scikit-learn) and Dice, each with its number of volumes; the kind field is not repeated as a subgroup."""
    from volad.data.manifest import read_manifest

    manifest, _ = read_manifest("phantom_kinds")
    ds = load_dataset("phantom_kinds", kinds_root)
    test_ids = ds.split_ids("test")
    people = {sid: ("female" if i % 2 else "male", 25 + 20 * (i % 3)) for i, sid in enumerate(ds.split_ids("val") + test_ids)}
    table = tmp_path / "participants.tsv"
    table.write_text("participant_id\tsex\tage\n" + "".join(f"{sid}\t{s}\t{a}\n" for sid, (s, a) in people.items() if sid != test_ids[0]))
    manifest["participants"] = {"file": str(table), "id_column": "participant_id", "columns": {"sex": "sex", "age": "age"}}
    path = tmp_path / "phantom_kinds_people.json"
    path.write_text(json.dumps(manifest))
    run = tmp_path / "intensity"
    Inferer(output_dir=str(run), method=IntensityBaseline(), dataset=str(path), data_root=str(kinds_root), device="cpu").run()
    Evaluator(output_dir=str(run), erosion_mm=0.0, median_mm=0.0, min_component_voxels=0, bootstrap=50, montage_cases=0).run()
    report = json.loads((run / "report.json").read_text())
    jsonschema.validate(report, report_schema())
    fields = report["by_subgroup"]["fields"]
    assert set(fields) == {"sex", "age"}  # "kind" names the category: the by-kind table has it
    ds = load_dataset(str(path), kinds_root)
    known = [sid for sid in test_ids if sid != test_ids[0]]  # the table lacks the first test subject: it belongs to no subgroup
    for sex in ("female", "male"):
        for status, word in (("anomalous", "lesioned"), ("healthy", "healthy")):
            members = [sid for sid in known if people[sid][0] == sex and ds.status(sid)[0] == status]
            row = fields["sex"].get(f"{sex} · {word}")
            assert (row["n"] if row else 0) == len(members)
            if row and status == "anomalous":
                scores, labels = [], []
                for sid in members:
                    s = EnsureMasks()(ds.subject(sid, "test"))
                    brain = s["brain_mask"].numpy()[0].astype(bool)
                    scores.append(read_map(run / "maps" / f"{sid}_anomaly.nii.gz")[0][brain])
                    labels.append(s["label"].numpy()[0].astype(bool)[brain])
                assert row["auprc"] == pytest.approx(average_precision_score(np.concatenate(labels), np.concatenate(scores)), abs=1e-6)
            elif row:
                assert 0 <= row["fpr"] <= 1 and 0 <= row["flagged_volumes"] <= 1
    assert {name.split(" · ")[0] for name in fields["age"]} <= {"<30", "45–59", "60–74"}
    assert sum(r["n"] for r in fields["age"].values()) == len(known)
    md = (run / "report.md").read_text()
    assert "## By sex" in md and "## By age" in md


def test_participants_tables_match_ids_as_the_files_write_them(tmp_path):
    from volad.data.participants import age_bin, normalise_id, read_participants
    from volad.errors import VoladDataError

    assert [normalise_id(x) for x in ("002", "2", "2.0", "IXI002")] == ["2", "2", "2", "IXI002"]
    assert [age_bin(x) for x in ("12", "30", "44.9", "75", "", "n/a")] == ["<30", "30–44", "30–44", "≥75", "", ""]
    sheet = tmp_path / "IXI.csv"
    sheet.write_text("IXI_ID,\"SEX_ID (1=m, 2=f)\",AGE\n2,2,35.8\n12,1,38.8\n")
    assert read_participants(sheet, "IXI_ID")["12"] == {"IXI_ID": "12", "SEX_ID (1=m, 2=f)": "1", "AGE": "38.8"}
    with pytest.raises(VoladDataError, match="no column 'ID'.*IXI_ID"):
        read_participants(sheet, "ID")
    xls = tmp_path / "IXI.xls"
    xls.write_bytes(b"\xd0\xcf\x11\xe0not really a sheet")
    with pytest.raises(VoladDataError, match="IXI.xls"):
        read_participants(xls, "IXI_ID")


def test_ixi_manifest_reads_site_from_file_names_and_sex_and_age_from_its_sheet(tmp_path):
    from volad.data.fakes import make_fake

    root = make_fake("ixi", tmp_path / "ixi", n=4)
    ds = load_dataset("ixi", root)
    ids = sorted(ds.discover())
    nums = [ds.discover()[sid]["num"] for sid in ids]
    (root / "IXI.csv").write_text("IXI_ID,\"SEX_ID (1=m, 2=f)\",AGE\n" + f"{int(nums[0])},2,35.8\n")
    assert ds.metadata(ids[1])["sex"] == "" and ds.metadata(ids[0])["site"] in ("Guys", "HH", "IOP")  # no sheet yet: empty, said once
    from volad.data.manifest import read_manifest

    manifest, _ = read_manifest("ixi")
    manifest["participants"]["file"] = "IXI.csv"  # the sheet saved as CSV
    path = tmp_path / "ixi_csv.json"
    path.write_text(json.dumps(manifest))
    ds = load_dataset(str(path), root)
    assert ds.metadata(ids[0]) == {"site": ds.discover()[ids[0]]["site"], "sex": "female", "age": "35.8"}
    assert ds.metadata(ids[1])["sex"] == ""
