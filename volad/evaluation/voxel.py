"""Voxel-level metrics with bounded memory.

:class:`ScoreAccumulator` collects (score, label) pairs over many volumes. It is
exact while the total stays under ``exact_limit`` voxels; past it, it switches to
a fixed-width histogram of ``bins`` bins per class whose range doubles as needed
(pairs of bins merge), so memory stays constant for hundreds of full-resolution
volumes. AUROC, average precision (AUPRC) and the Dice-versus-threshold curve
are computed from it: exactly, or at bin resolution (the report says which).

Average precision follows scikit-learn's definition (step-wise, no
interpolation): ``AP = Σ_n (R_n − R_{n−1}) P_n`` over distinct thresholds; the
MOOD challenge pools all voxels of all cases into one AP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def curve_from_sorted(scores_desc: np.ndarray, labels_desc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative TP/FP at each distinct threshold (descending), like sklearn."""
    if scores_desc.size == 0:
        empty = np.zeros(0, dtype=np.float64)
        return empty, empty, empty
    distinct = np.where(np.diff(scores_desc))[0]
    idx = np.r_[distinct, labels_desc.size - 1]
    tps = np.cumsum(labels_desc)[idx]
    fps = 1 + idx - tps
    return tps.astype(np.float64), fps.astype(np.float64), scores_desc[idx]


def ap_auroc(tps: np.ndarray, fps: np.ndarray) -> tuple[float, float]:
    P, N = tps[-1] if tps.size else 0.0, fps[-1] if fps.size else 0.0
    ap = float("nan")
    if P > 0:
        precision = tps / np.maximum(tps + fps, 1e-12)
        recall = tps / P
        ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    auroc = float("nan")
    if P > 0 and N > 0:
        tpr = np.r_[0.0, tps / P]
        fpr = np.r_[0.0, fps / N]
        auroc = float(np.trapezoid(tpr, fpr))
    return ap, auroc


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact average precision (NaN without positives)."""
    order = np.argsort(-scores, kind="mergesort")
    tps, fps, _ = curve_from_sorted(scores[order], labels[order].astype(np.float64))
    return ap_auroc(tps, fps)[0]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact area under the ROC curve (NaN without both classes)."""
    order = np.argsort(-scores, kind="mergesort")
    tps, fps, _ = curve_from_sorted(scores[order], labels[order].astype(np.float64))
    return ap_auroc(tps, fps)[1]


@dataclass
class Curve:
    """Cumulative counts at decreasing thresholds: predicting ``score >= thresholds[i]``."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    positives: float
    negatives: float
    exact: bool

    @property
    def fn(self) -> np.ndarray:
        return self.positives - self.tp

    def dice(self) -> np.ndarray:
        return 2 * self.tp / np.maximum(2 * self.tp + self.fp + self.fn, 1e-12)

    def ap_auroc(self) -> tuple[float, float]:
        return ap_auroc(self.tp, self.fp)

    def best_dice(self) -> tuple[float, float]:
        """(threshold, Dice) at the threshold with the highest Dice."""
        d = self.dice()
        if d.size == 0:
            return float("nan"), float("nan")
        i = int(np.nanargmax(d))
        return float(self.thresholds[i]), float(d[i])

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        return np.r_[0.0, self.fp / max(self.negatives, 1)], np.r_[0.0, self.tp / max(self.positives, 1)]

    def pr(self) -> tuple[np.ndarray, np.ndarray]:
        return self.tp / max(self.positives, 1), self.tp / np.maximum(self.tp + self.fp, 1e-12)


class ScoreAccumulator:
    """Pooled voxel scores and labels; exact up to ``exact_limit`` voxels, binned beyond.

    Args:
        exact_limit: Voxels kept exactly before switching to histograms.
        bins: Histogram bins per class once binned.
    """

    def __init__(self, exact_limit: int = 30_000_000, bins: int = 1 << 16):
        self.exact_limit = int(exact_limit)
        self.bins = int(bins)
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._n = 0
        self.hist: np.ndarray | None = None  # (2, bins): negatives, positives
        self.lo = 0.0
        self.width = 0.0

    @property
    def exact(self) -> bool:
        return self.hist is None

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        scores = np.asarray(scores, dtype=np.float32).ravel()
        labels = np.asarray(labels, dtype=bool).ravel()
        if self.hist is None:
            self._scores.append(scores)
            self._labels.append(labels)
            self._n += scores.size
            if self._n > self.exact_limit:
                s, lab = np.concatenate(self._scores), np.concatenate(self._labels)
                self._scores, self._labels = [], []
                self._init_hist(float(s.min()), float(s.max()))
                self._add_hist(s, lab)
        else:
            self._add_hist(scores, labels)

    def _init_hist(self, lo: float, hi: float) -> None:
        self.hist = np.zeros((2, self.bins), dtype=np.int64)
        self.lo = lo
        self.width = max(hi - lo, 1e-6) / self.bins * (1 + 1e-6)

    def _grow(self, lo: float, hi: float) -> None:
        assert self.hist is not None
        while lo < self.lo or hi >= self.lo + self.width * self.bins:
            merged = self.hist.reshape(2, self.bins // 2, 2).sum(-1)
            self.hist = np.zeros_like(self.hist)
            if lo < self.lo:  # extend downwards: old range becomes the upper half
                self.hist[:, self.bins // 2 :] = merged
                self.lo -= self.width * self.bins
            else:
                self.hist[:, : self.bins // 2] = merged
            self.width *= 2

    def _add_hist(self, scores: np.ndarray, labels: np.ndarray) -> None:
        if scores.size == 0:
            return
        self._grow(float(scores.min()), float(scores.max()))
        idx = np.clip(((scores - self.lo) / self.width).astype(np.int64), 0, self.bins - 1)
        self.hist[0] += np.bincount(idx[~labels], minlength=self.bins)
        self.hist[1] += np.bincount(idx[labels], minlength=self.bins)

    def curve(self) -> Curve:
        if self.hist is None:
            s = np.concatenate(self._scores) if self._scores else np.zeros(0, np.float32)
            lab = np.concatenate(self._labels) if self._labels else np.zeros(0, bool)
            order = np.argsort(-s, kind="mergesort")
            tps, fps, thr = curve_from_sorted(s[order], lab[order].astype(np.float64))
            return Curve(thr.astype(np.float64), tps, fps, float(lab.sum()), float((~lab).sum()), exact=True)
        neg, pos = self.hist[0][::-1], self.hist[1][::-1]
        keep = (neg + pos) > 0
        tps, fps = np.cumsum(pos)[keep].astype(np.float64), np.cumsum(neg)[keep].astype(np.float64)
        edges = (self.lo + self.width * np.arange(self.bins))[::-1][keep]
        return Curve(edges, tps, fps, float(pos.sum()), float(neg.sum()), exact=False)


def confusion(pred: np.ndarray, label: np.ndarray) -> dict[str, int]:
    """Voxel confusion counts of two boolean arrays."""
    pred, label = pred.astype(bool), label.astype(bool)
    tp = int(np.count_nonzero(pred & label))
    fp = int(np.count_nonzero(pred & ~label))
    fn = int(np.count_nonzero(~pred & label))
    tn = int(pred.size - tp - fp - fn)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def scores_from_counts(c: dict[str, int]) -> dict[str, float]:
    """Dice, IoU, precision, recall and FPR from confusion counts.

    Dice and IoU are 1 when prediction and label are both empty (nothing to find,
    nothing found), following MONAI's ``ignore_empty=False`` convention.
    """
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    nan = float("nan")
    empty = tp + fp + fn == 0
    return {
        "dice": 1.0 if empty else 2 * tp / (2 * tp + fp + fn),
        "iou": 1.0 if empty else tp / (tp + fp + fn),
        "precision": tp / (tp + fp) if tp + fp else nan,
        "recall": tp / (tp + fn) if tp + fn else nan,
        "fpr": fp / (fp + tn) if fp + tn else nan,
    }
