"""Reports: ``report.json`` (machine-readable), ``report.md`` (for people), and ROC/PR plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from volad.evaluation.voxel import Curve  # noqa: E402
from volad.io import atomic_path, write_json  # noqa: E402


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.4f}"
    return str(v)


def markdown(report: dict) -> str:
    v, t = report["voxel"], report["threshold"]
    lines = [
        f"# {report['method']} on {report['dataset']} ({report['split']} split, {report['n_subjects']} volumes, {report['n_lesioned']} with lesions)",
        "",
        f"Threshold {_fmt(t['value'])}, chosen on: **{t['chosen_on']}** ({t['mode']}).",
        "",
        "| metric | pooled over voxels |",
        "|---|---|",
    ]
    for k in ("dice", "iou", "precision", "recall", "fpr", "auroc", "auprc"):
        lines.append(f"| {k} | {_fmt(v[k])} |")
    lines.append(f"| ⌈Dice⌉ (oracle: best threshold on the test set) | {_fmt(v['dice_oracle'])} |")
    lines += [
        "",
        f"AUROC/AUPRC are {'exact' if v['exact'] else 'binned (65,536 bins per class)'}.",
        "",
        "Per-volume means (lesioned volumes): "
        + ", ".join(f"{k} {_fmt(report['per_volume_mean'][k])}" for k in ("dice", "iou", "auroc", "auprc"))
        + f"; FPR on healthy volumes {_fmt(report['per_volume_mean']['fpr_healthy_volumes'])}.",
        "",
        "Post-processing: " + ", ".join(f"{k}={val}" for k, val in report["postprocessing"].items()) + ".",
        "",
        "| subject | lesion voxels | predicted | Dice | AUROC | AUPRC | volume score |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["per_volume"]:
        lines.append(
            f"| {r['subject_id']} | {r['lesion_voxels']} | {r['predicted_voxels']} | {_fmt(r['dice'])} | {_fmt(r['auroc'])} | {_fmt(r['auprc'])} | {_fmt(r['volume_score'])} |"
        )
    lines += ["", "![ROC and PR curves](curves.png)", ""]
    return "\n".join(lines)


def plot_curves(curve: Curve, path: Path, title: str) -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4))
    fpr, tpr = curve.roc()
    a.plot(fpr, tpr)
    a.plot([0, 1], [0, 1], "k:", lw=0.8)
    a.set(xlabel="false-positive rate", ylabel="true-positive rate", title="voxel ROC")
    rec, prec = curve.pr()
    b.plot(rec, prec)
    b.set(xlabel="recall", ylabel="precision", title="voxel PR", xlim=(0, 1), ylim=(0, 1))
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def write_report(report: dict, curve: Curve, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    write_json(report, out_dir / "report.json")
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text(markdown(report))
    plot_curves(curve, out_dir / "curves.png", f"{report['method']} on {report['dataset']} ({report['split']})")
    return out_dir / "report.json"
