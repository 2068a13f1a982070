"""``volad compare RUN_DIR...``: one leaderboard from several runs' reports.

Runs are only comparable under one evaluation protocol: the same test dataset,
split and subjects, contrasts, post-processing (the brain-mask erosion and the
component rule; the median filter is each method's own), headline threshold rule
and lesion rule. Runs whose protocol differs from the most common one are
flagged in the table, and the differing fields are listed under it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Sequence

from volad.errors import VoladDataError
from volad.io import atomic_path
from volad.utils.cli_format import HelpFormatter

COLUMNS = [
    ("run", None),
    ("method", "method"),
    ("dataset", "dataset"),
    ("threshold", None),
    ("dice", "voxel.dice"),
    ("dice_ci95", "ci95.dice"),
    ("dice_oracle", "voxel.dice_oracle"),
    ("auroc", "voxel.auroc"),
    ("auprc", "voxel.auprc"),
    ("auprc_ci95", "ci95.auprc"),
    ("lesion_f1", "lesion.f1"),
    ("lesion_sensitivity", "lesion.sensitivity"),
    ("fp_components_per_volume", "lesion.fp_components_per_volume"),
    ("volume_auroc", "volume.auroc"),
    ("protocol", None),
]


#: Method kinds (``hparams["kind"]``) that are baselines: every table shows them, and marks the strongest.
BASELINE_KINDS = frozenset({"IntensityBaseline", "NormativeBaseline"})


#: Per-kind figures: of lesion kinds, and of healthy kinds (clean, artefact).
LESION_KIND_METRICS = ("auprc", "auroc", "dice", "dice_oracle")
HEALTHY_KIND_METRICS = ("fpr", "flagged_volumes")


def kind_figures(report: dict, metrics: Sequence[str] = ("auprc", "fpr")) -> dict[str, object]:
    """Per-kind columns of a report: ``<metric>[<kind>]`` (with ``…_ci95`` where the report has an interval).

    Args:
        report: A ``report.json``.
        metrics: Which of :data:`LESION_KIND_METRICS` (for lesion kinds) and :data:`HEALTHY_KIND_METRICS` (healthy kinds).
    """
    out: dict[str, object] = {}
    for name, k in ((report.get("by_kind") or {}).get("kinds") or {}).items():
        own = LESION_KIND_METRICS if k.get("status") == "anomalous" else HEALTHY_KIND_METRICS
        for key in (m for m in metrics if m in own):
            out[f"{key}[{name}]"] = k.get(key)
            if key in (k.get("ci95") or {}):
                out[f"{key}[{name}]_ci95"] = k["ci95"][key]
    return out


def mark_baselines(rows: list[dict], kinds: Sequence[str | None], sort_by: str = "auprc") -> None:
    """Set each row's ``role``: ``method``, ``baseline``, or ``baseline to beat`` (the strongest baseline by ``sort_by``)."""
    best, best_value = None, float("-inf")
    for row, kind in zip(rows, kinds):
        row["role"] = "baseline" if kind in BASELINE_KINDS else "method"
        value = row.get(sort_by)
        if row["role"] == "baseline" and isinstance(value, (int, float)) and value == value and value > best_value:
            best, best_value = row, value
    if best is not None:
        best["role"] = "baseline to beat"


def baselines_beside(report: dict, run_dir: str | Path, extra: Sequence[str | Path] = ()) -> dict:
    """The baseline runs evaluated under the same protocol as ``report``, for its "beside the baselines" section.

    Candidates are the run folders next to ``run_dir`` (what ``volad bench`` and a
    ``runs/`` folder hold) and ``extra``; a candidate counts when its report is a
    baseline's (intensity, normative) and its protocol matches this report's.

    Returns:
        ``{"runs": [{run, method, kind, auprc, dice, ...per-kind...}], "to_beat": run or None, "note": ...}``
    """
    run_dir = Path(run_dir).resolve()
    candidates = {p.resolve() for p in Path(run_dir).parent.iterdir() if p.is_dir()} | {Path(e).resolve() for e in extra}
    voxel_level = lambda r: {k: v for k, v in protocol(r).items() if k != "volume_score"}  # noqa: E731  (voxel figures only)
    mine = voxel_level(report)
    rows, kinds = [], []
    for cand in sorted(candidates - {run_dir}):
        path = cand / "report.json"
        if not path.is_file():
            continue
        try:
            other = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        kind = (other.get("method_hparams") or {}).get("kind")
        if kind not in BASELINE_KINDS or voxel_level(other) != mine:
            continue
        rows.append({"run": str(cand), "method": other.get("method"), "auprc": _get(other, "voxel.auprc"), "dice": _get(other, "voxel.dice"),
                     "auroc": _get(other, "voxel.auroc"), **kind_figures(other)})
        kinds.append(kind)
    mark_baselines(rows, kinds)
    to_beat = next((r["run"] for r in rows if r["role"] == "baseline to beat"), None)
    note = ("baseline runs next to this one (or given), evaluated under the same protocol" if rows else
            "no baseline run under the same protocol next to this run: train and evaluate baseline3d (--baseline normative_signed, "
            "--baseline normative, --baseline intensity) into sibling run folders on the same data to see them here")
    return {"runs": rows, "to_beat": to_beat, "note": note}


def _get(report: dict, dotted: str):
    cur = report
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def protocol(report: dict) -> dict:
    """The fields that must match for two reports to be comparable."""
    t = report.get("threshold", {})
    return {
        "schema": report.get("schema", "volad-report/1"),
        "dataset": report.get("dataset"),
        "split": report.get("split"),
        "subjects": tuple(sorted(r["subject_id"] for r in report.get("per_volume", []))),
        "contrasts": tuple(report.get("contrasts") or ()),
        "postprocessing": json.dumps(_shared_postprocessing(report.get("postprocessing", {})), sort_keys=True),
        "threshold_rule": f"{t.get('name', t.get('mode'))} on {t.get('chosen_on')}",
        "lesion_rule": (report.get("lesion") or {}).get("min_overlap"),
        "volume_score": (report.get("volume") or {}).get("score"),
    }


def _shared_postprocessing(post: dict) -> dict:
    """The post-processing two reports must share: all but the median filter, which is each method's own
    (:attr:`volad.methods.base.AnomalyMethod.median_mm`), like its volume score."""
    mine = ("median_mm", "median_kernel", "median_from")
    out = {k: v for k, v in post.items() if k not in mine and k != "in_voxels"}
    if "in_voxels" in post:
        out["in_voxels"] = [{k: v for k, v in d.items() if k not in mine} for d in post["in_voxels"]]
    return out


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.4f}"
    return str(v)


#: What every volad report has, and a leaderboard reads.
REPORT_KEYS = ("method", "dataset", "split", "threshold", "voxel")


def read_report(path: Path) -> dict:
    """A run's ``report.json``.

    Raises:
        VoladDataError: missing, not JSON, or lacking what a volad report holds (naming what).
    """
    if not path.is_file():
        raise VoladDataError(path, "no report; run the bundle's evaluate.json for this run first")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VoladDataError(path, f"is not JSON ({exc}); run the bundle's evaluate.json again to rewrite it") from exc
    missing = [k for k in REPORT_KEYS if not isinstance(report, dict) or k not in report]
    if missing:
        raise VoladDataError(path, f"is not a volad report (no {', '.join(missing)}); run the bundle's evaluate.json again to rewrite it")
    return report


def leaderboard(run_dirs: Sequence[str | Path], sort_by: str = "auprc") -> tuple[list[dict], list[str]]:
    """Rows (best first by ``sort_by``) and notes on protocol differences.

    Raises:
        VoladDataError: a run has no ``report.json``, or one that is not a volad report.
    """
    reports = [(Path(d), read_report(Path(d) / "report.json")) for d in run_dirs]
    protos = [protocol(r) for _, r in reports]
    keys = [json.dumps(p, sort_keys=True, default=str) for p in protos]
    reference_key, _ = Counter(keys).most_common(1)[0]
    reference = protos[keys.index(reference_key)]
    labels: dict[str, str] = {}
    rows, notes = [], []
    kinds = [(rep.get("method_hparams") or {}).get("kind") for _, rep in reports]
    for (run, rep), proto, key in zip(reports, protos, keys):
        tag = labels.setdefault(key, chr(ord("A") + len(labels)))
        row = {"run": str(run), "threshold": f"{rep['threshold'].get('name', rep['threshold'].get('mode'))} ({rep['threshold'].get('chosen_on')})"}
        for col, dotted in COLUMNS:
            if dotted:
                row[col] = _get(rep, dotted)
        row["protocol"] = tag + ("" if key == reference_key else " ⚠")
        row.update(kind_figures(rep))
        rows.append(row)
        if key != reference_key:
            diff = [f"{k}: {_short(proto[k])} vs {_short(reference[k])}" for k in proto if proto[k] != reference[k]]
            notes.append(f"{run} (protocol {tag}) differs from protocol {labels[reference_key]}: " + "; ".join(diff))
    mark_baselines(rows, kinds, sort_by)
    rows.sort(key=lambda r: -(r.get(sort_by) if isinstance(r.get(sort_by), (int, float)) and r.get(sort_by) == r.get(sort_by) else float("-inf")))
    return rows, notes


def _short(v) -> str:
    if isinstance(v, tuple) and len(v) > 4:
        return f"{len(v)} subjects ({', '.join(v[:2])}, ...)"
    return str(v)


def columns(rows: list[dict]) -> list[str]:
    """The table's columns: the fixed ones, the role, then every per-kind column any row has."""
    fixed = [c for c, _ in COLUMNS]
    extra = list(dict.fromkeys(k for r in rows for k in r if k not in fixed and k != "role"))
    return fixed[:2] + ["role"] + fixed[2:] + extra


def to_markdown(rows: list[dict], notes: list[str]) -> str:
    cols = columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    if notes:
        lines += ["", "**Different protocols: these runs are not directly comparable.**", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    cols = columns(rows)
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    for r in rows:
        writer.writerow({c: (json.dumps(r.get(c)) if isinstance(r.get(c), list) else r.get(c)) for c in cols})
    return buf.getvalue()


def build_parser() -> argparse.ArgumentParser:
    """The command's options (also read by the test that every option has help)."""
    p = argparse.ArgumentParser(prog="volad compare", description="merge runs' reports into one leaderboard (Markdown and CSV)", formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders holding report.json")
    p.add_argument("--out", default=None, help="folder for leaderboard.md and leaderboard.csv (default: print only)")
    p.add_argument("--sort_by", default="auprc", help="voxel metric that orders the rows")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    rows, notes = leaderboard(a.runs, a.sort_by)
    md = to_markdown(rows, notes)
    print(md)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "leaderboard.md") as tmp:
            tmp.write_text(md)
        with atomic_path(out / "leaderboard.csv") as tmp:
            tmp.write_text(to_csv(rows))
        print(f"volad: wrote {out / 'leaderboard.md'} and {out / 'leaderboard.csv'}")
    return 0
