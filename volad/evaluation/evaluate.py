"""Evaluate a folder of anomaly maps against a dataset's labels, honestly.

One pass over the threshold split chooses the thresholds (max Dice on that
labelled split; a fixed false-positive rate on its healthy scans), one pass over
the test split measures everything at once:

* voxel level: Dice, IoU, precision, recall, FPR at each threshold, pooled over
  all voxels and averaged per volume; AUROC and AUPRC (MOOD-style, one AP over
  all brain voxels of all cases); the oracle ⌈Dice⌉, labelled so;
* lesion level: per-lesion sensitivity by size, false-positive components per
  volume, lesion-wise F1 (:mod:`volad.evaluation.lesions`);
* volume level: AUROC/AP of a per-volume score, ACC/F1 at the max-F1 threshold
  of the threshold split, FPR on healthy volumes;
* box hits for datasets whose labels are boxes (FastMRI+);
* bootstrap 95 % intervals over volumes (:mod:`volad.evaluation.bootstrap`).

Every threshold says which split (and dataset) chose it; a labelled split that
shares subjects with the test split is refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from volad.utils import distributed, rundir
from volad.runs.checkpoint import checkpoint_path, file_sha256, read_checkpoint
from volad.data.manifest import Dataset, load_dataset
from volad.data.preprocessing import EnsureMasks
from volad.errors import VoladConfigError, VoladDataError
from volad.evaluation import thresholds as th
from volad.evaluation.bootstrap import BootstrapStore, quantile_edges
from volad.evaluation.compare import baselines_beside
from volad.evaluation.image_level import detection_metrics, max_f1_threshold
from volad.evaluation.kinds import KindSummary
from volad.evaluation.lesions import LesionSummary, bins_from_manifest, match_lesions
from volad.evaluation.report import fmt, write_report
from volad.evaluation.tracking import report_to_handlers
from volad.evaluation.voxel import ScoreAccumulator, auroc, average_precision, confusion, scores_from_counts
from volad.io import read_map
from volad.utils.progress import progress
from volad.types import none_means_default, unset
from volad.evaluation.postprocess import PostProcessing, binarize, postprocess, volume_score

log = logging.getLogger("volad.evaluation")
REPORT_SCHEMA = "volad-report/2"


@dataclass
class LoadedCase:
    subject_id: str
    anomaly_map: np.ndarray
    label: np.ndarray
    brain: np.ndarray
    spacing: tuple[float, ...]
    category: str = ""
    status: str = ""


class Evaluator:
    """Compute voxel, lesion and volume metrics for the maps written by an inference run.

    Args:
        output_dir: Run folder; the report goes here.
        maps_dir: Folder of maps (default ``<output_dir>/maps``). With an
            ``index.json`` (written by volad inference) it is used; without one,
            maps named ``<subject>_anomaly.nii.gz`` or ``<subject>.nii.gz`` are
            matched to the dataset's split lists (maps from any tool).
        dataset: Manifest name or path of the test data (default: the index's).
        data_root: Data folder (``None``: volad's cache for generated datasets).
        test_split: Split to report on.
        threshold_split: Labelled split that picks thresholds (must not share
            subjects with ``test_split``).
        threshold_modes: Thresholds to report, the first being the headline:
            ``val_dice``, ``healthy_fpr@<rate>`` (e.g. ``healthy_fpr@0.01``).
            Later modes that cannot be computed (no healthy scans) are skipped
            with the reason recorded; the headline must work.
        threshold: A fixed threshold; becomes the headline (recorded as user-given).
        healthy_split: Split whose lesion-free scans set ``healthy_fpr``
            thresholds (default: ``threshold_split``).
        healthy_dataset: Dataset of those healthy scans (default: ``dataset``),
            e.g. the training dataset's healthy ``val`` split in cross-dataset runs.
        healthy_data_root: Its data folder.
        erosion_mm: Brain-mask erosion before scoring.
        median_mm: Median filter window.
        min_component_voxels: Connected components smaller than this are dropped after thresholding.
        volume_score_mode: ``top1``, ``max`` or ``mean`` for the per-volume score.
        lesion_overlap: Fraction of a lesion the thresholded map must cover to detect it.
        lesion_size_bins: Size bins in mm³ (default: the manifest's, else ATLAS's 71/570).
        box_fraction: A box label counts as hit when more than this fraction fires.
        box_fpr: Healthy-scan FPR that fixes the box-hit threshold.
        bootstrap: Bootstrap replicates for 95 % intervals (0 disables).
        montage_cases: Test cases drawn as overlay montages.
        exact_limit: Voxels kept exactly for AUROC/AUPRC before histogram binning.
        checkpoint: The checkpoint the maps must have been made by (``best``, ``last`` or a
            path; default: the run's own file of the name their ``index.json`` records). Maps made by another
            checkpoint, or by a file that has changed since (the run trained on), are refused.
        method_name: Name written in the report (default: the run folder's name).
        seed: Seed of the bootstrap.
        baselines: Baseline run folders to show beside this run, besides those
            found next to it (:func:`volad.evaluation.compare.baselines_beside`).
        val_handlers: Ignite handlers told the headline figures (``engine.state.metrics``)
            once the report is written (:func:`volad.evaluation.tracking.report_to_handlers`), e.g.
            MONAI's ``MLFlowHandler`` under ``--tracking mlflow``, which also gets the
            report and figures as artefacts. ``None`` entries (disabled handlers) are skipped.

    These defaults are the only ones: ``volad evaluate`` and every bundle's
    ``evaluate.json`` pass ``None`` for a setting they leave alone.
    """

    @none_means_default
    def __init__(
        self,
        *,
        output_dir: str,
        maps_dir: str | None = None,
        dataset: str | None = None,
        data_root: str | None = None,
        test_split: str = "test",
        threshold_split: str = "val",
        threshold_modes: Sequence[str] = ("val_dice", "healthy_fpr@0.01", "healthy_fpr@0.05"),
        threshold: float | None = None,
        healthy_split: str | None = None,
        healthy_dataset: str | None = None,
        healthy_data_root: str | None = None,
        erosion_mm: float = 2.0,
        median_mm: float = 5.0,
        min_component_voxels: int = 0,
        volume_score_mode: str = "top1",
        lesion_overlap: float = 0.1,
        lesion_size_bins: dict | None = None,
        box_fraction: float = 0.1,
        box_fpr: float = 0.05,
        bootstrap: int = 1000,
        montage_cases: int = 6,
        exact_limit: int = 30_000_000,
        checkpoint: str | None = None,
        method_name: str | None = None,
        seed: int = 0,
        baselines: Sequence[str] = (),
        val_handlers: Sequence | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.maps_dir = self.output_dir / "maps" if unset(maps_dir) else Path(maps_dir)
        index_path = self.maps_dir / "index.json"
        if index_path.is_file():
            self.index = json.loads(index_path.read_text())
            recorded = self.index.get("dataset_spec", self.index.get("dataset"))
            dataset = dataset or recorded
            same = str(dataset) in (str(recorded), str(self.index.get("dataset")))
            self.dataset = load_dataset(dataset, data_root or (self.index.get("data_root") if same else None), self.index.get("contrasts"))
        else:
            if not self.maps_dir.is_dir():
                raise VoladConfigError(f"{self.maps_dir}: no maps folder; run the bundle's inference.json first (same --output_dir) or pass --maps")
            if not dataset:
                raise VoladConfigError(f"{self.maps_dir} has no index.json: pass --dataset")
            self.dataset = load_dataset(dataset, data_root)
            self.index = index_from_folder(self.maps_dir, self.dataset, (test_split, threshold_split, healthy_split or threshold_split))
        check_maps_checkpoint(self.index, self.output_dir, self.maps_dir, checkpoint)
        if self.dataset.manifest.get("image_level"):
            raise VoladConfigError(
                f"dataset {self.dataset.name!r} has one label per picture, not voxel labels; "
                "evaluate it with volad protocol (image-level AUROC/ACC)"
            )
        self.test_split, self.threshold_split, self.threshold = test_split, threshold_split, threshold
        self.modes = ["fixed"] if threshold is not None else [str(m) for m in ([threshold_modes] if isinstance(threshold_modes, str) else threshold_modes)]
        for m in self.modes:
            th.parse_mode(m)
        self.healthy_split = healthy_split or threshold_split
        if unset(healthy_dataset):
            self.healthy_dataset = self.dataset
        else:
            self.healthy_dataset = load_dataset(healthy_dataset, healthy_data_root, self.index.get("contrasts"))
        self.post = PostProcessing(erosion_mm=erosion_mm, median_mm=median_mm, min_component_voxels=min_component_voxels)
        self.volume_score_mode = volume_score_mode
        self.lesion_overlap = float(lesion_overlap)
        self.size_bins = bins_from_manifest(lesion_size_bins or self.dataset.manifest.get("lesion_size_bins"))
        self.boxes = (self.dataset.manifest.get("label") or {}).get("annotations") is not None
        self.box_fraction, self.box_fpr = float(box_fraction), float(box_fpr)
        self.n_boot, self.seed = int(bootstrap), int(seed)
        self.montage_cases = int(montage_cases)
        self.exact_limit = exact_limit
        self.method_name = method_name or self.output_dir.resolve().name
        self.baselines = [str(b) for b in (baselines or [])]
        self.prepare = EnsureMasks()
        self.handlers = [h for h in (val_handlers or []) if h is not None]

    # -- loading ---------------------------------------------------------------------
    def _entries(self, split: str, dataset: Dataset | None = None) -> list[dict]:
        dataset = dataset or self.dataset
        entries = [e for e in self.index["subjects"] if e["split"] == split]
        expected = set(dataset.split_ids(split))
        entries = [e for e in entries if e["subject_id"] in expected]
        missing = sorted(expected - {e["subject_id"] for e in entries})
        if missing:
            raise VoladDataError(self.maps_dir, f"no maps for {len(missing)} {split} subjects of {dataset.name} (e.g. {missing[0]}); run inference with this split")
        return entries

    def _load(self, entry: dict, split: str, dataset: Dataset | None = None) -> LoadedCase:
        dataset = dataset or self.dataset
        subject = self.prepare(dataset.subject(entry["subject_id"], split))
        path = self.maps_dir / entry["anomaly_map"]
        if not path.is_file():
            raise VoladDataError(path, "anomaly map not found")
        amap, affine = read_map(path)
        ref = subject["image"]
        if amap.shape != tuple(ref.spatial_shape):
            raise VoladDataError(path, f"map shape {amap.shape} differs from the input's {tuple(ref.spatial_shape)} ({ref.path})")
        if not np.allclose(affine, ref.affine, atol=1e-3):
            raise VoladDataError(path, f"map grid is not the input's ({ref.path}): {_affine_difference(affine, ref.affine)}")
        if not np.isfinite(amap).all():
            raise VoladDataError(path, "anomaly map contains NaN or Inf")
        brain = subject["brain_mask"].numpy()[0].astype(bool)
        label = subject["label"].numpy()[0].astype(bool)
        spacing = tuple(float(s) for s in ref.spacing)
        return LoadedCase(
            entry["subject_id"], postprocess(amap, brain, spacing, self.post), label, brain, spacing,
            str(subject.get("category", "") or ""), str(subject.get("status", "") or ""),
        )

    def _check_disjoint(self, split: str, dataset: Dataset, what: str) -> None:
        same_data = dataset.name == self.dataset.name and dataset.root == self.dataset.root
        if not same_data:
            return
        if split == self.test_split:
            raise VoladConfigError(f"the {what} split must differ from the test split (use the oracle ⌈Dice⌉ for test-set thresholds)")
        overlap = set(dataset.split_ids(split)) & set(self.dataset.split_ids(self.test_split))
        if overlap:
            raise VoladConfigError(
                f"{what} split {split!r} shares {len(overlap)} subjects with test split {self.test_split!r} "
                f"(e.g. {sorted(overlap)[0]}); a threshold must come from data disjoint from the test set"
            )

    # -- thresholds ------------------------------------------------------------------
    def _threshold_pass(self) -> dict:
        """Read the threshold split (and healthy scans) once; return what choosing needs."""
        out = {"labelled": None, "healthy": None, "n_threshold": 0, "n_healthy": 0, "volume_scores": [], "volume_labels": [], "sample": []}
        needs_split = any(th.parse_mode(m)[0] in ("val_dice", "healthy_fpr") for m in self.modes) or self.boxes
        if not needs_split:
            return out
        rng = np.random.default_rng(self.seed)
        self._check_disjoint(self.threshold_split, self.dataset, "threshold")
        labelled, healthy = ScoreAccumulator(exact_limit=self.exact_limit), ScoreAccumulator(exact_limit=self.exact_limit)
        healthy_here = self.healthy_dataset is self.dataset and self.healthy_split == self.threshold_split
        entries = self._entries(self.threshold_split)
        for e in progress(entries, f"thresholds on {self.threshold_split}"):
            case = self._load(e, self.threshold_split)
            s, lab = case.anomaly_map[case.brain], case.label[case.brain]
            labelled.add(s, lab)
            out["volume_scores"].append(volume_score(case.anomaly_map, case.brain, self.volume_score_mode))
            out["volume_labels"].append(bool(lab.any()))
            out["sample"].append(rng.choice(s, size=min(s.size, 20_000), replace=False) if s.size else s)
            if healthy_here and not lab.any():
                healthy.add(s, lab)
                out["n_healthy"] += 1
        out["n_threshold"] = len(entries)
        if not healthy_here:
            self._check_disjoint(self.healthy_split, self.healthy_dataset, "healthy")
            h_entries = [e for e in self.index["subjects"] if e["split"] == self.healthy_split and e["subject_id"] in set(self.healthy_dataset.split_ids(self.healthy_split))]
            for e in progress(h_entries, f"healthy scans of {self.healthy_dataset.name}/{self.healthy_split}"):
                case = self._load(e, self.healthy_split, self.healthy_dataset)
                if not case.label.any():
                    healthy.add(case.anomaly_map[case.brain], case.label[case.brain])
                    out["n_healthy"] += 1
        out["labelled"], out["healthy"] = labelled.curve(), healthy.curve()
        return out

    def _choose(self, mode: str, seen: dict) -> th.ThresholdChoice:
        kind, rate = th.parse_mode(mode)
        if kind == "fixed":
            return th.ThresholdChoice("fixed", float(self.threshold), "user", "user")
        if kind == "val_dice":
            if seen["labelled"].positives == 0:
                raise VoladConfigError(
                    f"split {self.threshold_split!r} of dataset {self.dataset.name!r} has no lesion voxels "
                    f"({seen['n_threshold']} subjects): a threshold cannot be chosen by Dice there; "
                    "pass --threshold_modes healthy_fpr@0.01 or a labelled --threshold_split"
                )
            t, d = th.max_dice(seen["labelled"])
            return th.ThresholdChoice(
                mode, t, "max_dice_on_labelled_split", self.threshold_split, self.dataset.name, seen["n_threshold"],
                {"dice_on_split": d, "exact": seen["labelled"].exact},
            )
        if seen["n_healthy"] == 0:
            raise VoladConfigError(
                f"no healthy (lesion-free) scans in split {self.healthy_split!r} of {self.healthy_dataset.name}: "
                "pass --healthy_dataset/--healthy_split (e.g. the training dataset's val split) or another threshold mode"
            )
        t, fpr = th.at_fpr(seen["healthy"], rate)
        return th.ThresholdChoice(
            mode, t, "fpr_on_healthy_scans", self.healthy_split, self.healthy_dataset.name, seen["n_healthy"],
            {"target_fpr": rate, "fpr_on_split": fpr, "exact": seen["healthy"].exact},
        )

    def choose_thresholds(self, seen: dict) -> tuple[dict[str, th.ThresholdChoice], dict[str, str]]:
        """Thresholds by mode (headline first) and the reasons for modes skipped."""
        chosen, skipped = {}, {}
        for i, mode in enumerate(self.modes):
            try:
                chosen[mode] = self._choose(mode, seen)
            except VoladConfigError as exc:
                if i == 0:
                    raise
                skipped[mode] = str(exc)
        return chosen, skipped

    # -- main ------------------------------------------------------------------------
    def run(self) -> Path:
        """Write ``report.json``, ``report.md`` and figures into the run folder.

        A test split without lesion voxels gets a report whose overlap figures
        (Dice, IoU, AUROC, AUPRC, lesion sensitivity) are null and say why
        (``undefined``); its false-positive figures stand.

        Raises:
            VoladConfigError: the test split has no subjects.
        """
        if not distributed.is_main():  # under torchrun the report is rank 0's job; it reads maps, it trains nothing
            return self.output_dir / "report.json"
        with rundir.claim(self.output_dir, "evaluation"):
            path = self._run()
        if self.handlers:
            report_to_handlers(json.loads(path.read_text()), path.parent, self.handlers)
        return path

    def _test_entries(self) -> list[dict]:
        entries = self._entries(self.test_split)
        if not entries:
            raise VoladConfigError(
                f"split {self.test_split!r} of dataset {self.dataset.name!r} ({self.dataset.root}) has no subjects: nothing to evaluate"
            )
        return entries

    def _run(self) -> Path:
        entries = self._test_entries()
        print(
            f"volad: evaluating {len(entries)} {self.test_split} subjects of {self.dataset.name} from {self.maps_dir}; "
            f"thresholds: {', '.join(self.modes)}",
            flush=True,
        )
        seen = self._threshold_pass()
        chosen, skipped = self.choose_thresholds(seen)
        headline = chosen[self.modes[0]]
        box_choice, box_skipped = None, ""
        if self.boxes:
            mode = f"healthy_fpr@{self.box_fpr:g}"
            try:
                box_choice = chosen.get(mode) or self._choose(mode, seen)
            except VoladConfigError as exc:
                box_skipped = str(exc)
        edges = quantile_edges(np.concatenate(seen["sample"]) if seen["sample"] else np.zeros(0))
        store: BootstrapStore | None = None
        kinds: KindSummary | None = None
        acc = ScoreAccumulator(exact_limit=self.exact_limit)
        pooled = {k: {"tp": 0, "fp": 0, "fn": 0, "tn": 0} for k in chosen}
        per_threshold_rows: dict[str, list[dict]] = {k: [] for k in chosen}
        lesions = LesionSummary(self.lesion_overlap, self.size_bins)
        boxes = LesionSummary(self.box_fraction, {"all": (0.0, None)}) if box_choice is not None else None
        per_volume, in_voxels, test_scores, test_labels = [], [], [], []
        for e in progress(entries, f"evaluate {self.test_split}"):
            case = self._load(e, self.test_split)
            if store is None:
                if edges.size <= 1:
                    edges = quantile_edges(case.anomaly_map[case.brain])
                store = BootstrapStore(edges)
                kinds = KindSummary(edges, self.exact_limit)
            v = self.post.voxels(case.spacing)
            if v not in in_voxels:
                in_voxels.append(v)
            s, lab = case.anomaly_map[case.brain], case.label[case.brain]
            acc.add(s, lab)
            row = {"subject_id": case.subject_id, "lesion_voxels": int(lab.sum())}
            for name, choice in chosen.items():
                pred_full = binarize(case.anomaly_map, choice.value, self.post.min_component_voxels) & case.brain
                c = confusion(pred_full[case.brain], lab)
                for k in pooled[name]:
                    pooled[name][k] += c[k]
                metrics = scores_from_counts(c)
                per_threshold_rows[name].append({"lesioned": bool(lab.any()), **metrics})
                if choice is headline:
                    headline_pred, headline_counts = pred_full, c
                    row.update({"predicted_voxels": int(pred_full.sum()), **metrics})
            voxel_mm3 = float(np.prod(case.spacing))
            les = match_lesions(headline_pred, case.label, voxel_mm3, min_overlap=self.lesion_overlap)
            lesions.add(les)
            row.update(lesions=int(les.detected.size), lesions_detected=int(les.detected.sum()), fp_components=les.n_fp)
            if boxes is not None:
                bpred = binarize(case.anomaly_map, box_choice.value, self.post.min_component_voxels) & case.brain
                boxes.add(match_lesions(bpred, case.label, voxel_mm3, min_overlap=self.box_fraction, per_slice=True, strict=True))
            row["auroc"] = auroc(s, lab)
            row["auprc"] = average_precision(s, lab)
            row["volume_score"] = volume_score(case.anomaly_map, case.brain, self.volume_score_mode)
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
            row["category"] = case.category
            per_volume.append(row)
        curve = acc.curve()
        ap, roc = curve.ap_auroc()
        oracle_t, oracle_dice = curve.best_dice()
        thresholds_report = {}
        for name, choice in chosen.items():
            rows = per_threshold_rows[name]
            thresholds_report[name] = {
                **choice.as_dict(),
                "voxel": scores_from_counts(pooled[name]),
                "per_volume_mean": _means(rows),
            }
        thresholds_report["oracle"] = {
            "name": "oracle", "value": oracle_t, "mode": "oracle_on_test", "chosen_on": f"{self.test_split} (oracle)",
            "chosen_on_dataset": self.dataset.name, "voxel": {"dice": oracle_dice},
        }
        voxel = dict(thresholds_report[headline.name]["voxel"])
        voxel.update(auroc=roc, auprc=ap, dice_oracle=oracle_dice, threshold_oracle=oracle_t, exact=curve.exact)
        undefined = None
        if not any(test_labels):  # nothing to find: overlap figures are undefined, never a perfect score
            undefined = (
                f"split {self.test_split!r} has no lesion voxels in any of its {len(entries)} subjects: Dice, IoU, precision, "
                "recall, AUROC, AUPRC and lesion figures are undefined; only false positives are measured"
            )
            for record in [voxel] + [t["voxel"] for t in thresholds_report.values()]:
                record.update({k: None for k in _LESION_VOXEL_METRICS if k in record})
            voxel.update(auroc=None, auprc=None, dice_oracle=None, threshold_oracle=None)
            ap = None
        report = {
            "schema": REPORT_SCHEMA,
            "method": self.method_name,
            "method_hparams": self.index.get("method", {}),
            "checkpoint": self.index.get("checkpoint", {}),
            "dataset": self.dataset.name,
            "trained_on": self.index.get("checkpoint", {}).get("data", {}),
            "contrasts": self.dataset.contrasts,
            "split": self.test_split,
            "n_subjects": len(per_volume),
            "n_lesioned": int(sum(test_labels)),
            **({"undefined": undefined} if undefined else {}),
            "threshold": {k: v for k, v in thresholds_report[headline.name].items() if k not in ("voxel", "per_volume_mean")},
            "thresholds": thresholds_report,
            "thresholds_skipped": skipped,
            "postprocessing": {**self.post.as_dict(), **(in_voxels[0] if len(in_voxels) == 1 else {"in_voxels": in_voxels})},
            "voxel": voxel,
            "per_volume_mean": {
                **thresholds_report[headline.name]["per_volume_mean"],
                **{k: _nanmean([r[k] for r in per_volume if r["lesion_voxels"] > 0]) for k in ("auroc", "auprc")},
            },
            "lesion": {**lesions.as_dict(), "threshold": headline.name, "connectivity": "26 (3D)"},
            "volume": self._volume_level(seen, np.asarray(test_scores), np.asarray(test_labels, dtype=bool)),
            "ci95": {
                "method": f"percentile bootstrap over {self.test_split} volumes, {self.n_boot} replicates, seed {self.seed}; "
                "voxel AUROC/AUPRC intervals from curves binned on quantiles of the threshold split",
                **(store.intervals(self.n_boot, self.seed) if store is not None and self.n_boot else {}),
            },
            "per_volume": per_volume,
        }
        if kinds:
            report["by_kind"] = {
                "threshold": headline.name,
                "note": "lesion kinds: voxel AUPRC/AUROC over the brain voxels of that kind's test volumes, Dice at the headline "
                "threshold, oracle ⌈Dice⌉ on the kind's own test voxels; healthy kinds: voxel FPR at the headline threshold, "
                "share of volumes with any predicted voxel, FP components per volume; 95 % bootstrap intervals over the kind's volumes",
                "kinds": kinds.as_dict(self.n_boot, self.seed),
            }
        if boxes is not None:
            report["boxes"] = {**boxes.as_dict(), "threshold": box_choice.as_dict(), "rule": f"a box is hit when more than {self.box_fraction:g} of it fires"}
        elif box_skipped:
            report["boxes_skipped"] = box_skipped
        report["baselines"] = baselines_beside(report, self.output_dir, self.baselines)
        path = write_report(report, curve, self.output_dir, montage=self._montage_inputs(per_volume))
        if undefined:
            print(f"volad: report written to {path} (FPR {fmt(voxel.get('fpr'))} at the {headline.name} threshold; {undefined})")
        else:
            print(
                f"volad: report written to {path} (Dice {voxel['dice']:.3f} at the {headline.name} threshold from "
                f"{headline.chosen_on}, AUPRC {ap:.3f}, lesion F1 {report['lesion']['f1']:.3f})"
            )
        return path

    def _volume_level(self, seen: dict, scores: np.ndarray, labels: np.ndarray) -> dict:
        out: dict = {"score": self.volume_score_mode, "n_lesioned": int(labels.sum()), "n_healthy": int((~labels).sum())}
        if labels.any() and (~labels).any():
            out.update(auroc=auroc(scores, labels), ap=average_precision(scores, labels))
        val_s, val_y = np.asarray(seen["volume_scores"]), np.asarray(seen["volume_labels"], dtype=bool)
        if val_y.any() and (~val_y).any():
            t, f1 = max_f1_threshold(val_s, val_y)
            m = detection_metrics(scores, labels, t)
            out["at_threshold"] = {
                "value": t, "chosen_on": self.threshold_split, "mode": "max_f1_on_labelled_split", "f1_on_split": f1,
                **{k: m[k] for k in ("acc", "f1", "precision", "recall", "specificity")},
            }
        else:
            out["at_threshold"] = {"skipped": f"split {self.threshold_split!r} needs healthy and lesioned volumes for a max-F1 threshold"}
        return out

    def _montage_inputs(self, per_volume: list[dict]) -> list[dict]:
        """The test cases to draw: the largest lesions first, then one healthy volume."""
        lesioned = sorted((r for r in per_volume if r["lesion_voxels"] > 0), key=lambda r: -r["lesion_voxels"])
        healthy = [r for r in per_volume if r["lesion_voxels"] == 0]
        chosen = lesioned[: max(self.montage_cases - (1 if healthy else 0), 0)] + healthy[:1]
        by_id = {e["subject_id"]: e for e in self.index["subjects"] if e["split"] == self.test_split}
        out = []
        for r in chosen[: self.montage_cases]:
            e = by_id[r["subject_id"]]
            subject = self.prepare(self.dataset.subject(r["subject_id"], self.test_split))
            amap = self._load(e, self.test_split).anomaly_map
            rec_name = next(iter((e.get("reconstructions") or {}).values()), None)
            rec = read_map(self.maps_dir / rec_name)[0] if rec_name else None
            out.append(
                {
                    "subject_id": r["subject_id"],
                    "image": subject["image"].numpy()[0].astype(np.float32),
                    "anomaly_map": amap,
                    "label": subject["label"].numpy()[0].astype(bool),
                    "brain": subject["brain_mask"].numpy()[0].astype(bool),
                    "reconstruction": rec,
                    "dice": r.get("dice"),
                }
            )
        return out


def _affine_difference(affine: np.ndarray, ref: np.ndarray) -> str:
    """How far apart two voxel-to-world affines are, in words a person can act on."""
    affine, ref = np.asarray(affine, dtype=float), np.asarray(ref, dtype=float)
    parts = []
    shift = float(np.linalg.norm(affine[:3, 3] - ref[:3, 3]))
    if shift > 1e-3:
        parts.append(f"origin {shift:.3g} mm away ({', '.join(f'{v:+.3g}' for v in affine[:3, 3] - ref[:3, 3])} mm)")
    sizes, ref_sizes = np.linalg.norm(affine[:3, :3], axis=0), np.linalg.norm(ref[:3, :3], axis=0)
    if not np.allclose(sizes, ref_sizes, atol=1e-3):
        parts.append(f"voxel size {'×'.join(f'{v:.4g}' for v in sizes)} mm vs {'×'.join(f'{v:.4g}' for v in ref_sizes)} mm")
    directions = affine[:3, :3] / sizes, ref[:3, :3] / ref_sizes
    if not np.allclose(*directions, atol=1e-3):
        cos = np.clip(np.sum(directions[0] * directions[1], axis=0), -1.0, 1.0)
        parts.append(f"axes turned by up to {float(np.degrees(np.arccos(cos)).max()):.3g}°")
    return "; ".join(parts) or f"affines differ by up to {float(np.abs(affine - ref).max()):.3g}"


def check_maps_checkpoint(index: dict, output_dir: Path, maps_dir: Path, checkpoint: str | None = None) -> None:
    """Refuse maps that the run's checkpoint did not make (the run trained on after mapping, or another was named).

    Args:
        index: The maps' ``index.json`` (its ``checkpoint`` entry names the file and its SHA-256).
        output_dir: The run folder.
        maps_dir: The maps folder (named in the error).
        checkpoint: ``best``, ``last`` or a path the maps must come from; ``None``: the run's own checkpoint of the
            name the index records, as it is now (else the recorded path itself, e.g. maps of another folder's run).

    Raises:
        VoladConfigError: naming both checkpoints and the command that remaps.
    """
    made = index.get("checkpoint") or {}
    sha = made.get("sha256")
    if not sha:  # maps from another tool, or from a method given in Python: nothing recorded to check
        return
    remap = (f"python -m monai.bundle run --config_file bundles/<bundle>/inference.json --output_dir {output_dir}"
             + (f" --maps_dir {maps_dir}" if maps_dir != output_dir / "maps" else "")
             + (f" --checkpoint {checkpoint}" if not unset(checkpoint) and checkpoint != "best" else ""))
    made_by = f"{made.get('path')} (sha256 {sha[:12]}, epoch {made.get('epoch')})"
    if not unset(checkpoint):
        current = checkpoint_path(output_dir, str(checkpoint))
    else:
        recorded = Path(str(made.get("path")))
        if "in_run" in made:  # the run's own checkpoint wherever the run folder is now, or another run's file (None)
            candidates = [output_dir / made["in_run"]] if made["in_run"] else [recorded]
        else:  # indexes of volad before 0.4: the run's own file of that name first
            candidates = [output_dir / "checkpoints" / recorded.name, recorded]
        current = next((p for p in candidates if p.is_file()), None)
        if current is None:
            raise VoladConfigError(f"{maps_dir / 'index.json'}: its maps were made by {made_by}, which no longer exists; "
                                   f"remap them: {remap} (every bundle's inference.json rebuilds the method the run recorded)")
    now = file_sha256(current)
    if now != sha:
        epoch = read_checkpoint(current).get("epoch")
        raise VoladConfigError(
            f"{maps_dir / 'index.json'}: the maps were made by {made_by}, but the checkpoint to evaluate is {current} "
            f"(sha256 {now[:12]}, epoch {epoch}): they are stale; remap them: {remap} "
            "(every bundle's inference.json rebuilds the method the run recorded)"
        )


def index_from_folder(maps_dir: Path, dataset: Dataset, splits: Sequence[str]) -> dict:
    """A maps index for a folder of maps made by any tool, matched to the dataset's splits by file name."""
    subjects = []
    for split in dict.fromkeys(s for s in splits if s):
        try:
            ids = dataset.split_ids(split)
        except VoladConfigError:
            continue
        for sid in ids:
            name = next((n for n in (f"{sid}_anomaly.nii.gz", f"{sid}.nii.gz", f"{sid}_anomaly.nii", f"{sid}.nii") if (maps_dir / n).is_file()), None)
            if name is not None:
                subjects.append({"subject_id": sid, "split": split, "anomaly_map": name})
    if not subjects:
        raise VoladDataError(maps_dir, f"no maps named <subject>_anomaly.nii.gz or <subject>.nii.gz for subjects of {dataset.name}")
    return {"dataset": dataset.name, "data_root": str(dataset.root), "contrasts": dataset.contrasts, "method": {}, "checkpoint": {}, "subjects": subjects}


_LESION_VOXEL_METRICS = ("dice", "iou", "precision", "recall")


def _nanmean(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else float("nan")


def _means(rows: list[dict]) -> dict:
    lesioned = [r for r in rows if r["lesioned"]]
    healthy = [r for r in rows if not r["lesioned"]]
    return {
        "note": "means over lesioned test volumes (AUROC/AUPRC undefined without lesion voxels); FPR on healthy ones",
        **{k: _nanmean([r[k] for r in lesioned]) for k in ("dice", "iou", "precision", "recall")},
        "fpr_healthy_volumes": _nanmean([r["fpr"] for r in healthy]),
    }
