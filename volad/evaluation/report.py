"""Reports: ``report.json`` (machine-readable, schema in ``report.schema.json``), ``report.md``
(for people) and PNG figures (curves, lesion sizes, per-case montages)."""

from __future__ import annotations

import json
from pathlib import Path

from volad.evaluation.figures import plot_curves, plot_lesion_sizes, plot_montage
from volad.evaluation.voxel import Curve
from volad.io import atomic_path, write_json

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
    return ["", f"**Chosen on val** ({sel['on']}): {chosen['rule']} of {', '.join(chosen['members'])} (val AUPRC {fmt(chosen['val_auprc'])})."]


def _checkpoint_line(report: dict) -> list[str]:
    """Which checkpoint made the maps: file, SHA-256 prefix, epoch and val AUPRC (maps from another tool: said so)."""
    ck = report.get("checkpoint") or {}
    if not ck.get("sha256"):
        return ["", "Maps: not made by a volad checkpoint (no checkpoint recorded in their index)."]
    return ["", f"Maps made by checkpoint `{ck.get('path')}` (SHA-256 {ck['sha256'][:12]}, stage {ck.get('stage') or '—'}, "
                f"epoch {ck.get('epoch')}, val AUPRC {fmt(ck.get('val_auprc'))})."]


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
        f"| ⌈Dice⌉ (**oracle**: best threshold on the test set) | {fmt(v['dice_oracle'])} |",
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
        lines += ["| kind | volumes | AUPRC | AUROC | Dice | ⌈Dice⌉ (oracle) | FPR | volumes flagged |", "|---|---|---|---|---|---|---|---|"]
        for name, k in bk["kinds"].items():
            ci = k.get("ci95", {})

            def cell(key: str) -> str:
                interval = ci.get(key)
                return fmt(k.get(key)) + (f" [{fmt(interval[0])}, {fmt(interval[1])}]" if interval else "")

            lines.append(
                f"| {name} ({k['status']}) | {k['n']} | {cell('auprc')} | {cell('auroc')} | {cell('dice')} | {fmt(k.get('dice_oracle'))} | "
                f"{cell('fpr')} | {fmt(k.get('flagged_volumes'))} |"
            )
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
