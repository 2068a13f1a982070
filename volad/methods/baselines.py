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

from typing import Literal, Sequence

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

    Statistics are accumulated in one pass (stage ``"fit"``) as float64 sums of
    ``x`` and ``x²`` per voxel, buffers that travel with the checkpoint; sums add
    up over batches, epochs and processes (DDP, :class:`volad.utils.distributed.SummedBuffers`).

    Two ways to turn the per-contrast z-scores into one map:

    * ``polarity="both"`` (absolute): mean over contrasts of ``|z|``, any deviation;
    * signed (``"bright"`` or ``"dark"``, one for all contrasts or one per
      contrast): only deviations of the lesions' sign count, e.g. hyperintensities
      on FLAIR and T2 (``"bright"``) or hypointensities on T1 (``"dark"``). A healthy
      voxel darker than usual on FLAIR (partial volume with CSF, atrophy) then no
      longer fires, which is most of the absolute map's false positives.

    ``volume_norm="robust"`` first maps each volume's brain voxels, per contrast, to
    ``(x − median) / IQR``, in training and at inference, so that global
    intensity shifts between scanners and sessions do not read as lesions.

    Args:
        spatial_dims: Recorded only; the model is per voxel and sees whole volumes.
        in_channels: Input contrasts.
        min_std: Floor on σ, in normalised intensity units, so that voxels that
            barely vary in the training set do not explode.
        polarity: ``"both"``, ``"bright"`` or ``"dark"``, or one of them per contrast.
        volume_norm: ``"none"`` or ``"robust"`` (per-volume median/IQR in the brain).
    """

    stages = ("fit",)
    input_view = "volume"
    summed_buffers = ("count", "total", "total_sq")

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        min_std: float = 0.05,
        polarity: str | Sequence[str] = "both",
        volume_norm: Literal["none", "robust"] = "none",
    ):
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels)
        self.min_std = float(min_std)
        self.polarity = [polarity] * in_channels if isinstance(polarity, str) else [str(p) for p in polarity]
        if len(self.polarity) != in_channels or any(p not in ("bright", "dark", "both") for p in self.polarity):
            raise VoladConfigError(f"polarity must be bright, dark or both, once or per contrast ({in_channels}); got {polarity!r}")
        if volume_norm not in ("none", "robust"):
            raise VoladConfigError(f"volume_norm must be none or robust, got {volume_norm!r}")
        self.volume_norm = volume_norm
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("total", torch.zeros(0, dtype=torch.float64))  # allocated on the first volume's grid
        self.register_buffer("total_sq", torch.zeros(0, dtype=torch.float64))

    def configure_optimizers(self, stage: str) -> dict[str, torch.optim.Optimizer]:
        return {}

    def _normalised(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Per-volume, per-contrast ``(x − median) / IQR`` over brain voxels (``volume_norm="robust"``); else ``x``."""
        if self.volume_norm == "none":
            return x
        inside = (mask > 0) if mask is not None else (x.abs().sum(dim=1, keepdim=True) > 0)
        out = x.clone()
        levels = torch.tensor([0.25, 0.5, 0.75], device=x.device, dtype=x.dtype)
        for b in range(x.shape[0]):
            brain = inside[b, 0]
            for c in range(x.shape[1]):
                values = x[b, c][brain]
                if values.numel() < 2:
                    continue
                q1, med, q3 = torch.quantile(values, levels)
                out[b, c] = (x[b, c] - med) / (q3 - q1).clamp_min(1e-3)
        return out

    def optimization_step(self, batch: Batch, stage: str, optimizers: dict) -> dict[str, float]:
        x = self._normalised(batch.image.detach(), batch.mask).double()
        if self.total.numel() == 0:
            self.total = torch.zeros_like(x[0])
            self.total_sq = torch.zeros_like(x[0])
        if x.shape[1:] != self.total.shape:
            raise VoladConfigError(
                f"normative model needs every subject on one grid; got {tuple(x.shape[1:])} after {tuple(self.total.shape)}. "
                "Register the subjects to a template first (volad preprocess)."
            )
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.total_sq += (x * x).sum(0)
        return {"subjects": float(self.count)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "m2" in state_dict:  # volad 0.2 kept Welford's mean and M2: the same statistics
            n = state_dict[prefix + "count"].double()
            mean, m2 = state_dict.pop(prefix + "mean").double(), state_dict.pop(prefix + "m2").double()
            state_dict[prefix + "count"] = n
            state_dict[prefix + "total"] = mean * n
            state_dict[prefix + "total_sq"] = m2 + mean * mean * n
        for name in ("total", "total_sq"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def mean(self) -> torch.Tensor:
        return (self.total / self.count.clamp_min(1)).float()

    @property
    def std(self) -> torch.Tensor:
        n = self.count.clamp_min(1)
        var = ((self.total_sq - self.total * self.total / n) / (self.count - 1).clamp_min(1)).clamp_min(0)
        return var.sqrt().float().clamp_min(self.min_std)

    def predict(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> AnomalyOutput:
        if self.count < 2:
            raise VoladConfigError("normative model is not fitted (train it on at least two healthy subjects)")
        if x.shape[1:] != self.total.shape:
            raise VoladConfigError(f"input grid {tuple(x.shape[1:])} differs from the fitted grid {tuple(self.total.shape)}")
        z = (self._normalised(x, mask) - self.mean) / self.std
        signed = [z[:, c] if p == "bright" else -z[:, c] if p == "dark" else z[:, c].abs() for c, p in enumerate(self.polarity)]
        z = torch.stack(signed, dim=1).clamp_min(0).mean(dim=1, keepdim=True)
        if mask is not None:
            z = z * mask
        return AnomalyOutput(z, self.mean.expand_as(x).clone())


#: The baselines by name: class and the settings that make them.
BASELINES: dict[str, tuple[type[AnomalyMethod], dict]] = {
    "intensity": (IntensityBaseline, {}),
    "normative": (NormativeBaseline, {"polarity": "both"}),
    "normative_signed": (NormativeBaseline, {"polarity": "bright", "volume_norm": "robust"}),
}


def build_baseline(name: str = "normative", **kwargs) -> AnomalyMethod:
    """Build a baseline by name (``intensity``, ``normative`` (absolute z) or ``normative_signed``
    (hyperintense z after robust per-volume normalisation)); kwargs go to its constructor and win,
    except those that are ``None`` (not given: the baseline's own setting)."""
    if name not in BASELINES:
        raise VoladConfigError(f"unknown baseline {name!r} (choose from {', '.join(BASELINES)})")
    cls, settings = BASELINES[name]
    return cls(**{**settings, **{k: v for k, v in kwargs.items() if v is not None}})
