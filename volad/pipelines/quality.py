"""``volad bench quality``: every method trained, mapped and evaluated through its own bundle, beside the baselines."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from volad.bundle.config import combines_runs, default_member_names, run_bundle
from volad.data.held_out import without_kind_in_val
from volad.errors import VoladConfigError
from volad.evaluation.compare import HEALTHY_KIND_METRICS, LESION_KIND_METRICS, kind_figures, mark_baselines
from volad.methods.baselines import BASELINES


def quality(
    methods: Sequence[str] = ("intensity", "normative", "zscore", "normative_signed", "ae3d", "vae3d", "rd4ad3d"),
    *,
    dataset: str = "phantom",
    data_root: str | None = None,
    val_dataset: str | None = None,
    val_data_root: str | None = None,
    contrasts: Sequence[str] | None = None,
    runs_dir: str = "runs/bench",
    max_epochs: int | None = None,
    spatial_dims: int = 3,
    patch_size: int | None = None,
    seed: int = 0,
    leave_out_kind: str | None = None,
    postprocessing: dict | None = None,
) -> list[dict]:
    """Train (or resume/reuse), infer and evaluate each method through its bundle's own configs.

    Training, inference and evaluation use each bundle's ``train.json``,
    ``inference.json`` and ``evaluate.json``: training with only the dataset, run
    folder, mode and seed overridden (and ``max_epochs``/``patch_size`` when
    given), inference and evaluation with only the run folder (the run describes
    itself), so the figures are those a user of the bundle gets. A bundle that
    combines runs (``fusion3d``) gets every method benchmarked before it as a
    member when its ``train.json`` lists that method among its default members
    (``fusion3d``: intensity, normative_views, ae3d, pii3d), so its row is the
    fusion a user of the bundle builds from the same runs; when none of the runs
    before it is a default member, it fuses all of them. Returns report summaries.

    With ``val_dataset`` every method trains on the healthy split of ``dataset``
    and is validated, thresholded and tested on ``val_dataset`` (a cross-dataset
    protocol, e.g. IXI → BraTS); ``contrasts`` picks the contrasts both share.

    With ``leave_out_kind=K`` everything runs on a view of the dataset whose val
    split lacks lesion kind ``K`` (:mod:`volad.data.held_out`), in run folders of
    its own (``<runs_dir>/without_<K>/``): checkpoints, thresholds and the
    fusion are chosen without ``K``, and the test split is unchanged, so the
    report's figures for ``K`` are those of a kind nothing was chosen on.

    ``postprocessing`` (``evaluate.json`` settings, e.g. a published protocol's
    ``{"median_mm": 5, "min_component_voxels": 7}``) evaluates every method alike;
    ``None`` lets each method keep its own median window.
    """
    if leave_out_kind and val_dataset:
        raise VoladConfigError("leave one kind out reads one dataset's val split; it does not combine with a val_dataset")
    if leave_out_kind:
        runs_dir = str(Path(runs_dir) / f"without_{leave_out_kind}")
        data_root = str(without_kind_in_val(dataset, data_root, leave_out_kind, Path(runs_dir) / "data"))
    rows, kinds, trained = [], [], []
    for name in methods:
        out = Path(runs_dir) / (name if spatial_dims == 3 else f"{name}_2d")
        if combines_runs(name):  # a fusion of the runs benchmarked before it
            train_over = {"output_dir": str(out), "members": [str(p) for p in fused_members(name, trained)], "seed": seed}
        else:
            train_over = {"dataset": dataset, "data_root": data_root, "output_dir": str(out), "spatial_dims": spatial_dims, "seed": seed}
            if val_dataset:
                train_over.update(val_dataset=val_dataset, val_data_root=val_data_root)
            if contrasts:
                train_over["contrasts"] = list(contrasts)
            if max_epochs is not None and name not in BASELINES:
                train_over["max_epochs"] = max_epochs
            if patch_size is not None:
                train_over["patch_size"] = patch_size
            trained.append(out)
        t0 = time.perf_counter()
        run_bundle(name, "train", **train_over)
        train_s = time.perf_counter() - t0
        run_bundle(name, "inference", output_dir=str(out))
        index = json.loads((out / "maps" / "index.json").read_text())
        secs = [e["seconds"] for e in index["subjects"] if "seconds" in e]
        run_bundle(name, "evaluate", output_dir=str(out), method_name=name, **(postprocessing or {}))
        rep = json.loads((out / "report.json").read_text())
        v = rep["voxel"]
        kinds.append((rep.get("method_hparams") or {}).get("kind"))
        rows.append(
            {
                "method": name,
                "dice_val_threshold": v["dice"],
                "dice_oracle": v["dice_oracle"],
                "auroc": v["auroc"],
                "auprc": v["auprc"],
                "threshold_chosen_on": rep["threshold"]["chosen_on"],
                "train_seconds": train_s,
                "seconds_per_volume": float(np.mean(secs)) if secs else float("nan"),
                "auprc_ci95": rep.get("ci95", {}).get("auprc"),
                **kind_figures(rep, LESION_KIND_METRICS + HEALTHY_KIND_METRICS),
                "subgroups": (rep.get("by_subgroup") or {}).get("fields", {}),
            }
        )
    mark_baselines(rows, kinds)
    return rows


def fused_members(name: str, trained: Sequence[Path]) -> list[Path]:
    """The run folders among ``trained`` (benchmarked before bundle ``name``) that it fuses: those of its default
    members, in its order; all of ``trained`` when none of them is one."""
    if not trained:
        raise VoladConfigError(f"{name} combines trained runs: list the methods it fuses before it in --methods")
    by_name = {Path(p).name.removesuffix("_2d"): Path(p) for p in trained}
    chosen = [by_name[m] for m in default_member_names(name) if m in by_name]
    return chosen or list(trained)
