"""Budget study: detection quality against training CPU time (``volad bench budget``).

Each method is trained once, through its bundle's own ``train.json``, until a
CPU budget is spent, with its weights saved as the run passes each mark
(:class:`volad.engine.trainer.Trainer` ``snapshot_minutes``; training CPU time is the
training process's CPU time over all its threads, so it means the same with 1 or
2 threads and under contention). Every snapshot then makes maps of the val and
test splits through ``inference.json`` and is scored through ``evaluate.json``
twice: on val (what a user may look at to pick a budget) and on test (the
threshold chosen on val). The baselines stand beside every method, as they do in
``volad bench quality``. Nothing is chosen on test.

During training the validation check is off (``val_interval`` 0), so every
CPU-second goes to training and a snapshot is the weights at that moment, not
the best epoch before it; and ``max_epochs`` is unbounded, so a bundle with a
cosine learning-rate schedule would not decay within the budget (every bundle
studied here keeps a constant rate).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from volad.bundle.config import run_bundle
from volad.evaluation.compare import LESION_KIND_METRICS, kind_figures
from volad.pipelines.quality import quality
from volad.runs.checkpoint import read_checkpoint

#: ``max_epochs`` of a budgeted run: the CPU budget, not the epoch count, ends it.
UNBOUNDED_EPOCHS = 1_000_000


def snapshot_name(minutes: float) -> str:
    """File name of the snapshot a run saves when it passes ``minutes`` of training CPU time."""
    return f"cpu_{float(minutes):g}min.pt"


def train_budgeted(name: str, out: Path, *, dataset: str, minutes: Sequence[float], spatial_dims: int, seed: int, **overrides) -> None:
    """Train bundle ``name`` into ``out`` until ``max(minutes)`` training CPU-minutes, saving a snapshot at each mark.

    A run folder that already holds every snapshot is reused; an interrupted one resumes.
    """
    if all((out / "checkpoints" / snapshot_name(m)).is_file() for m in minutes):
        print(f"volad: {out} already holds every snapshot ({', '.join(f'{m:g}' for m in minutes)} CPU-min), reusing it")
        return
    over = {
        "dataset": dataset,
        "output_dir": str(out),
        "spatial_dims": spatial_dims,
        "seed": seed,
        "max_epochs": UNBOUNDED_EPOCHS,
        "val_interval": 0,
        "snapshot_minutes": [float(m) for m in minutes],
        "max_cpu_minutes": float(max(minutes)),
        **overrides,
    }
    run_bundle(name, "train", **over)


def settings_suffix(settings: dict | None) -> str:
    """How inference settings name a snapshot's folder and row: ``""``, or e.g. ``" t_test=50"``."""
    return "".join(f" {k}={json.dumps(v, separators=(',', ':'))}" for k, v in sorted((settings or {}).items()))


def score_snapshot(name: str, out: Path, minutes: float, label: str | None = None, settings: dict | None = None) -> dict:
    """Maps of val and test from one snapshot, evaluated on val and on test; one row of the study.

    Args:
        name: Bundle name.
        out: The run folder.
        minutes: The snapshot's CPU-minute mark.
        label: The row's method column (default ``name``).
        settings: Inference-only bundle IDs for the maps (e.g. ``{"t_test": 50}``, a value ``volad tune`` chose
            on val); they name the maps' folder and the row apart from the defaults'.
    """
    ckpt = out / "checkpoints" / snapshot_name(minutes)
    payload = read_checkpoint(ckpt)
    suffix = settings_suffix(settings)
    folder = out / "budget" / re.sub(r"[^\w=.,-]+", "_", f"{float(minutes):g}min{suffix}")
    maps = folder / "maps"
    run_bundle(name, "inference", output_dir=str(out), checkpoint=str(ckpt), maps_dir=str(maps), **(settings or {}))
    reports = {}
    for split, where in (("test", folder), ("val", folder / "val")):
        over = {"output_dir": str(where), "maps_dir": str(maps), "method_name": f"{name}{suffix} @ {float(minutes):g} CPU-min"}
        if split == "val":  # val scored at the threshold the test report took from val, so no other split is read
            over.update(test_split="val", threshold=reports["test"]["threshold"]["value"])
        run_bundle(name, "evaluate", **over)
        reports[split] = json.loads((where / "report.json").read_text())
    index = json.loads((maps / "index.json").read_text())
    secs = [e["seconds"] for e in index["subjects"] if "seconds" in e]
    test = reports["test"]
    return {
        "method": (label or name) + suffix,
        "budget_minutes": float(minutes),
        "cpu_minutes": float(payload["cpu_minutes"]),
        "epoch": payload.get("epoch"),
        "val_auprc": reports["val"]["voxel"]["auprc"],
        "auprc": test["voxel"]["auprc"],
        "dice_val_threshold": test["voxel"]["dice"],
        "auroc": test["voxel"]["auroc"],
        "seconds_per_volume": float(np.mean(secs)) if secs else float("nan"),
        **kind_figures(test, LESION_KIND_METRICS),
    }


def budget_study(
    methods: Sequence[str],
    *,
    minutes: Sequence[float] = (5, 15, 45),
    dataset: str = "phantom",
    runs_dir: str = "runs/bench",
    spatial_dims: int = 3,
    seed: int = 0,
    baselines: Sequence[str] = ("intensity", "normative_signed"),
    train_overrides: dict | None = None,
    tag: str = "",
    inference_overrides: dict | None = None,
) -> tuple[list[dict], list[dict], Path]:
    """Train, snapshot and score each method; returns (method rows, baseline rows, the plot ``budget_<dataset>[_2d].png``).

    Args:
        methods: Bundle names.
        minutes: Training CPU-minute marks (the largest is each run's budget).
        dataset: Manifest name or path.
        runs_dir: Folder of the study's run folders (``<method>[_2d]_budget``), reused when complete.
        spatial_dims: 3, or 2 for slice mode.
        seed: Seed of every run.
        baselines: Baselines evaluated beside (through ``volad bench quality``).
        train_overrides: Bundle IDs set for every method's training (e.g. a slice-mode geometry).
        tag: Names runs made with other settings apart: ``<method>[_2d]_budget_<tag>``, labelled ``<method>[_2d] <tag>``.
        inference_overrides: Inference-only bundle IDs for every snapshot's maps (e.g. a ``t_test`` that
            ``volad tune`` chose on val); rows and map folders carry them in their names.
    """
    from volad.evaluation.figures import plot_budget

    rows = []
    suffix = "" if spatial_dims == 3 else "_2d"
    for name in methods:
        out = Path(runs_dir) / (f"{name}{suffix}_budget" + (f"_{tag}" if tag else ""))
        train_budgeted(name, out, dataset=dataset, minutes=minutes, spatial_dims=spatial_dims, seed=seed, **(train_overrides or {}))
        label = f"{name}{suffix}" + (f" {tag}" if tag else "")
        rows += [score_snapshot(name, out, m, label=label, settings=inference_overrides) for m in sorted(minutes)]
    base = quality(list(baselines), dataset=dataset, runs_dir=runs_dir, seed=seed) if baselines else []
    stem = f"budget_{Path(str(dataset)).stem}{suffix}" + (f"_{tag}" if tag else "")
    plot = plot_budget(rows, base, Path(runs_dir) / f"{stem}.png", f"training budget on {dataset}, {spatial_dims}D" + (f", {tag}" if tag else ""))
    return rows, base, plot
