"""Bundles: finding them, loading their configs, and what happens before a bundle's job starts.

:func:`discover_bundles` lists ``bundles/*/train.json``; :func:`bundle_config`
loads one of a bundle's configs with overrides (what ``volad bench``, ``volad
protocol`` and ``volad tune`` build their runs from).

Every bundle config calls :func:`start` from its ``initialize`` list, which
``python -m monai.bundle run`` evaluates before ``run``:

* **Overrides are checked.** ``--max_epoch 1`` (a misspelling) would otherwise add
  an unused key and train for the default epochs; an override whose ID the
  bundle does not have is an error that lists close matches.
* **``--help``** prints the bundle's settings and defaults and exits, instead of
  starting the default job.
* **Seeds are set before any network is built**, so the same command with the
  same ``--seed`` gives the same weights (on CPU; see :func:`volad.engine.seed_everything`).
* **Errors are readable.** MONAI wraps every exception raised inside a config
  expression in a long chain ending with ``Failed to evaluate ConfigExpression``;
  for volad's own errors (bad data, bad settings) only the one-line message is
  printed, last (``VOLAD_DEBUG=1`` shows the traceback). The exit code stays
  non-zero.
"""

from __future__ import annotations

import ast
import difflib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from volad.errors import VoladConfigError, VoladDataError

#: Arguments of ``monai.bundle run`` / ``create_workflow`` and of MONAI's tracking
#: settings: not bundle IDs, but legitimate on the command line.
MONAI_RUN_ARGS = frozenset(
    {
        "run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
        "workflow_name", "workflow_type", "properties_path",
        "tracking_uri", "experiment_name", "run_name", "save_execute_config",
    }
)  # fmt: skip
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


def _config_ids(config: Any, prefix: str = "") -> set[str]:
    """Every ID of a config, nested ones as ``a#b`` (MONAI's separator)."""
    ids = set()
    if isinstance(config, dict):
        items = config.items()
    elif isinstance(config, list):
        items = ((str(i), v) for i, v in enumerate(config))
    else:
        return ids
    for k, v in items:
        key = f"{prefix}{k}"
        ids.add(key)
        ids |= _config_ids(v, f"{key}#")
    return ids


def _load_config(files: Any) -> dict:
    from monai.bundle import ConfigParser

    if isinstance(files, str) and files.strip().startswith("["):
        files = json.loads(files.replace("'", '"'))
    return ConfigParser.load_config_files(files)


def cli_value(text: Any) -> Any:
    """A command-line value as python-fire reads it (numbers, lists, ``None``/``True``/``False``; else the string)."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _resolved(parser: Any, id_: str) -> Any:
    value = parser.get_parsed_content(id_, instantiate=True)
    return json.loads(json.dumps(value, default=str))


def _same_data(setting: str, given: Any, recorded: Any) -> bool:
    """Whether a trainer data setting names what the checkpoint recorded (manifest names, resolved folders)."""
    if given in (None, "", "None"):
        return True  # the default: the run recorded what it resolved to
    if setting in ("dataset", "val_dataset"):
        from volad.data.manifest import read_manifest

        return read_manifest(given)[0]["name"] == recorded
    if setting in ("data_root", "val_data_root"):
        return Path(str(given)).resolve() == Path(str(recorded)).resolve()
    if setting == "contrasts":
        return ([given] if isinstance(given, str) else list(given)) == list(recorded)
    return False


def _feeds(raw: Any, id_: str, settings: dict[str, Any]) -> bool:
    """Whether a config entry (``raw``, at ``id_``) is set by one of ``settings``: ``@name`` in it, or its own ID given."""
    if any(k.replace("::", "#") == id_ for k in settings):
        return True
    text = json.dumps(raw)
    return any(f'"@{k}"' in text or f"@{k}#" in text for k in settings)


def check_against_run(settings: dict[str, Any], train_file: str | Path, output_dir: str | Path, checkpoint: str = "best") -> list[str]:
    """Check training settings given to ``inference.json``/``evaluate.json`` against what the run recorded.

    Inference rebuilds the method and its data from the run folder, so training
    settings are not needed there. One that repeats the run's value is accepted
    (older scripts passed them); one that contradicts the checkpoint is an error
    naming both values.

    Returns:
        One line per accepted setting (printed by :func:`start`).

    Raises:
        VoladConfigError: a setting contradicts the checkpoint, or is a
            training-only setting the checkpoint does not record (``max_epochs``).
    """
    from monai.bundle import ConfigParser

    from volad.runs import RECORDED_TRAINING, open_run

    run = open_run(output_dir, checkpoint)
    values = {k: cli_value(v) for k, v in settings.items()}
    base, new = ConfigParser(), ConfigParser()
    base.read_config(str(train_file))
    new.read_config(str(train_file))
    new.update(values)
    shown = ", ".join(f"--{k} {v}" for k, v in settings.items())
    where = f"the run in {output_dir} (checkpoint {run.checkpoint})"
    # The method and trainer arguments these settings feed (directly, or a nested ID such as method#norm).
    changed = {comp: [a for a in base[comp] if a != "_target_" and _feeds(base[comp][a], f"{comp}#{a}", values)] for comp in ("method", "trainer")}
    changed["trainer"] = [a for a in changed["trainer"] if a != "method"]
    if changed["method"]:
        method = new.get_parsed_content("method", instantiate=True)
        rebuilt, free = method.hparams, set(type(method).inference_hparams) | set(type(method).provenance_hparams)
        keys = {a for a in changed["method"] if a in rebuilt} or {"kind"}  # an argument that is no hparam (a builder's) picks the kind
        for key in sorted(keys):
            if key not in free and rebuilt.get(key) != run.hparams.get(key):
                raise VoladConfigError(f"{shown} contradicts {where}: it was trained with {key}={run.hparams.get(key)!r}, "
                                       f"this command asks for {key}={rebuilt.get(key)!r}. Inference rebuilds the method from the run: leave training settings out")
    for arg in changed["trainer"]:
        given = _resolved(new, f"trainer#{arg}")
        if arg not in RECORDED_TRAINING:
            raise VoladConfigError(f"{shown}: {arg} is a training setting that inference does not use; the run's checkpoint is used as trained")
        try:
            recorded = run.recorded(arg)
        except KeyError:
            raise VoladConfigError(f"{shown}: {where} does not record {arg}; leave it out") from None
        same = _same_data(arg, given, recorded) if arg in ("dataset", "val_dataset", "data_root", "val_data_root", "contrasts") else given == recorded
        if not same:
            raise VoladConfigError(f"{shown} contradicts {where}: it was trained with {arg}={recorded!r}, this command asks for {arg}={given!r}. "
                                   "Inference rebuilds the method and data from the run: leave training settings out")
    return [f"volad: {shown}: the run's own setting (inference reads it from {output_dir}; no need to pass it)"]


def check_overrides(overrides: dict[str, Any], config: dict, config_file: str | Path | None = None) -> list[str]:
    """Refuse overrides that name no ID of the bundle, listing close matches.

    For ``inference.json`` and ``evaluate.json``, a training setting (an ID of the
    bundle's ``train.json``) is checked against the run instead (:func:`check_against_run`).

    Returns:
        Lines to print about accepted training settings.

    Raises:
        VoladConfigError: an override matches nothing, or contradicts the run.
    """
    ids = _config_ids(config)
    top = sorted(k for k in config if not k.startswith("_"))
    train_file = Path(config_file).parent / "train.json" if config_file else None
    training: dict[str, Any] = {}
    if train_file is not None and train_file.is_file() and Path(config_file).name != "train.json":
        train_ids = _config_ids(_load_config(str(train_file)))
        training = {k: v for k, v in overrides.items() if k not in MONAI_RUN_ARGS and k.replace("::", "#") not in ids and k.replace("::", "#") in train_ids}
    for key in overrides:
        norm = key.replace("::", "#")
        if key in MONAI_RUN_ARGS or norm in ids or key.replace("-", "_") in ids or key in training:
            continue
        close = difflib.get_close_matches(norm, top if "#" not in norm else sorted(ids), n=4, cutoff=0.6)
        hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close else "; --help lists the settings"
        raise VoladConfigError(f"unknown setting --{key}: this bundle has no ID {norm!r}{hint}")
    if not training:
        return []
    output_dir = cli_value(overrides.get("output_dir", config.get("output_dir")))
    return check_against_run(training, train_file, output_dir, str(cli_value(overrides.get("checkpoint", config.get("checkpoint", "best")))))


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
        if key.startswith("_") or key in ("run", "initialize", "finalize", "imports"):
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
    argv = list(sys.argv if argv is None else argv)
    if argv[1:2] == ["run"]:  # python -m monai.bundle run ...
        overrides = parse_cli_overrides(argv)
        config_file = overrides.get("config_file")
        if config_file:
            config = _load_config(config_file)
            if any(h in overrides for h in HELP_FLAGS):
                print(bundle_help(config, str(config_file)))
                raise SystemExit(0)
            for line in check_overrides({k: v for k, v in overrides.items() if k not in HELP_FLAGS}, config, config_file):
                print(line)
    if seed is not None:
        from volad.engine import seed_everything

        seed_everything(int(seed))
