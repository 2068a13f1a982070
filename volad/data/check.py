"""``volad data check``: is a dataset on disk complete and consistent with its manifest?

Every problem is one line naming the file. Errors make the dataset unusable as it
is (loading would fail on that subject, or the dataset would silently shrink):
missing, unreadable or truncated files, NaN/Inf voxels, grids that differ
between contrasts, mask and label, label values the manifest does not know,
subjects whose folder lacks the file they are discovered by, split rules that
cannot be met, empty or missing ``val``/``test`` splits, split lists naming
subjects that are not on disk (``--headers_only`` skips reading voxels).
Warnings are worth a look but do not
block: counts that differ from the published ones, a contrast some subjects lack
where each contrast is discovered on its own (IXI), contrasts on different grids
where the manifest says so (raw IXI before ``volad preprocess``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from volad.data.manifest import Dataset, load_dataset
from volad.errors import VoladConfigError, VoladDataError
from volad.io import read_geometry, read_image
from volad.utils.progress import progress as progress_bar

log = logging.getLogger("volad.data")


@dataclass
class Problem:
    level: str  # "error" or "warning"
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.level.upper()}: {self.path}: {self.message}"


@dataclass
class CheckReport:
    """What :func:`check_dataset` found."""

    dataset: str
    root: Path
    subjects: dict[str, int] = field(default_factory=dict)  # per contrast (or "all")
    categories: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def usable(self) -> bool:
        return not self.errors and any(self.subjects.values())

    def add(self, level: str, path, message: str) -> None:
        self.problems.append(Problem(level, str(path), message))

    def summary(self) -> str:
        lines = [str(p) for p in self.problems]
        found = ", ".join(f"{k}: {v}" for k, v in self.subjects.items())
        lines.append(f"volad data check: {self.dataset} at {self.root}: subjects found ({found})")
        if self.categories:
            lines.append("  by status/category: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.categories.items())))
        if self.splits:
            lines.append("  splits: " + ", ".join(f"{k}: {v}" for k, v in self.splits.items()))
        n_err, n_warn = len(self.errors), len(self.problems) - len(self.errors)
        lines.append(f"  {n_err} error(s), {n_warn} warning(s): {'usable' if self.usable else 'NOT usable as it is'}")
        return "\n".join(lines)


def _contrast_groups(manifest: dict, contrasts: Sequence[str] | None) -> list[list[str]]:
    chosen = list(contrasts) if contrasts else list(manifest["contrasts"])
    aliases = manifest.get("contrast_aliases", {})
    chosen = [aliases.get(c, c) for c in chosen]
    if manifest.get("one_contrast_per_subject"):
        return [[c] for c in chosen]
    return [chosen]


def _check_subject(ds: Dataset, sid: str, report: CheckReport, *, all_expected: bool, share_grid: bool, read_voxels: bool) -> None:
    reader = ds.reader
    ref_path, ref = None, None
    for contrast, path in zip(ds.contrasts, ds.path_of(sid, "contrast")):
        if not path.exists():
            level = "error" if all_expected else "warning"
            report.add(level, path, f"contrast {contrast!r} of subject {sid!r} is missing")
            continue
        geom = _reported(report, path, reader.geometry)
        if geom is None or (read_voxels and _reported(report, path, reader.read) is None):  # truncated files, NaN/Inf
            continue
        if ref is None:
            ref_path, ref = path, geom
        elif not geom.matches(ref):
            level = "error" if share_grid else "warning"
            note = "" if share_grid else " (expected for raw data; volad preprocess puts contrasts on one grid)"
            report.add(level, path, f"grid differs from {ref_path.name}: shape {geom.shape} vs {ref.shape}{note}")
    if ref is None:
        return
    checks = []
    mask_spec = ds.manifest.get("brain_mask", {})
    if "pattern" in mask_spec:
        checks.append(("brain mask", ds.path_of(sid, "brain_mask")[0], None))
    label_spec = ds.manifest.get("label") or {}
    if "pattern" in label_spec or "label" in ds.manifest.get("overrides", {}).get(sid, {}):
        status = ds.status(sid)[0]
        checks.append(("label", ds.path_of(sid, "label")[0], status))
    for what, path, status in checks:
        if not path.exists():
            needed = what == "brain mask" or (label_spec.get("missing", "error") == "error" and status != "healthy")
            report.add("error" if needed else "warning", path, f"{what} of subject {sid!r} is missing")
            continue
        geom = _reported(report, path, read_geometry)
        if geom is None:
            continue
        if not geom.matches(ref):
            shift = np.abs(geom.affine - ref.affine).max() if geom.shape == ref.shape else None
            detail = f"affine differs by up to {shift:.3g} mm" if shift is not None else f"shape {geom.shape} vs {ref.shape}"
            report.add("error", path, f"{what} is off the grid of {ref_path.name} ({detail})")
            continue
        if not read_voxels or (what == "label" and "values" not in label_spec):
            continue
        data = _reported(report, path, read_image)
        if data is None:
            continue
        if what == "label":
            found = set(np.unique(data[0]).tolist())
            unknown = sorted(found - set(label_spec["values"]))
            if unknown:
                report.add("error", path, f"unexpected label value(s) {unknown} (expected {label_spec['values']})")
        elif not data[0].any():
            report.add("error", path, "brain mask is empty")


def _reported(report: CheckReport, path, read):
    """``read(path)``, or ``None`` with the error added to the report."""
    try:
        return read(path)
    except VoladDataError as exc:
        report.add("error", exc.path or path, exc.problem)
        return None


def _check_discovery(ds: Dataset, found: dict, report: CheckReport) -> None:
    """Subjects that have other files but lack the one they are discovered by would vanish from the dataset."""
    spec = ds.discovery_pattern
    first = spec if isinstance(spec, str) else spec[0]
    others = [ds.manifest["contrasts"][c] for c in ds.manifest["contrasts"]]
    label = (ds.manifest.get("label") or {}).get("pattern")
    if label:
        others.append(label)
    lost: dict[str, dict] = {}
    for pattern in others:
        for sid, fields in ds.find_subjects(pattern).items():
            if sid not in found:
                lost.setdefault(sid, fields)
    for sid, fields in sorted(lost.items()):
        try:
            missing = ds.root / first.format(**fields)
        except KeyError:
            missing = ds.root / first
        report.add("error", missing, f"subject {sid!r} has files but lacks this one, by which subjects are found: it would be left out of the dataset")


def _check_splits(ds: Dataset, found: dict, report: CheckReport) -> dict[str, list[str]] | None:
    """Split lists that are empty, missing, or name subjects that are not on disk."""
    try:
        table = ds.split_table()
    except (VoladDataError, VoladConfigError) as exc:
        report.add("error", getattr(exc, "path", None) or ds.root, getattr(exc, "problem", str(exc)))
        return None
    for split in ("val", "test"):
        if split not in table:
            report.add("error", ds.root, f"split {split!r} is missing (splits: {', '.join(table) or 'none'}); evaluation needs it")
        elif not table[split]:
            report.add("error", ds.root, f"split {split!r} is empty; evaluation needs subjects there")
    for split, ids in table.items():
        unknown = [sid for sid in ids if sid not in found]
        if unknown:
            report.add("error", ds.root, f"split {split!r} names {len(unknown)} subject(s) not found under the root (e.g. {unknown[0]!r})")
    return table


def check_dataset(
    dataset: str | Path,
    root: str | Path,
    *,
    contrasts: Sequence[str] | None = None,
    read_voxels: bool = True,
    progress: bool = True,
) -> CheckReport:
    """Check every subject of a dataset against its manifest.

    Args:
        dataset: Manifest name or path.
        root: The dataset's folder.
        contrasts: Contrasts to check (default: all the manifest lists).
        read_voxels: Also read every image, label and mask voxel (truncated files,
            NaN/Inf, label values, empty masks); ``False`` checks headers only (quick).
        progress: Show a progress bar.
    """
    root = Path(root)
    first = load_dataset(dataset, root, contrasts=(_contrast_groups(_manifest(dataset), contrasts)[0]))
    manifest = first.manifest
    report = CheckReport(dataset=first.name, root=root)
    all_expected = "subjects" in manifest  # one subject list for all contrasts: each must be there
    share_grid = manifest.get("contrasts_share_grid", True)
    csv = first.annotation_csv()
    if csv is not None and not csv.is_file():
        report.add("error", csv, "annotation file not found")
        return report
    for group in _contrast_groups(manifest, contrasts):
        ds = load_dataset(dataset, root, contrasts=group)
        found = ds.discover()
        report.subjects["+".join(group)] = len(found)
        if not found:
            pattern = manifest.get("subjects") or manifest["contrasts"][group[0]]
            report.add("error", root, f"no subject matches {pattern!r}")
            continue
        statuses = Counter()
        for sid in progress_bar(sorted(found), f"check {ds.name} ({'+'.join(group)})") if progress else sorted(found):
            _check_subject(ds, sid, report, all_expected=all_expected, share_grid=share_grid, read_voxels=read_voxels)
            status, category = ds.status(sid)
            statuses[category or status or "no status"] += 1
        for k, v in statuses.items():
            report.categories[k] = report.categories.get(k, 0) + v
        if not manifest.get("one_contrast_per_subject"):
            _check_discovery(ds, found, report)
        table = _check_splits(ds, found, report)
        for k, v in (table or {}).items():
            report.splits[k] = report.splits.get(k, 0) + len(v)
    for key, expected in manifest.get("expected_counts", {}).items():
        if key == "subjects":
            have = sum(report.subjects.values())
        elif key in manifest["contrasts"]:
            have = report.subjects.get(key, sum(v for k, v in report.subjects.items() if key in k.split("+")))
        elif key in report.splits:
            have = report.splits[key]
        else:
            have = report.categories.get(key, 0)
        if have != expected:
            report.add("warning", root, f"{key}: found {have}, the published dataset has {expected}")
    return report


def _manifest(dataset: str | Path) -> dict:
    from volad.data.manifest import read_manifest

    return read_manifest(dataset)[0]
