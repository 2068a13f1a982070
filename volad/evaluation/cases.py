"""The cases an evaluation reads: a folder of maps, its index, and each map with its label and brain mask.

:func:`open_maps` finds the maps index (volad inference's ``index.json``, or one made
from a folder of maps of any tool by file name) and the dataset it maps, and refuses
maps that the run's checkpoint did not make (:func:`check_maps_checkpoint`).
:class:`MapCases` loads a case (map, label, brain mask, post-processed as every
method's is) and refuses a choosing split that shares subjects with the test split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from volad.data.manifest import Dataset, load_dataset
from volad.data.preprocessing import EnsureMasks
from volad.errors import VoladConfigError, VoladDataError
from volad.evaluation.postprocess import PostProcessing, postprocess
from volad.io import file_sha256, read_map
from volad.runs.checkpoint import checkpoint_path, read_checkpoint
from volad.types import unset


@dataclass
class LoadedCase:
    subject_id: str
    anomaly_map: np.ndarray
    label: np.ndarray
    brain: np.ndarray
    spacing: tuple[float, ...]
    category: str = ""
    status: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


def open_maps(output_dir: Path, maps_dir: Path, dataset: str | None, data_root: str | None, splits: Sequence[str | None],
              checkpoint: str | None = None) -> tuple[dict, Dataset]:
    """The maps index and the dataset it maps (``dataset`` overrides the index's), checked against the run's checkpoint.

    Raises:
        VoladConfigError: no maps folder, no dataset to match a folder of maps to, stale maps.
    """
    index_path = maps_dir / "index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        recorded = index.get("dataset_spec", index.get("dataset"))
        dataset = dataset or recorded
        same = str(dataset) in (str(recorded), str(index.get("dataset")))
        opened = load_dataset(dataset, data_root or (index.get("data_root") if same else None), index.get("contrasts"))
    else:
        if not maps_dir.is_dir():
            raise VoladConfigError(f"{maps_dir}: no maps folder; run the bundle's inference.json first (same --output_dir) or pass --maps")
        if not dataset:
            raise VoladConfigError(f"{maps_dir} has no index.json: pass --dataset")
        opened = load_dataset(dataset, data_root)
        index = index_from_folder(maps_dir, opened, splits)
    check_maps_checkpoint(index, output_dir, maps_dir, checkpoint)
    return index, opened


class MapCases:
    """The cases of one evaluation, loaded on demand.

    Args:
        maps_dir: Folder of the maps.
        index: Its index (:func:`open_maps`).
        dataset: The dataset the maps are of (test and threshold splits).
        post: The post-processing every map gets before it is scored.
        test_split: The split reported on: no choosing split may share its subjects.
    """

    def __init__(self, maps_dir: Path, index: dict, dataset: Dataset, post: PostProcessing, test_split: str):
        self.maps_dir, self.index, self.dataset, self.post, self.test_split = maps_dir, index, dataset, post, test_split
        self.prepare = EnsureMasks()

    def entries(self, split: str, dataset: Dataset | None = None) -> list[dict]:
        """The index entries of ``split``'s subjects; every subject of the split must have a map."""
        dataset = dataset or self.dataset
        expected = set(dataset.split_ids(split))
        entries = [e for e in self.index["subjects"] if e["split"] == split and e["subject_id"] in expected]
        missing = sorted(expected - {e["subject_id"] for e in entries})
        if missing:
            raise VoladDataError(self.maps_dir, f"no maps for {len(missing)} {split} subjects of {dataset.name} (e.g. {missing[0]}); run inference with this split")
        return entries

    def load(self, entry: dict, split: str, dataset: Dataset | None = None) -> LoadedCase:
        """A case: its post-processed map, label and brain mask, on the input's grid (else refused, saying by how much)."""
        dataset = dataset or self.dataset
        subject = self.prepare(dataset.subject(entry["subject_id"], split))
        path = self.maps_dir / entry["anomaly_map"]
        if not path.is_file():
            raise VoladDataError(path, "anomaly map not found")
        amap, affine = read_map(path)
        ref = subject["image"]
        if amap.shape != tuple(ref.spatial_shape):
            raise VoladDataError(path, f"map shape {amap.shape} differs from the input's {tuple(ref.spatial_shape)} ({ref.path})")
        if not np.allclose(affine, ref.affine, atol=1e-3):
            raise VoladDataError(path, f"map grid is not the input's ({ref.path}): {affine_difference(affine, ref.affine)}")
        if not np.isfinite(amap).all():
            raise VoladDataError(path, "anomaly map contains NaN or Inf")
        brain = subject["brain_mask"].numpy()[0].astype(bool)
        label = subject["label"].numpy()[0].astype(bool)
        spacing = tuple(float(s) for s in ref.spacing)
        return LoadedCase(
            entry["subject_id"], postprocess(amap, brain, spacing, self.post), label, brain, spacing,
            str(subject.get("category", "") or ""), str(subject.get("status", "") or ""), dataset.metadata(entry["subject_id"]),
        )

    def check_disjoint(self, split: str, dataset: Dataset, what: str) -> None:
        """Refuse a choosing split of the test dataset that is the test split or shares subjects with it."""
        same_data = dataset.name == self.dataset.name and dataset.root == self.dataset.root
        if not same_data:
            return
        if split == self.test_split:
            raise VoladConfigError(f"the {what} split must differ from the test split (use the oracle ⌈Dice⌉ for test-set thresholds)")
        overlap = set(dataset.split_ids(split)) & set(self.dataset.split_ids(self.test_split))
        if overlap:
            raise VoladConfigError(
                f"{what} split {split!r} shares {len(overlap)} subjects with test split {self.test_split!r} "
                f"(e.g. {sorted(overlap)[0]}); a threshold must come from data disjoint from the test set"
            )


def affine_difference(affine: np.ndarray, ref: np.ndarray) -> str:
    """How far apart two voxel-to-world affines are, in words a person can act on."""
    affine, ref = np.asarray(affine, dtype=float), np.asarray(ref, dtype=float)
    parts = []
    shift = float(np.linalg.norm(affine[:3, 3] - ref[:3, 3]))
    if shift > 1e-3:
        parts.append(f"origin {shift:.3g} mm away ({', '.join(f'{v:+.3g}' for v in affine[:3, 3] - ref[:3, 3])} mm)")
    sizes, ref_sizes = np.linalg.norm(affine[:3, :3], axis=0), np.linalg.norm(ref[:3, :3], axis=0)
    if not np.allclose(sizes, ref_sizes, atol=1e-3):
        parts.append(f"voxel size {'×'.join(f'{v:.4g}' for v in sizes)} mm vs {'×'.join(f'{v:.4g}' for v in ref_sizes)} mm")
    directions = affine[:3, :3] / sizes, ref[:3, :3] / ref_sizes
    if not np.allclose(*directions, atol=1e-3):
        cos = np.clip(np.sum(directions[0] * directions[1], axis=0), -1.0, 1.0)
        parts.append(f"axes turned by up to {float(np.degrees(np.arccos(cos)).max()):.3g}°")
    return "; ".join(parts) or f"affines differ by up to {float(np.abs(affine - ref).max()):.3g}"


def check_maps_checkpoint(index: dict, output_dir: Path, maps_dir: Path, checkpoint: str | None = None) -> None:
    """Refuse maps that the run's checkpoint did not make (the run trained on after mapping, or another was named).

    Args:
        index: The maps' ``index.json`` (its ``checkpoint`` entry names the file and its SHA-256).
        output_dir: The run folder.
        maps_dir: The maps folder (named in the error).
        checkpoint: ``best``, ``last`` or a path the maps must come from; ``None``: the run's own checkpoint of the
            name the index records, as it is now (else the recorded path itself, e.g. maps of another folder's run).

    Raises:
        VoladConfigError: naming both checkpoints and the command that remaps.
    """
    made = index.get("checkpoint") or {}
    sha = made.get("sha256")
    if not sha:  # maps from another tool, or from a method given in Python: nothing recorded to check
        return
    remap = (f"python -m monai.bundle run --config_file bundles/<bundle>/inference.json --output_dir {output_dir}"
             + (f" --maps_dir {maps_dir}" if maps_dir != output_dir / "maps" else "")
             + (f" --checkpoint {checkpoint}" if not unset(checkpoint) and checkpoint != "best" else ""))
    made_by = f"{made.get('path')} (sha256 {sha[:12]}, epoch {made.get('epoch')})"
    if not unset(checkpoint):
        current = checkpoint_path(output_dir, str(checkpoint))
    else:
        recorded = Path(str(made.get("path")))
        if "in_run" in made:  # the run's own checkpoint (wherever the run folder is now, else where it was), or another run's file
            candidates = [output_dir / made["in_run"], recorded] if made["in_run"] else [recorded]
        else:  # indexes of volad before 0.4: the run's own file of that name first
            candidates = [output_dir / "checkpoints" / recorded.name, recorded]
        current = next((p for p in candidates if p.is_file()), None)
        if current is None:
            raise VoladConfigError(f"{maps_dir / 'index.json'}: its maps were made by {made_by}, which no longer exists; "
                                   f"remap them: {remap} (every bundle's inference.json rebuilds the method the run recorded)")
    now = file_sha256(current)
    if now != sha:
        epoch = read_checkpoint(current).get("epoch")
        raise VoladConfigError(
            f"{maps_dir / 'index.json'}: the maps were made by {made_by}, but the checkpoint to evaluate is {current} "
            f"(sha256 {now[:12]}, epoch {epoch}): they are stale; remap them: {remap} "
            "(every bundle's inference.json rebuilds the method the run recorded)"
        )


def index_from_folder(maps_dir: Path, dataset: Dataset, splits: Sequence[str]) -> dict:
    """A maps index for a folder of maps made by any tool, matched to the dataset's splits by file name."""
    subjects = []
    for split in dict.fromkeys(s for s in splits if s):
        try:
            ids = dataset.split_ids(split)
        except VoladConfigError:
            continue
        for sid in ids:
            name = next((n for n in (f"{sid}_anomaly.nii.gz", f"{sid}.nii.gz", f"{sid}_anomaly.nii", f"{sid}.nii") if (maps_dir / n).is_file()), None)
            if name is not None:
                subjects.append({"subject_id": sid, "split": split, "anomaly_map": name})
    if not subjects:
        raise VoladDataError(maps_dir, f"no maps named <subject>_anomaly.nii.gz or <subject>.nii.gz for subjects of {dataset.name}")
    return {"dataset": dataset.name, "data_root": str(dataset.root), "contrasts": dataset.contrasts, "method": {}, "checkpoint": {}, "subjects": subjects}
