"""How batches are cut from volumes: patches, axial slices (slice mode) or whole volumes.

Volumes are always ``tio.Subject``s with images ``(C, W, H, D)``. Slice mode
(``spatial_dims=2``) only changes the patch shape to ``(W, H, 1)`` and squeezes
the last axis before the network, so 2D and 3D share the whole pipeline.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torchio as tio

from volad.errors import VoladConfigError, VoladDataError
from volad.io import read_geometry
from volad.types import Batch, drop_depth


def patch_shape(patch_size: int | Sequence[int], spatial_dims: int) -> tuple[int, int, int]:
    """3D patch shape for a requested patch size.

    Args:
        patch_size: One size for all axes, or per-axis sizes.
        spatial_dims: 3, or 2 for slice mode (in-plane patch of depth 1).
    """
    sizes = [int(patch_size)] * 3 if isinstance(patch_size, (int, float)) else [int(p) for p in patch_size]
    if len(sizes) == 1:
        sizes = sizes * 3
    if spatial_dims == 2:
        return (sizes[0], sizes[1], 1)
    if len(sizes) != 3:
        raise VoladConfigError(f"patch_size {patch_size} needs 1 or 3 values in 3D")
    return (sizes[0], sizes[1], sizes[2])


View = Literal["volume", "slices", "patches"]


def choose_view(input_view: Literal["patch", "volume"], spatial_dims: int, patch_size: int | Sequence[int] | None) -> View:
    """How a method sees data, for training and inference alike: the one place this is decided.

    Args:
        input_view: The method's ``input_view`` (``"volume"``: it needs whole volumes on one grid).
        spatial_dims: 3, or 2 for slice mode.
        patch_size: The patch (in-plane size in slice mode); ``None`` or 0 (the CLI cannot pass ``None``) for whole ones.

    Returns:
        ``"volume"`` (whole volumes), ``"slices"`` (whole axial slices, slice mode) or ``"patches"``.
    """
    if input_view == "volume" or (not patch_size and spatial_dims == 3):
        return "volume"
    return "slices" if not patch_size else "patches"


def to_batch(tio_batch: dict, spatial_dims: int) -> Batch:
    """Plain :class:`Batch` from a TorchIO batch; slice mode drops the depth-1 axis."""
    image = tio_batch["image"][tio.DATA].float()
    mask = tio_batch["brain_mask"][tio.DATA].float()
    location = tio_batch.get(tio.LOCATION)
    if spatial_dims == 2:
        if image.shape[-1] != 1:
            raise VoladConfigError(f"slice mode expects patches of depth 1, got {tuple(image.shape[2:])}")
        image, mask = drop_depth(image), drop_depth(mask)
    return Batch(image=image, mask=mask, location=location)


def check_patch_fits(subjects: Sequence[tio.Subject], patch: Sequence[int]) -> None:
    """Refuse a patch larger than a volume, naming the subject."""
    for s in subjects:
        shape = tuple(s["image"].spatial_shape)
        if any(p > v for p, v in zip(patch, shape)):
            raise VoladConfigError(
                f"patch {tuple(patch)} is larger than subject {s['subject_id']!r} ({shape}); pass a smaller --patch_size"
            )


def check_same_grid(subjects: Sequence[tio.Subject]) -> None:
    """Refuse to batch whole volumes of different sizes, naming the first odd file."""
    ref_path = subjects[0]["image_paths"][0]
    ref = read_geometry(ref_path).shape
    for s in subjects[1:]:
        path = s["image_paths"][0]
        size = read_geometry(path).shape
        if size != ref:
            raise VoladDataError(
                path, f"size {size} differs from {ref} ({ref_path}); whole volumes are batched, so pass --batch_size 1 or a --patch_size"
            )


def training_loader(
    subjects: Sequence[tio.Subject],
    transform: tio.Transform,
    *,
    spatial_dims: int,
    patch_size: int | Sequence[int] | None,
    batch_size: int,
    samples_per_volume: int = 8,
    queue_length: int = 64,
    num_workers: int = 0,
    view: Literal["patch", "volume"] = "patch",
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """Loader of training batches (TorchIO dicts; convert with :func:`to_batch`).

    ``view="patch"`` samples ``samples_per_volume`` patches per subject centred
    inside the brain mask through a ``tio.Queue`` (memory bounded by
    ``queue_length``, whatever the number of subjects). ``view="volume"`` yields
    whole volumes, shuffled each epoch by ``seed`` and the epoch (:func:`set_epoch`). ``patch_size`` None or 0 means whole volumes in 3D and whole axial
    slices (of the first subject's in-plane size) in slice mode; whole volumes
    are batched, so batches above 1 need subjects on one grid.

    With ``world_size`` above 1 (DDP), process ``rank`` draws its own share of the
    subjects through a :class:`~torch.utils.data.DistributedSampler` (TorchIO's
    ``subject_sampler``), reshuffled each epoch by :func:`set_epoch`; the shares
    are padded to equal length, so every process runs the same number of batches.
    ``num_workers`` processes load and augment subjects for the queue;
    ``pin_memory`` speeds copies to a GPU.
    """
    if not subjects:
        raise VoladConfigError("no training subjects")
    patch_size = patch_size or None  # 0 (the CLI cannot pass None) also means whole volumes/slices
    dataset = tio.SubjectsDataset(list(subjects), transform=transform)
    shares = None
    if world_size > 1:
        shares = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    chosen = choose_view(view, spatial_dims, patch_size)
    if chosen == "volume":
        if batch_size > 1:
            check_same_grid(subjects)
        # the order of each epoch follows from (seed, epoch) alone (set_epoch), in one process as under DDP,
        # so a run resumed at an epoch boundary shuffles as the uninterrupted run would
        order = shares or torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
        return tio.SubjectsLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, sampler=order)
    if chosen == "slices":
        width, height, _ = transform(subjects[0])["image"].spatial_shape
        patch = (width, height, 1)
    else:
        patch = patch_shape(patch_size, spatial_dims)
    check_patch_fits(subjects, patch)
    sampler = tio.LabelSampler(patch, label_name="brain_mask", label_probabilities={0: 0.0, 1: 1.0})
    queue = tio.Queue(
        dataset,
        max_length=max(queue_length, samples_per_volume),
        samples_per_volume=samples_per_volume,
        sampler=sampler,
        num_workers=num_workers,
        subject_sampler=shares,
        shuffle_subjects=shares is None,
        shuffle_patches=True,
    )
    return tio.SubjectsLoader(queue, batch_size=batch_size, num_workers=0, pin_memory=pin_memory)  # the queue's workers load


def set_epoch(loader: torch.utils.data.DataLoader, epoch: int) -> None:
    """Start ``epoch`` from a clean patch queue, and reshuffle the subjects' split between processes (DDP).

    TorchIO's queue carries state across epochs: the pass over the subjects it is in,
    patches left over when its length is not a multiple of ``samples_per_volume``, a
    subject half sampled. Each epoch starts without them, so what an epoch draws
    depends only on the random states at its start, and a run resumed at an epoch
    boundary (which restores those states, :func:`volad.utils.seed.rng_state`) draws what
    the uninterrupted run would have drawn.
    """
    queue = loader.dataset
    if isinstance(queue, tio.Queue):  # TorchIO has no public reset; these are the attributes its __init__ sets
        queue.patches_list = []
        queue._incomplete_subject = None
        queue._subjects_iterable = None  # the next fill starts a new pass (and draws its shuffle then)
    sampler = getattr(queue, "subject_sampler", None) or loader.sampler
    if isinstance(sampler, torch.utils.data.DistributedSampler):
        sampler.set_epoch(epoch)


def subject_ids(loader: torch.utils.data.DataLoader) -> list[str]:
    """The subjects this process draws in the current epoch (its DDP share; all of them in one process)."""
    dataset = loader.dataset
    subjects = dataset.subjects_dataset if isinstance(dataset, tio.Queue) else dataset
    sampler = getattr(dataset, "subject_sampler", None) or loader.sampler
    order = list(sampler) if isinstance(sampler, torch.utils.data.DistributedSampler) else range(len(subjects))
    records = subjects.dry_iter()
    return [records[i]["subject_id"] for i in order]
