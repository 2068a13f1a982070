"""Validation during training and tuning: which cases, and their voxel AUPRC.

Two sources, chosen by the bundle (the Trainer's ``val_tasks``):

* :class:`LabelledValidation`: the labelled ``val`` subjects of a dataset (the
  default; the validation split, never the test split, picks ``best.pt``);
* :class:`SyntheticTaskValidation`: healthy training volumes carrying one
  anomaly of a task held out of training each (Baugh et al., MICCAI 2023), so
  no lesion label is read at all (the PII detector's ``--val_tasks``).

:func:`validation_auprc` maps the cases exactly as inference does and scores
them as the report does: each map post-processed by ``evaluate.json``'s
default chain (brain-mask erosion, the method's own median filter; :func:`report_postprocessing`),
over every brain voxel. A checkpoint is thus chosen by the yardstick it will be
reported by, not by raw voxels the report never sees. ``volad tune`` calls it
directly.
"""

from __future__ import annotations

import logging
from typing import Iterator, Sequence

import numpy as np
import torch
import torchio as tio

from volad.data.manifest import Dataset
from volad.errors import VoladConfigError
from volad.evaluation.evaluate import Evaluator
from volad.evaluation.postprocess import PostProcessing, postprocess
from volad.evaluation.voxel import average_precision
from volad.methods.base import AnomalyMethod
from volad.methods.predict import predict_volume
from volad.methods.registry import method_median_mm
from volad.types import defaults_of

log = logging.getLogger("volad.engine.validation")
Case = tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[float, ...]]  # image (C, ...), brain mask (1, ...), label (1, ...), voxel size


def report_postprocessing(hparams: dict) -> PostProcessing:
    """The post-processing ``evaluate.json`` applies by default to the maps of the method ``hparams`` describe (its
    Evaluator's erosion, the method's own median window), which validation scores by too."""
    return PostProcessing(erosion_mm=defaults_of(Evaluator)["erosion_mm"], median_mm=method_median_mm(hparams))


class LabelledValidation:
    """The labelled ``val`` subjects of ``dataset`` (none when it has no such split), loaded when iterated.

    Args:
        dataset: Dataset whose ``val`` split validates.
        transform: The on-load preprocessing (the training's).
        max_subjects: Cap on subjects (``None``: all).
    """

    def __init__(self, dataset: Dataset, transform: tio.Transform, max_subjects: int | None = None):
        try:
            subjects = dataset.subjects("val", limit=max_subjects)
        except VoladConfigError:
            subjects = []
        self.subjects = [s for s in subjects if s["has_label"]]
        self.transform = transform
        self.description = f"{len(self.subjects)} labelled subjects of {dataset.name}/val"

    def __len__(self) -> int:
        return len(self.subjects)

    def __iter__(self) -> Iterator[Case]:
        for s in self.subjects:
            p = self.transform(s)
            yield p["image"].data, p["brain_mask"].data, p["label"].data, tuple(float(v) for v in p["image"].spacing)


class SyntheticTaskValidation:
    """The last healthy training volumes, each with one anomaly of a held-out task (built once, seeded).

    Args:
        subjects: Healthy training subjects (the last ``max_subjects`` are used).
        transform: The on-load preprocessing.
        tasks: Held-out synthetic tasks.
        max_subjects: How many volumes (``None``: all).
        seed: Seed of the anomaly draws.
    """

    def __init__(self, subjects: Sequence[tio.Subject], transform: tio.Transform, tasks: Sequence[str], max_subjects: int | None, seed: int):
        from volad.synthesis.validation import synthetic_validation_set

        subjects = list(subjects)[-(max_subjects or len(subjects)) :]
        loaded = list(map(transform, subjects))
        self.cases = synthetic_validation_set([(p["image"].data, p["brain_mask"].data) for p in loaded], list(tasks), seed=seed)
        self.spacings = [tuple(float(v) for v in p["image"].spacing) for p in loaded]
        self.description = f"{len(self.cases)} training volumes with held-out synthetic tasks {list(tasks)}"
        log.info("validating on %s", self.description)

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[Case]:
        return ((*case, spacing) for case, spacing in zip(self.cases, self.spacings))


def validation_auprc(
    method: AnomalyMethod,
    cases: LabelledValidation | SyntheticTaskValidation,
    *,
    patch_size: int | Sequence[int] | None = None,
    device: torch.device | str | None = None,
    postprocessing: PostProcessing | None = None,
) -> float:
    """Voxel AUPRC over the brain voxels of the validation cases (label > 0 is anomalous), each map post-processed
    as the report does (``postprocessing``, default :func:`report_postprocessing` of ``method``); NaN without lesion voxels."""
    post = postprocessing or report_postprocessing(method.hparams)
    scores, labels = [], []
    for image, mask, label, spacing in cases:
        out = predict_volume(method, image, mask, patch_size=patch_size, device=device)
        m = mask[0].bool()
        scores.append(postprocess(out.anomaly_map[0].numpy(), m.numpy(), spacing, post)[m.numpy()])
        labels.append(label[0][m].numpy() > 0)
    if not scores or not np.concatenate(labels).any():
        return float("nan")
    return average_precision(np.concatenate(scores), np.concatenate(labels))


def training_validation(
    dataset: Dataset, val_dataset: Dataset, transform: tio.Transform, *, val_tasks: Sequence[str], max_subjects: int | None,
    val_max_subjects: int | None, seed: int,
) -> LabelledValidation | SyntheticTaskValidation:
    """A training run's validation cases: healthy training volumes carrying held-out synthetic tasks when
    ``val_tasks`` is set (no label read), else the labelled ``val`` subjects of ``val_dataset``."""
    if val_tasks:
        subjects = dataset.subjects("train", limit=max_subjects)
        return SyntheticTaskValidation(subjects, transform, val_tasks, val_max_subjects, seed)
    return LabelledValidation(val_dataset, transform, val_max_subjects)
