"""Baselines reported beside every method.

* :class:`IntensityBaseline`: the score is the chosen contrast's normalised
  intensity inside the brain. Meissen et al., "Challenging current
  semi-supervised anomaly segmentation methods for brain MRI", BrainLes @ MICCAI
  2021, show that plain FLAIR thresholding beats many deep models.
* :class:`NormativeBaseline`: a voxel-wise normative model. Mean and standard
  deviation of every voxel are fitted on the healthy training brains that cover
  it (the training split must share one registered grid); the score is the
  z-score, absolute or of the lesions' sign, averaged over contrasts.

By name (:data:`BASELINES`): ``intensity``; ``normative`` (absolute z);
``zscore``, the plain signed recipe (robust per-volume normalisation, bright
z, σ floor in quadrature, z = 0 where fewer than 5 training brains cover the
voxel), kept as the yardstick; ``normative_signed``, the same with a
one-voxel misregistration search (FLAIR-bright); and ``normative_views``, the
same model on every contrast the dataset has with both signs, the normative
member volad fuses: the fusion splits it into one view per contrast and sign
(:meth:`NormativeBaseline.contrast_views`), which share one vote.
"""

from __future__ import annotations

import itertools
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
    median_mm = 0.0  # a voxel's own intensity: no residual noise for a median to remove

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

    Per voxel, the mean and standard deviation of the healthy training subjects
    **whose brain mask covers that voxel** (a subject outside its brain there says
    nothing about the tissue); they are accumulated in one pass (stage ``"fit"``)
    as float64 per-voxel sums of coverage, ``x`` and ``x²``, buffers that travel
    with the checkpoint and add up over batches, epochs and processes (DDP,
    :class:`volad.utils.distributed.SummedBuffers`). The score is

    ``z = (x − μ) / sqrt(σ² + min_std²)``

    (the floor added in quadrature, so a voxel that barely varies in the training
    set is judged on ``min_std`` instead of exploding, and one that varies keeps
    its own σ), set to 0 where fewer than ``min_coverage`` training brains cover
    the voxel (the rim of the brain, where μ and σ come from a handful of
    subjects). With its defaults (``search_radius=0``) this is the plain
    voxel-wise z-score of the normative-modelling literature (e.g. Marquand et
    al., "Understanding heterogeneity in clinical cohorts using normative models:
    beyond case-control studies", Biol. Psychiatry 2016).

    ``search_radius=r`` tolerates residual misregistration: each voxel is scored
    against the statistics of every voxel within ``r`` voxels along each axis
    and keeps the **least** surprising of those z-scores. A voxel that is only
    bright because a tissue border sits a voxel away from where the template puts
    it finds a neighbour whose healthy mean explains it; a lesion is bright against
    all of them. This only lowers scores, so it trades no sensitivity to lesions
    larger than the neighbourhood for fewer false positives at tissue borders.

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
        min_std: σ floor, in normalised intensity units, added in quadrature.
        min_coverage: Least number of training brains covering a voxel for it to be
            scored (capped at the number of training subjects, so a tiny training
            set still scores where all its brains agree).
        polarity: ``"both"``, ``"bright"`` or ``"dark"``, or one of them per contrast.
        volume_norm: ``"none"`` or ``"robust"`` (per-volume median/IQR in the brain).
        search_radius: Neighbourhood (voxels along each axis) whose statistics a
            voxel may be explained by; 0 scores each voxel against its own.
    """

    stages = ("fit",)
    input_view = "volume"
    median_mm = 0.0  # a healthy-calibrated per-voxel statistic: a median trades its small lesions for smoother large ones (card)
    summed_buffers = ("subjects", "count", "total", "total_sq")
    inference_hparams = ("min_std", "min_coverage", "search_radius")  # scoring only: the fitted sums do not depend on them

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        min_std: float = 0.05,
        min_coverage: int = 5,
        polarity: str | Sequence[str] = "both",
        volume_norm: Literal["none", "robust"] = "none",
        search_radius: int = 0,
    ):
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels)
        self.min_std = float(min_std)
        if int(search_radius) < 0:
            raise VoladConfigError(f"search_radius must be 0 or more voxels, got {search_radius!r}")
        self.search_radius = int(search_radius)
        if int(min_coverage) < 1:
            raise VoladConfigError(f"min_coverage must be at least 1, got {min_coverage!r}")
        self.min_coverage = int(min_coverage)
        self.polarity = [polarity] * in_channels if isinstance(polarity, str) else [str(p) for p in polarity]
        if len(self.polarity) != in_channels or any(p not in ("bright", "dark", "both") for p in self.polarity):
            raise VoladConfigError(f"polarity must be bright, dark or both, once or per contrast ({in_channels}); got {polarity!r}")
        if volume_norm not in ("none", "robust"):
            raise VoladConfigError(f"volume_norm must be none or robust, got {volume_norm!r}")
        self.volume_norm = volume_norm
        self.register_buffer("subjects", torch.zeros((), dtype=torch.float64))
        # per-voxel sums, allocated on the first volume's grid: coverage (1, ...), x and x² (C, ...)
        self.register_buffer("count", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("total", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("total_sq", torch.zeros(0, dtype=torch.float64))

    @classmethod
    def contrast_views(cls, hparams: dict) -> list[tuple[int, str]]:
        """Each contrast with each sign it scores (``"both"``: bright and dark): a fusion calibrates every one on its own, so
        a deviation in one contrast is not averaged away by the others (the model's own map is their mean)."""
        n = int(hparams.get("in_channels", 1))
        polarity = hparams.get("polarity", "both")
        per = [polarity] * n if isinstance(polarity, str) else list(polarity)
        return [(c, s) for c, p in enumerate(per) for s in (("bright", "dark") if p == "both" else (p,))]

    @classmethod
    def view(cls, hparams: dict, state: dict, channel: int, sign: str) -> tuple[dict, dict]:
        """The model of contrast ``channel`` alone scoring ``sign``: the same fitted sums, that contrast's only (coverage is shared)."""
        if not 0 <= channel < int(hparams.get("in_channels", 1)) or sign not in ("bright", "dark", "both"):
            raise VoladConfigError(f"no view of contrast {channel} with sign {sign!r} in a normative model of {hparams.get('in_channels')} contrasts")
        part = {k: state[k][channel : channel + 1].clone() for k in ("total", "total_sq") if state[k].numel()}
        return {**hparams, "in_channels": 1, "polarity": sign}, {**state, **part}

    def configure_optimizers(self, stage: str) -> dict[str, torch.optim.Optimizer]:
        return {}

    @staticmethod
    def _brain(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Brain voxels ``(B, 1, ...)``: the mask, else every voxel with signal in some contrast."""
        return (mask > 0) if mask is not None else (x.abs().sum(dim=1, keepdim=True) > 0)

    def _normalised(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Per-volume, per-contrast ``(x − median) / IQR`` over brain voxels (``volume_norm="robust"``); else ``x``."""
        if self.volume_norm == "none":
            return x
        inside = self._brain(x, mask)
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
        image = batch.image.detach()
        inside = self._brain(image, batch.mask).double()
        x = self._normalised(image, batch.mask).double() * inside
        if self.total.numel() == 0:
            self.count = torch.zeros_like(inside[0])
            self.total = torch.zeros_like(x[0])
            self.total_sq = torch.zeros_like(x[0])
        if x.shape[1:] != self.total.shape:
            raise VoladConfigError(
                f"normative model needs every subject on one grid; got {tuple(x.shape[1:])} after {tuple(self.total.shape)}. "
                "Register the subjects to a template first (volad preprocess)."
            )
        self.subjects += x.shape[0]
        self.count += inside.sum(0)
        self.total += x.sum(0)
        self.total_sq += (x * x).sum(0)
        return {"subjects": float(self.subjects)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "m2" in state_dict:  # volad 0.2 kept Welford's mean and M2: the same statistics
            n = state_dict[prefix + "count"].double()
            mean, m2 = state_dict.pop(prefix + "mean").double(), state_dict.pop(prefix + "m2").double()
            state_dict[prefix + "count"] = n
            state_dict[prefix + "total"] = mean * n
            state_dict[prefix + "total_sq"] = m2 + mean * mean * n
        if prefix + "subjects" not in state_dict and prefix + "count" in state_dict:
            # before coverage was counted per voxel: one count for all voxels (every subject covered every voxel)
            n = state_dict[prefix + "count"].double()
            state_dict[prefix + "subjects"] = n.clone()
            total = state_dict.get(prefix + "total")
            state_dict[prefix + "count"] = n.expand_as(total[:1]).clone() if total is not None and total.numel() else n.reshape(0)
        for name in ("count", "total", "total_sq"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def mean(self) -> torch.Tensor:
        """Per-voxel mean over the training brains covering the voxel ``(C, ...)``."""
        return (self.total / self.count.clamp_min(1)).float()

    @property
    def std(self) -> torch.Tensor:
        """Per-voxel standard deviation with the floor added in quadrature ``(C, ...)``."""
        n = self.count.clamp_min(1)
        var = ((self.total_sq - self.total * self.total / n) / (self.count - 1).clamp_min(1)).clamp_min(0)
        return (var + self.min_std**2).sqrt().float()

    @property
    def covered(self) -> torch.Tensor:
        """Voxels that enough training brains cover to be scored ``(1, ...)``."""
        return self.count >= min(self.min_coverage, max(int(self.subjects), 1))

    def _signed(self, z: torch.Tensor) -> torch.Tensor:
        """Per-contrast z-scores ``(B, C, ...)`` turned to the polarity's sign (``|z|`` for ``"both"``)."""
        return torch.stack([z[:, c] if p == "bright" else -z[:, c] if p == "dark" else z[:, c].abs() for c, p in enumerate(self.polarity)], dim=1)

    def _least_surprising(self, x: torch.Tensor) -> torch.Tensor:
        """Signed z-scores of normalised ``x`` against the statistics within ``search_radius`` voxels, the least of them per voxel."""
        mean, std = self.mean.to(x)[None], self.std.to(x)[None]
        r = self.search_radius
        if r == 0:
            return self._signed((x - mean) / std)
        dims = x.dim() - 2
        pad = [r] * (2 * dims)
        mean_p = torch.nn.functional.pad(mean, pad, mode="replicate")
        std_p = torch.nn.functional.pad(std, pad, mode="replicate")
        best = None
        for offset in itertools.product(range(2 * r + 1), repeat=dims):
            window = (slice(None), slice(None), *(slice(o, o + n) for o, n in zip(offset, x.shape[2:])))
            z = self._signed((x - mean_p[window]) / std_p[window])
            best = z if best is None else torch.minimum(best, z)
        return best

    def predict(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> AnomalyOutput:
        if self.subjects < 2:
            raise VoladConfigError("normative model is not fitted (train it on at least two healthy subjects)")
        if x.shape[1:] != self.total.shape:
            raise VoladConfigError(f"input grid {tuple(x.shape[1:])} differs from the fitted grid {tuple(self.total.shape)}")
        z = self._least_surprising(self._normalised(x, mask))
        z = z.clamp_min(0).mean(dim=1, keepdim=True) * self.covered.to(z)
        if mask is not None:
            z = z * mask
        return AnomalyOutput(z, self.mean.expand_as(x).clone())


#: The baselines by name: class and the settings that make them.
BASELINES: dict[str, tuple[type[AnomalyMethod], dict]] = {
    "intensity": (IntensityBaseline, {}),
    "normative": (NormativeBaseline, {"polarity": "both"}),
    "zscore": (NormativeBaseline, {"polarity": "bright", "volume_norm": "robust"}),
    "normative_signed": (NormativeBaseline, {"polarity": "bright", "volume_norm": "robust", "search_radius": 1}),
    "normative_views": (NormativeBaseline, {"polarity": "both", "volume_norm": "robust", "search_radius": 1}),
}

#: Contrasts a baseline reads unless told otherwise (:func:`baseline_contrasts`); the others read the dataset's default ones.
BASELINE_CONTRASTS: dict[str, str] = {"normative_views": "all"}


def baseline_contrasts(baseline: str) -> str | None:
    """The contrasts baseline ``baseline`` reads by default (``baseline3d``'s ``contrasts``): ``"all"`` for ``normative_views``,
    whose every contrast and sign a fusion calibrates as a view of its own; ``None`` (the dataset's default) for the others."""
    return BASELINE_CONTRASTS.get(baseline)


def build_baseline(name: str = "normative", **kwargs) -> AnomalyMethod:
    """Build a baseline by name (``intensity``, ``normative`` (absolute z) or ``normative_signed``
    (hyperintense z after robust per-volume normalisation)); kwargs go to its constructor and win,
    except those that are ``None`` (not given: the baseline's own setting)."""
    if name not in BASELINES:
        raise VoladConfigError(f"unknown baseline {name!r} (choose from {', '.join(BASELINES)})")
    cls, settings = BASELINES[name]
    return cls(**{**settings, **{k: v for k, v in kwargs.items() if v is not None}})
