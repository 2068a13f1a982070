"""Bootstrap 95 % intervals over test volumes for the headline metrics.

Volumes are resampled with replacement (percentile intervals, ``n_boot``
replicates, fixed seed). Everything a replicate needs is kept per volume, so
memory grows with the number of volumes, not voxels:

* confusion counts at the headline threshold → pooled Dice, IoU;
* per-volume Dice → mean Dice over lesioned volumes;
* a histogram of brain-voxel scores per class on shared quantile edges (from the
  threshold split) → voxel AUROC and AUPRC. Interval *widths* therefore come
  from binned curves; the point estimates in reports stay the exact ones;
* the volume score and whether the volume has a lesion → volume-level AUROC;
* lesion counts → lesion sensitivity and lesion-wise F1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from volad.evaluation.voxel import ap_auroc, auroc


def quantile_edges(sample: np.ndarray, n_bins: int = 2048) -> np.ndarray:
    """Increasing bin edges at quantiles of a score sample (open-ended at both ends)."""
    sample = np.asarray(sample, dtype=np.float64)
    if sample.size == 0:
        return np.array([0.0])
    edges = np.unique(np.quantile(sample, np.linspace(0, 1, n_bins + 1)[1:-1]))
    return edges


@dataclass
class BootstrapStore:
    """Per-volume sufficient statistics for resampling."""

    edges: np.ndarray
    counts: list[tuple[int, int, int]] = field(default_factory=list)  # tp, fp, fn
    dice: list[float] = field(default_factory=list)
    lesioned: list[bool] = field(default_factory=list)
    hist: list[np.ndarray] = field(default_factory=list)  # (2, bins): healthy voxels, lesion voxels
    volume_score: list[float] = field(default_factory=list)
    lesions: list[tuple[int, int, int, int]] = field(default_factory=list)  # n lesions, detected, predicted, predicted hits

    def add(self, *, scores: np.ndarray, labels: np.ndarray, counts: dict, dice: float, volume_score: float, lesions: tuple[int, int, int, int]) -> None:
        idx = np.searchsorted(self.edges, scores, side="right")
        bins = self.edges.size + 1
        h = np.stack([np.bincount(idx[~labels], minlength=bins), np.bincount(idx[labels], minlength=bins)])
        self.hist.append(h.astype(np.int64))
        self.counts.append((counts["tp"], counts["fp"], counts["fn"]))
        self.dice.append(dice)
        self.lesioned.append(bool(labels.any()))
        self.volume_score.append(volume_score)
        self.lesions.append(lesions)

    def intervals(self, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
        """Percentile intervals of each metric; NaN where a replicate leaves a metric undefined too often."""
        n = len(self.counts)
        if n < 2:
            return {}
        rng = np.random.default_rng(seed)
        weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)]).astype(np.float64)
        counts = np.asarray(self.counts, dtype=np.float64)
        tp, fp, fn = (weights @ counts).T
        out: dict[str, np.ndarray] = {
            "dice": 2 * tp / np.maximum(2 * tp + fp + fn, 1e-12),
            "iou": tp / np.maximum(tp + fp + fn, 1e-12),
        }
        les = np.asarray(self.lesioned)
        dice = np.asarray(self.dice, dtype=np.float64)
        w_les = weights[:, les]
        with np.errstate(invalid="ignore", divide="ignore"):
            out["per_volume_dice"] = (w_les @ dice[les]) / w_les.sum(1)
        hist = np.stack(self.hist).reshape(n, -1).astype(np.float64)
        summed = (weights @ hist).reshape(n_boot, 2, -1)
        ap, roc = np.empty(n_boot), np.empty(n_boot)
        for b in range(n_boot):
            neg, pos = summed[b, 0][::-1], summed[b, 1][::-1]
            keep = (neg + pos) > 0
            ap[b], roc[b] = ap_auroc(np.cumsum(pos)[keep], np.cumsum(neg)[keep])
        out["auprc"], out["auroc"] = ap, roc
        scores = np.asarray(self.volume_score, dtype=np.float64)
        if les.any() and (~les).any():
            vol = np.empty(n_boot)
            for b in range(n_boot):
                idx = np.repeat(np.arange(n), weights[b].astype(int))
                vol[b] = auroc(scores[idx], les[idx])
            out["volume_auroc"] = vol
        lcounts = np.asarray(self.lesions, dtype=np.float64)
        if lcounts[:, 0].sum() > 0:
            n_les, det, n_pred, hits = (weights @ lcounts).T
            with np.errstate(invalid="ignore", divide="ignore"):
                sens = det / n_les
                prec = np.where(n_pred > 0, hits / np.maximum(n_pred, 1), np.nan)
                f1 = np.where(n_pred > 0, 2 * prec * sens / np.maximum(prec + sens, 1e-12), 0.0)
            out["lesion_sensitivity"], out["lesion_f1"] = sens, f1
        alpha = (1 - level) / 2
        result = {}
        for k, v in out.items():
            v = v[np.isfinite(v)]
            result[k] = [float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))] if v.size >= 0.9 * n_boot else [float("nan")] * 2
        return result
