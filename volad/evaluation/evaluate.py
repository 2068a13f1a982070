"""Evaluate a folder of anomaly maps against a dataset's labels, honestly.

The threshold is chosen on a labelled split that is disjoint from the test
split (maximum pooled Dice there), or given by the user, and the report says
which. The best threshold on the test set itself is reported only as the
oracle ⌈Dice⌉, labelled so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from volad.data.manifest import load_dataset
from volad.data.preprocessing import EnsureMasks
from volad.errors import VoladConfigError, VoladDataError
from volad.evaluation.report import write_report
from volad.evaluation.voxel import ScoreAccumulator, auroc, average_precision, confusion, scores_from_counts
from volad.scoring import PostProcessing, binarize, postprocess, volume_score

log = logging.getLogger("volad.evaluation")


@dataclass
class LoadedCase:
    subject_id: str
    anomaly_map: np.ndarray
    label: np.ndarray
    brain: np.ndarray


class Evaluator:
    """Compute voxel metrics for the maps written by an inference run.

    Args:
        output_dir: Run folder holding ``maps/index.json``; the report goes here.
        dataset: Manifest name or path.
        data_root: Data folder (``None``: volad's cache for generated datasets).
        test_split: Split to report on.
        threshold_split: Labelled split that picks the threshold (must not share
            subjects with ``test_split``); ignored when ``threshold`` is given.
        threshold: A fixed threshold instead (recorded as user-given).
        erosion_mm: Brain-mask erosion before scoring.
        median_mm: Median filter window.
        min_component_voxels: Connected components smaller than this are dropped after thresholding.
        volume_score_mode: ``top1``, ``max`` or ``mean`` for the per-volume score.
        exact_limit: Voxels kept exactly for AUROC/AUPRC before histogram binning.
        method_name: Name written in the report (default: from the maps' index).
    """

    def __init__(
        self,
        *,
        output_dir: str = "runs/ae3d",
        dataset: str = "phantom",
        data_root: str | None = None,
        test_split: str = "test",
        threshold_split: str = "val",
        threshold: float | None = None,
        erosion_mm: float = 2.0,
        median_mm: float = 5.0,
        min_component_voxels: int = 0,
        volume_score_mode: str = "top1",
        exact_limit: int = 30_000_000,
        method_name: str | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.maps_dir = self.output_dir / "maps"
        index_path = self.maps_dir / "index.json"
        if not index_path.is_file():
            raise VoladConfigError(f"{index_path}: no maps index; run the bundle's inference.json first (same --output_dir)")
        self.index = json.loads(index_path.read_text())
        self.dataset = load_dataset(dataset, data_root, self.index.get("contrasts"))
        if self.dataset.manifest.get("image_level"):
            raise VoladConfigError(
                f"dataset {self.dataset.name!r} has one label per picture, not voxel labels; "
                "evaluate it with volad protocol (image-level AUROC/ACC)"
            )
        self.test_split, self.threshold_split, self.threshold = test_split, threshold_split, threshold
        self.post = PostProcessing(erosion_mm=erosion_mm, median_mm=median_mm, min_component_voxels=min_component_voxels)
        self.volume_score_mode = volume_score_mode
        self.exact_limit = exact_limit
        self.method_name = method_name or str(self.index.get("method", {}).get("kind", "method"))
        self.prepare = EnsureMasks()

    def _entries(self, split: str) -> list[dict]:
        entries = [e for e in self.index["subjects"] if e["split"] == split]
        expected = set(self.dataset.split_ids(split))
        missing = sorted(expected - {e["subject_id"] for e in entries})
        if missing:
            raise VoladDataError(self.maps_dir, f"no maps for {len(missing)} {split} subjects (e.g. {missing[0]}); run inference with this split")
        return entries

    def _load(self, entry: dict, split: str) -> tuple[LoadedCase, tuple[float, ...]]:
        subject = self.prepare(self.dataset.subject(entry["subject_id"], split))
        path = self.maps_dir / entry["anomaly_map"]
        if not path.is_file():
            raise VoladDataError(path, "anomaly map not found")
        img = nib.load(str(path))
        amap = np.asarray(img.dataobj, dtype=np.float32)
        ref = subject["image"]
        if amap.shape != tuple(ref.spatial_shape) or not np.allclose(img.affine, ref.affine, atol=1e-3):
            raise VoladDataError(path, f"map grid {amap.shape} does not match the input {tuple(ref.spatial_shape)} of {ref.path}")
        if not np.isfinite(amap).all():
            raise VoladDataError(path, "anomaly map contains NaN or Inf")
        brain = subject["brain_mask"].numpy()[0].astype(bool)
        label = subject["label"].numpy()[0].astype(bool)
        spacing = tuple(float(s) for s in ref.spacing)
        return LoadedCase(entry["subject_id"], postprocess(amap, brain, spacing, self.post), label, brain), spacing

    def _choose_threshold(self) -> dict:
        if self.threshold is not None:
            return {"value": float(self.threshold), "chosen_on": "user", "mode": "fixed"}
        if self.threshold_split == self.test_split:
            raise VoladConfigError("the threshold split must differ from the test split (use the oracle ⌈Dice⌉ for test-set thresholds)")
        overlap = set(self.dataset.split_ids(self.threshold_split)) & set(self.dataset.split_ids(self.test_split))
        if overlap:
            raise VoladConfigError(
                f"threshold split {self.threshold_split!r} shares {len(overlap)} subjects with test split {self.test_split!r} "
                f"(e.g. {sorted(overlap)[0]}); a threshold must come from data disjoint from the test set"
            )
        acc = ScoreAccumulator(exact_limit=self.exact_limit)
        entries = self._entries(self.threshold_split)
        for e in tqdm(entries, desc=f"threshold on {self.threshold_split}", disable=None):
            case, _ = self._load(e, self.threshold_split)
            acc.add(case.anomaly_map[case.brain], case.label[case.brain])
        curve = acc.curve()
        if curve.positives == 0:
            raise VoladConfigError(f"split {self.threshold_split!r} has no lesion voxels: cannot choose a threshold by Dice; pass --threshold")
        value, dice = curve.best_dice()
        return {
            "value": value,
            "chosen_on": self.threshold_split,
            "chosen_on_dataset": self.dataset.name,
            "mode": "max_dice_on_labelled_split",
            "n_subjects": len(entries),
            "dice_on_split": dice,
            "exact": curve.exact,
        }

    def run(self) -> Path:
        """Write ``report.json``, ``report.md`` and curve plots into the run folder."""
        threshold = self._choose_threshold()
        t = threshold["value"]
        acc = ScoreAccumulator(exact_limit=self.exact_limit)
        pooled = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
        per_volume = []
        in_voxels: list[dict[str, int]] = []
        entries = self._entries(self.test_split)
        for e in tqdm(entries, desc=f"evaluate {self.test_split}", disable=None):
            case, spacing = self._load(e, self.test_split)
            if self.post.voxels(spacing) not in in_voxels:
                in_voxels.append(self.post.voxels(spacing))
            s, lab = case.anomaly_map[case.brain], case.label[case.brain]
            acc.add(s, lab)
            pred = binarize(case.anomaly_map, t, self.post.min_component_voxels)[case.brain]
            c = confusion(pred, lab)
            for k in pooled:
                pooled[k] += c[k]
            row = {"subject_id": case.subject_id, "lesion_voxels": int(lab.sum()), "predicted_voxels": int(pred.sum())}
            row.update(scores_from_counts(c))
            row["auroc"] = auroc(s, lab)
            row["auprc"] = average_precision(s, lab)
            row["volume_score"] = volume_score(case.anomaly_map, case.brain, self.volume_score_mode)
            per_volume.append(row)
        curve = acc.curve()
        ap, roc = curve.ap_auroc()
        oracle_t, oracle_dice = curve.best_dice()
        voxel = scores_from_counts(pooled)
        voxel.update(auroc=roc, auprc=ap, dice_oracle=oracle_dice, threshold_oracle=oracle_t, exact=curve.exact)
        lesioned = [r for r in per_volume if r["lesion_voxels"] > 0]
        mean = lambda rows, k: float(np.nanmean([r[k] for r in rows])) if rows else float("nan")  # noqa: E731
        report = {
            "method": self.method_name,
            "method_hparams": self.index.get("method", {}),
            "checkpoint": self.index.get("checkpoint", {}),
            "dataset": self.dataset.name,
            "trained_on": self.index.get("checkpoint", {}).get("data", {}),
            "contrasts": self.dataset.contrasts,
            "split": self.test_split,
            "n_subjects": len(per_volume),
            "n_lesioned": len(lesioned),
            "threshold": threshold,
            "postprocessing": {**self.post.as_dict(), **(in_voxels[0] if len(in_voxels) == 1 else {"in_voxels": in_voxels})},
            "voxel": voxel,
            "per_volume_mean": {
                "note": "means over lesioned test volumes (AUROC/AUPRC undefined without lesion voxels)",
                **{k: mean(lesioned, k) for k in ("dice", "iou", "precision", "recall", "auroc", "auprc")},
                "fpr_healthy_volumes": mean([r for r in per_volume if r["lesion_voxels"] == 0], "fpr"),
            },
            "per_volume": per_volume,
        }
        path = write_report(report, curve, self.output_dir)
        print(f"volad: report written to {path} (Dice {voxel['dice']:.3f} at threshold from {threshold['chosen_on']}, AUPRC {ap:.3f})")
        return path
