"""The test pass of an evaluation: every test map read once, every figure accumulated at once.

Per volume: the confusion counts at every chosen threshold, the lesions matched at the
headline one (and FastMRI+-style boxes at theirs), AUROC, AUPRC and the volume score;
pooled: the voxel curve, the counts per threshold, the lesion and box summaries, the
bootstrap store and the per-kind figures. Nothing here chooses anything: the thresholds
come in already chosen (:class:`volad.evaluation.thresholds.ThresholdRule`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from volad.data.participants import age_bin
from volad.evaluation.bootstrap import BootstrapStore, quantile_edges
from volad.evaluation.cases import MapCases
from volad.evaluation.kinds import KindSummary
from volad.evaluation.lesions import LesionSummary, match_lesions
from volad.evaluation.postprocess import binarize, volume_score
from volad.evaluation.thresholds import ThresholdChoice
from volad.evaluation.voxel import Curve, ScoreAccumulator, auroc, average_precision, confusion, scores_from_counts
from volad.utils.progress import progress


@dataclass
class PassFigures:
    """What the test pass accumulated (see the module notes)."""

    curve: Curve
    pooled: dict[str, dict[str, int]]
    per_threshold_rows: dict[str, list[dict]]
    lesions: LesionSummary
    boxes: LesionSummary | None
    per_volume: list[dict]
    in_voxels: list[dict]
    volume_scores: np.ndarray
    volume_labels: np.ndarray
    store: BootstrapStore | None
    kinds: KindSummary | None
    subgroups: dict[str, KindSummary]


def run_test_pass(
    cases: MapCases,
    entries: list[dict],
    *,
    chosen: dict[str, ThresholdChoice],
    headline: ThresholdChoice,
    box_choice: ThresholdChoice | None,
    edges: np.ndarray,
    lesion_overlap: float,
    size_bins: dict,
    box_fraction: float,
    volume_score_mode: str,
    exact_limit: int,
) -> PassFigures:
    """Read every test map once and accumulate every figure (``edges``: the bootstrap bins, from the threshold split)."""
    store: BootstrapStore | None = None
    kinds: KindSummary | None = None
    subgroups: dict[str, KindSummary] = {}
    acc = ScoreAccumulator(exact_limit=exact_limit)
    pooled = {k: {"tp": 0, "fp": 0, "fn": 0, "tn": 0} for k in chosen}
    per_threshold_rows: dict[str, list[dict]] = {k: [] for k in chosen}
    lesions = LesionSummary(lesion_overlap, size_bins)
    boxes = LesionSummary(box_fraction, {"all": (0.0, None)}) if box_choice is not None else None
    per_volume, in_voxels, test_scores, test_labels = [], [], [], []
    for e in progress(entries, f"evaluate {cases.test_split}"):
        case = cases.load(e, cases.test_split)
        if store is None:
            if edges.size <= 1:
                edges = quantile_edges(case.anomaly_map[case.brain])
            store = BootstrapStore(edges)
            kinds = KindSummary(edges, exact_limit)
        v = cases.post.voxels(case.spacing)
        if v not in in_voxels:
            in_voxels.append(v)
        s, lab = case.anomaly_map[case.brain], case.label[case.brain]
        acc.add(s, lab)
        row = {"subject_id": case.subject_id, "lesion_voxels": int(lab.sum())}
        for name, choice in chosen.items():
            pred_full = binarize(case.anomaly_map, choice.value, cases.post.min_component_voxels) & case.brain
            c = confusion(pred_full[case.brain], lab)
            for k in pooled[name]:
                pooled[name][k] += c[k]
            metrics = scores_from_counts(c)
            per_threshold_rows[name].append({"lesioned": bool(lab.any()), **metrics})
            if choice is headline:
                headline_pred, headline_counts = pred_full, c
                row.update({"predicted_voxels": int(pred_full.sum()), **metrics})
        voxel_mm3 = float(np.prod(case.spacing))
        les = match_lesions(headline_pred, case.label, voxel_mm3, min_overlap=lesion_overlap)
        lesions.add(les)
        row.update(lesions=int(les.detected.size), lesions_detected=int(les.detected.sum()), fp_components=les.n_fp)
        if boxes is not None:
            bpred = binarize(case.anomaly_map, box_choice.value, cases.post.min_component_voxels) & case.brain
            boxes.add(match_lesions(bpred, case.label, voxel_mm3, min_overlap=box_fraction, per_slice=True, strict=True))
        row["auroc"] = auroc(s, lab)
        row["auprc"] = average_precision(s, lab)
        row["volume_score"] = volume_score(case.anomaly_map, case.brain, volume_score_mode)
        test_scores.append(row["volume_score"])
        test_labels.append(bool(lab.any()))
        store.add(
            scores=s, labels=lab, counts=headline_counts, dice=row["dice"], volume_score=row["volume_score"],
            lesions=(int(les.detected.size), int(les.detected.sum()), les.n_pred, les.n_pred_hits),
        )
        kinds.add(
            category=case.category, status=case.status, scores=s, labels=lab, counts=headline_counts, dice=row["dice"],
            volume_score=row["volume_score"], lesions=(int(les.detected.size), int(les.detected.sum()), les.n_pred, les.n_pred_hits),
            fp_components=les.n_fp,
        )
        for key, value in case.metadata.items():
            if value == case.category:  # the field that names the kind (phantom_kinds): the by-kind table already has it
                continue
            group = subgroup_label(key, value, case.status or ("anomalous" if lab.any() else "healthy"))
            if group:
                subgroups.setdefault(key, KindSummary(edges, exact_limit)).add(
                    category=group, status=case.status, scores=s, labels=lab, counts=headline_counts, dice=row["dice"],
                    volume_score=row["volume_score"], lesions=(int(les.detected.size), int(les.detected.sum()), les.n_pred, les.n_pred_hits),
                    fp_components=les.n_fp,
                )
        row["category"] = case.category
        row.update({f"meta:{k}": v for k, v in case.metadata.items()})
        per_volume.append(row)
    return PassFigures(acc.curve(), pooled, per_threshold_rows, lesions, boxes, per_volume, in_voxels,
                       np.asarray(test_scores), np.asarray(test_labels, dtype=bool), store, kinds, subgroups)


def subgroup_label(key: str, value: str, status: str) -> str:
    """A test volume's subgroup for one metadata field: its value (ages in bins, :data:`volad.data.participants.AGE_BINS`)
    and whether it is healthy or lesioned, which are reported apart (FPR for one, AUPRC and Dice for the other); ``""`` when unknown."""
    value = age_bin(value) if key == "age" else str(value).strip()
    if not value:
        return ""
    return f"{value} · {'lesioned' if status == 'anomalous' else 'healthy'}"
