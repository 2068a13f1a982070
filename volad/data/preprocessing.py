"""Preprocessing applied when a subject is loaded: checks, masks, labels, normalisation.

Each step is a small TorchIO transform so that training, inference and evaluation
apply the very same chain (:func:`preprocessing`). Normalisation records its
parameters in the subject (``subject["normalization"]``) so a reconstruction can
be mapped back to the input's intensity units (:func:`denormalize`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torchio as tio

from volad.data.anatomy import AppendAnatomy, anatomy_channels
from volad.errors import VoladDataError


def _path_of(image: tio.Image, subject: tio.Subject, fallback_key: str = "image_paths") -> str:
    if image.path is not None:
        return ", ".join(str(p) for p in image.path) if isinstance(image.path, (list, tuple)) else str(image.path)
    return ", ".join(subject.get(fallback_key, ["<in memory>"]))


class ValidateSubject(tio.Transform):
    """Refuse NaN/Inf voxels and (after masks are set) empty brain masks, naming the file."""

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        image = subject["image"]
        data = image.data
        if not torch.isfinite(data).all():
            bad = int((~torch.isfinite(data)).sum())
            raise VoladDataError(_path_of(image, subject), f"contains {bad} NaN or Inf voxels")
        if "brain_mask" in subject and not bool(subject["brain_mask"].data.any()):
            raise VoladDataError(_path_of(subject["brain_mask"], subject), "brain mask is empty")
        return subject


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """Head foreground of a non-skull-stripped ``(W, H, D)`` image: Otsu threshold, holes
    filled in each axial slice, largest connected component.

    An approximation of a brain mask for data that ships none (FastMRI brain): it
    keeps the skull and scalp, so maps are scored over the whole head.
    """
    import SimpleITK as sitk
    from scipy import ndimage

    img = sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float32))
    fg = sitk.GetArrayFromImage(sitk.OtsuThreshold(img, 0, 1)).astype(bool)
    for k in range(fg.shape[2]):
        fg[:, :, k] = ndimage.binary_fill_holes(fg[:, :, k])
    labels, n = ndimage.label(fg)
    if n > 1:
        sizes = ndimage.sum(fg, labels, index=range(1, n + 1))
        fg = labels == (int(np.argmax(sizes)) + 1)
    return fg


def mni152_brain_mask(image: tio.Image) -> torch.Tensor:
    """nilearn's MNI152 2009 brain mask resampled (nearest) onto an image in MNI space.

    For data already registered to MNI152 but not skull-stripped (ATLAS v2.0): the
    template's brain, not the subject's, so it is an approximation at the edges.
    """
    from nilearn.datasets import load_mni152_brain_mask

    tmpl = load_mni152_brain_mask(resolution=1)
    mask = tio.LabelMap(tensor=np.asarray(tmpl.get_fdata() > 0, dtype=np.uint8)[None], affine=tmpl.affine)
    return tio.Resample((tuple(image.spatial_shape), image.affine))(mask).data > 0


class EnsureMasks(tio.Transform):
    """Add a derived brain mask and a binary anomaly label where the manifest asks for them.

    * ``derive_mask == "nonzero"``: brain mask = any channel of the image is non-zero
      (BraTS-style skull-stripped data).
    * ``"all"``: every voxel (2D picture benchmarks, scored over the whole image).
    * ``"foreground"``: :func:`foreground_mask` of the first channel (raw head scans).
    * ``"mni152"``: :func:`mni152_brain_mask` (registered, not skull-stripped data).
    * The label becomes binary: 1 where the raw label is one of ``label_values``
      (or non-zero), 0 elsewhere. Subjects without a label get an all-zero label.
      A raw value outside the manifest's declared ``label.values`` is an error
      naming the file (a wrong or corrupt label is never silently ignored).
    """

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        image = subject["image"]
        derive = subject.get("derive_mask")
        if derive:
            if derive == "nonzero":
                mask = (image.data != 0).any(dim=0, keepdim=True)
            elif derive == "all":
                mask = torch.ones((1, *image.spatial_shape), dtype=torch.bool)
            elif derive == "foreground":
                mask = torch.from_numpy(foreground_mask(image.data[0].float().numpy()))[None]
            elif derive == "mni152":
                mask = mni152_brain_mask(image)
            else:
                raise VoladDataError(_path_of(image, subject), f"unknown brain-mask derivation {derive!r}")
            mask = mask.to(torch.uint8)
            subject.add_image(tio.LabelMap(tensor=mask, affine=image.affine), "brain_mask")
        if "label" in subject:
            raw = subject["label"].data
            declared = subject.get("label_declared", "any")
            if declared != "any":
                unknown = sorted(set(torch.unique(raw).tolist()) - {float(v) for v in declared})
                if unknown:
                    raise VoladDataError(
                        _path_of(subject["label"], subject),
                        f"unexpected label value(s) {[int(u) if float(u).is_integer() else u for u in unknown]} "
                        f"(the manifest declares {list(declared)})",
                    )
            values = subject.get("label_values", "nonzero")
            if values == "nonzero":
                binary = raw != 0
            else:
                binary = torch.isin(raw, torch.as_tensor(list(values), dtype=raw.dtype))
            subject["label"].set_data(binary.to(torch.uint8))
        else:
            zeros = torch.zeros((1, *image.spatial_shape), dtype=torch.uint8)
            subject.add_image(tio.LabelMap(tensor=zeros, affine=image.affine), "label")
        subject["brain_mask"].set_data((subject["brain_mask"].data > 0).to(torch.uint8))
        return subject


class NormalizeInBrain(tio.Transform):
    """Per-channel percentile rescale inside the brain mask; zero outside it.

    Intensity ``p_lo`` maps to 0 and ``p_hi`` to 1. Values above ``p_hi`` are kept
    (hyperintense lesions must stay bright) up to ``clip_max``. With
    ``mode="none"`` intensities are kept as read (pictures already scaled to
    [0, 1] by their reader) and only the outside of the mask is zeroed.

    Args:
        percentiles: Lower and upper percentile computed inside the brain mask.
        clip_max: Upper clip after rescaling, guarding against outliers.
        mode: ``"percentile"`` or ``"none"``.
    """

    def __init__(self, percentiles: Sequence[float] = (1.0, 99.0), clip_max: float = 3.0, mode: str = "percentile", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("percentile", "none"):
            raise ValueError(f"unknown intensity mode {mode!r} (percentile or none)")
        self.percentiles = tuple(float(p) for p in percentiles)
        self.clip_max = float(clip_max)
        self.mode = mode
        self.args_names = ["percentiles", "clip_max", "mode"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        image = subject["image"]
        mask = subject["brain_mask"].data[0].bool()
        data = image.data.float()
        lows, highs = [], []
        out = torch.zeros_like(data)
        if self.mode == "none":
            image.set_data(data * mask)
            subject["normalization"] = {"low": [0.0] * data.shape[0], "high": [1.0] * data.shape[0]}
            return subject
        for c in range(data.shape[0]):
            inside = data[c][mask]
            lo, hi = (float(v) for v in np.percentile(inside.numpy(), self.percentiles))
            if hi <= lo:
                hi = lo + 1.0
            out[c] = ((data[c] - lo) / (hi - lo)).clamp(0.0, self.clip_max) * mask
            lows.append(lo)
            highs.append(hi)
        image.set_data(out)
        subject["normalization"] = {"low": lows, "high": highs}
        return subject


def denormalize(x: np.ndarray | torch.Tensor, normalization: dict, channel_axis: int = 0):
    """Map a normalised ``(C, ...)`` array back to the input's intensity units."""
    low = np.asarray(normalization["low"], dtype=np.float32)
    high = np.asarray(normalization["high"], dtype=np.float32)
    shape = [1] * x.ndim
    shape[channel_axis] = -1
    if isinstance(x, torch.Tensor):
        low_t, high_t = torch.as_tensor(low).reshape(shape), torch.as_tensor(high).reshape(shape)
        return x * (high_t - low_t) + low_t
    return x * (high - low).reshape(shape) + low.reshape(shape)


def preprocessing(
    *,
    intensity: str = "percentile",
    percentiles: Sequence[float] = (1.0, 99.0),
    spacing: float | Sequence[float] | None = None,
    canonical: bool = False,
    orientation: str | None = None,
    anatomy: str | None = None,
) -> tio.Compose:
    """The chain every subject goes through before a network sees it.

    Args:
        intensity: ``"percentile"`` (rescale inside the brain mask) or ``"none"``.
        percentiles: Normalisation percentiles inside the brain mask.
        spacing: Resample to this voxel size in mm (``None`` keeps the input grid).
            Maps are put back on the input grid at inference.
        canonical: Reorient to RAS+ first.
        orientation: Reorient to these axis codes first (``"LPS"``, ...; ``None`` keeps the input's).
        anatomy: Append this kind of anatomy channels after normalisation, for
            methods that condition on where a voxel is (:mod:`volad.data.anatomy`).
    """
    steps: list[tio.Transform] = [EnsureMasks(), ValidateSubject()]
    if canonical:
        steps.append(tio.ToCanonical())
    if orientation is not None:
        steps.append(tio.ToOrientation(orientation))
    if spacing is not None:
        steps.append(tio.Resample(spacing))
    steps.append(NormalizeInBrain(percentiles=percentiles, mode=intensity))
    if anatomy_channels(anatomy):
        steps.append(AppendAnatomy(anatomy))
    return tio.Compose(steps)
