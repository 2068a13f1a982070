"""``volad protocol``: the seed review's 2D image-level protocol (Br35H, Brain Tumor MRI).

For each seed ``k`` (REFERENCE.md §3):

1. draw the dataset's splits with the manifest's rule at seed ``k`` and freeze
   them in the run folder (train: healthy pictures only; labelled val; test);
2. train the bundle in slice mode on whole 256² pictures (seed ``k``), with the
   bundle's paper overlay (``bundles/<name>/paper_2d.json``: the paper's
   teacher, optimiser and epochs) when it ships one;
3. write anomaly maps for val and test, and score each picture with the bundle's
   ``volume_score_mode`` (its method's own);
4. choose the threshold with the highest F1 on **val**, and report test AUROC,
   ACC (at that threshold), F1 and AP.

Figures are averaged over seeds (mean ± sample standard deviation). Both the
split and the training seed change with ``k``. Where the benchmark has published
figures (``volad/evaluation/published.json``: the review's Table 3 for Br35H and
Brain Tumor MRI), they are printed and recorded beside volad's, labelled as
published with their source. Outputs: ``protocol.json``,
``protocol.md`` and ``protocol_roc.png`` in the run folder.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from volad.bundle.config import bundle_overlays, run_bundle
from volad.data.manifest import load_dataset, read_manifest
from volad.errors import VoladConfigError
from volad.evaluation.image_level import detection_metrics, max_f1_threshold
from volad.evaluation.postprocess import volume_score
from volad.evaluation.published import image_protocol_for, published_protocol, published_rows
from volad.io import read_map, write_json
from volad.runs.record import open_run
from volad.utils.cli_format import HelpFormatter, parse_assignments

log = logging.getLogger("volad.pipelines.protocol")


def freeze_splits(dataset: str | Path, data_root: str | Path, seed: int, folder: Path) -> Path:
    """Draw the manifest's split rule at ``seed`` and write ``manifest.json`` + ``splits.json`` into ``folder``."""
    manifest, _ = read_manifest(dataset)
    if "rule" not in manifest["splits"]:
        raise VoladConfigError(f"dataset {manifest['name']!r} has fixed splits; the protocol needs a split rule to reseed")
    manifest = json.loads(json.dumps(manifest))
    manifest["splits"]["rule"]["seed"] = int(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tmp_manifest = folder / "manifest.json"
    write_json(manifest, tmp_manifest)
    table = load_dataset(tmp_manifest, data_root).split_table()
    write_json(table, folder / "splits.json")
    manifest["splits"] = {"file": str((folder / "splits.json").resolve())}
    write_json(manifest, tmp_manifest)
    return tmp_manifest


def picture_scores(run: Path, dataset: str | Path, data_root: str | Path, split: str, mode: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per-picture scores of a split from a run's maps, with labels (1 = anomalous)."""
    ds = load_dataset(dataset, data_root)
    index = json.loads((run / "maps" / "index.json").read_text())
    scores, labels, ids = [], [], []
    for e in index["subjects"]:
        if e["split"] != split:
            continue
        amap = read_map(run / "maps" / e["anomaly_map"])[0]
        scores.append(volume_score(amap, np.ones(amap.shape, dtype=bool), mode))
        labels.append(ds.status(e["subject_id"])[0] == "anomalous")
        ids.append(e["subject_id"])
    return np.asarray(scores), np.asarray(labels, dtype=bool), ids


def run_protocol(
    *,
    bundle: str,
    dataset: str | Path,
    data_root: str | Path,
    out: str | Path,
    seeds: int | Sequence[int] = 5,
    overrides: dict[str, Any] | None = None,
    overlays: Sequence[str] | None = None,
) -> dict:
    """Run the image-level protocol for one bundle on one dataset; returns the summary.

    Args:
        bundle: Bundle name in ``bundles/`` (trained in slice mode).
        dataset: Manifest name or path (its splits must come from a rule).
        data_root: The dataset's folder.
        out: Run folder; seed ``k`` trains in ``<out>/seed<k>`` (resumable).
        seeds: Number of seeds (0..n-1) or the seeds themselves.
        overrides: Extra bundle overrides (e.g. ``{"max_epochs": 50}``), applied after the overlays.
        overlays: Bundle overlays read after ``train.json`` (``None``: ``paper_2d`` when the bundle has it, else none).
    """
    out = Path(out)
    manifest_name = read_manifest(dataset)[0]["name"]
    if overlays is None:
        overlays = [o for o in bundle_overlays(bundle) if o == "paper_2d"]
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    rows, curves = [], []
    for k in seed_list:
        run = out / f"seed{k}"
        manifest = freeze_splits(dataset, data_root, k, run / "data")
        common = {"dataset": str(manifest), "data_root": str(data_root), "output_dir": str(run), "spatial_dims": 2, "patch_size": 0}
        common.update(overrides or {})
        print(f"volad protocol: {bundle}{''.join(f' + {o}' for o in overlays)} on {dataset}, seed {k} -> {run}")
        run_bundle(bundle, "train", overlays, **common, seed=k)  # seeded before the network is built, so each seed's weights repeat
        run_bundle(bundle, "inference", output_dir=str(run), splits=["val", "test"])
        mode = open_run(run).method_class.volume_score_mode  # the method's own per-picture score
        val_s, val_y, _ = picture_scores(run, manifest, data_root, "val", mode)
        test_s, test_y, _ = picture_scores(run, manifest, data_root, "test", mode)
        threshold, val_f1 = max_f1_threshold(val_s, val_y)
        metrics = detection_metrics(test_s, test_y, threshold)
        rows.append({"seed": k, "threshold": threshold, "threshold_chosen_on": "val (max F1)", "val_f1": val_f1, **metrics})
        curves.append((k, test_s, test_y))
        print(f"volad protocol: seed {k}: test AUROC {metrics['auroc']:.4f}, ACC {metrics['acc']:.4f} (threshold {threshold:.4g} from val)")
    summary = {
        "bundle": bundle,
        "overlays": list(overlays),
        "dataset": str(dataset),
        "score": mode,
        "threshold": "max F1 on the labelled val split of each seed",
        "seeds": rows,
        "mean": {k: float(np.mean([r[k] for r in rows])) for k in ("auroc", "acc", "f1", "ap")},
        "std": {k: float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0 for k in ("auroc", "acc", "f1", "ap")},
    }
    published = image_protocol_for(manifest_name)
    if published:  # the published figures of this picture benchmark, from their data file, labelled so
        summary["published"] = {"protocol": published, "source": published_protocol(published)["source"], "rows": published_rows(published)}
    write_json(summary, out / "protocol.json")
    lines = [
        f"# {bundle}{''.join(f' + {o}' for o in overlays)} on {dataset}: image-level protocol ({len(rows)} seeds)",
        "",
        f"Score per picture: `{mode}` of the anomaly map. Threshold: max F1 on val.",
        "",
        "| seed | n test (normal/anomalous) | AUROC | ACC | F1 | AP |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['n_normal']}/{r['n_anomalous']} | {r['auroc']:.4f} | {r['acc']:.4f} | {r['f1']:.4f} | {r['ap']:.4f} |")
    m, s = summary["mean"], summary["std"]
    lines.append(f"| mean ± sd | | {m['auroc']:.4f} ± {s['auroc']:.4f} | {m['acc']:.4f} ± {s['acc']:.4f} | {m['f1']:.4f} ± {s['f1']:.4f} | {m['ap']:.4f} ± {s['ap']:.4f} |")
    if published:
        spec = published_protocol(published)
        lines += ["", f"Published beside it ({spec['source']}; what differs: {spec['differs']}):", "", "| method | AUROC | source |", "|---|---|---|",
                  f"| {bundle}{''.join(f' + {o}' for o in overlays)} (volad, this run) | {m['auroc']:.4f} ± {s['auroc']:.4f} | volad |"]
        lines += [f"| {r['method']} | {r['auroc']:.4f} | published: {r['source']} |" for r in summary["published"]["rows"]]
    (out / "protocol.md").write_text("\n".join(lines) + "\n")
    _plot_roc(curves, out / "protocol_roc.png", f"{bundle} on {Path(str(dataset)).stem}")
    print("\n".join(lines))
    return summary


def _plot_roc(curves, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from volad.evaluation.voxel import curve_from_sorted

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for k, s, y in curves:
        order = np.argsort(-s, kind="mergesort")
        tps, fps, _ = curve_from_sorted(s[order], y[order])
        ax.plot(np.r_[0, fps / max(fps[-1], 1)], np.r_[0, tps / max(tps[-1], 1)], label=f"seed {k}")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The command's options (also read by the test that every option has help)."""
    p = argparse.ArgumentParser(prog="volad protocol", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle name, trained in slice mode (e.g. ae3d)")
    p.add_argument("--dataset", required=True, help="2D picture benchmark manifest (br35h, brain_tumor_mri) or its path")
    p.add_argument("--data_root", required=True, help="the dataset's folder")
    p.add_argument("--out", required=True, help="protocol folder; seed k trains in <out>/seed<k>")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (0..n-1)")
    p.add_argument("--overlay", nargs="*", default=None, metavar="NAME",
                   help="bundle overlays read after train.json (default: the bundle's paper_2d.json when it has one; --overlay with no name: none)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="bundle overrides, JSON values (e.g. max_epochs=50)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    overrides = parse_assignments(a.set, "volad protocol")
    run_protocol(bundle=a.bundle, dataset=a.dataset, data_root=a.data_root, out=a.out, seeds=a.seeds, overrides=overrides, overlays=a.overlay)
    return 0
