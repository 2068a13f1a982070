"""How a voxel threshold is chosen, and the record of that choice.

Three ways, as in the literature (REFERENCE.md §3), each recorded in reports:

1. ``val_dice``: the threshold with the highest pooled Dice on a labelled split
   disjoint from the test split;
2. ``healthy_fpr@q``: the lowest threshold at which at most a fraction ``q`` of
   brain voxels of healthy scans (scans without lesion voxels) fire;
3. the oracle: the best Dice threshold on the test set itself (⌈Dice⌉), always
   labelled oracle and never used for anything else.

A fixed user threshold is recorded as ``fixed``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from volad.errors import VoladConfigError
from volad.evaluation.voxel import Curve


@dataclass
class ThresholdChoice:
    """One threshold and how it was chosen.

    Attributes:
        name: Key in reports (``val_dice``, ``healthy_fpr@0.05``, ``fixed``, ``oracle``).
        value: The threshold (``score >= value`` is anomalous).
        mode: ``max_dice_on_labelled_split``, ``fpr_on_healthy_scans``, ``user`` or ``oracle_on_test``.
        chosen_on: Split that chose it (``user`` or ``test (oracle)`` otherwise).
        chosen_on_dataset: Dataset of that split.
        n_subjects: Volumes that contributed.
        details: Mode-specific figures (Dice or FPR reached on the choosing split, exactness).
    """

    name: str
    value: float
    mode: str
    chosen_on: str
    chosen_on_dataset: str = ""
    n_subjects: int = 0
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("details"))
        return d


def parse_mode(mode: str) -> tuple[str, float | None]:
    """``"val_dice"`` → (``val_dice``, None); ``"healthy_fpr@0.05"`` → (``healthy_fpr``, 0.05)."""
    if mode == "val_dice" or mode == "fixed":
        return mode, None
    if mode.startswith("healthy_fpr@"):
        q = float(mode.split("@", 1)[1])
        if not 0 < q < 1:
            raise VoladConfigError(f"threshold mode {mode!r}: the false-positive rate must be in (0, 1)")
        return "healthy_fpr", q
    raise VoladConfigError(f"unknown threshold mode {mode!r} (val_dice, healthy_fpr@<rate>, fixed)")


def max_dice(curve: Curve) -> tuple[float, float]:
    """(threshold, Dice) with the highest pooled Dice on a labelled curve."""
    if curve.positives == 0:
        raise VoladConfigError("no lesion voxels: a threshold cannot be chosen by Dice")
    return curve.best_dice()


def at_fpr(healthy: Curve, rate: float) -> tuple[float, float]:
    """Lowest threshold whose false-positive rate on healthy voxels is at most ``rate``.

    Args:
        healthy: Curve of healthy brain voxels only (all negatives).
        rate: Target false-positive rate.

    Returns:
        (threshold, FPR reached there). When even the highest score exceeds the
        target, the threshold is just above the maximum (nothing fires).
    """
    if healthy.negatives == 0:
        raise VoladConfigError("no healthy voxels: a threshold cannot be chosen by false-positive rate")
    fpr = healthy.fp / healthy.negatives
    ok = np.nonzero(fpr <= rate)[0]
    if ok.size == 0:
        top = float(healthy.thresholds[0])
        return float(np.nextafter(np.float32(top), np.float32(np.inf))), 0.0
    i = int(ok[-1])
    return float(healthy.thresholds[i]), float(fpr[i])
