"""Where a voxel is in the brain, as extra input channels for methods that condition on it.

A voxel-wise normative model knows where each voxel is, because subjects are
registered to one template; a network that sees one patch at a time does not.
With ``anatomy="coordinates"`` a method also receives each voxel's template
(world) coordinates, so it can learn what is normal *where*: a bright periventricular
spot is normal in one place and a lesion in another.

The channels are the voxel centres' RAS world coordinates in mm, divided by
:data:`COORDINATE_SCALE_MM` (so a brain in MNI152 space spans about ±1). They are
only meaningful for subjects registered to one template (MNI152 for every volad
dataset manifest and for ``volad preprocess``); they follow the image's affine, so
resampling and cropping keep them right, and patches, slices and whole volumes
carry the same values for the same voxel.

The channels are appended after normalisation (:class:`AppendAnatomy`), behind the
contrasts, and a method that conditions on them reads ``in_channels`` contrasts
plus :func:`anatomy_channels` channels, reconstructing only the contrasts.
"""

from __future__ import annotations

import numpy as np
import torch
import torchio as tio

from volad.errors import VoladConfigError

#: Kinds of anatomy input and how many channels each adds.
ANATOMY_KINDS: dict[str, int] = {"coordinates": 3}

#: World coordinates are divided by this (mm), so an MNI152 brain spans about ±1.
COORDINATE_SCALE_MM = 100.0


def anatomy_channels(anatomy: str | None) -> int:
    """Channels ``anatomy`` adds to a method's input (0 for ``None``)."""
    if anatomy in (None, "", "None", "none"):
        return 0
    if anatomy not in ANATOMY_KINDS:
        raise VoladConfigError(f"anatomy must be one of {sorted(ANATOMY_KINDS)} or null, got {anatomy!r}")
    return ANATOMY_KINDS[anatomy]


def world_coordinates(shape: tuple[int, int, int], affine: np.ndarray) -> torch.Tensor:
    """RAS world coordinates (mm) of every voxel centre: ``(3, *shape)`` float32."""
    index = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"), axis=0)
    world = np.einsum("ij,j...->i...", np.asarray(affine, dtype=np.float64)[:3, :3], index)
    world += np.asarray(affine, dtype=np.float64)[:3, 3].reshape(3, 1, 1, 1)
    return torch.from_numpy(world.astype(np.float32))


class AppendAnatomy(tio.Transform):
    """Append anatomy channels (see module docstring) to ``subject["image"]``.

    Args:
        anatomy: A key of :data:`ANATOMY_KINDS`.
    """

    def __init__(self, anatomy: str, **kwargs):
        super().__init__(**kwargs)
        anatomy_channels(anatomy)  # refuses an unknown kind
        self.anatomy = anatomy
        self.args_names = ["anatomy"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        image = subject["image"]
        coords = world_coordinates(tuple(image.spatial_shape), image.affine) / COORDINATE_SCALE_MM
        image.set_data(torch.cat([image.data.float(), coords.to(image.data.device)], dim=0))
        return subject
