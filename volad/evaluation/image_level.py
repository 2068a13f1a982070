"""Image-level (per picture or per volume) detection metrics.

The threshold for ACC/F1 is the one with the highest F1 on a labelled
validation split (the 2D protocol of the seed review, REFERENCE.md §3), never
one chosen on the test split.
"""

from __future__ import annotations

import numpy as np

from volad.evaluation.voxel import auroc, average_precision, curve_from_sorted


def max_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Threshold ``t`` (anomalous when ``score >= t``) with the highest F1, and that F1.

    Raises:
        ValueError: no anomalous case among ``labels``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        raise ValueError("max-F1 threshold needs at least one anomalous case")
    order = np.argsort(-scores, kind="mergesort")
    tps, fps, thresholds = curve_from_sorted(scores[order], labels[order])
    fns = labels.sum() - tps
    f1 = 2 * tps / np.maximum(2 * tps + fps + fns, 1e-12)
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def detection_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """AUROC, AP and the confusion-matrix metrics at ``threshold`` (``score >= t`` is anomalous)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    pred = scores >= threshold
    tp, fp = int((pred & labels).sum()), int((pred & ~labels).sum())
    fn, tn = int((~pred & labels).sum()), int((~pred & ~labels).sum())
    n = max(tp + fp + fn + tn, 1)
    return {
        "auroc": auroc(scores, labels),
        "ap": average_precision(scores, labels),
        "acc": (tp + tn) / n,
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
        "specificity": tn / max(tn + fp, 1),
        "n_normal": int((~labels).sum()),
        "n_anomalous": int(labels.sum()),
    }
