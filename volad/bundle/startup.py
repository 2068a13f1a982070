"""What happens before a bundle's job starts.

Every bundle config calls :func:`start` from its ``initialize`` list, which
``python -m monai.bundle run`` evaluates before ``run``:

* **Overrides are checked** (:mod:`volad.bundle.overrides`). ``--max_epoch 1`` (a
  misspelling) would otherwise add an unused key and train for the default
  epochs; an override whose ID the bundle does not have is an error that lists
  close matches, and a training setting given to inference is checked against the run.
* **``--help``** prints the bundle's settings and defaults and exits, instead of
  starting the default job.
* **Seeds are set before any network is built**, so the same command with the
  same ``--seed`` gives the same weights (on CPU; see :func:`volad.utils.seed.seed_everything`).
* **Under torchrun, one job over all processes.** The process group is joined
  (:func:`volad.utils.distributed.setup`) before anything is built, so training runs
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

from volad.bundle.overrides import check_overrides, load_config, parse_cli_overrides
from volad.errors import VoladConfigError, VoladDataError

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
    from volad.utils import distributed

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
        from volad.utils.seed import seed_everything

        seed_everything(int(seed))
