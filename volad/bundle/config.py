"""Bundles from code: finding them, loading their configs with overrides, and running their jobs.

:func:`discover_bundles` lists ``bundles/*/train.json``; :func:`bundle_config`
loads one of a bundle's configs with overrides, and :func:`run_bundle` runs its job
as ``python -m monai.bundle run`` does (what ``volad bench``, ``volad protocol``
and the tests build their runs from).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from volad.errors import VoladConfigError
from volad.methods.baselines import BASELINES
from volad.utils.seed import seed_everything

#: The component each bundle role runs.
JOBS = {"train": "trainer", "inference": "inferer", "evaluate": "evaluator"}


def bundle_dir() -> Path:
    """The ``bundles/`` folder of the source tree (or of the working directory)."""
    here = Path(__file__).resolve().parents[2] / "bundles"  # volad/bundle/config.py -> the repository root
    return here if here.is_dir() else Path.cwd() / "bundles"


def bundle_overlays(name: str) -> list[str]:
    """The overlays a bundle ships beside its configs (``bundles/<name>/paper_*.json``: a paper's settings), by name."""
    return sorted(p.stem for p in (bundle_dir() / name).glob("paper_*.json"))


def bundle_config(name: str, role: str = "train", overlays: Sequence[str] = (), **overrides):
    """A bundle's config (``bundles/<name>/<role>.json``) with overrides; baselines by baseline name
    (:data:`volad.methods.baselines.BASELINES`, built by ``baseline3d``).

    ``overlays`` name files of the bundle (``paper_2d`` for ``bundles/<name>/paper_2d.json``) read after the
    role's config, key by key, as ``--config_file "['train.json','paper_2d.json']"`` merges them; the
    overrides come last.
    """
    from monai.bundle import ConfigParser

    bundle = name
    if name in BASELINES:
        bundle = "baseline3d"
        if role == "train":
            overrides["baseline"] = name
    path = bundle_dir() / bundle / f"{role}.json"
    if not path.is_file():
        known = ", ".join(discover_bundles())
        raise VoladConfigError(f"unknown bundle {name!r}: no {path} (bundles: {known}; baselines: {', '.join(BASELINES)})")
    files = [path]
    for overlay in overlays:
        extra = bundle_dir() / bundle / f"{overlay}.json"
        if not extra.is_file():
            raise VoladConfigError(f"bundle {bundle!r} has no overlay {overlay!r} (no {extra}; it has: {', '.join(bundle_overlays(bundle)) or 'none'})")
        files.append(extra)
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.update(overrides)
    return parser


def run_bundle(name: str, role: str = "train", overlays: Sequence[str] = (), **overrides: Any) -> Any:
    """Run a bundle's job from code, as ``python -m monai.bundle run --config_file bundles/<name>/<role>.json`` runs it.

    A config with a ``seed`` is seeded first, before any network is built (what its
    ``initialize`` step does), so the same overrides give the same weights.

    Returns:
        What the job's ``run()`` returns (the checkpoint, the maps folder, the report).
    """
    config = bundle_config(name, role, overlays, **overrides)
    if "seed" in config.config:
        seed_everything(int(config.get_parsed_content("seed")))
    return config.get_parsed_content(JOBS[role], instantiate=True).run()


def combines_runs(name: str) -> bool:
    """Whether a bundle combines trained runs (its ``train.json`` takes ``members``, e.g. ``fusion3d``)
    instead of building and training a method of its own."""
    return "members" in bundle_config(name, "train").config


def default_member_names(name: str) -> list[str]:
    """The methods a run-combining bundle fuses by default: the folder names of its ``train.json`` ``members``
    (``runs/ae3d`` is ``ae3d``), in order."""
    return [Path(str(m)).name for m in bundle_config(name, "train").config.get("members") or ()]


def discover_bundles() -> list[str]:
    """Every bundle: the folders of ``bundles/`` that hold a ``train.json``."""
    return sorted(p.parent.name for p in bundle_dir().glob("*/train.json"))
