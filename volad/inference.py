"""Whole subject in, whole anomaly map out, on the input's own grid.

:func:`predict_volume` runs a method over one preprocessed volume: whole (fully
convolutional networks), on a Hann-weighted TorchIO patch grid (bounded
memory), or slice by slice in slice mode. :func:`infer_subject` adds
preprocessing and puts the map back on the input grid; :class:`Inferer` does it
for every subject of some splits and writes NIfTI files that line up with the
inputs in 3D Slicer.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchio as tio

from volad import rundir
from volad.data.manifest import load_dataset
from volad.data.preprocessing import denormalize
from volad.data.views import patch_shape
from volad.io import write_json, write_like
from volad.methods.base import AnomalyMethod
from volad.progress import progress
from volad.types import AnomalyOutput, crop_spatial, pad_to_multiple, resolve_device

log = logging.getLogger("volad.inference")


@torch.inference_mode()
def _predict_batch(method: AnomalyMethod, x: torch.Tensor, mask: torch.Tensor) -> AnomalyOutput:
    xp, spatial = pad_to_multiple(x, method.size_divisor)
    mp, _ = pad_to_multiple(mask, method.size_divisor)
    out = method.predict(xp, mp)
    rec = None if out.reconstruction is None else crop_spatial(out.reconstruction, spatial)
    return AnomalyOutput(crop_spatial(out.anomaly_map, spatial), rec)


@torch.inference_mode()
def predict_volume(
    method: AnomalyMethod,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    patch_size: int | Sequence[int] | None = None,
    overlap: float = 0.25,
    batch_size: int = 4,
    device: torch.device | str | None = None,
) -> AnomalyOutput:
    """Anomaly map of one preprocessed volume.

    Args:
        method: A trained method (its ``spatial_dims`` chooses 3D or slice mode).
        image: ``(C, W, H, D)`` normalised volume.
        mask: ``(1, W, H, D)`` brain mask.
        patch_size: ``None`` or 0 runs whole volumes (3D) or whole slices (2D); else a
            Hann-weighted patch grid with this patch (in-plane size in slice mode).
            Methods with a ``required_patch_size`` always use a grid of that size.
        overlap: Fraction of the patch that neighbouring patches share.
        batch_size: Patches or slices per forward pass.
        device: Device to run on (default: the method's).

    Returns:
        Unbatched :class:`AnomalyOutput`: map ``(1, W, H, D)``, reconstruction ``(C, W, H, D)`` or None.
    """
    if device is None:
        device = next(itertools.chain(method.parameters(), method.buffers()), torch.zeros(())).device
    method.eval()
    # 0 (the CLI cannot pass None) also means whole volumes/slices; fixed-size networks (f-AnoGAN) always need their grid.
    patch_size = patch_size or method.required_patch_size
    image, mask = image.float(), mask.float()
    whole = method.input_view == "volume" or (patch_size is None and method.spatial_dims == 3)
    if whole:
        out = _predict_batch(method, image[None].to(device), mask[None].to(device))
        return AnomalyOutput(out.anomaly_map[0].cpu(), None if out.reconstruction is None else out.reconstruction[0].cpu())
    if patch_size is None:  # slice mode, whole axial slices
        maps, recs = [], []
        depth = image.shape[-1]
        for start in range(0, depth, batch_size):
            sl = slice(start, min(depth, start + batch_size))
            xs = image[..., sl].permute(3, 0, 1, 2).to(device)
            ms = mask[..., sl].permute(3, 0, 1, 2).to(device)
            out = _predict_batch(method, xs, ms)
            maps.append(out.anomaly_map.cpu())
            if out.reconstruction is not None:
                recs.append(out.reconstruction.cpu())
        amap = torch.cat(maps).permute(1, 2, 3, 0)
        rec = torch.cat(recs).permute(1, 2, 3, 0) if recs else None
        return AnomalyOutput(amap, rec)
    return _predict_grid(method, image, mask, patch_shape(patch_size, method.spatial_dims), overlap, batch_size, device)


def _predict_grid(method, image, mask, patch, overlap, batch_size, device) -> AnomalyOutput:
    patch = tuple(min(p, s) for p, s in zip(patch, image.shape[1:]))
    ov = tuple(2 * int(round(p * overlap / 2)) if p > 1 else 0 for p in patch)
    subject = tio.Subject(image=tio.ScalarImage(tensor=image), brain_mask=tio.LabelMap(tensor=mask.to(torch.uint8)))
    sampler = tio.GridSampler(subject, patch_size=patch, patch_overlap=ov, padding_mode=0)
    agg_map = tio.GridAggregator(sampler, overlap_mode="hann")
    agg_rec = tio.GridAggregator(sampler, overlap_mode="hann")
    has_rec = False
    loader = tio.SubjectsLoader(sampler, batch_size=batch_size)
    for batch in loader:
        x = batch["image"][tio.DATA].float()
        m = batch["brain_mask"][tio.DATA].float()
        if method.spatial_dims == 2:
            x, m = x[..., 0], m[..., 0]
        out = _predict_batch(method, x.to(device), m.to(device))
        amap, rec = out.anomaly_map.cpu(), out.reconstruction
        if method.spatial_dims == 2:
            amap = amap[..., None]
            rec = None if rec is None else rec[..., None]
        loc = batch[tio.LOCATION]
        agg_map.add_batch(amap, loc)
        if rec is not None:
            has_rec = True
            agg_rec.add_batch(rec.cpu(), loc)
    return AnomalyOutput(agg_map.get_output_tensor().float(), agg_rec.get_output_tensor().float() if has_rec else None)


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
    """Write anomaly maps (and pseudo-healthy reconstructions) for every subject of some splits.

    Outputs, per subject, in ``<output_dir>/maps/``:
    ``<id>_anomaly.nii.gz`` and ``<id>_recon_<contrast>.nii.gz``, on exactly the
    input's grid with its geometry header; plus ``index.json`` listing them.
    Files are written atomically. A map already on disk is reused only when its
    ``index.json`` entry shows it was made by the same checkpoint (content hash),
    method settings, inference settings, loading and input files; any other map
    is recomputed. The index is updated after every map, so an interrupted run
    resumes where it stopped.

    Args:
        method: Method with trained weights (see :func:`volad.checkpoint.load_trained`).
        dataset: Manifest name or path.
        data_root: Data folder (``None``: volad's cache for generated datasets).
        contrasts: Contrasts (channels); ``None`` uses the manifest default.
        splits: Splits to write maps for.
        output_dir: Run folder.
        patch_size: ``None`` for whole volumes/slices, else a patch grid.
        overlap: Patch overlap fraction.
        batch_size: Patches or slices per pass.
        device: ``"auto"`` picks CUDA when present.
        overwrite: Recompute maps that already exist.
        checkpoint_info: Recorded in ``index.json`` (which checkpoint made the maps).
        slicer_dir: Also export every case for 3D Slicer there
            (:func:`volad.export.slicer.export_run`); ``None`` skips it.
        slicer_threshold: Segmentation threshold of that export (``None``: the
            run's report threshold when evaluated, else no segmentation).
    """

    def __init__(
        self,
        *,
        method: AnomalyMethod,
        dataset: str = "phantom",
        data_root: str | None = None,
        contrasts: Sequence[str] | None = None,
        splits: Sequence[str] = ("val", "test"),
        output_dir: str = "runs/ae3d",
        patch_size: int | Sequence[int] | None = None,
        overlap: float = 0.25,
        batch_size: int = 4,
        device: str = "auto",
        overwrite: bool = False,
        checkpoint_info: dict | None = None,
        slicer_dir: str | None = None,
        slicer_threshold: float | None = None,
    ):
        self.method = method
        self.dataset = load_dataset(dataset, data_root, contrasts)
        self.dataset_spec = str(dataset)
        self.splits = [splits] if isinstance(splits, str) else list(splits)
        self.maps_dir = Path(output_dir) / "maps"
        self.predict_kwargs = dict(patch_size=patch_size, overlap=overlap, batch_size=batch_size)
        self.device = resolve_device(device)
        self.overwrite = overwrite
        self.checkpoint_info = checkpoint_info or getattr(method, "checkpoint_info", {})
        self.transform = self.dataset.transform()
        self.output_dir = Path(output_dir)
        self.slicer_dir = None if slicer_dir in (None, "", "None") else slicer_dir
        self.slicer_threshold = slicer_threshold

    def producer(self) -> dict:
        """Everything that decides what a map holds, except the input files (see :meth:`_input_identity`).

        The checkpoint is identified by its file's SHA-256 (set by
        :func:`volad.checkpoint.load_trained`); a method given without one is
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
        with rundir.claim(self.output_dir, "inference"):
            return self._run()

    def _run(self) -> Path:
        self.method.to(self.device).eval()
        index_path = self.maps_dir / "index.json"
        previous = json.loads(index_path.read_text()) if index_path.is_file() else {}
        made_by = {e["subject_id"]: e.get("fingerprint") for e in previous.get("subjects", [])}
        producer = self.producer()  # once: it may hash the weights
        todo = [(split, s) for split in self.splits for s in self.dataset.subjects(split)]
        log.info("writing maps for %d subjects (%s) to %s", len(todo), "+".join(self.splits), self.maps_dir)
        entries, reused, written = [], [], []
        for split, subject in progress(todo, "inference"):
            sid = subject["subject_id"]
            map_path = self.maps_dir / f"{sid}_anomaly.nii.gz"
            rec_paths = {c: self.maps_dir / f"{sid}_recon_{c}.nii.gz" for c in self.dataset.contrasts}
            fingerprint = _fingerprint({**producer, "inputs": self._input_identity(subject)})
            entry = {"subject_id": sid, "split": split, "anomaly_map": map_path.name, "image_paths": subject["image_paths"], "fingerprint": fingerprint}
            if map_path.exists() and not self.overwrite and made_by.get(sid) == fingerprint:
                entry["reconstructions"] = {c: p.name for c, p in rec_paths.items() if p.exists()}
                entries.append(entry)
                reused.append(sid)
                continue
            pred = infer_subject(self.method, subject, self.transform, device=self.device, **self.predict_kwargs)
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
            entry["seconds"] = round(pred.seconds, 3)
            log.info("%s (%d/%d): %.2f s -> %s", sid, len(entries) + 1, len(todo), pred.seconds, map_path)
            entries.append(entry)
            written.append(sid)
            self._write_index(index_path, previous, producer, entries)  # after every map, so an interrupted run resumes
        self._write_index(index_path, previous, producer, entries)
        if reused:
            print(f"volad: reused {len(reused)} map(s) made by the same checkpoint, settings and inputs: {', '.join(reused)}")
        print(f"volad: wrote {len(written)} anomaly map(s) to {self.maps_dir}" + (f": {', '.join(written)}" if written else ""))
        if self.slicer_dir:
            from volad.export.slicer import export_run

            export_run(self.output_dir, out_dir=self.slicer_dir, threshold=self.slicer_threshold, splits=self.splits)
        return self.maps_dir

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
