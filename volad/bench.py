"""``volad bench``: quality, speed and memory figures, printed as tables.

* ``quality``: trains (or reuses) each method through its bundle's own configs
  on the harder benchmark (``phantom_kinds``; ``--dataset`` for another), writes
  maps and reports, and prints Dice at the validation threshold, oracle ⌈Dice⌉,
  voxel AUROC and AUPRC per method on the test split, then a table by kind: AUPRC
  per lesion kind and FPR on healthy clean and artefact scans, with 95 %
  intervals. The baselines (intensity, absolute and signed normative z-score)
  stand beside the methods; the strongest is marked ``baseline to beat``.
* ``speed``: seconds for one full-volume anomaly map of a 1 mm phantom volume
  (197×233×189) and the peak RSS of the process that made it.
* ``memory``: peak RSS of training with 10 and with 100 subjects.
* ``diffusion``: one-step diffusion maps against a 50-step DDIM chain (2 mm).
* ``synthesis``: synthetic anomalies per second at 64³, per task and mixed.
* ``scale``: ae3d training throughput (patches per second) in one process and
  with ``torchrun`` DDP over 2 processes, and the scaling efficiency.
* ``budget``: val and test AUPRC of each method against training CPU-minutes
  (:mod:`volad.budget`), beside the baselines, with a plot.
* ``evaluation``: seconds and peak RSS of ``evaluate.json`` over N synthetic
  1 mm-sized maps (240×240×155), for growing N.

Each speed/memory figure is measured in a fresh subprocess so peak RSS belongs
to that measurement alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from volad.bundles import bundle_config, combines_runs
from volad.cli_format import HelpFormatter, cli_value
from volad.evaluation.compare import HEALTHY_KIND_METRICS, LESION_KIND_METRICS, kind_figures, mark_baselines
from volad.methods.baselines import BASELINES


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(fn: str, **kwargs) -> dict:
    code = f"import json, volad.bench as b; print('@@' + json.dumps(b.{fn}(**{kwargs!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        raise RuntimeError(f"bench child {fn} failed:\n{out.stderr[-3000:]}")
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("@@"))
    return json.loads(line[2:])


# -- methods under test ------------------------------------------------------------
def build_method(name: str, spatial_dims: int = 3, dataset: str = "phantom"):
    """A bundle's method exactly as its ``train.json`` builds it (baselines by baseline name)."""
    return bundle_config(name, "train", spatial_dims=spatial_dims, dataset=dataset).get_parsed_content("method", instantiate=True)


# -- speed ---------------------------------------------------------------------------
def timing_case(method: str, spacing: float, checkpoint_dir: str | None = None, threads: int | None = None):
    """A phantom FLAIR volume with one tumour at ``spacing`` mm, its brain mask, and the method in eval mode."""
    from volad.data.phantom import _template, phantom_subject
    from volad.checkpoint import load_trained

    if threads:
        torch.set_num_threads(threads)
    images, brain, _ = phantom_subject(_template(spacing), np.random.default_rng(123), n_tumours=1, n_small=0)
    x = torch.from_numpy(images["flair"] / max(np.percentile(images["flair"][brain > 0], 99), 1)).float()[None]
    mask = torch.from_numpy(brain).float()[None]
    m = build_method(method)
    if checkpoint_dir and m.stages:
        load_trained(m, checkpoint_dir)
    return x, mask, m.eval()


def speed_child(method: str = "ae3d", checkpoint_dir: str | None = None, repeats: int = 3, threads: int | None = None) -> dict:
    from volad.prediction import predict_volume

    x, mask, m = timing_case(method, 1.0, checkpoint_dir, threads)
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        out = predict_volume(m, x, mask, device="cpu")
        times.append(time.perf_counter() - t)
    return {
        "method": method,
        "shape": list(x.shape[1:]),
        "seconds_first": times[0],
        "seconds_median": float(np.median(times[1:])),
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "map_shape": list(out.anomaly_map.shape[1:]),
    }


def memory_child(n_subjects: int = 10, iterations: int = 40, patch_size: int = 48, batch_size: int = 4) -> dict:
    """Peak RSS of training on ``n_subjects`` (phantom train subjects, repeated to reach n)."""
    from volad.data import load_dataset
    from volad.data.views import to_batch, training_loader

    ds = load_dataset("phantom")
    base = ds.subjects("train")
    subjects = [base[i % len(base)] for i in range(n_subjects)]
    method = build_method("ae3d")
    opt = method.configure_optimizers("main")
    loader = training_loader(subjects, ds.transform(), spatial_dims=3, patch_size=patch_size, batch_size=batch_size)
    it = 0
    t = time.perf_counter()
    while it < iterations:
        for b in loader:
            method.optimization_step(to_batch(b, 3), "main", opt)
            it += 1
            if it >= iterations:
                break
    return {"n_subjects": n_subjects, "iterations": it, "seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb()}


def synthesis_child(size: int = 64, repeats: int = 20, threads: int | None = None) -> dict:
    """Synthetic anomalies per second on ``size``³ phantom patches (TorchIO transform, one per call), by task."""
    import torchio as tio

    from volad.synthesis.tasks import TASKS
    from volad.synthesis.transforms import RandomSyntheticAnomaly

    x, mask, _ = timing_case("ae3d", 1.0, None, threads)
    c = [int(n) // 2 for n in x.shape[1:]]
    crop = (slice(None), *[slice(a - size // 2, a + size // 2) for a in c])
    pool = [torch.flip(x[crop], dims=(1,))]
    row: dict = {"size": size, "threads": torch.get_num_threads()}
    torch.manual_seed(0)
    for tasks in [[t] for t in TASKS] + [list(TASKS)]:
        t0 = time.perf_counter()
        for _ in range(repeats):
            subject = tio.Subject(image=tio.ScalarImage(tensor=x[crop].clone()), brain_mask=tio.LabelMap(tensor=mask[crop].to(torch.uint8)))
            RandomSyntheticAnomaly(tasks=tasks, sources=pool)(subject)
        row["per_second_" + ("all" if len(tasks) > 1 else tasks[0])] = repeats / (time.perf_counter() - t0)
    row["peak_rss_mb"] = peak_rss_mb()
    return row


# -- scale ---------------------------------------------------------------------------
def scale_run(processes: int, threads: int, out_dir: str, dataset: str = "phantom", epochs: int = 2) -> dict:
    """Train ae3d for ``epochs`` epochs with ``processes`` processes (torchrun when above 1) of
    ``threads`` threads each; throughput from the last epoch (the first warms up)."""
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else [])
    cmd = [*launch, "-m", "monai.bundle", "run", "--config_file", str(Path(__file__).resolve().parents[1] / "bundles/ae3d/train.json"),
           "--dataset", dataset, "--output_dir", out_dir, "--max_epochs", str(epochs), "--val_interval", "0", "--device", "cpu", "--tensorboard", "False"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"bench scale run failed:\n{done.stderr[-3000:]}")
    history = torch.load(Path(out_dir) / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["history"]
    last = history[-1]
    patches = last["steps"] * 4 * last.get("processes", 1)  # ae3d's batch of 4 per process
    return {"processes": processes, "threads_each": threads, "epoch_seconds": last["seconds"], "patches_per_epoch": patches,
            "patches_per_second": round(patches / last["seconds"], 2)}


def evaluation_child(n_maps: int = 20, shape: Sequence[int] = (240, 240, 155), n_val: int = 4) -> dict:
    """Seconds and peak RSS of the evaluator over ``n_maps`` test maps of ``shape`` (1 mm), plus
    ``n_val`` val maps for the threshold. One set of files on disk, linked under every subject's
    name, so only the evaluator's own memory grows with the count."""
    import shutil
    import tempfile

    from volad.evaluation.evaluate import Evaluator
    from volad.io import write_json, write_nifti

    root = Path(tempfile.mkdtemp(prefix="volad-bench-eval-"))
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    brain = ((grid**2).sum(0) < 0.8).astype(np.uint8)
    seg = (((grid - np.array([0.3, 0.2, 0.0])[:, None, None, None]) ** 2).sum(0) < 0.02).astype(np.uint8)
    flair = (0.5 + 0.05 * rng.standard_normal(shape) + 0.4 * seg) * brain
    score = (0.3 * rng.standard_normal(shape) + seg) * brain
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    base = root / "base"
    for name, arr in (("flair", flair), ("brainmask", brain), ("seg", seg), ("map", score)):
        write_nifti(arr, affine, base / f"{name}.nii.gz", dtype=np.float32 if name in ("flair", "map") else np.uint8)
    ids = {"val": [f"ev-val-{i:03d}" for i in range(n_val)], "test": [f"ev-test-{i:03d}" for i in range(n_maps)]}
    (root / "maps").mkdir()
    for sid in ids["val"] + ids["test"]:
        (root / sid).mkdir()
        for name in ("flair", "brainmask", "seg"):
            (root / sid / f"{sid}_{name}.nii.gz").symlink_to(base / f"{name}.nii.gz")
        (root / "maps" / f"{sid}_anomaly.nii.gz").symlink_to(base / "map.nii.gz")
    write_json({"train": [], **ids}, root / "splits.json")
    manifest = json.loads((Path(__file__).resolve().parents[1] / "data_manifests" / "synthetic.json").read_text())
    manifest = {**{k: v for k, v in manifest.items() if k != "generator"}, "name": "bench_evaluation", "description": "volad bench evaluation"}
    write_json(manifest, root / "manifest.json")
    try:
        start = time.perf_counter()
        Evaluator(output_dir=str(root / "run"), maps_dir=str(root / "maps"), dataset=str(root / "manifest.json"), data_root=str(root),
                  bootstrap=0, montage_cases=0, threshold_modes=["val_dice"]).run()
        seconds = time.perf_counter() - start
        report = json.loads((root / "run" / "report.json").read_text())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"maps": n_maps, "shape": "×".join(map(str, shape)), "seconds": round(seconds, 1), "seconds_per_map": round(seconds / (n_maps + n_val), 2),
            "exact": report["voxel"].get("exact"), "peak_rss_mb": round(peak_rss_mb())}


# -- quality -------------------------------------------------------------------------
def quality(
    methods: Sequence[str] = ("intensity", "normative", "normative_signed", "ae3d", "vae3d", "rd4ad3d"),
    *,
    dataset: str = "phantom",
    runs_dir: str = "runs/bench",
    max_epochs: int | None = None,
    spatial_dims: int = 3,
    patch_size: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Train (or resume/reuse), infer and evaluate each method through its bundle's own configs.

    Training, inference and evaluation use each bundle's ``train.json``,
    ``inference.json`` and ``evaluate.json``: training with only the dataset, run
    folder, mode and seed overridden (and ``max_epochs``/``patch_size`` when
    given), inference and evaluation with only the run folder (the run describes
    itself), so the figures are those a user of the bundle gets. A bundle that
    combines runs (``fusion3d``) gets every method benchmarked before it as a
    member and chooses among them on val. Returns report summaries.
    """
    rows, kinds, trained = [], [], []
    for name in methods:
        out = Path(runs_dir) / (name if spatial_dims == 3 else f"{name}_2d")
        if combines_runs(name):  # a fusion of the runs benchmarked before it
            train_over = {"output_dir": str(out), "members": [str(p) for p in trained], "seed": seed}
        else:
            train_over = {"dataset": dataset, "output_dir": str(out), "spatial_dims": spatial_dims, "seed": seed}
            if max_epochs is not None and name not in BASELINES:
                train_over["max_epochs"] = max_epochs
            if patch_size is not None:
                train_over["patch_size"] = patch_size
            trained.append(out)
        t0 = time.perf_counter()
        from volad.engine import seed_everything

        seed_everything(seed)  # before the network is built, as the bundle's initialize does
        bundle_config(name, "train", **train_over).get_parsed_content("trainer", instantiate=True).run()
        train_s = time.perf_counter() - t0
        bundle_config(name, "inference", output_dir=str(out)).get_parsed_content("inferer", instantiate=True).run()
        index = json.loads((out / "maps" / "index.json").read_text())
        secs = [e["seconds"] for e in index["subjects"] if "seconds" in e]
        bundle_config(name, "evaluate", output_dir=str(out), method_name=name).get_parsed_content("evaluator", instantiate=True).run()
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
            }
        )
    mark_baselines(rows, kinds)
    return rows


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


def parse_assignments(items: Sequence[str]) -> dict:
    """``ID=VALUE`` strings as a dict, each value read as JSON when it parses (``96``, ``[8,16]``), else kept as text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"volad bench: error: {item!r} is not ID=VALUE")
        out[key] = cli_value(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command's options (also read by the test that every option has help)."""
    p = argparse.ArgumentParser(prog="volad bench", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("what", choices=["quality", "speed", "memory", "diffusion", "synthesis", "scale", "evaluation", "budget", "all"], nargs="?", default="all", help="which benchmark to run")
    p.add_argument("--methods", nargs="+", default=["intensity", "normative", "normative_signed", "ae3d", "vae3d", "rd4ad3d"],
                   help="quality: methods (bundle names, or the baselines intensity, normative, normative_signed); fusion3d fuses the runs listed before it")
    p.add_argument("--speed_methods", nargs="+", default=["ae3d", "rd4ad3d"], help="speed: bundles to time")
    p.add_argument("--dataset", default="phantom_kinds", help="quality, budget: dataset (phantom_kinds: every lesion kind and artefacts; phantom: the quick default)")
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
    if a.what in ("diffusion", "all"):
        rows = [_child("diffusion_child", method=m) for m in a.diffusion_methods]
        _section("## diffusion: one 2 mm phantom map (one-step paths) against a 50-step DDIM full chain, same network and windows", rows, ["method", "shape", "threads", "seconds", "network_windows", "stages", "ddim_steps", "ddim_seconds", "peak_rss_mb"])
    if a.what in ("synthesis", "all"):
        row = _child("synthesis_child")
        _section("## synthesis: synthetic anomalies per second on 64³ phantom patches (one TorchIO call each)", [row], list(row))
    if a.what in ("speed", "all"):
        rows = [_child("speed_child", method=m, checkpoint_dir=a.checkpoint_dir if len(a.speed_methods) == 1 else None) for m in a.speed_methods]
        _section("## speed: full-volume anomaly map, 1 mm phantom volume", rows, ["method", "shape", "threads", "seconds_first", "seconds_median", "peak_rss_mb"])
    if a.what in ("memory", "all"):
        rows = [_child("memory_child", n_subjects=n) for n in a.subjects]
        _section("## memory: AE3D training peak RSS against number of subjects", rows, ["n_subjects", "iterations", "seconds", "peak_rss_mb"])
        if len(rows) >= 2:
            print(f"ratio {rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.3f}\n")
    if a.what in ("scale", "all"):
        folder = Path(a.runs_dir) / "scale"
        rows = [scale_run(p, t, str(folder / f"p{p}t{t}")) for p, t in ((1, 1), (1, 2), (2, 1))]
        single = rows[0]["patches_per_second"]
        for r in rows:
            r["efficiency_vs_1x1"] = round(r["patches_per_second"] / (single * r["processes"] * r["threads_each"]), 2)
        _section("## scale: ae3d training on the phantom (48³ patches, batch 4 per process), CPU, last of 2 epochs", rows, ["processes", "threads_each", "patches_per_epoch", "epoch_seconds", "patches_per_second", "efficiency_vs_1x1"])
    if a.what in ("evaluation", "all"):
        rows = [_child("evaluation_child", n_maps=n) for n in a.maps]
        _section("## evaluation: evaluate.json over 1 mm maps (240×240×155), one process", rows, ["maps", "shape", "seconds", "seconds_per_map", "exact", "peak_rss_mb"])
    if a.what == "budget":  # hours of training: only when asked for by name
        from volad.budget import budget_study

        rows, base, plot = budget_study(a.budget_methods, minutes=a.budget_minutes, dataset=a.dataset, runs_dir=a.runs_dir, spatial_dims=a.spatial_dims,
                                        train_overrides=parse_assignments(a.train_overrides), tag=a.budget_tag,
                                        inference_overrides=parse_assignments(a.inference_overrides))
        print(f"## budget: {a.dataset} ({a.spatial_dims}D), voxel AUPRC on val and test (threshold from val) against training CPU-minutes\n")
        cols = ["method", "budget_minutes", "cpu_minutes", "epoch", "val_auprc", "auprc", "dice_val_threshold", "auroc", "seconds_per_volume"]
        print(_table(rows + base, cols))
        kinds = [k for k in dict.fromkeys(k for r in rows + base for k in r) if k.startswith("auprc[") and not k.endswith("_ci95")]
        if kinds:
            print("\n## budget by kind: test AUPRC per lesion kind\n")
            print(_table(rows + base, ["method", "budget_minutes", *kinds]))
        print(f"\nplot: {plot}")
    if a.what in ("quality", "all"):
        rows = quality(a.methods, dataset=a.dataset, runs_dir=a.runs_dir, max_epochs=a.max_epochs, spatial_dims=a.spatial_dims, patch_size=a.patch_size)
        print(f"## quality: {a.dataset} test split (threshold from the validation split)\n")
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
    return 0


# -- diffusion cost ------------------------------------------------------------------
def diffusion_child(method: str = "pddpm3d", checkpoint_dir: str | None = None, ddim_steps: int = 50, threads: int | None = None) -> dict:
    """Seconds, network passes and peak RSS of one 2 mm phantom map, and of a DDIM full chain.

    The DDIM chain runs ``ddim_steps`` steps from t = T − 1 with the same network
    over the same sliding windows the method restores with (:meth:`restore`), on the same volume.
    """
    from volad.prediction import predict_volume

    x, mask, m = timing_case(method, 2.0, checkpoint_dir, threads)
    t = time.perf_counter()
    predict_volume(m, x, mask, device="cpu")
    seconds = time.perf_counter() - t
    passes = m.stats.get("windows", m.stats["passes"])
    row = {
        "method": method,
        "shape": list(x.shape[1:]),
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "network_windows": passes,
        "stages": m.stats.get("stages", ""),
    }
    with torch.no_grad():
        calls = [0]

        def model(xt, tt):
            out, n = m.restore(xt, x[None], int(tt[0]))
            calls[0] += n
            return out

        t = time.perf_counter()
        m.schedule.ddim_reconstruct(model, x[None], t_start=m.schedule.num_train_timesteps - 1, steps=ddim_steps, generator=torch.Generator().manual_seed(0))
        row["ddim_seconds"] = time.perf_counter() - t
        row["ddim_steps"] = ddim_steps
    row["peak_rss_mb"] = peak_rss_mb()
    return row
