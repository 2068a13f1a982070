"""Choose an inference-only setting (e.g. a diffusion method's ``t_test``) on the validation split.

``volad tune BUNDLE --output_dir RUN --param t_test --values 150 300 500``
rebuilds the bundle's method once per value, loads the run's checkpoint into it
(allowed because the setting is listed in the method's ``inference_hparams``),
maps the labelled **validation** subjects exactly as training's validation does
and prints voxel AUPRC per value. The test split is never read. The result is
written to ``RUN/tuning_<param>.json``; pass the chosen value to
``inference.json`` (``--<param> VALUE``) so the maps and the report use it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

from volad.cli_format import HelpFormatter
from volad.errors import VoladConfigError
from volad.io import atomic_path


def _value(text: str) -> Any:
    """Command-line value as JSON (numbers, lists, null, booleans) or else a string, as monai.bundle reads overrides."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def tune_on_val(
    bundle: str,
    *,
    output_dir: str,
    param: str,
    values: Sequence[Any],
    overrides: dict[str, Any] | None = None,
    checkpoint: str = "best",
) -> dict[str, Any]:
    """Validation AUPRC of a trained run for each value of one inference-only setting.

    Args:
        bundle: Bundle name under ``bundles/`` (e.g. ``pddpm3d``).
        output_dir: The training run's folder (its checkpoint is loaded).
        param: Bundle ID of the setting (must be one of the method's ``inference_hparams``).
        values: Values to try.
        overrides: Further train-config overrides, as given in training (dataset, spatial_dims, ...).
        checkpoint: ``best``, ``last`` or a ``.pt`` path.

    Returns:
        The record written to ``tuning_<param>.json``: ``rows`` (one per value:
        ``{param, value, val_auprc, seconds, subjects}``) and ``best`` (the value with the highest val AUPRC).

    Raises:
        VoladConfigError: the setting changes training (not inference-only), or no checkpoint.
    """
    from volad.bundles import bundle_config
    from volad.checkpoint import load_trained
    from volad.validation import LabelledValidation, validation_auprc

    rows = []
    for v in values:
        cfg = bundle_config(bundle, "train", **{**(overrides or {}), "output_dir": output_dir, param: v})
        trainer = cfg.get_parsed_content("trainer", instantiate=True)
        method = trainer.method
        if param not in type(method).inference_hparams and param != "inference_patch_size":
            raise VoladConfigError(
                f"{bundle}: {param!r} changes training, not only inference (inference-only settings of "
                f"{type(method).__name__}: {', '.join(type(method).inference_hparams) or 'none'})"
            )
        load_trained(method, output_dir, checkpoint)
        method.to(trainer.device).eval()
        cases = LabelledValidation(trainer.val_dataset, trainer.transform, trainer.val_max_subjects)
        if not len(cases):
            raise VoladConfigError(f"{trainer.val_dataset.name}: no labelled validation subjects to tune on")
        t0 = time.perf_counter()
        auprc = validation_auprc(method, cases, patch_size=trainer.inference_patch_size, device=trainer.device)
        row = {"param": param, "value": v, "val_auprc": auprc, "seconds": time.perf_counter() - t0, "subjects": len(cases)}
        print(f"volad tune: {param}={v}: val AUPRC {auprc:.4f} ({row['subjects']} val subjects, {row['seconds']:.1f} s)", flush=True)
        rows.append(row)
    best = max((r for r in rows if not math.isnan(r["val_auprc"])), key=lambda r: r["val_auprc"], default=None)
    record = {
        "bundle": bundle,
        "output_dir": output_dir,
        "chosen_on": "val",
        "metric": "voxel AUPRC over brain voxels of the labelled val subjects",
        "rows": rows,
        "best": None if best is None else best["value"],
    }
    with atomic_path(Path(output_dir) / f"tuning_{param}.json") as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2))
    return record


def build_parser() -> argparse.ArgumentParser:
    """The command's options (also read by the test that every option has help)."""
    p = argparse.ArgumentParser(prog="volad tune", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("bundle", help="bundle name, e.g. pddpm3d")
    p.add_argument("--output_dir", required=True, help="the trained run's folder")
    p.add_argument("--param", required=True, help="inference-only bundle ID, e.g. t_test")
    p.add_argument("--values", nargs="+", required=True, type=_value, help="values to try (JSON, e.g. 50 100 250)")
    p.add_argument("--checkpoint", default="best", help="best, last, or a .pt path")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="train-config overrides used in training (dataset=..., spatial_dims=2)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    overrides = {}
    for kv in a.set:
        if "=" not in kv:
            raise VoladConfigError(f"--set expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        overrides[k] = _value(v)
    record = tune_on_val(a.bundle, output_dir=a.output_dir, param=a.param, values=a.values, overrides=overrides, checkpoint=a.checkpoint)
    best = next((r for r in record["rows"] if r["value"] == record["best"]), None)
    if best is not None:
        print(f"volad tune: best on val: {a.param}={best['value']} (AUPRC {best['val_auprc']:.4f}); "
              f"use it with: python -m monai.bundle run --config_file bundles/{a.bundle}/inference.json --output_dir {a.output_dir} --{a.param} {best['value']}")
    return 0
