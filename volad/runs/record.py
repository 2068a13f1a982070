"""A run folder describes itself: what its checkpoint recorded, and the method it rebuilds.

One :class:`RunRecord`, written into every checkpoint by the trainer and by the
fusion builder, holds the method's ``hparams`` (its ``kind`` and
every constructor argument), the data it was trained on (dataset, root,
contrasts, loading, grid), the run's settings (seed, patch and batch size) and the
defaults inference should use (its patch grid and batch size). So
``inference.json`` and ``evaluate.json`` need nothing but ``--output_dir``:
:func:`open_run` reads that record and :meth:`TrainedRun.method` rebuilds the
trained method, with only inference-only settings (``t_test``, ...) changeable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volad.errors import VoladConfigError
from volad.methods.base import AnomalyMethod
from volad.methods.registry import recorded_class
from volad.runs.checkpoint import check_hparams, checkpoint_path, provenance, read_checkpoint

log = logging.getLogger("volad.runs.record")

#: Trainer settings a checkpoint records, and where: ``(section, key)`` of the checkpoint.
RECORDED_TRAINING = {
    "dataset": ("data", "train_dataset"),
    "data_root": ("data", "train_root"),
    "contrasts": ("data", "contrasts"),
    "val_dataset": ("data", "val_dataset"),
    "val_data_root": ("data", "val_root"),
    "patch_size": ("run", "patch_size"),
    "batch_size": ("run", "batch_size"),
    "samples_per_volume": ("run", "samples_per_volume"),
    "seed": ("run", "seed"),
    "max_subjects": ("run", "max_subjects"),
    "inference_patch_size": ("inference", "patch_size"),
}


@dataclass
class RunRecord:
    """What every checkpoint of a run records besides its weights (written by the trainer and the fusion builder).

    Attributes:
        hparams: The method's ``kind`` and constructor arguments.
        data: ``train_dataset``, ``train_root``, ``train_spec``, ``val_dataset``, ``val_root``, ``val_spec``,
            ``contrasts``, ``loading`` and ``grid`` (orientation and spacing) of training.
        run: The settings a resumed run must share (the data record, seed, patch and batch size, ...).
        inference: Defaults for inference: ``patch_size`` (the validation grid) and ``batch_size``.
        history: One row per trained epoch (losses, val AUPRC, seconds, CPU time).
        selection: What the validation split chose about the method itself (a fusion's members and rule), if anything.
    """

    hparams: dict[str, Any]
    data: dict[str, Any]
    run: dict[str, Any]
    inference: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    selection: dict[str, Any] | None = None

    def payload(self, weights: dict, *, stage: str, epoch: int, completed_stages: list[str], val_auprc: float | None,
                best_val_auprc: float | None, cpu_minutes: float) -> dict[str, Any]:
        """A checkpoint's content: the weights, where training stood, and this record (plain data only)."""
        return {
            "method": weights,
            "hparams": self.hparams,
            "stage": stage,
            "epoch": epoch,
            "completed_stages": list(completed_stages),
            "val_auprc": val_auprc,
            "best_val_auprc": best_val_auprc,
            "data": self.data,
            "run": self.run,
            "inference": self.inference,
            "history": self.history,
            "cpu_minutes": round(cpu_minutes, 3),
            **({"selection": self.selection} if self.selection else {}),
        }


def _patch(value: Any, none: Any) -> Any:
    """A patch size as recorded: a list, an int, or ``none`` when unset or 0."""
    return list(value) if isinstance(value, (list, tuple)) else (int(value) if value else none)


def training_record(
    *, hparams: dict, dataset: Any, val_dataset: Any, specs: dict[str, str], grid: dict | None, seed: int, patch_size: Any,
    batch_size: int, samples_per_volume: int, max_subjects: int | None, ema_decay: float | None, lr_schedule: str,
    precise_bn_batches: int, average_best: int, inference_patch_size: Any, history: list[dict],
) -> RunRecord:
    """The record of a training run (the trainer's settings; ``dataset``, ``val_dataset``: :class:`volad.data.manifest.Dataset`)."""
    data = {
        "train_dataset": dataset.name,
        "train_root": str(Path(dataset.root).resolve()),
        "val_dataset": val_dataset.name,
        "val_root": str(Path(val_dataset.root).resolve()),
        "train_spec": specs["train"],
        "val_spec": specs["val"],
        "contrasts": list(dataset.contrasts),
        "loading": dataset.load_options(),
        "grid": grid,
    }
    run = {
        **data,  # what a resumed run must share: its data, and how it was trained (``max_epochs`` may grow)
        "seed": seed,
        "patch_size": _patch(patch_size, 0),
        "batch_size": batch_size,
        "samples_per_volume": samples_per_volume,
        "max_subjects": max_subjects,
        "ema_decay": ema_decay,
        "lr_schedule": lr_schedule,
        "precise_bn_batches": precise_bn_batches,
        "average_best": average_best,
    }
    inference = {"patch_size": _patch(inference_patch_size, None), "batch_size": batch_size}  # the grid validation used
    return RunRecord(hparams=hparams, data=data, run=run, inference=inference, history=history)


@dataclass
class TrainedRun:
    """What a run folder's checkpoint recorded.

    Attributes:
        output_dir: The run folder.
        checkpoint: The checkpoint file read.
        hparams: The method's ``kind`` and constructor arguments.
        data: ``train_dataset``, ``train_root``, ``val_dataset``, ``val_root``,
            ``contrasts`` and ``loading`` of training.
        run: Seed, patch size, batch size, samples per volume, subject cap.
        inference: Defaults for inference: ``patch_size`` (the validation grid) and ``batch_size``.
        info: Provenance written into map indexes (path, SHA-256, epoch, stage, val AUPRC).
    """

    output_dir: Path
    checkpoint: Path
    hparams: dict[str, Any]
    data: dict[str, Any]
    run: dict[str, Any]
    inference: dict[str, Any]
    info: dict[str, Any]
    _state: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.hparams.get("kind"))

    @property
    def method_class(self) -> type[AnomalyMethod]:
        """The class of the run's method.

        Raises:
            VoladConfigError: no volad method has the recorded ``kind``.
        """
        return recorded_class(self.hparams, str(self.checkpoint))

    def recorded(self, setting: str) -> Any:
        """The value a training setting (a trainer argument) had, or ``KeyError`` if it is not recorded."""
        section, key = RECORDED_TRAINING[setting]
        values = getattr(self, section)
        if key not in values:
            raise KeyError(setting)
        return values[key]

    def method(self, **inference_settings: Any) -> AnomalyMethod:
        """The trained method, rebuilt from the record, with its weights loaded.

        Args:
            **inference_settings: New values of the method's inference-only
                ``hparams`` (``None`` keeps the trained value).

        Raises:
            VoladConfigError: a setting is not inference-only for this method,
                or the record names no known method.
        """
        changes = {k: v for k, v in inference_settings.items() if v is not None}
        cls = self.method_class
        cls_free = cls.inference_hparams
        fixed = sorted(set(changes) - set(cls_free))
        if fixed:
            raise VoladConfigError(
                f"{fixed[0]} is fixed by training for {self.kind} (checkpoint {self.checkpoint} has {fixed[0]}="
                f"{self.hparams.get(fixed[0])!r}); inference can change only {', '.join(cls_free) or 'nothing'}"
            )
        try:
            method = cls.rebuild({**self.hparams, **changes})
        except TypeError as exc:
            raise VoladConfigError(f"{self.checkpoint}: its record does not rebuild a {self.kind} ({exc}); was it made by another volad version?") from exc
        check_hparams(method, self.hparams, self.checkpoint)
        method.load_state_dict(self._state)
        method.checkpoint_info = dict(self.info)
        return method


def trained_method(output_dir: str | Path | None, checkpoint: str = "best") -> AnomalyMethod | None:
    """The trained method of a run folder, weights loaded (``None`` for ``None``): what a bundle config hands
    another method, e.g. rd4ad3d's ``"run"`` teacher (``--teacher_run runs/pii3d``)."""
    return None if output_dir is None else open_run(output_dir, checkpoint).method()


def open_run(output_dir: str | Path, checkpoint: str = "best") -> TrainedRun:
    """Read what a run folder's checkpoint recorded (see :class:`TrainedRun`).

    Raises:
        VoladConfigError: no checkpoint, a checkpoint holding more than plain data,
            or one written before runs recorded their method (volad < 0.3).
    """
    path = checkpoint_path(output_dir, checkpoint)
    payload = read_checkpoint(path)
    hparams = dict(payload["hparams"])
    if "run" not in payload or "data" not in payload or "kind" not in hparams:
        raise VoladConfigError(
            f"{path}: this checkpoint does not record how its method and data were set up (written by volad < 0.3); "
            "retrain the run, or load it in Python with volad.runs.checkpoint.load_trained(method, output_dir)"
        )
    inference = dict(payload.get("inference") or {})
    inference.setdefault("batch_size", payload["run"].get("batch_size"))
    info = provenance(path, payload)
    log.info("read %s (%s, stage %s, epoch %s)", path, hparams.get("kind"), payload.get("stage"), payload.get("epoch"))
    return TrainedRun(
        output_dir=Path(output_dir),
        checkpoint=path,
        hparams=hparams,
        data=dict(payload["data"]),
        run=dict(payload["run"]),
        inference=inference,
        info=info,
        _state=payload["method"],
    )
