"""A detector trained on synthetic anomalies (3D Poisson image interpolation and other tasks).

References:
    Tan, Hou, Batten, Kainz & Kamnitsas. "Detecting outliers with Poisson image
    interpolation." MICCAI 2021.
    Baugh, Tan, Müller, Dombrowski, Batten & Kainz. "Many tasks make light work:
    learning to localise medical anomalies from multiple synthetic tasks."
    MICCAI 2023.

Each training patch receives, with probability ``anomaly_probability``, one
synthetic anomaly from :class:`~volad.synthesis.transforms.RandomSyntheticAnomaly`
(the PII source is another patch of the same batch), and a MONAI U-Net learns to
regress the per-voxel factor (binary cross-entropy on the soft label, over the
whole patch, plus ``dice_weight`` times a soft Dice term per patch; see
:func:`localisation_loss`). The anomaly map is the sigmoid of its output; there is no
pseudo-healthy image. Tasks listed in ``val_tasks`` are never trained on: the
trainer validates on them instead (held-out synthetic tasks on healthy
volumes, as Baugh et al. do), so no lesion label picks the checkpoint.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchio as tio
from monai.losses import DiceLoss
from monai.networks.nets import UNet

from volad.methods.base import AnomalyMethod, Batch
from volad.synthesis.shapes import checked_radius_prior
from volad.synthesis.tasks import TASKS
from volad.synthesis.transforms import LABEL_KEY, RandomSyntheticAnomaly
from volad.types import AnomalyOutput, add_depth, drop_depth


def synthesise_batch(
    x: torch.Tensor, mask: torch.Tensor, transform_kwargs: dict, probability: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Apply one random synthetic anomaly to each sample of a batch (CPU, via TorchIO).

    The PII source of sample ``i`` is drawn from the other samples (a mirrored
    copy of itself when the batch has one sample).

    Returns:
        (images, labels ``(B, 1, *spatial)``, the recorded parameters per sample; ``{}`` for untouched samples).
    """
    spatial_dims = x.ndim - 2
    xs, ms = x.detach().cpu().float(), mask.detach().cpu().float()
    if spatial_dims == 2:  # TorchIO images are (C, W, H, D)
        xs, ms = add_depth(xs), add_depth(ms)
    images, labels, records = [], [], []
    for i in range(xs.shape[0]):
        if rng.random() >= probability:
            images.append(xs[i])
            labels.append(torch.zeros_like(xs[i][:1]))
            records.append({})
            continue
        pool = [xs[j] for j in range(xs.shape[0]) if j != i] or [torch.flip(xs[i], dims=(1,))]
        subject = tio.Subject(image=tio.ScalarImage(tensor=xs[i].clone()), brain_mask=tio.LabelMap(tensor=(ms[i] > 0).to(torch.uint8)))
        out = RandomSyntheticAnomaly(sources=pool, spatial_dims=spatial_dims, **transform_kwargs)(subject)
        images.append(out["image"].data.float())
        labels.append(out[LABEL_KEY].data.float())
        records.append(dict(out.applied_transforms[-1][1]))
    img, lab = torch.stack(images), torch.stack(labels)
    if spatial_dims == 2:
        img, lab = drop_depth(img), drop_depth(lab)
    return img.to(x.device), lab.to(x.device), records


def localisation_loss(logits: torch.Tensor, label: torch.Tensor, dice_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Binary cross-entropy on the soft label over every voxel, plus ``dice_weight`` times a soft Dice loss
    (MONAI ``DiceLoss``) per sample over the samples that carry an anomaly.

    The cross-entropy is a voxel average, so an anomaly's share of it grows with its volume: a 2 mm
    anomaly weighs about a thousandth of a 2 cm one. The Dice term is a ratio per sample, so every
    anomaly counts alike whatever its size. Samples without an anomaly have no Dice (it is undefined
    for an empty label) and are left to the cross-entropy.

    Returns:
        ``loss``; with a Dice term also its parts ``bce`` and ``dice`` (detached, for the log).
    """
    bce = F.binary_cross_entropy_with_logits(logits, label)
    if not dice_weight:
        return {"loss": bce}
    carrying = label.flatten(1).amax(1) > 0
    if carrying.any():
        dice = DiceLoss(sigmoid=True, soft_label=True, reduction="none")(logits[carrying], label[carrying]).mean()
    else:
        dice = logits.sum() * 0.0
    return {"loss": bce + dice_weight * dice, "bce": bce.detach(), "dice": dice.detach()}


class SyntheticAnomalyDetector(AnomalyMethod):
    """PII (and multi-task) synthetic-anomaly detector (see module docstring).

    Args:
        spatial_dims: 2 (slice mode) or 3.
        in_channels: Input contrasts.
        channels: U-Net channels per level.
        num_res_units: Residual units per U-Net level.
        tasks: Synthetic tasks, from ``pii``, ``intensity``, ``deformation``, ``cutout``.
        val_tasks: Tasks held out of training for validation (empty: validate on labels).
        radius_range: Anomaly semi-axes as fractions of the patch edge.
        radius_prior: How sizes are drawn in that range, ``uniform`` or ``log_uniform``
            (see :func:`~volad.synthesis.shapes.random_region_params`).
        anomaly_probability: Fraction of training patches that receive an anomaly.
        dice_weight: Weight of a soft Dice loss added to the binary cross-entropy, computed per
            patch over the patches that carry an anomaly (MONAI ``DiceLoss``): each anomaly then
            counts alike whatever its size, where the voxel-averaged cross-entropy lets a
            millimetre anomaly weigh a thousandth of a centimetre one (0: cross-entropy alone).
        lr: Adam learning rate.
        seed: Seed of the synthesis draws.
    """

    stat_names = ("synthesis",)  # the anomalies synthesised in the last training step
    median_mm = 0.0  # a trained segmentation output, already smooth: a median would only erase its millimetre findings

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        num_res_units: int = 1,
        tasks: Sequence[str] = TASKS,
        val_tasks: Sequence[str] = (),
        radius_range: Sequence[float] = (0.08, 0.3),
        radius_prior: str = "uniform",
        anomaly_probability: float = 0.8,
        dice_weight: float = 0.0,
        lr: float = 1e-3,
        seed: int = 0,
    ):
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels, lr=lr)
        tasks, val_tasks = [str(t) for t in tasks], [str(t) for t in (val_tasks or [])]
        for t in tasks + val_tasks:
            if t not in TASKS:
                raise ValueError(f"unknown synthetic task {t!r}; choose from {TASKS}")
        self.train_tasks = [t for t in tasks if t not in val_tasks]
        if not self.train_tasks:
            raise ValueError(f"every task of {tasks} is held out for validation; nothing is left to train on")
        self.val_tasks = val_tasks
        channels = [int(c) for c in channels]
        self.net = UNet(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1, channels=channels,
            strides=[2] * (len(channels) - 1), num_res_units=num_res_units, norm="BATCH",
        )
        self.divisor = 2 ** (len(channels) - 1)
        self.radius_range = (float(radius_range[0]), float(radius_range[1]))
        self.radius_prior = checked_radius_prior(radius_prior)
        self.anomaly_probability = float(anomaly_probability)
        self.dice_weight = float(dice_weight)
        self.rng = np.random.default_rng(seed)

    @property
    def size_divisor(self) -> int:
        return self.divisor

    def random_state(self) -> dict[str, Any]:
        """The synthesis generator's state (seeded by ``seed``), so a resumed run synthesises what it would have."""
        return self.rng.bit_generator.state

    def set_random_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state

    def training_step(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        kwargs = {"tasks": self.train_tasks, "radius_range": self.radius_range, "radius_prior": self.radius_prior}
        image, label, synthesis = synthesise_batch(batch.image, batch.mask, kwargs, self.anomaly_probability, self.rng)
        self.record(synthesis=synthesis)
        return localisation_loss(self.net(image), label, self.dice_weight)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> AnomalyOutput:
        amap = torch.sigmoid(self.net(x))
        if mask is not None:
            amap = amap * mask
        return AnomalyOutput(anomaly_map=amap, reconstruction=None)
