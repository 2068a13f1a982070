"""Every method volad has, by ``kind``: how a run folder's record finds the class that rebuilds its method.

Methods are found, not listed: every module under ``volad/methods`` is imported on
first use (a plugin-style discovery, so a new method's module needs no entry here).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

from volad.errors import VoladConfigError
from volad.methods.base import AnomalyMethod


def method_classes() -> dict[str, type[AnomalyMethod]]:
    """Every concrete method, by ``kind`` (its class name): every module under ``volad.methods`` is imported,
    so a new method's module is found without being listed anywhere."""
    for info in pkgutil.walk_packages([str(Path(__file__).parent)], "volad.methods."):
        importlib.import_module(info.name)

    found: dict[str, type[AnomalyMethod]] = {}
    todo = list(AnomalyMethod.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if not inspect.isabstract(cls) and cls.__module__.startswith("volad."):
            found[cls.__name__] = cls
    return found


def recorded_class(hparams: dict, where: str) -> type[AnomalyMethod]:
    """The class that rebuilds the method a record (``hparams``) describes.

    Args:
        hparams: The record, with its ``kind``.
        where: What holds the record (a checkpoint, a fusion member), named in the error.

    Raises:
        VoladConfigError: no volad method has the recorded ``kind``.
    """
    classes = method_classes()
    kind = hparams.get("kind")
    if kind not in classes:
        raise VoladConfigError(f"{where}: no volad method of kind {kind!r} (known: {', '.join(sorted(classes))})")
    return classes[kind]


def method_volume_score(hparams: dict) -> str:
    """How evaluation takes one score per volume from the maps of the method ``hparams`` describe (its class's
    ``volume_score_mode``); maps of another tool, or of an unknown kind, get the base method's."""
    cls = method_classes().get(str(hparams.get("kind")))
    return (cls or AnomalyMethod).volume_score_mode


def method_median_mm(hparams: dict) -> float:
    """The median window (mm) evaluation applies by default to the maps of the method ``hparams`` describe
    (:meth:`~volad.methods.base.AnomalyMethod.map_median_mm`); maps of another tool, or of an unknown kind, get the
    base method's (the literature's 5 mm)."""
    cls = method_classes().get(str(hparams.get("kind")))
    return (cls or AnomalyMethod).map_median_mm(hparams)
