"""``volad bench``: quality, speed and memory figures, printed as tables.

* ``quality``: trains (or reuses) each method through its bundle's own configs
  on the harder benchmark (``phantom_kinds``; ``--dataset`` for another), writes
  maps and reports, and prints Dice at the validation threshold, oracle ⌈Dice⌉,
  voxel AUROC and AUPRC per method on the test split, then a table by kind: AUPRC
  per lesion kind and FPR on healthy clean and artefact scans, with 95 %
  intervals. The baselines (intensity, absolute z-score, the plain signed
  z-score and volad's signed normative model) stand beside the methods; the
  strongest is marked ``baseline to beat``. ``--leave_out_kind K`` (or ``all``)
  runs everything again with lesion kind K removed from val (checkpoints,
  thresholds and fusion chosen without it) and prints each method's figures on
  K alone: the leave-one-kind-out table. ``--seeds 0 1 2`` trains every method
  once per training seed (seed 0 in ``--runs_dir``, seed k in
  ``<runs_dir>/seed<k>``) and prints the spread of test AUPRC over the seeds,
  overall and per lesion kind. ``--val_dataset`` (with ``--val_data_root``)
  trains every method on the healthy split of ``--dataset`` and validates,
  thresholds and tests on the other dataset; ``--protocol NAME`` sets that
  pairing, the contrasts and the mode of a published comparison (IXI T2 →
  BraTS 2021 T2, ...) and prints the published rows beside volad's, labelled
  with their source and what differs.
* ``speed``: seconds for one full-volume anomaly map of a 1 mm phantom volume
  (197×233×189) and the peak RSS of the process that made it.
* ``memory``: peak RSS of training with 10 and with 100 subjects.
* ``diffusion``: one-step diffusion maps against a 50-step DDIM chain (2 mm).
* ``synthesis``: synthetic anomalies per second at 64³, per task and mixed.
* ``scale``: ae3d training throughput (patches per second) in one process and
  with ``torchrun`` DDP over 2 processes, and the scaling efficiency.
* ``budget``: val and test AUPRC of each method against training CPU-minutes
  (:mod:`volad.pipelines.budget`), beside the baselines, with a plot.
* ``evaluation``: seconds and peak RSS of ``evaluate.json`` over N synthetic
  1 mm-sized maps (240×240×155), for growing N.

Each speed/memory figure is measured in a fresh subprocess so peak RSS belongs
to that measurement alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from volad.data.held_out import val_kinds
from volad.errors import VoladConfigError
from volad.evaluation.published import protocol_names, published_protocol, published_rows
from volad.pipelines import cost
from volad.pipelines.quality import quality
from volad.utils.cli_format import HelpFormatter, parse_assignments


def _section(title: str, rows: list[dict], cols: Sequence[str]) -> None:
    """Print one benchmark's table under its Markdown heading."""
    print(f"{title}\n")
    print(_table(rows, cols))
    print()


def _table(rows: list[dict], cols: Sequence[str]) -> str:
    def f(v):
        if isinstance(v, list):
            return "[" + ", ".join(f(x) for x in v) + "]"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def seed_runs_dir(runs_dir: str, seed: int) -> str:
    """The folder of one training seed's runs: ``runs_dir`` for seed 0, ``<runs_dir>/seed<k>`` for seed k."""
    return runs_dir if seed == 0 else str(Path(runs_dir) / f"seed{seed}")


def leave_out_rows(rows: list[dict], kind: str) -> list[dict]:
    """One row per method of a run with ``kind`` left out of val: its figures on that kind alone, and the strongest baseline's."""
    base = [r for r in rows if str(r.get("role", "")).startswith("baseline")]
    best = max(base, key=lambda r: r.get(f"auprc[{kind}]") or -1.0, default=None)
    return [
        {
            "left_out": kind,
            "method": r["method"],
            "role": r.get("role"),
            "auprc[kind]": r.get(f"auprc[{kind}]"),
            "auprc[kind]_ci95": r.get(f"auprc[{kind}]_ci95"),
            "dice[kind]": r.get(f"dice[{kind}]"),
            "best_baseline_on_kind": None if best is None else f"{best['method']} {best.get(f'auprc[{kind}]') or float('nan'):.4f}",
        }
        for r in rows
    ]


def seed_spread_rows(by_seed: dict[int, list[dict]]) -> list[dict]:
    """One row per method: test AUPRC (overall and per lesion kind) at each seed, and its spread (max − min) over the seeds."""
    seeds = sorted(by_seed)
    methods = list(dict.fromkeys(r["method"] for k in seeds for r in by_seed[k]))
    metrics = ["auprc"] + [c for c in dict.fromkeys(c for k in seeds for r in by_seed[k] for c in r) if c.startswith("auprc[") and not c.endswith("_ci95")]
    out = []
    for name in methods:
        found = {k: next((r for r in by_seed[k] if r["method"] == name), None) for k in seeds}
        row = {"method": name, "role": next((r.get("role") for r in found.values() if r), None)}
        for metric in metrics:
            vals = [found[k].get(metric) for k in seeds if found[k] is not None and isinstance(found[k].get(metric), float)]
            row[f"{metric}_by_seed"] = vals
            row[f"{metric}_spread"] = max(vals) - min(vals) if len(vals) == len(seeds) else None
        out.append(row)
    return out


def published_table(rows: list[dict], protocol: str) -> tuple[str, list[dict]]:
    """The heading and rows of a published comparison: volad's rows (Dice at the val threshold, AUPRC), then the published ones."""
    spec = published_protocol(protocol)
    heading = (f"## published beside measured: {spec['title']}\n\npublished rows: {spec['source']}. What differs: {spec['differs']}. "
               "Published figures are as printed there, not rerun by volad.")
    own = [{"method": r["method"], "role": r.get("role"), "dice": r.get("dice_val_threshold"), "auprc": r.get("auprc"), "source": "volad, this run"} for r in rows]
    return heading, own + published_rows(protocol)


def subgroup_rows(rows: list[dict], field: str) -> list[dict]:
    """Each method's figures per subgroup of one metadata field (sex, age, site): sizes, healthy FPR and flagged share,
    lesioned AUPRC and Dice, with the AUPRC and FPR intervals."""
    out = []
    for r in rows:
        for name, g in (r.get("subgroups") or {}).get(field, {}).items():
            ci = g.get("ci95", {})
            out.append({"method": r["method"], "role": r.get("role"), field: name, "n": g["n"], "auprc": g.get("auprc"), "auprc_ci95": ci.get("auprc"),
                        "dice": g.get("dice"), "fpr": g.get("fpr"), "fpr_ci95": ci.get("fpr"), "flagged_volumes": g.get("flagged_volumes")})
    return out


def _print_quality(rows: list[dict], dataset: str) -> None:
    """The quality tables: overall, then one per metric by kind."""
    print(f"## quality: {dataset} test split (threshold from the validation split)\n")
    print(_table(rows, ["method", "role", "dice_val_threshold", "dice_oracle", "auroc", "auprc", "auprc_ci95", "seconds_per_volume", "train_seconds"]))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    titles = {
        "auprc": "voxel AUPRC per lesion kind (over that kind's test volumes)",
        "auroc": "voxel AUROC per lesion kind",
        "dice": "Dice per lesion kind at the threshold chosen on val",
        "dice_oracle": "⌈Dice⌉ per lesion kind (oracle: best threshold on that kind's test voxels)",
        "fpr": "voxel false-positive rate on healthy clean and artefact scans at the threshold chosen on val",
        "flagged_volumes": "share of healthy scans with any detection at that threshold",
    }
    for metric, title in titles.items():
        cols = [k for k in keys if k.startswith(f"{metric}[")]
        if cols:
            print(f"\n## quality by kind: {title}; 95 % intervals over each kind's volumes\n")
            print(_table(rows, ["method", "role", *cols]))


def build_parser() -> argparse.ArgumentParser:
    """The command's options (also read by the test that every option has help)."""
    p = argparse.ArgumentParser(prog="volad bench", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("what", choices=["quality", "speed", "memory", "diffusion", "synthesis", "scale", "evaluation", "budget", "all"], nargs="?", default="all", help="which benchmark to run")
    p.add_argument("--methods", nargs="+", default=["intensity", "normative", "zscore", "normative_signed", "ae3d", "vae3d", "rd4ad3d"],
                   help="quality: methods (bundle names, or the baselines intensity, normative, zscore, normative_signed, normative_views), each "
                        "optionally with its own contrasts, NAME:contrasts=C1+C2 or NAME:contrasts=all (run folder and row NAME_C1+C2, NAME_all); "
                        "fusion3d fuses those listed before it that are its default members (intensity normative_views ae3d:contrasts=all pii3d; "
                        "all of them when none is)")
    p.add_argument("--data_root", default=None, help="quality: the dataset's folder (default: the manifest's, or volad's cache for generated data)")
    p.add_argument("--val_dataset", default=None, help="quality: a labelled dataset to validate, threshold and test on (cross-dataset; every method trains on --dataset's healthy split)")
    p.add_argument("--val_data_root", default=None, help="quality: the --val_dataset's folder")
    p.add_argument("--contrasts", nargs="+", default=None, help="quality: contrasts every method reads (default: each bundle's own)")
    p.add_argument("--protocol", default=None, choices=protocol_names("voxel"),
                   help="quality: a published comparison: sets --dataset, --val_dataset, --contrasts and --spatial_dims as published and prints the published rows beside volad's")
    p.add_argument("--by", nargs="+", default=[], metavar="FIELD",
                   help="quality: also print each method per subgroup of these metadata fields (site, sex, age: a bias report)")
    p.add_argument("--leave_out_kind", nargs="+", default=[], metavar="KIND",
                   help="quality: also run with each lesion KIND removed from val (all: every kind val has) and print each method on that kind alone")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="quality: training seeds; seed k > 0 runs in <runs_dir>/seed<k>, and with several the spread of test AUPRC over them is printed")
    p.add_argument("--speed_methods", nargs="+", default=["ae3d", "rd4ad3d"], help="speed: bundles to time")
    p.add_argument("--dataset", default=None,
                   help="quality, budget: dataset, a manifest name or a dataset folder (default phantom_kinds: every lesion kind and artefacts; phantom: the quick one)")
    p.add_argument("--runs_dir", default="runs/bench", help="quality, budget: folder of the benchmark's run folders (reused when complete)")
    p.add_argument("--max_epochs", type=int, default=None, help="quality: override every bundle's max_epochs (default: the bundle's own)")
    p.add_argument("--spatial_dims", type=int, default=3, choices=[2, 3], help="quality, budget: 3D, or 2 for slice mode")
    p.add_argument("--checkpoint_dir", default=None, help="speed: trained run folder of a single speed method (default: untrained weights; same cost)")
    p.add_argument("--subjects", type=int, nargs="+", default=[10, 100], help="memory: training-set sizes to measure peak RSS at")
    p.add_argument("--diffusion_methods", nargs="+", default=["pddpm3d", "cddpm3d", "synomaly3d"], help="diffusion: bundles to time")
    p.add_argument("--patch_size", type=int, default=None, help="quality: override every bundle's training patch size")
    p.add_argument("--budget_methods", nargs="+", default=["pddpm3d", "cddpm3d", "synomaly3d", "ae3d"], help="budget: bundles to train under a CPU budget")
    p.add_argument("--budget_minutes", type=float, nargs="+", default=[5, 15, 45], help="budget: training CPU-minute marks (the largest is the budget)")
    p.add_argument("--train_overrides", nargs="+", default=[], metavar="ID=VALUE",
                   help="budget: bundle IDs set for training (JSON values), e.g. beta_schedule=cosine prediction=epsilon")
    p.add_argument("--inference_overrides", nargs="+", default=[], metavar="ID=VALUE",
                   help="budget: inference-only bundle IDs for every snapshot's maps (JSON values), e.g. t_test=50 as volad tune chose it on val")
    p.add_argument("--budget_tag", default="", help="budget: names runs made with --train_overrides apart (run folder <method>_budget_<tag>)")
    p.add_argument("--maps", type=int, nargs="+", default=[10, 40], help="evaluation: numbers of 1 mm test maps to evaluate")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.dataset is None and not a.protocol:
        a.dataset = "phantom_kinds"
    if a.protocol:  # the published pairing; a dataset named explicitly (e.g. the folder volad preprocess wrote) stands in for it
        spec = published_protocol(a.protocol)
        a.dataset, a.val_dataset = a.dataset or spec["dataset"], a.val_dataset or spec["val_dataset"]
        a.contrasts, a.spatial_dims = spec["contrasts"], spec["spatial_dims"]
        print(f"volad bench: protocol {a.protocol}: {spec['title']} (train {a.dataset} at {a.data_root}, validate and test {a.val_dataset} at "
              f"{a.val_data_root}, contrasts {', '.join(a.contrasts)}, {a.spatial_dims}D)")
    if a.leave_out_kind and a.val_dataset:  # refused before anything trains
        raise VoladConfigError("--leave_out_kind reads one dataset's val split; it does not combine with --val_dataset or --protocol")
    if a.what in ("diffusion", "all"):
        rows = [cost.run_child("diffusion_child", method=m) for m in a.diffusion_methods]
        _section("## diffusion: one 2 mm phantom map (one-step paths) against a 50-step DDIM full chain, same network and windows", rows, ["method", "shape", "threads", "seconds", "network_windows", "stages", "ddim_steps", "ddim_seconds", "peak_rss_mb"])
    if a.what in ("synthesis", "all"):
        row = cost.run_child("synthesis_child")
        _section("## synthesis: synthetic anomalies per second on 64³ phantom patches (one TorchIO call each)", [row], list(row))
    if a.what in ("speed", "all"):
        rows = [cost.run_child("speed_child", method=m, checkpoint_dir=a.checkpoint_dir if len(a.speed_methods) == 1 else None) for m in a.speed_methods]
        _section("## speed: full-volume anomaly map, 1 mm phantom volume", rows, ["method", "shape", "threads", "seconds_first", "seconds_median", "peak_rss_mb"])
    if a.what in ("memory", "all"):
        rows = [cost.run_child("memory_child", n_subjects=n) for n in a.subjects]
        _section("## memory: AE3D training peak RSS against number of subjects", rows, ["n_subjects", "iterations", "seconds", "peak_rss_mb"])
        if len(rows) >= 2:
            print(f"ratio {rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.3f}\n")
    if a.what in ("scale", "all"):
        folder = Path(a.runs_dir) / "scale"
        rows = [cost.scale_run(p, t, str(folder / f"p{p}t{t}")) for p, t in ((1, 1), (1, 2), (2, 1))]
        single = rows[0]["patches_per_second"]
        for r in rows:
            r["efficiency_vs_1x1"] = round(r["patches_per_second"] / (single * r["processes"] * r["threads_each"]), 2)
        _section("## scale: ae3d training on the phantom (48³ patches, batch 4 per process), CPU, last of 2 epochs", rows, ["processes", "threads_each", "patches_per_epoch", "epoch_seconds", "patches_per_second", "efficiency_vs_1x1"])
    if a.what in ("evaluation", "all"):
        rows = [cost.run_child("evaluation_child", n_maps=n) for n in a.maps]
        _section("## evaluation: evaluate.json over 1 mm maps (240×240×155), one process", rows, ["maps", "shape", "seconds", "seconds_per_map", "exact", "peak_rss_mb"])
    if a.what == "budget":  # hours of training: only when asked for by name
        from volad.pipelines.budget import budget_study

        rows, base, plot = budget_study(a.budget_methods, minutes=a.budget_minutes, dataset=a.dataset, runs_dir=a.runs_dir, spatial_dims=a.spatial_dims,
                                        train_overrides=parse_assignments(a.train_overrides, "volad bench"), tag=a.budget_tag,
                                        inference_overrides=parse_assignments(a.inference_overrides, "volad bench"))
        print(f"## budget: {a.dataset} ({a.spatial_dims}D), voxel AUPRC on val and test (threshold from val) against training CPU-minutes\n")
        cols = ["method", "budget_minutes", "cpu_minutes", "epoch", "val_auprc", "auprc", "dice_val_threshold", "auroc", "seconds_per_volume"]
        print(_table(rows + base, cols))
        kinds = [k for k in dict.fromkeys(k for r in rows + base for k in r) if k.startswith("auprc[") and not k.endswith("_ci95")]
        if kinds:
            print("\n## budget by kind: test AUPRC per lesion kind\n")
            print(_table(rows + base, ["method", "budget_minutes", *kinds]))
        print(f"\nplot: {plot}")
    if a.what in ("quality", "all"):
        by_seed = {}
        for seed in dict.fromkeys(a.seeds):
            by_seed[seed] = quality(a.methods, dataset=a.dataset, data_root=a.data_root, val_dataset=a.val_dataset, val_data_root=a.val_data_root,
                                    contrasts=a.contrasts, runs_dir=seed_runs_dir(a.runs_dir, seed), max_epochs=a.max_epochs, spatial_dims=a.spatial_dims,
                                    patch_size=a.patch_size, seed=seed,
                                    postprocessing=published_protocol(a.protocol).get("postprocessing") if a.protocol else None)
            if len(set(a.seeds)) > 1:
                print(f"\n# training seed {seed}\n")
            _print_quality(by_seed[seed], a.val_dataset or a.dataset)
        rows = by_seed[a.seeds[0]]
        for field in a.by:
            table = subgroup_rows(rows, field)
            print(f"\n## by {field}: healthy FPR and flagged share, lesioned AUPRC and Dice per subgroup, with its number of volumes and 95 % "
                  "intervals over them" + ("" if table else f" (no report has subgroups of {field!r}: the dataset records no such field)") + "\n")
            if table:
                print(_table(table, ["method", "role", field, "n", "auprc", "auprc_ci95", "dice", "fpr", "fpr_ci95", "flagged_volumes"]))
        if a.protocol:
            heading, table = published_table(rows, a.protocol)
            print(f"\n{heading}\n")
            print(_table(table, ["method", "role", "dice", "auprc", "source"]))
        if len(by_seed) > 1:
            spread = seed_spread_rows(by_seed)
            print(f"\n## seed spread: {a.dataset} test AUPRC at training seeds {', '.join(map(str, by_seed))} and its range (max − min)\n")
            print(_table(spread, ["method", "role", *[c for c in spread[0] if c not in ("method", "role")]]))
        left_out = val_kinds(a.dataset, a.data_root) if a.leave_out_kind == ["all"] else a.leave_out_kind
        if a.leave_out_kind and not left_out:
            raise VoladConfigError(f"--leave_out_kind all: the val split of {a.dataset} has no lesion kinds (its manifest gives subjects no health category)")
        table = []
        for kind in left_out:
            held = quality(a.methods, dataset=a.dataset, data_root=a.data_root, contrasts=a.contrasts, runs_dir=seed_runs_dir(a.runs_dir, a.seeds[0]),
                           max_epochs=a.max_epochs, spatial_dims=a.spatial_dims, patch_size=a.patch_size, seed=a.seeds[0], leave_out_kind=kind)
            table += leave_out_rows(held, kind)
        if table:
            print(f"\n## leave one kind out: {a.dataset} test AUPRC and Dice of each lesion kind when val (checkpoints, thresholds, fusion) "
                  "did not hold it; beside each, the same kind with it in val\n")
            seen = {r["method"]: r for r in rows}
            for r in table:
                for metric in ("auprc", "dice"):
                    r[f"{metric}[kind]_with_it_in_val"] = seen.get(r["method"], {}).get(f"{metric}[{r['left_out']}]")
            print(_table(table, ["left_out", "method", "role", "auprc[kind]", "auprc[kind]_ci95", "dice[kind]", "auprc[kind]_with_it_in_val",
                                 "dice[kind]_with_it_in_val", "best_baseline_on_kind"]))
    return 0
