"""Experiment tracking: what volad tells MONAI's tracking handlers.

``python -m monai.bundle run ... --tracking mlflow`` (MONAI's own option) adds an
``MLFlowHandler`` to a bundle's ``train#handlers`` and to ``evaluate.json``'s
``handlers``; by MONAI's defaults it records into ``<output_dir>/mlruns.db``
(SQLite, a local file: MLflow 3 no longer accepts a plain folder store without
``MLFLOW_ALLOW_FILE_STORE``), with artefacts in ``<output_dir>/mlruns``.
``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlruns.db`` shows it.

* Training (:class:`volad.engine.trainer.Trainer`) attaches the handlers to each stage's
  Ignite engine: per-iteration ``train_loss``, per-epoch mean losses and
  ``val_auprc`` (``engine.state.metrics``), and the run's settings and the
  method's ``hparams`` as parameters; one MLflow run per stage.
* Evaluation (:class:`volad.evaluation.evaluate.Evaluator`) hands them the
  report's headline figures (:func:`headline_figures`) and, as artefacts, the
  report and its figures (:func:`report_to_handlers`).

TensorBoard event files are written by training itself, to ``<output_dir>/tensorboard``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ignite.engine import Engine, Events

#: Files of an evaluation a tracker keeps as artefacts (those that exist).
REPORT_FILES = ("report.json", "report.md", "curves.png", "lesion_sizes.png")


def headline_figures(report: dict[str, Any]) -> dict[str, float]:
    """The numbers a tracker should chart from a ``report.json``: voxel figures at the headline
    threshold (``voxel_dice_oracle`` is the oracle ⌈Dice⌉, labelled so), lesion and volume
    figures, and AUPRC per lesion kind or FPR per healthy kind."""
    out: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            out[name] = float(value)

    for key, value in (report.get("voxel") or {}).items():
        put(f"voxel_{key}", value)
    put("threshold", (report.get("threshold") or {}).get("value"))
    for key in ("f1", "sensitivity", "precision"):
        put(f"lesion_{key}", (report.get("lesion") or {}).get(key))
    for key in ("auroc", "ap"):
        put(f"volume_{key}", (report.get("volume") or {}).get(key))
    for kind, figures in ((report.get("by_kind") or {}).get("kinds") or {}).items():
        for key in ("auprc", "fpr"):
            put(f"{kind}_{key}", (figures or {}).get(key))
    return out


def report_to_handlers(report: dict[str, Any], folder: Path, handlers: Sequence[Any]) -> None:
    """Run Ignite ``handlers`` over a one-step engine whose ``state.metrics`` are the report's
    headline figures; handlers that keep artefacts (``artifacts``, as MONAI's ``MLFlowHandler``)
    also get the report and its figures."""
    figures = headline_figures(report)
    files = tuple(str(folder / name) for name in REPORT_FILES if (folder / name).is_file())
    engine = Engine(lambda engine, batch: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _figures(e: Engine) -> None:  # registered first, so every handler sees them
        e.state.metrics = dict(figures)

    described = {k: str(report.get(k)) for k in ("method", "dataset", "trained_on", "split", "n_subjects")}
    described["threshold_rule"] = str((report.get("threshold") or {}).get("name"))
    for handler in handlers:
        if hasattr(handler, "experiment_param") and not handler.experiment_param:
            handler.experiment_param = described
        if hasattr(handler, "artifacts"):
            handler.artifacts = tuple(a for a in (handler.artifacts or ()) if a) + files
        handler.attach(engine)
    engine.run([0], max_epochs=1)
