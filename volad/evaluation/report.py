"""Reports: ``report.json`` (machine-readable, schema in ``report.schema.json``), ``report.md``
(for people) and PNG figures (curves, lesion sizes, per-case montages)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from volad.evaluation.figures import plot_curves, plot_lesion_sizes, plot_montage
from volad.evaluation.voxel import Curve, scores_from_counts
from volad.io import atomic_path, write_json

if TYPE_CHECKING:
    from volad.evaluation.test_pass import PassFigures

SCHEMA_PATH = Path(__file__).with_name("report.schema.json")


def fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.4f}"
    return str(v)


def _ci(report: dict, key: str) -> str:
    ci = report.get("ci95", {}).get(key)
    return f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""


def _selection_lines(report: dict) -> list[str]:
    """What the validation split chose about the method itself (a fusion's members and rule), if anything."""
    sel = (report.get("checkpoint") or {}).get("selection")
    if not sel:
        return []
    chosen = sel["chosen"]
    if chosen.get("chosen_on", "val") != "val":
        return ["", f"**Fused, nothing chosen on val**: {chosen['rule']} of every member ({', '.join(chosen['members'])}); "
                    f"val ({sel['on']}) only reports: val AUPRC {fmt(chosen['val_auprc'])}."]
    return ["", f"**Chosen on val** ({sel['on']}): {chosen['rule']} of {', '.join(chosen['members'])} (val AUPRC {fmt(chosen['val_auprc'])})."]


def _checkpoint_line(report: dict) -> list[str]:
    """Which checkpoint made the maps: file, SHA-256 prefix, epoch and val AUPRC (maps from another tool: said so)."""
    ck = report.get("checkpoint") or {}
    if not ck.get("sha256"):
        return ["", "Maps: not made by a volad checkpoint (no checkpoint recorded in their index)."]
    averaged = ck.get("averaged_epochs")
    if averaged:  # best.pt under average_best: the uniform average of the best val epochs
        epochs = ", ".join(f"{e['epoch']} ({fmt(e['val_auprc'])})" for e in averaged)
        when = f"the average of the weights of epochs {epochs}, chosen by val AUPRC; the average's own val AUPRC {fmt(ck.get('val_auprc'))}"
    else:
        when = f"epoch {ck.get('epoch')}, val AUPRC {fmt(ck.get('val_auprc'))}"
    return ["", f"Maps made by checkpoint `{ck.get('path')}` (SHA-256 {ck['sha256'][:12]}, stage {ck.get('stage') or '—'}, {when})."]


def markdown(report: dict) -> str:
    v, t = report["voxel"], report["threshold"]
    lines = [
        f"# {report['method']} on {report['dataset']} ({report['split']} split, {report['n_subjects']} volumes, {report['n_lesioned']} with lesions)",
        "",
        f"Headline threshold `{t['name']}` = {fmt(t['value'])}, chosen on **{t['chosen_on']}** of {t.get('chosen_on_dataset') or 'user input'} ({t['mode']}).",
        "Brackets: bootstrap 95 % intervals over test volumes.",
        *_checkpoint_line(report),
        *(["", f"**Undefined figures:** {report['undefined']}."] if report.get("undefined") else []),
        *_selection_lines(report),
        "",
        "| voxel metric (pooled) | value |",
        "|---|---|",
    ]
    for k in ("dice", "iou", "precision", "recall", "fpr"):
        lines.append(f"| {k} | {fmt(v[k])}{_ci(report, k)} |")
    lines += [
        f"| AUROC | {fmt(v['auroc'])}{_ci(report, 'auroc')} |",
        f"| AUPRC (AP over all brain voxels of all cases) | {fmt(v['auprc'])}{_ci(report, 'auprc')} |",
        f"| ⌈Dice⌉ (**oracle**: best threshold on the test set, over the map's voxels before the component rule) | {fmt(v['dice_oracle'])} |",
        "",
        f"AUROC/AUPRC are {'exact' if v['exact'] else 'binned (65,536 bins per class)'}.",
        "",
        "## Every threshold",
        "",
        "| threshold | value | chosen on | pooled Dice | IoU | FPR | mean Dice per volume | FPR on healthy volumes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["thresholds"].items():
        pv = r.get("per_volume_mean", {})
        vox = r.get("voxel", {})
        lines.append(
            f"| {name} | {fmt(r['value'])} | {r['chosen_on']} ({r.get('chosen_on_dataset', '')}) | {fmt(vox.get('dice'))} | "
            f"{fmt(vox.get('iou'))} | {fmt(vox.get('fpr'))} | {fmt(pv.get('dice'))} | {fmt(pv.get('fpr_healthy_volumes'))} |"
        )
    for name, why in report.get("thresholds_skipped", {}).items():
        lines.append(f"| {name} | skipped: {why} | | | | | | |")
    les = report["lesion"]
    lines += [
        "",
        f"## Lesions (connected components; detected when ≥ {les['min_overlap']:g} of a lesion fires at `{les['threshold']}`)",
        "",
        f"{les['detected']}/{les['n_lesions']} lesions detected (sensitivity {fmt(les['sensitivity'])}{_ci(report, 'lesion_sensitivity')}), "
        f"{fmt(les['fp_components_per_volume'])} false-positive components per volume, lesion-wise precision {fmt(les['precision'])}, "
        f"F1 {fmt(les['f1'])}{_ci(report, 'lesion_f1')}.",
        "",
        "| size bin (mm³) | lesions | detected | sensitivity |",
        "|---|---|---|---|",
    ]
    for name, b in les["by_size"].items():
        lo, hi = b["range_mm3"]
        lines.append(f"| {name} [{lo:g}, {'∞' if hi is None else f'{hi:g}'}) | {b['n_lesions']} | {b['detected']} | {fmt(b['sensitivity'])} |")
    vol = report["volume"]
    at = vol.get("at_threshold", {})
    lines += [
        "",
        f"## Volumes (score: `{vol['score']}` of the map)",
        "",
        f"AUROC {fmt(vol.get('auroc'))}{_ci(report, 'volume_auroc')}, AP {fmt(vol.get('ap'))} over {vol['n_lesioned']} lesioned and {vol['n_healthy']} healthy volumes.",
        (
            f"At the max-F1 threshold of **{at['chosen_on']}**: ACC {fmt(at['acc'])}, F1 {fmt(at['f1'])}."
            if "acc" in at
            else f"No volume threshold: {at.get('skipped', '')}."
        ),
    ]
    if "baselines" in report:
        bs = report["baselines"]
        lines += ["", "## Beside the baselines", "", bs["note"] + "."]
        if bs["runs"]:
            kinds = list(dict.fromkeys(k for r in bs["runs"] for k in r if k.startswith(("auprc[", "fpr[")) and not k.endswith("_ci95")))
            own = {"method": report["method"], "role": "this run", "auprc": v.get("auprc"), "dice": v.get("dice"), "auroc": v.get("auroc")}
            own.update({f"auprc[{n}]" if k["status"] == "anomalous" else f"fpr[{n}]": k.get("auprc" if k["status"] == "anomalous" else "fpr")
                        for n, k in (report.get("by_kind") or {}).get("kinds", {}).items()})
            cols = ["method", "role", "auprc", "auroc", "dice", *kinds]
            lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for r in [own, *bs["runs"]]:
                lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    if "by_kind" in report:
        bk = report["by_kind"]
        lines += ["", f"## By kind (at `{bk['threshold']}`; 95 % intervals over each kind's volumes)", ""]
        lines += _group_table("kind", bk["kinds"], fmt)
    if "by_subgroup" in report:
        bs = report["by_subgroup"]
        for key, groups in bs["fields"].items():
            lines += ["", f"## By {key} (at `{bs['threshold']}`; 95 % intervals over each subgroup's volumes)", ""]
            lines += _group_table(key, groups, fmt)
    if "boxes" in report:
        b = report["boxes"]
        lines += [
            "",
            f"## Boxes ({b['rule']}, at `{b['threshold']['name']}` from {b['threshold']['chosen_on']})",
            "",
            f"{b['detected']}/{b['n_lesions']} boxes hit (rate {fmt(b['sensitivity'])}), {fmt(b['fp_components_per_volume'])} false-positive components per volume.",
        ]
    lines += [
        "",
        "## Post-processing",
        "",
        ", ".join(f"{k}={val}" for k, val in report["postprocessing"].items()) + ".",
        "",
        "## Per volume (headline threshold)",
        "",
        "| subject | lesion voxels | predicted | Dice | lesions hit | FP components | AUROC | AUPRC | volume score |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["per_volume"]:
        lines.append(
            f"| {r['subject_id']} | {r['lesion_voxels']} | {r['predicted_voxels']} | {fmt(r['dice'])} | {r['lesions_detected']}/{r['lesions']} | "
            f"{r['fp_components']} | {fmt(r['auroc'])} | {fmt(r['auprc'])} | {fmt(r['volume_score'])} |"
        )
    lines += ["", "![ROC and PR curves](curves.png)", "", "![lesion sensitivity by size](lesion_sizes.png)", ""]
    for m in report.get("figures", {}).get("montages", []):
        lines += [f"![{Path(m).stem}]({m})", ""]
    return "\n".join(lines)


def write_report(report: dict, curve: Curve, out_dir: str | Path, montage: list[dict] | None = None) -> Path:
    """Write figures, ``report.json`` and ``report.md`` (atomically) into ``out_dir``."""
    out_dir = Path(out_dir)
    title = f"{report['method']} on {report['dataset']} ({report['split']})"
    plot_curves(curve, out_dir / "curves.png", title)
    plot_lesion_sizes(report["lesion"], out_dir / "lesion_sizes.png", title)
    montages = [
        plot_montage(case, out_dir / "montages" / f"{case['subject_id']}.png", report["threshold"]["value"]).relative_to(out_dir).as_posix()
        for case in (montage or [])
    ]
    report["figures"] = {"curves": "curves.png", "lesion_sizes": "lesion_sizes.png", "montages": montages}
    write_json(report, out_dir / "report.json")
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text(markdown(report))
    return out_dir / "report.json"


def report_schema() -> dict:
    """The JSON schema of ``report.json``."""
    return json.loads(SCHEMA_PATH.read_text())

#: The report's schema (``report.schema.json``).
REPORT_SCHEMA = "volad-report/2"
#: Voxel figures that need lesion voxels (undefined on a test split without any).
LESION_VOXEL_METRICS = ("dice", "iou", "precision", "recall")


def assemble_report(
    figures: "PassFigures",
    *,
    chosen: dict,
    skipped: dict[str, str],
    headline,
    box_choice,
    box_skipped: str,
    box_fraction: float,
    method: str,
    index: dict,
    dataset,
    test_split: str,
    post,
    median_from: str,
    volume: dict,
    n_boot: int,
    seed: int,
) -> dict:
    """``report.json``'s content from the test pass's figures and the thresholds' record (see ``report.schema.json``).

    A test split without lesion voxels gets overlap figures (Dice, IoU, AUROC, AUPRC, ⌈Dice⌉) of null, and says why
    (``undefined``); its false-positive figures stand.
    """
    curve, per_volume = figures.curve, figures.per_volume
    ap, roc = curve.ap_auroc()
    oracle_t, oracle_dice = curve.best_dice()
    thresholds_report = {}
    for name, choice in chosen.items():
        rows = figures.per_threshold_rows[name]
        thresholds_report[name] = {
            **choice.as_dict(),
            "voxel": scores_from_counts(figures.pooled[name]),
            "per_volume_mean": _means(rows),
        }
    thresholds_report["oracle"] = {
        "name": "oracle", "value": oracle_t, "mode": "oracle_on_test", "chosen_on": f"{test_split} (oracle)",
        "chosen_on_dataset": dataset.name, "voxel": {"dice": oracle_dice},
    }
    voxel = dict(thresholds_report[headline.name]["voxel"])
    voxel.update(auroc=roc, auprc=ap, dice_oracle=oracle_dice, threshold_oracle=oracle_t, exact=curve.exact)
    undefined = None
    if not figures.volume_labels.any():  # nothing to find: overlap figures are undefined, never a perfect score
        undefined = (
            f"split {test_split!r} has no lesion voxels in any of its {len(per_volume)} subjects: Dice, IoU, precision, "
            "recall, AUROC, AUPRC and lesion figures are undefined; only false positives are measured"
        )
        for record in [voxel] + [t["voxel"] for t in thresholds_report.values()]:
            record.update({k: None for k in LESION_VOXEL_METRICS if k in record})
        voxel.update(auroc=None, auprc=None, dice_oracle=None, threshold_oracle=None)
        ap = None
    report = {
        "schema": REPORT_SCHEMA,
        "method": method,
        "method_hparams": index.get("method", {}),
        "checkpoint": index.get("checkpoint", {}),
        "dataset": dataset.name,
        "trained_on": index.get("checkpoint", {}).get("data", {}),
        "contrasts": dataset.contrasts,
        "split": test_split,
        "n_subjects": len(per_volume),
        "n_lesioned": int(figures.volume_labels.sum()),
        **({"undefined": undefined} if undefined else {}),
        "threshold": {k: v for k, v in thresholds_report[headline.name].items() if k not in ("voxel", "per_volume_mean")},
        "thresholds": thresholds_report,
        "thresholds_skipped": skipped,
        "postprocessing": {**post.as_dict(), "median_from": median_from, **(figures.in_voxels[0] if len(figures.in_voxels) == 1 else {"in_voxels": figures.in_voxels})},
        "voxel": voxel,
        "per_volume_mean": {
            **thresholds_report[headline.name]["per_volume_mean"],
            **{k: _nanmean([r[k] for r in per_volume if r["lesion_voxels"] > 0]) for k in ("auroc", "auprc")},
        },
        "lesion": {**figures.lesions.as_dict(), "threshold": headline.name, "connectivity": "26 (3D)"},
        "volume": volume,
        "ci95": {
            "method": f"percentile bootstrap over {test_split} volumes, {n_boot} replicates, seed {seed}; "
            "voxel AUROC/AUPRC intervals from curves binned on quantiles of the threshold split",
            **(figures.store.intervals(n_boot, seed) if figures.store is not None and n_boot else {}),
        },
        "per_volume": per_volume,
    }
    if figures.kinds:
        report["by_kind"] = {
            "threshold": headline.name,
            "note": "lesion kinds: voxel AUPRC/AUROC over the brain voxels of that kind's test volumes, Dice at the headline "
            "threshold, oracle ⌈Dice⌉ on the kind's own test voxels; healthy kinds: voxel FPR at the headline threshold, "
            "share of volumes with any predicted voxel, FP components per volume; 95 % bootstrap intervals over the kind's volumes",
            "kinds": figures.kinds.as_dict(n_boot, seed),
        }
    if figures.subgroups:
        report["by_subgroup"] = {
            "threshold": headline.name,
            "note": "bias and robustness: for each metadata field the dataset records (file-name fields such as IXI's site, a "
            "participants table's sex and age, ages in bins), healthy subgroups give the voxel FPR and the share of volumes with "
            "any detection at the headline threshold, lesioned subgroups AUPRC, AUROC and Dice; n volumes each; 95 % bootstrap "
            "intervals over the subgroup's volumes",
            "fields": {key: summary.as_dict(n_boot, seed) for key, summary in figures.subgroups.items()},
        }
    if figures.boxes is not None:
        report["boxes"] = {**figures.boxes.as_dict(), "threshold": box_choice.as_dict(), "rule": f"a box is hit when more than {box_fraction:g} of it fires"}
    elif box_skipped:
        report["boxes_skipped"] = box_skipped
    return report


def _group_table(title: str, groups: dict[str, dict], fmt) -> list[str]:
    """One Markdown table of per-group figures (by kind, or by a metadata subgroup): sizes, AUPRC/AUROC/Dice, FPR, with intervals."""
    lines = [f"| {title} | volumes | AUPRC | AUROC | Dice | ⌈Dice⌉ (oracle) | FPR | volumes flagged |", "|---|---|---|---|---|---|---|---|"]
    for name, k in groups.items():
        ci = k.get("ci95", {})

        def cell(key: str) -> str:
            interval = ci.get(key)
            return fmt(k.get(key)) + (f" [{fmt(interval[0])}, {fmt(interval[1])}]" if interval else "")

        lines.append(
            f"| {name} ({k['status']}) | {k['n']} | {cell('auprc')} | {cell('auroc')} | {cell('dice')} | {fmt(k.get('dice_oracle'))} | "
            f"{cell('fpr')} | {fmt(k.get('flagged_volumes'))} |"
        )
    return lines


def _nanmean(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else float("nan")


def _means(rows: list[dict]) -> dict:
    lesioned = [r for r in rows if r["lesioned"]]
    healthy = [r for r in rows if not r["lesioned"]]
    return {
        "note": "means over lesioned test volumes (AUROC/AUPRC undefined without lesion voxels); FPR on healthy ones",
        **{k: _nanmean([r[k] for r in lesioned]) for k in ("dice", "iou", "precision", "recall")},
        "fpr_healthy_volumes": _nanmean([r["fpr"] for r in healthy]),
    }
