"""``volad preprocess``: the usual brain-MRI chain, run once, writing a new self-describing dataset.

Steps, each on or off per dataset (defaults from the manifest's ``preprocess``
entry and the kind of data, overridable on the command line):

1. reorient to RAS and resample to ``spacing`` mm (1 mm by default);
2. N4 bias-field correction (SimpleITK);
3. affine registration of the first contrast to the MNI152 2009 template shipped
   with nilearn (SimpleITK), applied to every contrast, mask and label;
4. brain mask: for skull-stripped data the mask file or image > 0; for raw data
   the registered template's brain mask. **The template mask is an
   approximation**: it is the template's brain, not the subject's, so brain edges
   are off by the registration error. Raw data without registration falls back to
   an Otsu head mask;
5. percentile intensity normalisation inside the mask (1st → 0, 99th → 1);
6. crop/pad to a common ``shape`` around the brain mask's centre.

The output is ``<out>/<subject>/<subject>_{<contrast>,brainmask,seg}.nii.gz``
plus ``manifest.json`` (so ``--dataset <out>`` opens it), ``splits.json`` (the
source dataset's splits) and ``preprocess.json`` (settings). Runs are resumable:
a subject is written to a scratch folder and renamed into place with a ``.done``
marker, so a rerun skips finished subjects and redoes interrupted ones. Subjects
run in parallel processes behind a progress bar.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
from tqdm.auto import tqdm

from volad.data import registration as reg
from volad.data.manifest import load_dataset
from volad.errors import VoladConfigError, VoladDataError
from volad.io import atomic_path, write_json, write_nifti

log = logging.getLogger("volad.preprocess")
PARTIAL = ".volad_partial"


@dataclass(frozen=True)
class PrepSettings:
    """What ``volad preprocess`` does to every subject.

    Attributes:
        contrasts: Contrasts written (the first one drives registration).
        reorient: Reorient to RAS (implied by registration).
        spacing: Output voxel size in mm (``None`` keeps the input's).
        n4: N4 bias-field correction.
        register: Affine registration to MNI152 2009.
        skull_stripped: The input is skull-stripped (mask = mask file or image > 0).
        normalize: Percentile normalisation inside the brain mask.
        percentiles: Lower/upper normalisation percentiles.
        shape: Crop/pad to this shape around the mask centre (``None`` keeps the grid).
        seed: Seed of registration's voxel sampling.
    """

    contrasts: tuple[str, ...]
    reorient: bool = True
    spacing: float | None = 1.0
    n4: bool = False
    register: bool = False
    skull_stripped: bool = True
    normalize: bool = True
    percentiles: tuple[float, float] = (1.0, 99.0)
    shape: tuple[int, int, int] | None = None
    seed: int = 0


@dataclass
class Job:
    subject_id: str
    images: dict[str, str]
    mask: str | None
    label: str | None
    derive_mask: str
    out: str
    settings: PrepSettings = field(repr=False, default=None)  # type: ignore[assignment]


def default_settings(manifest: dict[str, Any], contrasts: Sequence[str]) -> PrepSettings:
    """Settings a dataset gets unless overridden: from its ``preprocess`` entry and mask kind."""
    spec = manifest.get("preprocess", {})
    mask = manifest.get("brain_mask", {"derive": "nonzero"})
    stripped = "pattern" in mask or mask.get("derive") == "nonzero"
    return PrepSettings(
        contrasts=tuple(contrasts),
        n4=bool(spec.get("n4", False)),
        register=bool(spec.get("register", False)),
        skull_stripped=bool(spec.get("skull_stripped", stripped)),
    )


def _crop_pad(arrays: dict[str, np.ndarray], affine: np.ndarray, mask: np.ndarray, shape: Sequence[int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Crop/pad every array to ``shape`` centred on the mask's bounding box; shift the affine to match."""
    idx = np.argwhere(mask)
    centre = (idx.min(0) + idx.max(0)) / 2 if len(idx) else (np.array(mask.shape) - 1) / 2
    start = np.round(centre - (np.array(shape) - 1) / 2).astype(int)
    out = {}
    for k, a in arrays.items():
        res = np.zeros(tuple(shape), dtype=a.dtype)
        src = [slice(max(s, 0), min(s + n, dim)) for s, n, dim in zip(start, shape, a.shape)]
        dst = [slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start)]
        if all(sl.stop > sl.start for sl in src):
            res[tuple(dst)] = a[tuple(src)]
        out[k] = res
    new_affine = affine.copy()
    new_affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return out, new_affine


def _normalise(image: np.ndarray, mask: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
    inside = image[mask]
    lo, hi = np.percentile(inside, percentiles) if inside.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    return (np.clip((image - lo) / (hi - lo), 0.0, 3.0) * mask).astype(np.float32)


def process_subject(job: Job) -> str:
    """Run the chain on one subject and move its folder into place; returns the subject ID."""
    s = job.settings
    final = Path(job.out) / job.subject_id
    scratch = Path(job.out) / PARTIAL / job.subject_id
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    try:
        images = {}
        for c in s.contrasts:
            try:
                images[c] = sitk.ReadImage(job.images[c], sitk.sitkFloat32)
            except RuntimeError as exc:
                raise VoladDataError(job.images[c], f"cannot be read ({str(exc).strip().splitlines()[-1]})") from exc
        first = images[s.contrasts[0]]
        label = sitk.ReadImage(job.label) if job.label else None
        mask = sitk.ReadImage(job.mask, sitk.sitkUInt8) if job.mask else None
        if s.skull_stripped and mask is None:  # brain = non-zero in any contrast on the first one's grid
            nonzero = np.zeros(sitk.GetArrayViewFromImage(first).shape, dtype=bool)
            for img in images.values():
                if img.GetSize() == first.GetSize():
                    nonzero |= sitk.GetArrayViewFromImage(img) != 0
            mask = sitk.GetImageFromArray(nonzero.astype(np.uint8))
            mask.CopyInformation(first)
        if s.n4:
            images = {c: reg.n4(img, mask) for c, img in images.items()}
        transform = None
        if s.register:
            fixed, template_mask = reg.template(s.spacing or 1.0, skull_stripped=s.skull_stripped)
            moving = images[s.contrasts[0]] * sitk.Cast(mask, sitk.sitkFloat32) if (s.skull_stripped and mask is not None) else images[s.contrasts[0]]
            transform = reg.register_affine(fixed, moving, seed=s.seed)
            reference = fixed
        else:
            reference = sitk.DICOMOrient(first, "RAS") if s.reorient else first
            if s.spacing:
                reference = reg.resample_to_spacing(reference, s.spacing)
            template_mask = None
        out_images = {c: reg.resample_onto(img, reference, transform) for c, img in images.items()}
        if mask is not None and s.skull_stripped:
            out_mask = reg.resample_onto(mask, reference, transform, label=True)
        elif template_mask is not None:
            out_mask = template_mask
        elif job.derive_mask == "mni152":
            _, tmask = reg.template(1.0)
            out_mask = reg.resample_onto(tmask, reference, None, label=True)
        else:
            from volad.data.preprocessing import foreground_mask

            fg = foreground_mask(reg.to_ras(out_images[s.contrasts[0]])[0]).astype(np.uint8)
            out_mask = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(fg, (2, 1, 0))))
            out_mask.CopyInformation(out_images[s.contrasts[0]])
        arrays = {c: reg.to_ras(img)[0] for c, img in out_images.items()}
        mask_arr, affine = reg.to_ras(out_mask)
        mask_arr = mask_arr > 0
        if not mask_arr.any():
            raise VoladDataError(job.images[s.contrasts[0]], "brain mask is empty after preprocessing")
        for c in arrays:
            arrays[c] = _normalise(arrays[c], mask_arr, s.percentiles) if s.normalize else (arrays[c] * mask_arr).astype(np.float32)
        arrays["brainmask"] = mask_arr.astype(np.uint8)
        if label is not None:
            arrays["seg"] = reg.to_ras(reg.resample_onto(label, reference, transform, label=True))[0]
        if s.shape:
            arrays, affine = _crop_pad(arrays, affine, arrays["brainmask"].astype(bool), s.shape)
        sid = job.subject_id
        for name, arr in arrays.items():
            dtype = np.uint8 if name == "brainmask" else (np.int16 if name == "seg" else np.float32)
            write_nifti(arr, affine, scratch / f"{sid}_{name}.nii.gz", dtype=dtype)
        (scratch / ".done").write_text(json.dumps(asdict(s)) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(scratch, final)
        return sid
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)


def _last_line(exc: Exception) -> str:
    """ITK errors span many lines; the last non-empty one says what went wrong."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _is_done(folder: Path, settings: PrepSettings) -> bool:
    marker = folder / ".done"
    if not marker.is_file():
        return False
    done = json.loads(marker.read_text())
    return done == json.loads(json.dumps(asdict(settings)))


def _worker_init(threads: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))


def preprocess_dataset(
    dataset: str | Path,
    root: str | Path,
    out: str | Path,
    *,
    contrasts: Sequence[str] | None = None,
    workers: int = 1,
    overwrite: bool = False,
    limit: int | None = None,
    **overrides: Any,
) -> Path:
    """Preprocess every subject of a dataset's splits into ``out``.

    Args:
        dataset: Manifest name or path of the source.
        root: Source folder.
        out: Destination folder (created; a rerun resumes it).
        contrasts: Contrasts to write (default: the manifest's default contrasts).
        workers: Parallel processes.
        overwrite: Redo subjects finished with other settings (otherwise an error).
        limit: Only the first N subjects of each split (quick trials).
        **overrides: :class:`PrepSettings` fields (``n4``, ``register``, ``spacing``, ...).

    Raises:
        VoladConfigError: a 2D dataset, or finished subjects made with other settings.
    """
    ds = load_dataset(dataset, root, contrasts)
    manifest = ds.manifest
    if (manifest.get("reader") or {"format": "nifti"}).get("format", "nifti") != "nifti":
        raise VoladConfigError(f"dataset {ds.name!r} is 2D ({manifest['reader']['format']}); volad reads it directly, resized on load")
    settings = default_settings(manifest, ds.contrasts)
    unknown = set(overrides) - set(PrepSettings.__dataclass_fields__)
    if unknown:
        raise VoladConfigError(f"unknown preprocessing option(s): {', '.join(sorted(unknown))}")
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None}
    settings = PrepSettings(**{**asdict(settings), **fields})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = ds.split_table()
    ids = [sid for split in table for sid in (table[split][:limit] if limit else table[split])]
    jobs: list[Job] = []
    skipped: list[str] = []
    for sid in list(ids):
        paths = ds.path_of(sid, "contrast")
        missing = [p for p in paths if not p.exists()]
        if missing and "subjects" not in manifest:  # contrasts discovered one by one (IXI): some subjects lack one
            print(f"volad preprocess: skipping {sid}: {missing[0]} not found")
            skipped.append(sid)
            ids.remove(sid)
            continue
        folder = out / sid
        if folder.exists() and _is_done(folder, settings):
            continue
        if folder.exists() and (folder / ".done").is_file() and not overwrite:
            raise VoladConfigError(f"{folder}: made with other preprocessing settings; pass --overwrite or another --out")
        mask_spec = manifest.get("brain_mask", {})
        has_mask = "pattern" in mask_spec or "brain_mask" in manifest.get("overrides", {}).get(sid, {})
        label_spec = manifest.get("label") or {}
        label = ds.path_of(sid, "label")[0] if "pattern" in label_spec else None
        jobs.append(
            Job(
                subject_id=sid,
                images={c: str(p) for c, p in zip(ds.contrasts, paths)},
                mask=str(ds.path_of(sid, "brain_mask")[0]) if has_mask else None,
                label=str(label) if label is not None and label.exists() else None,
                derive_mask=mask_spec.get("derive", ""),
                out=str(out),
                settings=settings,
            )
        )
    print(f"volad preprocess: {len(ids) - len(jobs)} of {len(ids)} subjects already done; {len(jobs)} to do with {workers} worker(s)")
    failures: list[str] = []
    bar = tqdm(total=len(jobs), desc=f"preprocess {ds.name}", disable=None)
    if workers <= 1:
        for job in jobs:
            try:
                process_subject(job)
            except (VoladDataError, RuntimeError) as exc:
                failures.append(f"{job.subject_id}: {_last_line(exc)}")
            bar.update(1)
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        with cf.ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, initargs=(threads,)) as pool:
            futures = {pool.submit(process_subject, job): job for job in jobs}
            for fut in cf.as_completed(futures):
                try:
                    fut.result()
                except (VoladDataError, RuntimeError) as exc:
                    failures.append(f"{futures[fut].subject_id}: {_last_line(exc)}")
                bar.update(1)
    bar.close()
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    if failures:
        for line in failures:
            print(f"FAILED {line}")
        raise VoladDataError(out, f"{len(failures)} subject(s) failed (listed above); fix them and rerun to resume")
    kept = set(ids)
    _write_description(ds, out, settings, {k: [s for s in v if s in kept] for k, v in table.items()})
    print(f"volad preprocess: wrote {len(ids)} subjects to {out} (open with --dataset {out})")
    return out


def _write_description(ds, out: Path, settings: PrepSettings, table: dict[str, list[str]]) -> None:
    src = ds.manifest
    label = src.get("label") or {}
    manifest: dict[str, Any] = {
        "name": f"{ds.name}_preprocessed",
        "description": f"{ds.name} after volad preprocess ({', '.join(k for k in ('n4', 'register', 'normalize') if getattr(settings, k))}); source {ds.root}.",
        "root": ".",
        "contrasts": {c: f"{{subject}}/{{subject}}_{c}.nii.gz" for c in settings.contrasts},
        "default_contrasts": list(settings.contrasts[:1]),
        "subjects": f"{{subject}}/{{subject}}_{settings.contrasts[0]}.nii.gz",
        "brain_mask": {"pattern": "{subject}/{subject}_brainmask.nii.gz"},
        "splits": {"file": "splits.json"},
        "preprocessed_with": asdict(settings),
        "source": {"dataset": ds.name, "root": str(ds.root)},
    }
    if "pattern" in label:
        manifest["label"] = {
            "pattern": "{subject}/{subject}_seg.nii.gz",
            "anomaly_values": label.get("anomaly_values", "nonzero"),
            **({"values": label["values"]} if "values" in label else {}),
            "missing": "healthy" if src.get("health") == "healthy" else label.get("missing", "error"),
        }
    for key in ("health", "lesion_size_bins"):
        if key in src and isinstance(src[key], (str, dict)) and not (key == "health" and isinstance(src[key], dict)):
            manifest[key] = src[key]
    if settings.spacing:
        manifest["spacing_mm"] = settings.spacing
    kept = sorted({sid for ids in table.values() for sid in ids})
    meta = {sid: ds.metadata(sid) for sid in kept}
    fields = sorted({k for m in meta.values() for k, v in m.items() if v})
    if fields:  # the subjects' metadata (site, sex, age) travel with them, as a participants table the new manifest reads
        lines = ["\t".join(["subject_id", *fields])] + ["\t".join([sid, *(meta[sid].get(f, "") for f in fields)]) for sid in kept]
        with atomic_path(out / "participants.tsv") as tmp:
            tmp.write_text("\n".join(lines) + "\n")
        manifest["participants"] = {"file": "participants.tsv", "id_column": "subject_id", "columns": {f: f for f in fields}}
    write_json(table, out / "splits.json")
    write_json(asdict(settings), out / "preprocess.json")
    write_json(manifest, out / "manifest.json")
