"""Whole subject in, whole anomaly map out, on the input's own grid.

:func:`volad.methods.predict.predict_volume` runs a method over one preprocessed
volume: whole (fully convolutional networks), on a Hann-weighted TorchIO patch
grid (bounded memory), or slice by slice in slice mode. :func:`infer_subject` adds
preprocessing and puts the map back on the input grid; :class:`Inferer` does it
for every subject of some splits and writes NIfTI files that line up with the
inputs in 3D Slicer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torchio as tio

from volad.data.manifest import Dataset, load_dataset
from volad.data.preprocessing import denormalize
from volad.data.scans import scan_subjects
from volad.errors import VoladConfigError
from volad.io import file_sha256, read_geometry, write_json, write_like
from volad.methods.base import AnomalyMethod
from volad.methods.predict import predict_volume
from volad.runs.checkpoint import free_hparams
from volad.runs.record import TrainedRun, open_run
from volad.types import resolve_device, unset
from volad.utils import distributed, rundir
from volad.utils.progress import progress

log = logging.getLogger("volad.engine.inferer")


@dataclass
class SubjectPrediction:
    """A subject's outputs on its input grid."""

    subject_id: str
    anomaly_map: np.ndarray  # (W, H, D)
    reconstruction: np.ndarray | None  # (C, W, H, D), input intensity units
    seconds: float


def infer_subject(
    method: AnomalyMethod,
    subject: tio.Subject,
    transform: tio.Transform,
    **predict_kwargs,
) -> SubjectPrediction:
    """Preprocess one subject, predict, and return outputs on the input's own grid."""
    start = time.perf_counter()
    prepared = transform(subject)
    out = predict_volume(method, prepared["image"].data, prepared["brain_mask"].data, **predict_kwargs)
    amap, rec = out.anomaly_map, out.reconstruction
    if rec is not None:
        rec = denormalize(rec, prepared["normalization"]) * prepared["brain_mask"].data
    ref_image = subject["image"]
    same_grid = tuple(prepared["image"].spatial_shape) == tuple(ref_image.spatial_shape) and np.allclose(
        prepared["image"].affine, ref_image.affine, atol=1e-4
    )
    if not same_grid:
        back = tio.Resample((tuple(ref_image.spatial_shape), ref_image.affine), image_interpolation="linear")
        amap = back(tio.ScalarImage(tensor=amap, affine=prepared["image"].affine)).data
        if rec is not None:
            rec = back(tio.ScalarImage(tensor=rec, affine=prepared["image"].affine)).data
    return SubjectPrediction(
        subject_id=subject["subject_id"],
        anomaly_map=amap[0].numpy().astype(np.float32),
        reconstruction=None if rec is None else rec.numpy().astype(np.float32),
        seconds=time.perf_counter() - start,
    )


class Inferer:
    """Write anomaly maps (and pseudo-healthy reconstructions) for every subject of some splits, or for given scans.

    Outputs, per subject, in ``<output_dir>/maps/`` (``<output_dir>/scans/`` for
    ``input`` scans): ``<id>_anomaly.nii.gz`` and ``<id>_recon_<contrast>.nii.gz``,
    on exactly the input's grid with its geometry header; plus ``index.json``
    listing them. Files are written atomically. Under ``torchrun`` the subjects
    are split between the processes (each writes its share; rank 0 writes the
    index of all of them). A map already on disk is reused
    only when its ``index.json`` entry shows it was made by the same checkpoint
    (content hash), method settings, inference settings, loading and input
    files, and the map and its reconstructions still have the size and SHA-256
    recorded when they were written (a truncated or edited file is recomputed);
    any other map is recomputed. The index is updated after every map, so
    an interrupted run resumes where it stopped.

    Without ``method``, the run folder describes everything
    (:func:`volad.runs.record.open_run`): the method is rebuilt from its checkpoint and
    the data, contrasts, loading, patch grid and batch size default to the run's.

    Args:
        output_dir: Run folder.
        method: A method with trained weights; ``None`` rebuilds the run's own.
        checkpoint: Which checkpoint of the run (``best``, ``last`` or a path), without ``method``.
        method_settings: New values of the method's inference-only ``hparams``
            (``t_test``, ...; ``None`` keeps the trained value), without ``method``.
        dataset: Manifest name or path of the data to map (default: the run's
            validation dataset: its training dataset, or in a cross-dataset run the
            labelled dataset whose ``val`` split checked training).
        data_root: Its data folder (default: the run's, for the run's dataset).
        contrasts: Contrasts (channels); default the run's (else the manifest's).
        splits: Splits to write maps for.
        input: A scan file, case folder or folder of cases to map instead of
            dataset splits (:mod:`volad.data.scans`); read as the run's dataset reads its subjects.
        maps_dir: Where the maps go (default ``<output_dir>/maps``, or ``<output_dir>/scans`` for ``input``).
        patch_size: ``None`` for whole volumes/slices (or the run's validation grid
            when rebuilding), else a patch grid; 0 forces whole volumes/slices.
        overlap: Patch overlap fraction.
        batch_size: Patches or slices per pass (default: the run's training batch size, else 4).
        device: ``"auto"`` picks CUDA when present.
        overwrite: Recompute maps that already exist.
        checkpoint_info: Recorded in ``index.json`` (which checkpoint made the maps).
        slicer_dir: Also export every case for 3D Slicer there
            (:mod:`volad.export.slicer`); ``None`` skips it.
        slicer_threshold: Segmentation threshold of that export (``None``: the
            run's report threshold when evaluated, else no segmentation).

    Raises:
        VoladConfigError: no checkpoint to rebuild from, a setting the run fixes,
            or data read differently from the run's training data.
    """

    def __init__(
        self,
        *,
        output_dir: str,
        method: AnomalyMethod | None = None,
        checkpoint: str = "best",
        method_settings: dict[str, Any] | None = None,
        dataset: str | None = None,
        data_root: str | None = None,
        contrasts: Sequence[str] | None = None,
        splits: Sequence[str] = ("val", "test"),
        input: str | None = None,
        maps_dir: str | None = None,
        patch_size: int | Sequence[int] | None = None,
        overlap: float = 0.25,
        batch_size: int | None = None,
        device: str = "auto",
        overwrite: bool = False,
        checkpoint_info: dict | None = None,
        slicer_dir: str | None = None,
        slicer_threshold: float | None = None,
    ):
        self.output_dir = Path(output_dir)
        run = None
        if method is None:
            run = open_run(output_dir, checkpoint)
            if not _inside(run.checkpoint, self.output_dir):
                _check_foreign_checkpoint(run, self.output_dir, maps_dir)
            method = run.method(**(method_settings or {}))
            if unset(dataset):
                dataset = run.data.get("val_spec", run.data["val_dataset"])
                data_root = run.data["val_root"] if unset(data_root) else data_root
            contrasts = contrasts or run.data["contrasts"]
            if patch_size is None:
                patch_size = run.inference.get("patch_size")
            if batch_size is None:
                batch_size = run.inference.get("batch_size")
        elif unset(dataset):
            raise VoladConfigError("Inferer: pass the dataset to map when giving a method (or no method, to use the run's record)")
        self.method = method
        self.dataset = load_dataset(dataset, data_root, contrasts)
        if run is not None:
            check_loading(self.dataset, run)
        self.dataset_spec = str(dataset)
        self.splits = [splits] if isinstance(splits, str) else list(splits)
        self.input = None if unset(input) else Path(input)
        default_maps = "scans" if self.input is not None else "maps"
        self.maps_dir = self.output_dir / default_maps if unset(maps_dir) else Path(maps_dir)
        self.predict_kwargs = dict(patch_size=patch_size or None, overlap=overlap, batch_size=int(batch_size or 4))
        self.device = distributed.local_device(resolve_device(device))
        self.overwrite = overwrite
        self.checkpoint_info = dict(checkpoint_info or getattr(method, "checkpoint_info", {}))
        path = self.checkpoint_info.get("path")
        if path:  # the run's own checkpoint is found again if the run folder moves; another run's is not the run's
            inside = _inside(Path(path), self.output_dir)
            self.checkpoint_info["in_run"] = str(Path(path).resolve().relative_to(self.output_dir.resolve())) if inside else None
        self.transform = self.dataset.transform(anatomy=method.anatomy)
        # the grid the network was trained on: scans given by path that are stored otherwise are brought to it
        self.grid = (run.data.get("grid") if run is not None else None) or self.dataset.grid("train")
        self.slicer_dir = None if unset(slicer_dir) else slicer_dir
        self.slicer_threshold = slicer_threshold

    def producer(self) -> dict:
        """Everything that decides what a map holds, except the input files (see :meth:`_input_identity`).

        The checkpoint is identified by its file's SHA-256 (set by
        :func:`volad.runs.checkpoint.load_trained`); a method given without one is
        identified by a hash of its weights.
        """
        ck = self.checkpoint_info or {}
        return {
            "checkpoint": ck.get("sha256") or _weights_digest(self.method),
            "method": self.method.hparams,
            "predict": self.predict_kwargs,
            "dataset": self.dataset.name,
            "contrasts": list(self.dataset.contrasts),
            "loading": self.dataset.load_options(),
        }

    @staticmethod
    def _input_identity(subject) -> list:
        """The input files of a subject, with their sizes and modification times."""
        out = []
        for p in subject["image_paths"]:
            st = Path(p).stat()
            out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
        return out

    def run(self) -> Path:
        """Write the maps, reusing one only when the same checkpoint, settings and inputs made it."""
        if not distributed.is_main():  # rank 0 holds the folder for all processes
            return self._run()
        with rundir.claim(self.output_dir, "inference"):
            return self._run()

    def _run(self) -> Path:
        self.method.to(self.device).eval()
        index_path = self.maps_dir / "index.json"
        previous = json.loads(index_path.read_text()) if index_path.is_file() else {}
        before = {e["subject_id"]: e for e in previous.get("subjects", [])}
        took = {e["subject_id"]: e["seconds"] for e in previous.get("subjects", []) if "seconds" in e}  # kept with a reused map
        producer = self.producer()  # once: it may hash the weights
        if self.input is not None:
            todo = [("input", s) for s in scan_subjects(self.dataset, self.input)]
        else:
            todo = [(split, s) for split in self.splits for s in self.dataset.subjects(split)]
        source = str(self.input) if self.input is not None else "+".join(self.splits)
        log.info("writing maps for %d subjects (%s) to %s", len(todo), source, self.maps_dir)
        order = [s["subject_id"] for _, s in todo]
        todo = todo[distributed.rank() :: distributed.world_size()]  # this process's share (all of them in one process)
        entries, reused, written = [], [], []
        for split, subject in progress(todo, "inference"):
            sid = subject["subject_id"]
            map_path = self.maps_dir / f"{sid}_anomaly.nii.gz"
            rec_paths = {c: self.maps_dir / f"{sid}_recon_{c}.nii.gz" for c in self.dataset.contrasts}
            fingerprint = _fingerprint({**producer, "inputs": self._input_identity(subject)})
            entry = {"subject_id": sid, "split": split, "anomaly_map": map_path.name, "image_paths": subject["image_paths"], "fingerprint": fingerprint}
            if self.input is not None:
                entry["input"] = str(self.input.resolve())
            if not self.overwrite and before.get(sid, {}).get("fingerprint") == fingerprint and _files_unchanged(self.maps_dir, before[sid]):
                entry["reconstructions"] = dict(before[sid].get("reconstructions") or {})
                entry["files"] = before[sid]["files"]
                if sid in took:
                    entry["seconds"] = took[sid]
                entries.append(entry)
                reused.append(sid)
                continue
            transform = self._scan_transform(subject) if self.input is not None else self.transform
            pred = infer_subject(self.method, subject, transform, device=self.device, **self.predict_kwargs)
            ref = subject["image_paths"][0]
            affine = subject["image"].affine  # for inputs that are not NIfTI (fastMRI .h5, pictures)
            if pred.reconstruction is not None:
                for i, (c, p) in enumerate(rec_paths.items()):
                    write_like(pred.reconstruction[i], ref, p, fallback_affine=affine)
                entry["reconstructions"] = {c: p.name for c, p in rec_paths.items()}
            else:
                for p in rec_paths.values():  # a reconstruction of an earlier method must not pass for this one's
                    p.unlink(missing_ok=True)
            write_like(pred.anomaly_map, ref, map_path, fallback_affine=affine)
            entry["files"] = {p.name: _file_record(p) for p in [map_path, *(rec_paths.values() if pred.reconstruction is not None else ())]}
            entry["seconds"] = round(pred.seconds, 3)
            log.info("%s (%d/%d): %.2f s -> %s", sid, len(entries) + 1, len(todo), pred.seconds, map_path)
            entries.append(entry)
            written.append(sid)
            if distributed.is_main():
                self._write_index(index_path, previous, producer, entries)  # after every map, so an interrupted run resumes
        if distributed.active():  # every process's entries, in the order of one process
            shares = distributed.gather((entries, reused, written))
            by_id = {e["subject_id"]: e for share in shares for e in share[0]}
            entries = [by_id[sid] for sid in order]
            reused = [sid for share in shares for sid in share[1]]
            written = [sid for share in shares for sid in share[2]]
        if not distributed.is_main():
            return self.maps_dir
        self._write_index(index_path, previous, producer, entries)
        if reused:
            print(f"volad: reused {len(reused)} map(s) made by the same checkpoint, settings and inputs: {', '.join(reused)}")
        print(f"volad: wrote {len(written)} anomaly map(s) to {self.maps_dir}" + (f": {', '.join(written)}" if written else ""))
        if self.slicer_dir:
            from volad.export.slicer import export_run

            splits = ["input"] if self.input is not None else self.splits
            export_run(self.output_dir, maps_dir=self.maps_dir, out_dir=self.slicer_dir, threshold=self.slicer_threshold, splits=splits)
        return self.maps_dir

    def _scan_transform(self, subject) -> tio.Transform:
        """The preprocessing of a scan given by path: first reoriented and resampled to the training data's grid
        where it is stored otherwise (said per scan); the map goes back onto the scan's own grid."""
        if not self.grid:
            return self.transform
        path = subject["image_paths"][0]
        geom = read_geometry(path)
        change = {}
        if geom.orientation != self.grid["orientation"]:
            change["orientation"] = self.grid["orientation"]
        if not np.allclose(geom.spacing, self.grid["spacing"], rtol=1e-3, atol=1e-4):
            change["spacing"] = tuple(self.grid["spacing"])
        if not change:
            return self.transform
        def mm(spacing) -> str:
            return "×".join(f"{v:g}" for v in spacing) + " mm"

        done = ([f"reoriented to {change['orientation']}"] if "orientation" in change else []) + (
            [f"resampled to {mm(change['spacing'])}"] if "spacing" in change else [])
        print(f"volad: {path}: stored {geom.orientation} at {mm(geom.spacing)}; {' and '.join(done)} as the run's training data; "
              "the map is written back on the scan's own grid", flush=True)
        return self.dataset.transform(anatomy=self.method.anatomy, grid=change)

    def _write_index(self, index_path: Path, previous: dict, producer: dict, entries: list[dict]) -> None:
        """``index.json``: this run's entries, plus those of other splits written by earlier runs with the same producer."""
        mine = {e["subject_id"] for e in entries}
        keep = []
        if previous and _fingerprint({k: previous.get(k) for k in producer}) == _fingerprint(producer):
            keep = [e for e in previous.get("subjects", []) if e["subject_id"] not in mine]
        index = {
            **producer,
            "dataset_spec": self.dataset_spec,
            "data_root": str(self.dataset.root),
            "checkpoint": self.checkpoint_info,
            "subjects": keep + entries,
        }
        write_json(index, index_path)


def check_loading(dataset: Dataset, run: TrainedRun) -> None:
    """Refuse data that reaches the network differently from the run's training data (another reader or intensity rule).

    Raises:
        VoladConfigError: the loading differs, naming both.
    """
    if run.data.get("loading") is None:
        return
    recorded, now = (json.loads(json.dumps(x)) for x in (run.data["loading"], dataset.load_options()))  # tuples as lists
    if now != recorded:
        diff = ", ".join(f"{k}: run {recorded.get(k)!r} vs {dataset.name} {now.get(k)!r}" for k in sorted(set(now) | set(recorded)) if now.get(k) != recorded.get(k))
        raise VoladConfigError(f"dataset {dataset.name!r} is loaded differently from the training data of {run.output_dir} ({diff}); its maps would not be comparable")


def _inside(path: Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def _check_foreign_checkpoint(run: TrainedRun, output_dir: Path, maps_dir: str | None) -> None:
    """A checkpoint from outside ``output_dir`` maps into this run's maps folder only when it was trained like this run.

    It must share the run's method (kind and every training setting), training data and contrasts; any
    other checkpoint needs a maps folder of its own (``--maps_dir``), named in the output.

    Raises:
        VoladConfigError: naming what differs and how to map it anyway.
    """
    try:
        own = open_run(output_dir, "best")
    except VoladConfigError:
        own = None  # a folder without a run of its own: the checkpoint's maps are the only ones
    if own is not None:
        keys = (set(own.hparams) | set(run.hparams)) - free_hparams(run.method_class)
        differs = [f"{k}: {own.hparams.get(k)!r} vs {run.hparams.get(k)!r}" for k in sorted(keys) if own.hparams.get(k) != run.hparams.get(k)]
        differs += [f"{k}: {own.data.get(k)!r} vs {run.data.get(k)!r}" for k in ("train_dataset", "train_root", "contrasts") if own.data.get(k) != run.data.get(k)]
        if differs and unset(maps_dir):
            raise VoladConfigError(
                f"{run.checkpoint}: a checkpoint of another run than {output_dir} (this run's vs its: {'; '.join(differs)}); "
                f"its maps would replace this run's. Give it its own --maps_dir, or map it from its own run folder"
            )
    if not unset(maps_dir):
        print(f"volad: mapping with {run.checkpoint}, from outside {output_dir}, into {maps_dir}")


def _file_record(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a written map: what :func:`_files_unchanged` checks before reusing it."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _files_unchanged(maps_dir: Path, entry: dict) -> bool:
    """Whether every file an index entry lists is still there with the size and content it was written with.

    An entry without that record (indexes of volad before 0.4) is not trusted: its maps are recomputed.
    """
    files = entry.get("files")
    if not files or entry.get("anomaly_map") not in files:
        return False
    for name, record in files.items():
        path = maps_dir / name
        if not path.is_file() or path.stat().st_size != record.get("bytes") or file_sha256(path) != record.get("sha256"):
            return False
    return True


def _weights_digest(method: AnomalyMethod) -> str:
    """SHA-256 of a method's weights and buffers (for methods not loaded from a checkpoint file)."""
    h = hashlib.sha256()
    for name, t in method.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fingerprint(obj) -> str:
    """A short content hash of a JSON-able record."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
