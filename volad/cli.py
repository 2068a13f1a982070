"""The ``volad`` command line: data generation, benchmarks, evaluation."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run a volad command; bad data or configuration ends with one clear line and exit code 2."""
    from volad.errors import VoladConfigError, VoladDataError

    try:
        return _main(argv)
    except (VoladDataError, VoladConfigError) as exc:
        print(f"volad: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The ``volad`` command's options; ``bench``, ``tune``, ``protocol`` and ``compare`` have their own parsers."""
    from volad import __version__
    from volad.utils.cli_format import HelpFormatter

    p = argparse.ArgumentParser(prog="volad", description="3D-first unsupervised anomaly detection in brain MRI", formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"volad {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)

    s = command("synth", "write the tiny synthetic dataset")
    s.add_argument("--out", required=True, help="folder to write it to")
    s.add_argument("--shape", type=int, default=24, help="edge of the cubic volumes in voxels")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    ph = command("phantom", "write the real-anatomy phantom (MNI152-based)")
    ph.add_argument("--out", required=True, help="folder to write it to")
    ph.add_argument("--spacing", type=float, default=2.0, choices=[1.0, 2.0, 3.0], help="voxel size in mm")
    ph.add_argument("--seed", type=int, default=0, help="random seed")
    ph.add_argument("--n_train", type=int, default=24, help="healthy training subjects")
    ph.add_argument("--n_val", type=int, default=6, help="labelled validation subjects")
    ph.add_argument("--n_test", type=int, default=12, help="test subjects")
    ev = command("evaluate", "evaluate a folder of anomaly maps against a dataset's labels")
    ev.add_argument("--run", required=True, help="run folder; the report goes here")
    ev.add_argument("--maps", default=None, help="folder of <subject>_anomaly.nii.gz or <subject>.nii.gz maps (default: <run>/maps)")
    ev.add_argument("--dataset", default=None, help="manifest (default: the one in the maps' index.json)")
    ev.add_argument("--data_root", default=None, help="the dataset's folder (default: the index's, or volad's cache)")
    from volad.evaluation.evaluate import Evaluator
    from volad.types import defaults_of

    defaults = defaults_of(Evaluator)

    def setting(name: str, text: str, **kw) -> None:
        shown = " ".join(defaults[name]) if isinstance(defaults[name], (list, tuple)) else defaults[name]
        ev.add_argument(f"--{name}", default=None, help=f"{text} (default: {shown})".replace("%", "%%"), **kw)

    setting("threshold_split", "labelled split that chooses thresholds (never the test split)")
    setting("test_split", "split to report on")
    setting("threshold_modes", "thresholds to report, the first being the headline", nargs="+")
    setting("threshold", "a fixed threshold (recorded as user-given)", type=float)
    ev.add_argument("--healthy_split", default=None, help="split whose lesion-free scans set healthy_fpr thresholds (default: --threshold_split)")
    ev.add_argument("--healthy_dataset", default=None, help="dataset of those healthy scans (default: --dataset)")
    ev.add_argument("--healthy_data_root", default=None, help="its data folder")
    setting("erosion_mm", "brain-mask erosion before scoring, mm", type=float)
    ev.add_argument("--median_mm", default=None, type=float, help="median filter window, mm (default: the method's own: 5 for reconstruction "
                    "residuals, 0 for intensities, z-scores, synthetic-anomaly detectors and fusions)")
    setting("min_component_voxels", "drop predicted components smaller than this", type=int)
    setting("volume_score_mode", "per-volume score for volume-level metrics", choices=["top1", "max", "mean"])
    setting("lesion_overlap", "fraction of a lesion that must fire to detect it", type=float)
    setting("box_fraction", "a box label counts as hit when more than this fraction fires", type=float)
    setting("box_fpr", "healthy-scan FPR that fixes the box-hit threshold", type=float)
    setting("bootstrap", "bootstrap replicates for 95% intervals (0 disables)", type=int)
    setting("montage_cases", "test cases drawn as overlay montages", type=int)
    ev.add_argument("--method_name", default=None, help="name in the report (default: the run folder's name)")
    ev.add_argument("--baselines", nargs="+", default=None, help="baseline run folders shown beside this run (besides those next to it)")
    command("bench", "quality/speed/memory benchmarks (volad bench --help)")
    command("tune", "choose an inference-only setting (e.g. t_test) on the val split (volad tune --help)")
    command("protocol", "2D image-level protocol over seeds (volad protocol --help)")
    command("compare", "merge runs' reports into one leaderboard (volad compare --help)")
    sx = command("export-slicer", "write heatmaps, segmentations and a scene per case for 3D Slicer")
    sx.add_argument("--run", required=True, help="run folder holding maps/index.json")
    sx.add_argument("--dataset", default=None, help="manifest (default: the one the maps were made from)")
    sx.add_argument("--data_root", default=None, help="the dataset's folder (default: the index's)")
    sx.add_argument("--out", default=None, help="export folder (default: <run>/slicer)")
    sx.add_argument("--threshold", type=float, default=None, help="segmentation threshold (default: the report's headline threshold)")
    sx.add_argument("--splits", nargs="+", default=["test"], help="splits to export")
    sx.add_argument("--subjects", nargs="+", default=None, help="only these subject IDs (default: all of the splits)")
    data = command("data", "real datasets: check a layout, write a fake one, print splits")
    dsub = data.add_subparsers(dest="data_cmd", required=True)

    def data_command(name: str, text: str) -> argparse.ArgumentParser:
        return dsub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)

    ck = data_command("check", "check a dataset on disk against its manifest (exit 0 = usable)")
    ck.add_argument("--dataset", required=True, help="manifest name or path")
    ck.add_argument("--root", required=True, help="the dataset's folder")
    ck.add_argument("--contrasts", nargs="+", default=None, help="contrasts to check (default: all)")
    ck.add_argument("--headers_only", action="store_true", help="quick mode: read headers only, not voxels (misses truncated files, NaN/Inf, label values)")
    fk = data_command("fake", "write a tiny fake copy of a dataset in its real layout")
    fk.add_argument("--dataset", required=True, help="manifest name or path")
    fk.add_argument("--out", required=True, help="folder to write it to")
    fk.add_argument("--n", type=int, default=None, help="subjects (pictures per class for br35h)")
    fk.add_argument("--seed", type=int, default=0, help="random seed")
    sp = data_command("splits", "write the splits a manifest's rule draws (to freeze or edit them)")
    sp.add_argument("--dataset", required=True, help="manifest name or path")
    sp.add_argument("--root", required=True, help="the dataset's folder")
    sp.add_argument("--out", required=True, help="splits JSON to write")
    sp.add_argument("--seed", type=int, default=None, help="another seed for the split rule (default: the manifest's)")
    pp = command("preprocess", "reorient/resample, N4, register to MNI152, mask, normalise, crop; resumable")
    pp.add_argument("--dataset", required=True, help="manifest name or path")
    pp.add_argument("--root", required=True, help="the raw dataset's folder")
    pp.add_argument("--out", required=True, help="folder of the preprocessed dataset (opened later with --dataset DIR)")
    pp.add_argument("--contrasts", nargs="+", default=None, help="contrasts to process (default: the manifest's default)")
    pp.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 1))), help="subjects processed in parallel")
    pp.add_argument("--spacing", type=float, default=None, help="output voxel size in mm (default 1)")
    pp.add_argument("--shape", type=int, nargs=3, default=None, help="crop/pad to this shape around the brain")
    for flag, text in (
        ("n4", "N4 bias-field correction"),
        ("register", "affine registration to nilearn's MNI152 2009 template"),
        ("skull_stripped", "the input is already skull-stripped"),
        ("normalize", "intensity normalisation"),
        ("reorient", "reorientation to RAS"),
    ):
        pp.add_argument(f"--{flag}", dest=flag, action="store_true", default=None, help=f"turn on {text} (default: the manifest's choice)")
        pp.add_argument(f"--no_{flag}", dest=flag, action="store_false", help=f"turn off {text}")
    pp.add_argument("--overwrite", action="store_true", help="redo subjects made with other settings")
    pp.add_argument("--limit", type=int, default=None, help="only the first N subjects of each split")
    return p


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("ignite").setLevel(logging.WARNING)
    if argv and argv[0] == "bench":
        from volad.pipelines.bench import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "compare":
        from volad.evaluation.compare import main as compare_main

        return compare_main(argv[1:])
    if argv and argv[0] == "tune":
        from volad.pipelines.tuning import main as tune_main

        return tune_main(argv[1:])
    if argv and argv[0] == "protocol":
        from volad.pipelines.protocol import main as protocol_main

        return protocol_main(argv[1:])
    a = build_parser().parse_args(argv)
    if a.cmd == "synth":
        from volad.data.synthetic import generate_synthetic

        print(generate_synthetic(a.out, shape=a.shape, seed=a.seed))
    elif a.cmd == "phantom":
        from volad.data.phantom import generate_phantom

        print(generate_phantom(a.out, spacing=a.spacing, seed=a.seed, n_train=a.n_train, n_val=a.n_val, n_test=a.n_test))
    elif a.cmd == "data":
        return _data(a)
    elif a.cmd == "preprocess":
        from volad.data.prepare import preprocess_dataset

        settings = {k: getattr(a, k) for k in ("spacing", "shape", "n4", "register", "skull_stripped", "normalize", "reorient")}
        preprocess_dataset(a.dataset, a.root, a.out, contrasts=a.contrasts, workers=a.workers, overwrite=a.overwrite, limit=a.limit, **settings)
    elif a.cmd == "export-slicer":
        from volad.export.slicer import export_run

        export_run(a.run, dataset=a.dataset, data_root=a.data_root, out_dir=a.out, threshold=a.threshold, splits=a.splits, subjects=a.subjects)
    elif a.cmd == "evaluate":
        from volad.evaluation.evaluate import Evaluator

        keys = ("dataset", "data_root", "threshold_split", "test_split", "threshold_modes", "threshold", "healthy_split", "healthy_dataset",
                "healthy_data_root", "erosion_mm", "median_mm", "min_component_voxels", "volume_score_mode", "lesion_overlap", "box_fraction",
                "box_fpr", "bootstrap", "montage_cases", "method_name", "baselines")
        Evaluator(output_dir=a.run, maps_dir=a.maps, **{k: getattr(a, k) for k in keys}).run()
    return 0


def _data(a: argparse.Namespace) -> int:
    if a.data_cmd == "check":
        from volad.data.check import check_dataset

        report = check_dataset(a.dataset, a.root, contrasts=a.contrasts, read_voxels=not a.headers_only)
        print(report.summary())
        return 0 if report.usable else 1
    if a.data_cmd == "fake":
        from volad.data.fakes import make_fake

        print(make_fake(a.dataset, a.out, n=a.n, seed=a.seed))
        return 0
    from volad.data.manifest import load_dataset
    from volad.io import write_json

    ds = load_dataset(a.dataset, a.root)
    if a.seed is not None:
        if "rule" not in ds.manifest["splits"]:
            raise SystemExit(f"volad: dataset {ds.name!r} has fixed splits, not a rule; --seed does not apply")
        ds.manifest["splits"]["rule"]["seed"] = a.seed
    table = ds.split_table()
    write_json(table, a.out)
    print(f"volad: wrote {a.out} ({', '.join(f'{k}: {len(v)}' for k, v in table.items())})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
