"""Baselines reported beside every method.

* :class:`IntensityBaseline`: the score is the chosen contrast's normalised
  intensity inside the brain. Meissen et al., "Challenging current
  semi-supervised anomaly segmentation methods for brain MRI", BrainLes @ MICCAI
  2021, show that plain FLAIR thresholding beats many deep models.
* :class:`NormativeBaseline`: a voxel-wise normative model. Mean and standard
  deviation of every voxel are fitted on the healthy training split (which must
  share one registered grid); the score is ``|x − μ| / σ`` averaged over contrasts.
"""

from __future__ import annotations

from typing import Literal

import torch

from volad.errors import VoladConfigError
from volad.methods.base import AnomalyMethod, Batch
from volad.types import AnomalyOutput


class IntensityBaseline(AnomalyMethod):
    """Normalised intensity of one contrast as the anomaly score. Nothing to train.

    Args:
        spatial_dims: Recorded only; the score is per voxel.
        in_channels: Input contrasts.
        channel: Which contrast (channel index) to score.
        polarity: ``"bright"`` (hyperintense lesions, e.g. FLAIR), ``"dark"``
            (hypointense, e.g. T1 stroke) or ``"both"`` (distance from the
            brain's median intensity).
    """

    stages = ()

    def __init__(self, *, spatial_dims: int = 3, in_channels: int = 1, channel: int = 0, polarity: Literal["bright", "dark", "both"] = "bright"):
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels)
        if not 0 <= channel < in_channels:
            raise VoladConfigError(f"channel {channel} out of range for {in_channels} input contrasts")
        if polarity not in ("bright", "dark", "both"):
            raise VoladConfigError(f"polarity must be bright, dark or both, got {polarity!r}")
        self.channel, self.polarity = int(channel), polarity

    def predict(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> AnomalyOutput:
        v = x[:, self.channel : self.channel + 1]
        if self.polarity == "dark":
            v = 1.0 - v
        elif self.polarity == "both":
            ref = v[mask.bool()].median() if mask is not None and mask.any() else v.median()
            v = (v - ref).abs()
        if mask is not None:
            v = v * mask
        return AnomalyOutput(v, None)


class NormativeBaseline(AnomalyMethod):
    """Voxel-wise normative z-score model fitted on the healthy training split.

    Statistics are accumulated with Welford's algorithm in one pass (stage
    ``"fit"``), as buffers that travel with the checkpoint.

    Args:
        spatial_dims: Recorded only; the model is per voxel and sees whole volumes.
        in_channels: Input contrasts.
        min_std: Floor on σ, in normalised intensity units, so that voxels that
            barely vary in the training set do not explode.
    """

    stages = ("fit",)
    input_view = "volume"

    def __init__(self, *, spatial_dims: int = 3, in_channels: int = 1, min_std: float = 0.05):
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels)
        self.min_std = float(min_std)
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("m2", torch.zeros(0))

    def configure_optimizers(self, stage: str) -> dict[str, torch.optim.Optimizer]:
        return {}

    def optimization_step(self, batch: Batch, stage: str, optimizers: dict) -> dict[str, float]:
        x = batch.image.detach()
        if self.mean.numel() == 0:
            self.mean = torch.zeros_like(x[0])
            self.m2 = torch.zeros_like(x[0])
        if x.shape[1:] != self.mean.shape:
            raise VoladConfigError(
                f"normative model needs every subject on one grid; got {tuple(x.shape[1:])} after {tuple(self.mean.shape)}. "
                "Register the subjects to a template first (volad preprocess)."
            )
        for sample in x:
            self.count += 1
            delta = sample - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (sample - self.mean)
        return {"subjects": float(self.count)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("mean", "m2"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def std(self) -> torch.Tensor:
        var = self.m2 / (self.count - 1).clamp_min(1)
        return var.sqrt().clamp_min(self.min_std)

    def predict(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> AnomalyOutput:
        if self.count < 2:
            raise VoladConfigError("normative model is not fitted (train it on at least two healthy subjects)")
        if x.shape[1:] != self.mean.shape:
            raise VoladConfigError(f"input grid {tuple(x.shape[1:])} differs from the fitted grid {tuple(self.mean.shape)}")
        z = ((x - self.mean) / self.std).abs().mean(dim=1, keepdim=True)
        if mask is not None:
            z = z * mask
        return AnomalyOutput(z, self.mean.expand_as(x).clone())


def build_baseline(name: str = "normative", **kwargs) -> AnomalyMethod:
    """Build a baseline by name (``"intensity"`` or ``"normative"``); kwargs go to its constructor."""
    table = {"intensity": IntensityBaseline, "normative": NormativeBaseline}
    if name not in table:
        raise VoladConfigError(f"unknown baseline {name!r} (choose from {', '.join(table)})")
    return table[name](**kwargs)
