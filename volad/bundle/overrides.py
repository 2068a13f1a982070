"""Command-line overrides of a bundle run, checked before the job starts.

* An override whose ID the bundle does not have (``--max_epoch 1``, a misspelling
  that would otherwise add an unused key) is refused, listing close matches.
* A training setting given to ``inference.json`` or ``evaluate.json`` (an ID of
  the bundle's ``train.json``) is checked against what the run folder recorded:
  the run's own value is accepted with a note, another value is an error naming
  both (inference rebuilds the method and data from the run, :mod:`volad.runs.record`).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Sequence

from volad.errors import VoladConfigError
from volad.types import unset
from volad.utils.cli_format import cli_value

#: Arguments of ``monai.bundle run`` / ``create_workflow`` and of MONAI's tracking
#: settings: not bundle IDs, but legitimate on the command line.
MONAI_RUN_ARGS = frozenset(
    {
        "run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
        "workflow_name", "workflow_type", "properties_path",
        "tracking_uri", "experiment_name", "run_name", "save_execute_config",
    }
)  # fmt: skip


def config_ids(config: Any, prefix: str = "") -> set[str]:
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
        ids |= config_ids(v, f"{key}#")
    return ids


def load_config(files: Any) -> dict:
    """A bundle config file (or a list of them, as ``--config_file`` takes) as one dict."""
    from monai.bundle import ConfigParser

    if isinstance(files, str) and files.strip().startswith("["):
        files = json.loads(files.replace("'", '"'))
    return ConfigParser.load_config_files(files)


def _resolved(parser: Any, id_: str) -> Any:
    value = parser.get_parsed_content(id_, instantiate=True)
    return json.loads(json.dumps(value, default=str))


def _same_data(setting: str, given: Any, recorded: Any, dataset: str | None = None) -> bool:
    """Whether a trainer data setting names what the checkpoint recorded (manifest names, resolved folders, contrasts as
    the run's training ``dataset`` resolves them)."""
    if unset(given):
        return True  # the default: the run recorded what it resolved to
    if setting in ("dataset", "val_dataset"):
        from volad.data.manifest import read_manifest

        return read_manifest(given)[0]["name"] == recorded
    if setting in ("data_root", "val_data_root"):
        return Path(str(given)).resolve() == Path(str(recorded)).resolve()
    if setting == "contrasts":
        if dataset is not None:
            from volad.data.manifest import chosen_contrasts, read_manifest

            given = chosen_contrasts(read_manifest(dataset)[0], given)
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

    from volad.runs.record import RECORDED_TRAINING, open_run

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
        same = (_same_data(arg, given, recorded, run.data.get("train_spec", run.data.get("train_dataset")))
                if arg in ("dataset", "val_dataset", "data_root", "val_data_root", "contrasts") else given == recorded)
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
    ids = config_ids(config)
    top = sorted(k for k in config if not k.startswith("_"))
    train_file = Path(config_file).parent / "train.json" if config_file else None
    training: dict[str, Any] = {}
    if train_file is not None and train_file.is_file() and Path(config_file).name != "train.json":
        train_ids = config_ids(load_config(str(train_file)))
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
