"""Checkpoints: written atomically, read safely, checked against what is asked of them.

A volad checkpoint is a plain ``dict`` of tensors, numbers, strings, lists and
dicts (the method's state dict, its ``hparams``, optimiser states, the epoch,
and the record of the data and settings it was trained with). It is always read
with ``torch.load(weights_only=True)``, so a crafted file cannot run code on
load: anything that is not plain data is refused with a clear error.
"""

from __future__ import annotations

import inspect
import logging
import math
import pickle
from pathlib import Path
from typing import Any

import torch

from volad.errors import VoladConfigError, VoladDataError
from volad.io import atomic_path, file_sha256
from volad.methods.base import AnomalyMethod

log = logging.getLogger("volad.runs.checkpoint")


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` to ``path`` atomically (a killed save never leaves a truncated file)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint as plain data (``weights_only=True``).

    Raises:
        VoladConfigError: the file holds pickled objects other than plain data
            (a crafted or foreign file); it is not loaded.
        VoladDataError: the file is missing, truncated or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise VoladDataError(path, "checkpoint file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VoladConfigError(
            f"{path}: refusing to load: the file holds objects other than tensors, numbers, strings, lists and dicts "
            f"({first}). volad's own checkpoints never do; do not load files you do not trust"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise VoladDataError(path, f"is not a readable checkpoint (truncated or corrupt: {str(exc).strip().splitlines()[0]})") from exc
    if not isinstance(payload, dict) or "method" not in payload or "hparams" not in payload:
        raise VoladDataError(path, "is not a volad checkpoint (no 'method' and 'hparams' entries)")
    return payload


def free_hparams(cls: type[AnomalyMethod]) -> set[str]:
    """``hparams`` keys a checkpoint and a method need not share: inference-only settings, provenance, build arguments."""
    return set(cls.inference_hparams) | set(cls.provenance_hparams) | set(cls.build_arguments)


def check_hparams(method: AnomalyMethod, saved: dict, path: str | Path) -> None:
    """Refuse a checkpoint made by a differently configured method (inference-only settings may differ)."""
    free = free_hparams(type(method))
    # A setting added by a later volad is absent from older checkpoints, which were made with its default.
    params = inspect.signature(type(method).__init__).parameters
    saved = {**{k: p.default for k, p in params.items() if k not in saved and p.default is not inspect.Parameter.empty}, **saved}
    diff = {
        k: (saved.get(k), method.hparams.get(k))
        for k in set(saved) | set(method.hparams)
        if k not in free and saved.get(k) != method.hparams.get(k)
    }
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise VoladConfigError(
            f"{path}: checkpoint was made by a differently configured method ({detail}); "
            "repeat the run's own settings, or use another --output_dir"
        )


#: Run settings a resumed run may change: the weight-averaging decay shapes the saved average, not the training path
#: (``max_epochs`` is not a run setting: it may always grow).
RESUME_MAY_CHANGE = frozenset({"ema_decay"})
#: Run settings added after volad 0.1, with the value every run made before them had: a checkpoint that
#: does not record one was made with it, so a resume that asks for another value is refused like any change.
RECORDED_SINCE = {"precise_bn_batches": 0, "average_best": 1}
#: What a resume may change, as the README and the resume error say it.
RESUME_RULE = "only --max_epochs may grow, and --ema_decay may change (it shapes the saved average, not the training path)"


def check_same_run(saved: dict, now: dict, path: str | Path) -> None:
    """Refuse to resume a run with settings that differ from those it recorded.

    Args:
        saved: The run record in the checkpoint (``payload["run"]``).
        now: The record the current command would write.
        path: The checkpoint, named in the error.
    """
    # Settings a run recorded; one recorded by a later volad only (absent from ``saved``) cannot differ,
    # except those whose earlier value is known.
    saved = {**{k: v for k, v in RECORDED_SINCE.items() if k in now}, **saved}
    diff = {k: (saved.get(k), now.get(k)) for k in sorted(saved) if saved.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE}
    if diff:
        detail = "; ".join(f"{k}: run has {a!r}, this command {b!r}" for k, (a, b) in diff.items())
        raise VoladConfigError(
            f"{path}: this command differs from the run it would resume ({detail}). "
            f"Repeat the run's own settings ({RESUME_RULE}), or train into another --output_dir"
        )
    for k in sorted(RESUME_MAY_CHANGE):
        if k in saved and saved.get(k) != now.get(k):
            print(f"volad: {k} changes on resume from {saved.get(k)!r} to {now.get(k)!r} (allowed: {RESUME_RULE})")


def checkpoint_path(output_dir: str | Path, checkpoint: str = "best") -> Path:
    """The checkpoint file meant by ``checkpoint``: ``best`` (else ``last``), ``last``, or a path.

    Raises:
        VoladConfigError: no such checkpoint.
    """
    ckdir = Path(output_dir) / "checkpoints"
    if checkpoint in ("best", "last"):
        candidates = [ckdir / "best.pt", ckdir / "last.pt"] if checkpoint == "best" else [ckdir / "last.pt"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise VoladConfigError(f"no checkpoint in {ckdir}: run the bundle's train.json with --output_dir {output_dir} first")
        return path
    path = Path(checkpoint)
    if not path.is_file():
        raise VoladConfigError(f"{path}: checkpoint file not found")
    return path


def provenance(path: Path, payload: dict) -> dict[str, Any]:
    """Which checkpoint made some maps (written into their ``index.json``): file, SHA-256, epoch, stage, val AUPRC, data,
    what the validation split chose about the method itself (``selection``: a fusion's members and rule), if anything,
    and the epochs whose weights it averages (``averaged_epochs``, under ``average_best``)."""
    return {
        "path": str(path),
        "sha256": file_sha256(path),
        "epoch": payload.get("epoch"),
        "stage": payload.get("stage"),
        "val_auprc": payload.get("val_auprc"),
        "data": payload.get("data", {}),
        **({"selection": payload["selection"]} if payload.get("selection") else {}),
        **({"averaged_epochs": payload["averaged_epochs"]} if payload.get("averaged_epochs") else {}),
    }


def load_trained(method: AnomalyMethod, output_dir: str | Path, checkpoint: str = "best") -> AnomalyMethod:
    """Load trained weights into ``method`` and return it.

    Args:
        method: Method built with the same arguments as in training.
        output_dir: Run folder of the training run.
        checkpoint: ``"best"`` (falls back to ``"last"`` when no validation ran),
            ``"last"``, or a path to a ``.pt`` file.

    Raises:
        VoladConfigError: no checkpoint, one made by a differently configured
            method, or one holding more than plain data.
    """
    try:
        path = checkpoint_path(output_dir, checkpoint)
    except VoladConfigError:
        if method.stages or checkpoint not in ("best", "last"):
            raise
        method.checkpoint_info = {"path": None, "note": "nothing to train"}
        return method
    payload = read_checkpoint(path)
    check_hparams(method, payload["hparams"], path)
    method.load_state_dict(payload["method"])
    method.checkpoint_info = provenance(path, payload)
    log.info("loaded %s (stage %s, epoch %s)", path, payload.get("stage"), payload.get("epoch"))
    return method


def recorded_val_auprc(path: str | Path) -> float:
    """The val AUPRC a checkpoint recorded (``-inf`` when the file is absent or recorded none): a run killed after
    writing ``best.pt`` but before ``last.pt`` resumes knowing its best."""
    path = Path(path)
    if not path.is_file():
        return float("-inf")
    val = read_checkpoint(path).get("val_auprc")
    return float(val) if val is not None and math.isfinite(val) else float("-inf")
