"""Choose an inference-only setting (e.g. a diffusion method's ``t_test``) on the validation split.

``volad tune BUNDLE --output_dir RUN --param t_test --values 150 300 500``
rebuilds the run's method from its checkpoint once per value (allowed because
the setting is listed in the method's ``inference_hparams``),
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

from volad.errors import VoladConfigError
from volad.io import atomic_path
from volad.utils.cli_format import HelpFormatter, cli_value


def tune_on_val(
    *,
    output_dir: str,
    param: str,
    values: Sequence[Any],
    checkpoint: str = "best",
    val_max_subjects: int | None = 8,
    device: str = "auto",
) -> dict[str, Any]:
    """Validation AUPRC of a trained run for each value of one inference-only setting.

    The run folder describes the method and its data (:func:`volad.runs.record.open_run`);
    the labelled ``val`` split of the run's validation dataset is mapped.

    Args:
        output_dir: The training run's folder (its checkpoint is loaded).
        param: One of the method's ``inference_hparams``, or ``inference_patch_size``.
        values: Values to try.
        checkpoint: ``best``, ``last`` or a ``.pt`` path.
        val_max_subjects: Cap on validation subjects (as training's validation).
        device: ``"auto"`` picks CUDA when present.

    Returns:
        The record written to ``tuning_<param>.json``: ``rows`` (one per value:
        ``{param, value, val_auprc, seconds, subjects}``) and ``best`` (the value with the highest val AUPRC).

    Raises:
        VoladConfigError: the setting changes training (not inference-only), or no checkpoint.
    """
    from volad.data.manifest import load_dataset
    from volad.engine.validation import LabelledValidation, validation_auprc
    from volad.runs.record import open_run
    from volad.types import resolve_device

    run = open_run(output_dir, checkpoint)
    free = run.method_class.inference_hparams
    if param not in free and param != "inference_patch_size":
        raise VoladConfigError(
            f"{output_dir}: {param!r} changes training, not only inference (inference-only settings of "
            f"{run.kind}: {', '.join(free) or 'none'}, and inference_patch_size)"
        )
    val = load_dataset(run.data.get("val_spec", run.data["val_dataset"]), run.data["val_root"], run.data["contrasts"])
    cases = LabelledValidation(val, val.transform(anatomy=run.method().anatomy), val_max_subjects)
    if not len(cases):
        raise VoladConfigError(f"{val.name}: no labelled validation subjects to tune on")
    dev = resolve_device(device)
    rows = []
    for v in values:
        patch = v if param == "inference_patch_size" else run.inference.get("patch_size")
        method = run.method(**({} if param == "inference_patch_size" else {param: v})).to(dev).eval()
        t0 = time.perf_counter()
        auprc = validation_auprc(method, cases, patch_size=patch, device=dev)
        row = {"param": param, "value": v, "val_auprc": auprc, "seconds": time.perf_counter() - t0, "subjects": len(cases)}
        print(f"volad tune: {param}={v}: val AUPRC {auprc:.4f} ({row['subjects']} val subjects, {row['seconds']:.1f} s)", flush=True)
        rows.append(row)
    best = max((r for r in rows if not math.isnan(r["val_auprc"])), key=lambda r: r["val_auprc"], default=None)
    record = {
        "method": run.kind,
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
    p.add_argument("bundle", help="bundle the run was trained with, e.g. pddpm3d (named in the suggested inference command)")
    p.add_argument("--output_dir", required=True, help="the trained run's folder (it records the method and data)")
    p.add_argument("--param", required=True, help="inference-only bundle ID, e.g. t_test")
    p.add_argument("--values", nargs="+", required=True, type=cli_value, help="values to try (JSON, e.g. 50 100 250)")
    p.add_argument("--checkpoint", default="best", help="best, last, or a .pt path")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    record = tune_on_val(output_dir=a.output_dir, param=a.param, values=a.values, checkpoint=a.checkpoint, device=a.device)
    best = next((r for r in record["rows"] if r["value"] == record["best"]), None)
    if best is not None:
        print(f"volad tune: best on val: {a.param}={best['value']} (AUPRC {best['val_auprc']:.4f}); "
              f"use it with: python -m monai.bundle run --config_file bundles/{a.bundle}/inference.json --output_dir {a.output_dir} --{a.param} {best['value']}")
    return 0
