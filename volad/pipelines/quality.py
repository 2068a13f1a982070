"""``volad bench quality``: every method trained, mapped and evaluated through its own bundle, beside the baselines."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from volad.bundle.config import combines_runs, default_member_names, run_bundle
from volad.data.held_out import without_kind_in_val
from volad.data.manifest import every_contrast
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

    A method is a bundle or baseline name, or ``NAME:contrasts=C1+C2`` (``ae3d:contrasts=all``): that method
    reading those contrasts whatever ``contrasts`` says, in a run folder and rows of its own (``ae3d_all``;
    :func:`method_spec`), so one bench holds ae3d on every contrast beside intensity on FLAIR. With
    ``contrasts`` given, ``all`` means all of those (what a cross-dataset protocol's two datasets share).

    Training, inference and evaluation use each bundle's ``train.json``,
    ``inference.json`` and ``evaluate.json``: training with only the dataset, run
    folder, mode and seed overridden (and ``max_epochs``/``patch_size`` when
    given), inference and evaluation with only the run folder (the run describes
    itself), so the figures are those a user of the bundle gets. A bundle that
    combines runs (``fusion3d``) gets every method benchmarked before it as a
    member when its ``train.json`` lists that method among its default members
    (``fusion3d``: intensity, normative_views, ae3d_all, pii3d), so its row is the
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
    specs = [method_spec(m) for m in methods]  # every entry read before anything trains
    for spec, (name, own_contrasts, _) in zip(methods, specs):
        if own_contrasts and combines_runs(name):
            raise VoladConfigError(f"--methods {spec}: {name} combines runs and reads the contrasts of its members; give contrasts to the members")
    if leave_out_kind and val_dataset:
        raise VoladConfigError("leave one kind out reads one dataset's val split; it does not combine with a val_dataset")
    if leave_out_kind:
        runs_dir = str(Path(runs_dir) / f"without_{leave_out_kind}")
        data_root = str(without_kind_in_val(dataset, data_root, leave_out_kind, Path(runs_dir) / "data"))
    rows, kinds, trained = [], [], []
    for name, own_contrasts, label in specs:
        out = Path(runs_dir) / (label if spatial_dims == 3 else f"{label}_2d")
        if combines_runs(name):  # a fusion of the runs benchmarked before it
            train_over = {"output_dir": str(out), "members": [str(p) for p in fused_members(name, trained)], "seed": seed}
        else:
            train_over = {"dataset": dataset, "data_root": data_root, "output_dir": str(out), "spatial_dims": spatial_dims, "seed": seed}
            if val_dataset:
                train_over.update(val_dataset=val_dataset, val_data_root=val_data_root)
            if own_contrasts or contrasts:  # "all" of a bench given contrasts (what two datasets share): all of those
                train_over["contrasts"] = list(contrasts if contrasts and every_contrast(own_contrasts) else own_contrasts or contrasts)
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
        run_bundle(name, "evaluate", output_dir=str(out), method_name=label, **(postprocessing or {}))
        rep = json.loads((out / "report.json").read_text())
        v = rep["voxel"]
        kinds.append((rep.get("method_hparams") or {}).get("kind"))
        rows.append(
            {
                "method": label,
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


def method_spec(spec: str) -> tuple[str, list[str] | None, str]:
    """A ``--methods`` entry read: ``NAME`` or ``NAME:contrasts=C1+C2`` (``all``: every contrast the data has).

    Returns:
        The bundle or baseline name, the contrasts the entry gives it (``None``: the bench's or the bundle's own),
        and the run's label, which names its run folder and its rows: ``NAME``, or ``NAME_C1+C2`` (``ae3d_all``, the
        folder fusion3d's default members name).
    """
    name, sep, setting = spec.partition(":")
    if not sep:
        return spec, None, spec
    key, eq, value = setting.partition("=")
    if key != "contrasts" or not eq or not value or not name:
        raise VoladConfigError(f"--methods {spec!r}: expected NAME or NAME:contrasts=C1+C2 (or NAME:contrasts=all); a method entry sets only its contrasts")
    chosen = value.split("+")
    return name, chosen, f"{name}_{'+'.join(chosen)}"


def fused_members(name: str, trained: Sequence[Path]) -> list[Path]:
    """The run folders among ``trained`` (benchmarked before bundle ``name``) that it fuses: those of its default
    members, in its order; all of ``trained`` when none of them is one. Default members that were not benchmarked
    are named on standard output, so a fusion of fewer members than its default is never silent."""
    if not trained:
        raise VoladConfigError(f"{name} combines trained runs: list the methods it fuses before it in --methods")
    by_name = {Path(p).name.removesuffix("_2d"): Path(p) for p in trained}
    defaults = default_member_names(name)
    chosen = [by_name[m] for m in defaults if m in by_name]
    missing = [m for m in defaults if m not in by_name]
    if chosen and missing:
        print(f"volad bench: {name} fuses {', '.join(p.name for p in chosen)}; its default members {', '.join(missing)} were not benchmarked "
              f"before it (list them in --methods; member NAME_C1+C2 is NAME:contrasts=C1+C2, e.g. ae3d_all is ae3d:contrasts=all)")
    return chosen or list(trained)
