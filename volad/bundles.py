"""Bundles: finding them, loading their configs, and what happens before a bundle's job starts.

:func:`discover_bundles` lists ``bundles/*/train.json``; :func:`bundle_config`
loads one of a bundle's configs with overrides (what ``volad bench``, ``volad
protocol`` and ``volad tune`` build their runs from).

Every bundle config calls :func:`start` from its ``initialize`` list, which
``python -m monai.bundle run`` evaluates before ``run``:

* **Overrides are checked** (:mod:`volad.overrides`). ``--max_epoch 1`` (a
  misspelling) would otherwise add an unused key and train for the default
  epochs; an override whose ID the bundle does not have is an error that lists
  close matches, and a training setting given to inference is checked against the run.
* **``--help``** prints the bundle's settings and defaults and exits, instead of
  starting the default job.
* **Seeds are set before any network is built**, so the same command with the
  same ``--seed`` gives the same weights (on CPU; see :func:`volad.engine.seed_everything`).
* **Under torchrun, one job over all processes.** The process group is joined
  (:func:`volad.distributed.setup`) before anything is built, so training runs
  DDP and inference splits the subjects; the printed output of ranks above 0 is
  dropped (their errors still reach stderr).
* **Errors are readable.** MONAI wraps every exception raised inside a config
  expression in a long chain ending with ``Failed to evaluate ConfigExpression``;
  for volad's own errors (bad data, bad settings) only the one-line message is
  printed, last (``VOLAD_DEBUG=1`` shows the traceback). The exit code stays
  non-zero.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from volad.errors import VoladConfigError, VoladDataError
from volad.overrides import check_overrides, load_config

HELP_FLAGS = ("help", "h")


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """An exception, then its causes (or contexts), outermost first."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def excepthook(exc_type, exc, tb) -> None:
    """Print volad's own error alone and last; other errors keep their traceback, their root cause repeated last."""
    chain = list(_chain(exc))
    found = next((e for e in chain if isinstance(e, (VoladConfigError, VoladDataError))), None)
    if found is not None and not os.environ.get("VOLAD_DEBUG"):
        print("(VOLAD_DEBUG=1 shows the traceback)", file=sys.stderr)
        print(f"volad: error: {found}", file=sys.stderr, flush=True)
        return
    sys.__excepthook__(exc_type, exc, tb)
    inner = chain[-1]
    if inner is not exc:
        print(f"volad: error: {type(inner).__name__}: {inner}", file=sys.stderr, flush=True)


def parse_cli_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` pairs of a ``monai.bundle run`` command line (``sys.argv``).

    A flag followed by another flag (or nothing) is ``True``, as python-fire reads it.
    """
    args = list(argv)[2:]  # after the program and the "run" command
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        tok = args[i]
        i += 1
        if not tok.startswith("-") or tok in ("-", "--"):
            continue  # a positional run_id, or fire's separator
        key = tok.lstrip("-")
        if "=" in key:
            key, value = key.split("=", 1)
        elif i < len(args) and not args[i].startswith("--"):
            value = args[i]
            i += 1
        else:
            value = True
        out[key] = value
    return out


def bundle_dir() -> Path:
    """The ``bundles/`` folder of the source tree (or of the working directory)."""
    here = Path(__file__).resolve().parents[1] / "bundles"
    return here if here.is_dir() else Path.cwd() / "bundles"


def bundle_config(name: str, role: str = "train", **overrides):
    """A bundle's config (``bundles/<name>/<role>.json``) with overrides; baselines by baseline name
    (:data:`volad.methods.baselines.BASELINES`, built by ``baseline3d``)."""
    from monai.bundle import ConfigParser

    bundle = name
    from volad.methods.baselines import BASELINES

    if name in BASELINES:
        bundle = "baseline3d"
        if role == "train":
            overrides["baseline"] = name
    path = bundle_dir() / bundle / f"{role}.json"
    if not path.is_file():
        known = ", ".join(discover_bundles())
        raise VoladConfigError(f"unknown bundle {name!r}: no {path} (bundles: {known}; baselines: normative, intensity)")
    parser = ConfigParser()
    parser.read_config(str(path))
    parser.update(overrides)
    return parser


def combines_runs(name: str) -> bool:
    """Whether a bundle combines trained runs (its ``train.json`` takes ``members``, e.g. ``fusion3d``)
    instead of building and training a method of its own."""
    return "members" in bundle_config(name, "train").config


def discover_bundles() -> list[str]:
    """Every bundle: the folders of ``bundles/`` that hold a ``train.json``."""
    return sorted(p.parent.name for p in bundle_dir().glob("*/train.json"))


def _default_behind(config: dict, key: str) -> Any:
    """What a ``null`` setting means: the default of the component argument it feeds (``None`` if none)."""
    from pydoc import locate

    for value in config.values():
        if isinstance(value, dict) and "_target_" in value:
            for arg, ref in value.items():
                if ref == f"@{key}":
                    try:
                        from volad.types import defaults_of

                        return defaults_of(locate(value["_target_"])).get(arg)
                    except Exception:  # an unimportable target: show no default
                        return None
    return None


def bundle_help(config: dict, config_file: str) -> str:
    """The settings of a bundle config and their defaults."""
    lines = [f"{config_file}: settings (override with --name value)"]
    if Path(config_file).name != "train.json":
        lines.append("null: as the run folder recorded it (inference), or volad's default (shown)")
    lines.append("")
    for key, value in config.items():
        if key.startswith("_") or key in ("run", "initialize", "finalize", "imports", "train", "handlers"):
            continue
        if isinstance(value, dict) and "_target_" in value:
            continue  # components built from the settings above
        shown = json.dumps(value)
        behind = _default_behind(config, key) if value is None else None
        if behind is not None:
            shown += f" (default {json.dumps(behind)})"
        lines.append(f"  --{key:<24} {shown if len(shown) < 70 else shown[:67] + '...'}")
    card = Path(config_file).parent / "README.md"
    if card.is_file():
        lines += ["", f"Model card: {card}"]
    return "\n".join(lines)


def start(seed: int | None = None, argv: Sequence[str] | None = None) -> None:
    """Prepare a bundle run (called from the bundle's ``initialize``).

    Args:
        seed: Seed for every RNG, set before any network is built (``None``: leave the RNGs alone).
        argv: Command line (default ``sys.argv``); only a ``monai.bundle run`` command line is checked.

    Raises:
        VoladConfigError: an override names no ID of the bundle.
        SystemExit: after printing the help, when ``--help`` was given.
    """
    sys.excepthook = excepthook
    logging.getLogger("ignite").setLevel(logging.WARNING)  # Ignite's per-epoch INFO lines drown volad's own
    from volad import distributed

    if distributed.setup() and not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # one voice: rank 0's
    argv = list(sys.argv if argv is None else argv)
    if argv[1:2] == ["run"]:  # python -m monai.bundle run ...
        overrides = parse_cli_overrides(argv)
        config_file = overrides.get("config_file")
        if config_file:
            config = load_config(config_file)
            if any(h in overrides for h in HELP_FLAGS):
                print(bundle_help(config, str(config_file)))
                raise SystemExit(0)
            for line in check_overrides({k: v for k, v in overrides.items() if k not in HELP_FLAGS}, config, config_file):
                print(line)
    if seed is not None:
        from volad.engine import seed_everything

        seed_everything(int(seed))
