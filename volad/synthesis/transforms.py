"""Synthetic anomalies as a TorchIO random/deterministic transform pair.

:class:`RandomSyntheticAnomaly` draws a task, a region and a strength and
applies a :class:`SyntheticAnomaly` built from them; TorchIO records that
deterministic transform and its arguments in ``subject.applied_transforms``, so
``SyntheticAnomaly(**recorded_args, sources=same_pool)`` rebuilds the case
exactly. The transformed subject gains a ``synthetic_label`` image (the
per-voxel factor in [0, 1]); the input image is changed only inside the region.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torchio as tio
from torchio.transforms.augmentation import RandomTransform

from volad.synthesis.shapes import checked_radius_prior, random_region_params, region_mask
from volad.synthesis.tasks import TASKS, apply_task, strength_range

LABEL_KEY = "synthetic_label"


class SyntheticAnomaly(tio.Transform):
    """Apply one fully specified synthetic anomaly (see :mod:`volad.synthesis.tasks`).

    Args:
        task: ``pii``, ``intensity``, ``deformation`` or ``cutout``.
        kind: Region shape, ``ellipsoid`` or ``irregular``.
        centre, radii, shape_seed: The region (voxels).
        strength: The task's strength (see :func:`~volad.synthesis.tasks.apply_task`).
        source_index: Index of the ``pii`` source in ``sources`` (−1: none).
        sources: Pool of healthy images ``(C, *spatial)`` on the subject's grid (not recorded).
        image_key: Subject key of the image to change.
        mask_key: Subject key of the brain mask; the region is kept inside it (``None``: no mask).
    """

    def __init__(
        self,
        *,
        task: str,
        kind: str,
        centre: Sequence[int],
        radii: Sequence[float],
        shape_seed: int,
        strength: float,
        source_index: int = -1,
        sources: Sequence[torch.Tensor] | None = None,
        image_key: str = "image",
        mask_key: str | None = "brain_mask",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
        self.task, self.kind, self.centre, self.radii = task, kind, [int(c) for c in centre], [float(r) for r in radii]
        self.shape_seed, self.strength, self.source_index = int(shape_seed), float(strength), int(source_index)
        self.sources = sources
        self.image_key, self.mask_key = image_key, mask_key
        self.args_names = ["task", "kind", "centre", "radii", "shape_seed", "strength", "source_index", "image_key", "mask_key"]

    def _get_named_arguments(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.args_names}

    def is_invertible(self) -> bool:
        return False

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        image = subject[self.image_key]
        data = image.data.numpy()
        squeeze = data.shape[-1] == 1 and len(self.centre) == 2  # 2D patch stored as (C, W, H, 1)

        def plane(a: np.ndarray) -> np.ndarray:
            return a[..., 0] if squeeze else a

        data = plane(data)
        region = region_mask(data.shape[1:], kind=self.kind, centre=self.centre, radii=self.radii, seed=self.shape_seed)
        if self.mask_key is not None and self.mask_key in subject:
            region &= plane(subject[self.mask_key].data.numpy()[0] > 0)
        source = None
        if self.task == "pii":
            if not self.sources or not 0 <= self.source_index < len(self.sources):
                raise ValueError(f"pii needs source {self.source_index} from a pool of {len(self.sources or [])}")
            source = plane(np.asarray(self.sources[self.source_index], dtype=np.float32))
        params = {"strength": self.strength, "centre": self.centre, "radii": self.radii, "shape_seed": self.shape_seed}
        pairs = [apply_task(self.task, data[c], None if source is None else source[c], region, params) for c in range(data.shape[0])]
        out = np.stack([img for img, _ in pairs]).astype(np.float32)
        label = np.max(np.stack([lab for _, lab in pairs]), axis=0)[None]
        if squeeze:
            out, label = out[..., None], label[..., None]
        image.set_data(torch.from_numpy(out))
        subject.add_image(tio.ScalarImage(tensor=torch.from_numpy(label), affine=image.affine), LABEL_KEY)
        return subject


class RandomSyntheticAnomaly(RandomTransform):
    """Draw and apply a synthetic anomaly (Baugh et al., MICCAI 2023; Tan et al., MICCAI 2021).

    Args:
        tasks: Tasks to draw from, uniformly.
        sources: Pool of healthy images for ``pii`` (without one, ``pii`` is skipped).
        radius_range: Region semi-axes as fractions of each axis' length.
        radius_prior: ``uniform`` or ``log_uniform`` (see :func:`~volad.synthesis.shapes.random_region_params`).
        spatial_dims: 2 treats ``(C, W, H, 1)`` images as 2D.
        image_key, mask_key: As in :class:`SyntheticAnomaly`.
    """

    def __init__(
        self,
        *,
        tasks: Sequence[str] = TASKS,
        sources: Sequence[torch.Tensor] | None = None,
        radius_range: tuple[float, float] = (0.08, 0.3),
        radius_prior: str = "uniform",
        spatial_dims: int = 3,
        image_key: str = "image",
        mask_key: str | None = "brain_mask",
        **kwargs,
    ):
        super().__init__(**kwargs)
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {list(tasks)}")
        self.tasks, self.sources, self.radius_range = list(tasks), sources, tuple(radius_range)
        self.radius_prior = checked_radius_prior(radius_prior)
        self.spatial_dims, self.image_key, self.mask_key = int(spatial_dims), image_key, mask_key

    def draw(self, subject: tio.Subject, rng: np.random.Generator) -> dict[str, Any]:
        """The parameters of one :class:`SyntheticAnomaly` for ``subject``."""
        data = subject[self.image_key].data
        shape = tuple(data.shape[1:])
        if self.spatial_dims == 2 and shape[-1] == 1:
            shape = shape[:-1]
        brain = None
        if self.mask_key is not None and self.mask_key in subject:
            brain = subject[self.mask_key].data[0].numpy()
            brain = brain[..., 0] if len(shape) < brain.ndim else brain
        tasks = [t for t in self.tasks if t != "pii" or self.sources]
        if not tasks:
            raise ValueError("only pii was asked for, but no source images were given")
        task = str(rng.choice(tasks))
        region = random_region_params(shape, brain, rng, self.radius_range, self.radius_prior)
        lo, hi = strength_range(task)
        strength = float(rng.uniform(lo, hi))
        if task == "intensity" and rng.random() < 0.5:
            strength = -strength
        if task == "deformation" and rng.random() < 0.5:
            strength = 1.0 / strength  # sink instead of source
        source_index = int(rng.integers(len(self.sources))) if task == "pii" else -1
        return dict(task=task, strength=strength, source_index=source_index, **region)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,)).item()))  # follows torch's seed, like TorchIO
        params = self.draw(subject, rng)
        transform = SyntheticAnomaly(**params, sources=self.sources, image_key=self.image_key, mask_key=self.mask_key, **self._get_base_args())
        return transform(subject)
