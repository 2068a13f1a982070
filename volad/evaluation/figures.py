"""Figures of a report: ROC/PR curves, metrics by lesion size, per-case overlay montages."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from volad.evaluation.voxel import Curve  # noqa: E402
from volad.io import atomic_path  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def plot_curves(curve: Curve, path: Path, title: str) -> Path:
    """Voxel ROC and precision–recall curves."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4))
    fpr, tpr = curve.roc()
    a.plot(fpr, tpr)
    a.plot([0, 1], [0, 1], "k:", lw=0.8)
    a.set(xlabel="false-positive rate", ylabel="true-positive rate", title="voxel ROC")
    rec, prec = curve.pr()
    b.plot(rec, prec)
    if curve.positives + curve.negatives:
        b.axhline(curve.positives / (curve.positives + curve.negatives), color="k", ls=":", lw=0.8)
    b.set(xlabel="recall", ylabel="precision", title="voxel PR", xlim=(0, 1), ylim=(0, 1))
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_lesion_sizes(lesion: dict, path: Path, title: str) -> Path:
    """Per-lesion sensitivity by size bin, with lesion counts."""
    bins = lesion["by_size"]
    names = list(bins)
    sens = [bins[n]["sensitivity"] if bins[n]["n_lesions"] else 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    bars = ax.bar(names, sens, color="#c0392b")
    for bar, n in zip(bars, names):
        ax.annotate(f"{bins[n]['detected']}/{bins[n]['n_lesions']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=9)
    ax.set(ylim=(0, 1.1), ylabel="lesion sensitivity", title=f"{title}\n(detected: ≥ {lesion['min_overlap']:g} of a lesion fires)")
    fig.tight_layout()
    return _save(fig, path)


def _slice_of_interest(label: np.ndarray, amap: np.ndarray) -> int:
    if label.any():
        return int(np.argmax(label.sum(axis=(0, 1))))
    return int(np.argmax(amap.max(axis=(0, 1))))


def _display(x: np.ndarray) -> np.ndarray:
    """Axial slice ``(W, H)`` to image rows/columns with anterior up (radiological-looking)."""
    return np.flipud(x.T)


def plot_montage(case: dict, path: Path, threshold: float) -> Path:
    """Input, anomaly map, label contour (and thresholded map), pseudo-healthy reconstruction."""
    k = _slice_of_interest(case["label"], case["anomaly_map"])
    img, amap, lab = case["image"][..., k], case["anomaly_map"][..., k], case["label"][..., k]
    lo, hi = np.percentile(img[case["brain"][..., k]], (1, 99)) if case["brain"][..., k].any() else (img.min(), img.max() + 1e-6)
    panels = ["input", "anomaly map", "label contour + prediction"] + (["pseudo-healthy"] if case.get("reconstruction") is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax in axes:
        ax.axis("off")
    axes[0].imshow(_display(img), cmap="gray", vmin=lo, vmax=hi)
    axes[1].imshow(_display(img), cmap="gray", vmin=lo, vmax=hi)
    vmax = float(np.percentile(case["anomaly_map"][case["brain"]], 99.9)) if case["brain"].any() else float(amap.max())
    im = axes[1].imshow(_display(np.ma.masked_less_equal(amap, 0)), cmap="inferno", alpha=0.7, vmin=0, vmax=max(vmax, 1e-6))
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    axes[2].imshow(_display(img), cmap="gray", vmin=lo, vmax=hi)
    axes[2].imshow(_display(np.ma.masked_equal((amap >= threshold).astype(float), 0)), cmap="autumn", alpha=0.45)
    if lab.any():
        axes[2].contour(_display(lab.astype(float)), levels=[0.5], colors="cyan", linewidths=1.0)
    if case.get("reconstruction") is not None:
        rec = case["reconstruction"][..., k]
        axes[3].imshow(_display(rec), cmap="gray", vmin=lo, vmax=hi)
    for ax, name in zip(axes, panels):
        ax.set_title(name, fontsize=9)
    dice = case.get("dice")
    fig.suptitle(f"{case['subject_id']} (axial slice {k}" + (f", Dice {dice:.3f})" if dice is not None and dice == dice else ")"), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_training(history: list[dict], path: Path, title: str) -> Path | None:
    """Per-epoch training losses (left) and validation AUPRC (right, the best marked), one line per stage."""
    if not history:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    stages = list(dict.fromkeys(h["stage"] for h in history))
    for stage in stages:
        rows = [h for h in history if h["stage"] == stage]
        epochs = [h["epoch"] for h in rows]
        for key in sorted({k for h in rows for k in h} - {"stage", "epoch", "seconds", "cpu_seconds", "steps", "processes", "val_auprc"}):
            a.plot(epochs, [h.get(key, np.nan) for h in rows], marker=".", label=f"{stage}: {key}")
        val = [(h["epoch"], h["val_auprc"]) for h in rows if h.get("val_auprc") is not None]
        if val:
            xs, ys = zip(*val)
            b.plot(xs, ys, marker="o", label=stage)
            i = int(np.nanargmax(ys))
            b.plot([xs[i]], [ys[i]], "r*", ms=12, label=f"best ({ys[i]:.3f}, epoch {xs[i]})")
    a.set(xlabel="epoch", ylabel="mean loss", title="training losses")
    a.legend(fontsize=7)
    b.set(xlabel="epoch", ylabel="voxel AUPRC", title="validation", ylim=(0, 1))
    if b.lines:
        b.legend(fontsize=7)
    else:
        b.text(0.5, 0.5, "no validation", ha="center", va="center", transform=b.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_budget(rows: list[dict], baselines: list[dict], path: Path, title: str) -> Path:
    """Voxel AUPRC against training CPU-minutes: test (solid) and val (dashed) per method, baselines' test AUPRC as lines."""
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        own = sorted((r for r in rows if r["method"] == method), key=lambda r: r["cpu_minutes"])
        xs = [r["cpu_minutes"] for r in own]
        (line,) = ax.plot(xs, [r["auprc"] for r in own], marker="o", label=f"{method} (test)")
        ax.plot(xs, [r["val_auprc"] for r in own], marker=".", ls="--", color=line.get_color(), label=f"{method} (val)")
    for b in baselines:
        ax.axhline(b["auprc"], ls=":", lw=1, color="k" if b.get("role") == "baseline to beat" else "grey")
        ax.annotate(f"{b['method']} {b['auprc']:.3f}", (0.01, b["auprc"]), xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
    ax.set(xlabel="training CPU-minutes (all threads of the training process; log scale)", ylabel="voxel AUPRC", title=title, ylim=(0, 1))
    ax.set_xscale("log")  # budgets grow by factors (5, 15, 45, 90)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes: the curves stay readable
    fig.tight_layout()
    return _save(fig, path)
