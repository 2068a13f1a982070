"""``volad bench`` cost figures: speed, memory, scale, synthesis, diffusion and evaluation timings.

Each figure is measured in a fresh subprocess (:func:`run_child`) so peak RSS belongs
to that measurement alone.
"""

from __future__ import annotations

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

from volad.bundle.config import bundle_config


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_child(fn: str, **kwargs) -> dict:
    code = f"import json, volad.pipelines.cost as c; print('@@' + json.dumps(c.{fn}(**{kwargs!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        raise RuntimeError(f"bench child {fn} failed:\n{out.stderr[-3000:]}")
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("@@"))
    return json.loads(line[2:])


def build_method(name: str, spatial_dims: int = 3, dataset: str = "phantom"):
    """A bundle's method exactly as its ``train.json`` builds it (baselines by baseline name)."""
    return bundle_config(name, "train", spatial_dims=spatial_dims, dataset=dataset).get_parsed_content("method", instantiate=True)


def timing_case(method: str, spacing: float, checkpoint_dir: str | None = None, threads: int | None = None):
    """A phantom FLAIR volume with one tumour at ``spacing`` mm, its brain mask, and the method in eval mode."""
    from volad.data.phantom import phantom_subject, template
    from volad.runs.checkpoint import load_trained

    if threads:
        torch.set_num_threads(threads)
    images, brain, _ = phantom_subject(template(spacing), np.random.default_rng(123), n_tumours=1, n_small=0)
    x = torch.from_numpy(images["flair"] / max(np.percentile(images["flair"][brain > 0], 99), 1)).float()[None]
    mask = torch.from_numpy(brain).float()[None]
    m = build_method(method)
    if checkpoint_dir and m.stages:
        load_trained(m, checkpoint_dir)
    return x, mask, m.eval()


def speed_child(method: str = "ae3d", checkpoint_dir: str | None = None, repeats: int = 3, threads: int | None = None) -> dict:
    from volad.methods.predict import predict_volume

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


def diffusion_child(method: str = "pddpm3d", checkpoint_dir: str | None = None, ddim_steps: int = 50, threads: int | None = None) -> dict:
    """Seconds, network passes and peak RSS of one 2 mm phantom map, and of a DDIM full chain.

    The DDIM chain runs ``ddim_steps`` steps from t = T − 1 with the same network
    over the same sliding windows the method restores with (:meth:`restore`), on the same volume.
    """
    from volad.methods.predict import predict_volume

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
