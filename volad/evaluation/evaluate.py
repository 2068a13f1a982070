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

:class:`Evaluator` keeps the settings and the order of the work; the parts are
:mod:`~volad.evaluation.cases` (the maps index, loading a case),
:mod:`~volad.evaluation.thresholds` (choosing), :mod:`~volad.evaluation.test_pass`
(the figures) and :mod:`~volad.evaluation.report` (assembling and writing the report).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from volad.data.manifest import load_dataset
from volad.errors import VoladConfigError
from volad.evaluation.bootstrap import quantile_edges
from volad.evaluation.cases import MapCases, open_maps
from volad.evaluation.compare import baselines_beside
from volad.evaluation.image_level import detection_metrics, max_f1_threshold
from volad.evaluation.lesions import bins_from_manifest
from volad.evaluation.postprocess import PostProcessing
from volad.evaluation.report import assemble_report, fmt, write_report
from volad.evaluation.test_pass import run_test_pass
from volad.evaluation.thresholds import ThresholdRule, parse_mode
from volad.evaluation.tracking import report_to_handlers
from volad.evaluation.voxel import auroc, average_precision
from volad.io import read_map
from volad.methods.registry import method_median_mm, method_volume_score
from volad.types import none_means_default, unset
from volad.utils import distributed, rundir

log = logging.getLogger("volad.evaluation")


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
        median_mm: Median filter window, mm (``None``: the method's own,
            :attr:`volad.methods.base.AnomalyMethod.median_mm`: 5 mm for reconstruction residuals,
            none for intensities, z-scores, detector outputs and fusions; maps of another tool get 5 mm).
        min_component_voxels: Connected components smaller than this are dropped after thresholding (7: the
            literature's protocol, Behrendt et al. 2024, cDDPM Table 3; it removes the single-voxel specks a map
            without a median filter leaves, and keeps a lesion of one voxel's radius; 0 keeps all).
        volume_score_mode: ``top1``, ``max`` or ``mean`` for the per-volume score (``None``: the method's own,
            :attr:`volad.methods.base.AnomalyMethod.volume_score_mode`: ``max`` for RD4AD, ``mean`` for f-AnoGAN).
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
        median_mm: float | None = None,
        min_component_voxels: int = 7,
        volume_score_mode: str | None = None,
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
        self.index, self.dataset = open_maps(self.output_dir, self.maps_dir, dataset, data_root,
                                             (test_split, threshold_split, healthy_split or threshold_split), checkpoint)
        if self.dataset.manifest.get("image_level"):
            raise VoladConfigError(
                f"dataset {self.dataset.name!r} has one label per picture, not voxel labels; "
                "evaluate it with volad protocol (image-level AUROC/ACC)"
            )
        self.test_split, self.threshold_split = test_split, threshold_split
        modes = ["fixed"] if threshold is not None else [str(m) for m in ([threshold_modes] if isinstance(threshold_modes, str) else threshold_modes)]
        for m in modes:
            parse_mode(m)
        healthy = self.dataset if unset(healthy_dataset) else load_dataset(healthy_dataset, healthy_data_root, self.index.get("contrasts"))
        self.rule = ThresholdRule(modes, self.dataset, threshold_split, healthy_split or threshold_split, healthy, threshold)
        own_median = median_mm is None
        if own_median:
            median_mm = method_median_mm(self.index.get("method") or {})
        kind = (self.index.get("method") or {}).get("kind")
        self.median_from = "given" if not own_median else f"the method's own ({kind})" if kind else "the default for another tool's maps"
        self.post = PostProcessing(erosion_mm=erosion_mm, median_mm=median_mm, min_component_voxels=min_component_voxels)
        self.cases = MapCases(self.maps_dir, self.index, self.dataset, self.post, test_split)
        self.volume_score_mode = volume_score_mode or method_volume_score(self.index.get("method") or {})
        self.lesion_overlap = float(lesion_overlap)
        self.size_bins = bins_from_manifest(lesion_size_bins or self.dataset.manifest.get("lesion_size_bins"))
        self.boxes = (self.dataset.manifest.get("label") or {}).get("annotations") is not None
        self.box_fraction, self.box_fpr = float(box_fraction), float(box_fpr)
        self.n_boot, self.seed = int(bootstrap), int(seed)
        self.montage_cases = int(montage_cases)
        self.exact_limit = exact_limit
        self.method_name = method_name or self.output_dir.resolve().name
        self.baselines = [str(b) for b in (baselines or [])]
        self.handlers = [h for h in (val_handlers or []) if h is not None]

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

    def _run(self) -> Path:
        entries = self.cases.entries(self.test_split)
        if not entries:
            raise VoladConfigError(
                f"split {self.test_split!r} of dataset {self.dataset.name!r} ({self.dataset.root}) has no subjects: nothing to evaluate"
            )
        print(
            f"volad: evaluating {len(entries)} {self.test_split} subjects of {self.dataset.name} from {self.maps_dir}; "
            f"thresholds: {', '.join(self.rule.modes)}",
            flush=True,
        )
        seen = self.rule.read(self.cases, volume_score_mode=self.volume_score_mode, boxes=self.boxes, seed=self.seed, exact_limit=self.exact_limit)
        chosen, skipped = self.rule.choose_all(seen)
        headline = chosen[self.rule.modes[0]]
        box_choice, box_skipped = None, ""
        if self.boxes:
            mode = f"healthy_fpr@{self.box_fpr:g}"
            try:
                box_choice = chosen.get(mode) or self.rule.choose(mode, seen)
            except VoladConfigError as exc:
                box_skipped = str(exc)
        figures = run_test_pass(
            self.cases, entries, chosen=chosen, headline=headline, box_choice=box_choice,
            edges=quantile_edges(np.concatenate(seen["sample"]) if seen["sample"] else np.zeros(0)), lesion_overlap=self.lesion_overlap,
            size_bins=self.size_bins, box_fraction=self.box_fraction, volume_score_mode=self.volume_score_mode, exact_limit=self.exact_limit,
        )
        report = assemble_report(
            figures, chosen=chosen, skipped=skipped, headline=headline, box_choice=box_choice, box_skipped=box_skipped, box_fraction=self.box_fraction,
            method=self.method_name, index=self.index, dataset=self.dataset, test_split=self.test_split, post=self.post, median_from=self.median_from,
            volume=self._volume_level(seen, figures.volume_scores, figures.volume_labels), n_boot=self.n_boot, seed=self.seed,
        )
        report["baselines"] = baselines_beside(report, self.output_dir, self.baselines)
        path = write_report(report, figures.curve, self.output_dir, montage=self._montage_inputs(figures.per_volume))
        voxel = report["voxel"]
        if report.get("undefined"):
            print(f"volad: report written to {path} (FPR {fmt(voxel.get('fpr'))} at the {headline.name} threshold; {report['undefined']})")
        else:
            print(
                f"volad: report written to {path} (Dice {voxel['dice']:.3f} at the {headline.name} threshold from "
                f"{headline.chosen_on}, AUPRC {voxel['auprc']:.3f}, lesion F1 {report['lesion']['f1']:.3f})"
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
            subject = self.cases.prepare(self.dataset.subject(r["subject_id"], self.test_split))
            amap = self.cases.load(e, self.test_split).anomaly_map
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
