"""Validation volumes with held-out synthetic anomalies, so no lesion label picks a checkpoint.

Baugh et al. (MICCAI 2023) validate a synthetic-task detector on tasks it never
trained on: how well it finds an unseen kind of anomaly predicts how well it
finds real ones. :func:`synthetic_validation_set` puts one such anomaly into
each of a few healthy volumes, reproducibly from ``seed``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torchio as tio

from volad.synthesis.transforms import LABEL_KEY, RandomSyntheticAnomaly


def synthetic_validation_set(
    volumes: Sequence[tuple[torch.Tensor, torch.Tensor]],
    tasks: Sequence[str],
    *,
    radius_range: tuple[float, float] = (0.05, 0.15),
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One held-out-task anomaly per healthy volume.

    Args:
        volumes: ``(image (C, W, H, D), brain mask (1, W, H, D))`` pairs of healthy volumes.
        tasks: Held-out tasks to draw from.
        radius_range: Anomaly semi-axes as fractions of each axis.
        seed: Seed of the draws.

    Returns:
        ``(image, brain mask, label (1, W, H, D))`` per volume; the PII source is
        the next volume of the list when it shares the grid, else the volume mirrored.
    """
    out = []
    for i, (image, mask) in enumerate(volumes):
        nxt = volumes[(i + 1) % len(volumes)][0]
        source = nxt if nxt.shape == image.shape and len(volumes) > 1 else torch.flip(image, dims=(1,))
        subject = tio.Subject(image=tio.ScalarImage(tensor=image.float().clone()), brain_mask=tio.LabelMap(tensor=(mask > 0).to(torch.uint8)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 7919 + i)
            s = RandomSyntheticAnomaly(tasks=tasks, sources=[source.float()], radius_range=radius_range, spatial_dims=3)(subject)
        out.append((s["image"].data.float(), mask.float(), s[LABEL_KEY].data.float()))
    return out
