"""How a voxel threshold is chosen, and the record of that choice.

Three ways, as in the literature (REFERENCE.md §3), each recorded in reports:

1. ``val_dice``: the threshold with the highest pooled Dice on a labelled split
   disjoint from the test split;
2. ``healthy_fpr@q``: the lowest threshold at which at most a fraction ``q`` of
   brain voxels of healthy scans (scans without lesion voxels) fire;
3. the oracle: the best Dice threshold on the test set itself (⌈Dice⌉), always
   labelled oracle and never used for anything else.

A fixed user threshold is recorded as ``fixed``. :class:`ThresholdRule` reads the
choosing splits once and makes every choice an evaluation asks for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from volad.errors import VoladConfigError
from volad.evaluation.postprocess import volume_score
from volad.evaluation.voxel import Curve, ScoreAccumulator
from volad.utils.progress import progress

if TYPE_CHECKING:
    from volad.data.manifest import Dataset
    from volad.evaluation.cases import MapCases


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


@dataclass
class ThresholdRule:
    """How an evaluation chooses its thresholds.

    Attributes:
        modes: Threshold modes, the headline first (``val_dice``, ``healthy_fpr@<rate>``, ``fixed``).
        dataset: The test dataset, whose ``threshold_split`` (labelled) chooses by Dice.
        threshold_split: The labelled split that chooses by Dice.
        healthy_split: The split whose lesion-free scans set ``healthy_fpr`` thresholds.
        healthy_dataset: Its dataset (``dataset`` itself, or e.g. the training dataset in cross-dataset runs).
        fixed: A threshold given by the user (mode ``fixed``).
    """

    modes: list[str]
    dataset: "Dataset"
    threshold_split: str
    healthy_split: str
    healthy_dataset: "Dataset"
    fixed: float | None = None

    def read(self, cases: MapCases, *, volume_score_mode: str, boxes: bool, seed: int, exact_limit: int) -> dict:
        """Read the threshold split (and the healthy scans) once; return what choosing needs (``seen``)."""
        out = {"labelled": None, "healthy": None, "n_threshold": 0, "n_healthy": 0, "volume_scores": [], "volume_labels": [], "sample": []}
        needs_split = any(parse_mode(m)[0] in ("val_dice", "healthy_fpr") for m in self.modes) or boxes
        if not needs_split:
            return out
        rng = np.random.default_rng(seed)
        cases.check_disjoint(self.threshold_split, cases.dataset, "threshold")
        labelled, healthy = ScoreAccumulator(exact_limit=exact_limit), ScoreAccumulator(exact_limit=exact_limit)
        healthy_here = self.healthy_dataset is cases.dataset and self.healthy_split == self.threshold_split
        entries = cases.entries(self.threshold_split)
        for e in progress(entries, f"thresholds on {self.threshold_split}"):
            case = cases.load(e, self.threshold_split)
            s, lab = case.anomaly_map[case.brain], case.label[case.brain]
            labelled.add(s, lab)
            out["volume_scores"].append(volume_score(case.anomaly_map, case.brain, volume_score_mode))
            out["volume_labels"].append(bool(lab.any()))
            out["sample"].append(rng.choice(s, size=min(s.size, 20_000), replace=False) if s.size else s)
            if healthy_here and not lab.any():
                healthy.add(s, lab)
                out["n_healthy"] += 1
        out["n_threshold"] = len(entries)
        if not healthy_here:
            cases.check_disjoint(self.healthy_split, self.healthy_dataset, "healthy")
            h_entries = [e for e in cases.index["subjects"] if e["split"] == self.healthy_split and e["subject_id"] in set(self.healthy_dataset.split_ids(self.healthy_split))]
            for e in progress(h_entries, f"healthy scans of {self.healthy_dataset.name}/{self.healthy_split}"):
                case = cases.load(e, self.healthy_split, self.healthy_dataset)
                if not case.label.any():
                    healthy.add(case.anomaly_map[case.brain], case.label[case.brain])
                    out["n_healthy"] += 1
        out["labelled"], out["healthy"] = labelled.curve(), healthy.curve()
        return out

    def choose(self, mode: str, seen: dict) -> ThresholdChoice:
        kind, rate = parse_mode(mode)
        if kind == "fixed":
            return ThresholdChoice("fixed", float(self.fixed), "user", "user")
        if kind == "val_dice":
            if seen["labelled"].positives == 0:
                raise VoladConfigError(
                    f"split {self.threshold_split!r} of dataset {self.dataset.name!r} has no lesion voxels "
                    f"({seen['n_threshold']} subjects): a threshold cannot be chosen by Dice there; "
                    "pass --threshold_modes healthy_fpr@0.01 or a labelled --threshold_split"
                )
            t, d = max_dice(seen["labelled"])
            return ThresholdChoice(
                mode, t, "max_dice_on_labelled_split", self.threshold_split, self.dataset.name, seen["n_threshold"],
                {"dice_on_split": d, "exact": seen["labelled"].exact},
            )
        if seen["n_healthy"] == 0:
            raise VoladConfigError(
                f"no healthy (lesion-free) scans in split {self.healthy_split!r} of {self.healthy_dataset.name}: "
                "pass --healthy_dataset/--healthy_split (e.g. the training dataset's val split) or another threshold mode"
            )
        t, fpr = at_fpr(seen["healthy"], rate)
        return ThresholdChoice(
            mode, t, "fpr_on_healthy_scans", self.healthy_split, self.healthy_dataset.name, seen["n_healthy"],
            {"target_fpr": rate, "fpr_on_split": fpr, "exact": seen["healthy"].exact},
        )

    def choose_all(self, seen: dict) -> tuple[dict[str, ThresholdChoice], dict[str, str]]:
        """Thresholds by mode (headline first) and the reasons for modes skipped."""
        chosen, skipped = {}, {}
        for i, mode in enumerate(self.modes):
            try:
                chosen[mode] = self.choose(mode, seen)
            except VoladConfigError as exc:
                if i == 0:
                    raise
                skipped[mode] = str(exc)
        return chosen, skipped
