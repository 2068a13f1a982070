"""Figures by kind: each lesion kind, and healthy scans clean or with artefacts, reported on its own.

A dataset's subjects carry a category (the manifest's ``health`` entry: the
harder benchmark's lesion kind, ``healthy`` or ``artefact``; BraTS, ATLAS and
MSLUB have one kind each). No single method is best on every kind, and a pooled
figure hides a method that is blind to one, so the report gives, per kind:

* **lesion kinds** (status ``anomalous``): voxel AUPRC and AUROC over the brain
  voxels of that kind's test volumes, Dice at the headline threshold (chosen on
  the validation split), and the oracle ⌈Dice⌉ (best threshold on that kind's
  own test voxels, labelled so);
* **healthy kinds** (status ``healthy``): the voxel false-positive rate at the
  headline threshold, the share of volumes with any predicted voxel, and
  false-positive components per volume;

each with percentile bootstrap intervals over the kind's volumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from volad.evaluation.bootstrap import BootstrapStore
from volad.evaluation.voxel import ScoreAccumulator


@dataclass
class _Kind:
    status: str
    scores: ScoreAccumulator
    store: BootstrapStore
    counts: dict[str, int] = field(default_factory=lambda: {"tp": 0, "fp": 0, "fn": 0, "tn": 0})
    volumes: list[tuple[int, int, int]] = field(default_factory=list)  # fp, tn, fp components per volume


class KindSummary:
    """Accumulates test volumes by category; :meth:`as_dict` gives the per-kind figures.

    Args:
        edges: Score bin edges shared with the report's bootstrap (quantiles of the threshold split).
        exact_limit: Voxels kept exactly for AUROC/AUPRC before histogram binning.
    """

    def __init__(self, edges: np.ndarray, exact_limit: int = 30_000_000):
        self.edges, self.exact_limit = edges, exact_limit
        self.kinds: dict[str, _Kind] = {}

    def add(self, *, category: str, status: str, scores: np.ndarray, labels: np.ndarray, counts: dict, dice: float,
            volume_score: float, lesions: tuple[int, int, int, int], fp_components: int) -> None:
        """One test volume: its brain-voxel scores and labels, and its figures at the headline threshold."""
        if not category:
            return
        kind = self.kinds.setdefault(category, _Kind(status or ("anomalous" if labels.any() else "healthy"),
                                                     ScoreAccumulator(exact_limit=self.exact_limit), BootstrapStore(self.edges)))
        kind.scores.add(scores, labels)
        kind.store.add(scores=scores, labels=labels, counts=counts, dice=dice, volume_score=volume_score, lesions=lesions)
        for k in kind.counts:
            kind.counts[k] += int(counts[k])
        kind.volumes.append((int(counts["fp"]), int(counts["tn"]), int(fp_components)))

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def as_dict(self, n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
        """Per-kind figures (see the module notes), lesion kinds first."""
        out: dict[str, dict] = {}
        order = sorted(self.kinds, key=lambda k: (self.kinds[k].status != "anomalous", k))
        for name in order:
            kind = self.kinds[name]
            c = kind.counts
            row: dict = {"status": kind.status, "n": len(kind.volumes)}
            if kind.status == "anomalous" and c["tp"] + c["fn"] > 0:
                curve = kind.scores.curve()
                ap, roc = curve.ap_auroc()
                oracle_t, oracle_dice = curve.best_dice()
                row.update(
                    auprc=ap, auroc=roc, dice=2 * c["tp"] / max(2 * c["tp"] + c["fp"] + c["fn"], 1),
                    dice_oracle=oracle_dice, threshold_oracle=oracle_t,
                )
                ci = kind.store.intervals(n_boot, seed) if n_boot else {}
                row["ci95"] = {k: ci[k] for k in ("auprc", "auroc", "dice") if k in ci}
            else:
                row.update(
                    fpr=c["fp"] / max(c["fp"] + c["tn"], 1),
                    flagged_volumes=float(np.mean([fp > 0 for fp, _, _ in kind.volumes])),
                    fp_components_per_volume=float(np.mean([n for _, _, n in kind.volumes])),
                )
                row["ci95"] = {"fpr": _fpr_interval(kind.volumes, n_boot, seed)} if n_boot and len(kind.volumes) > 1 else {}
            out[name] = row
        return out


def _fpr_interval(volumes: list[tuple[int, int, int]], n_boot: int, seed: int, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the pooled voxel FPR over volumes."""
    rng = np.random.default_rng(seed)
    arr = np.asarray([(fp, tn) for fp, tn, _ in volumes], dtype=np.float64)
    n = len(arr)
    weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)]).astype(np.float64)
    fp, tn = (weights @ arr).T
    rates = fp / np.maximum(fp + tn, 1)
    alpha = (1 - level) / 2
    return [float(np.quantile(rates, alpha)), float(np.quantile(rates, 1 - alpha))]
