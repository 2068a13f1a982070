"""Calibrated fusion: several trained methods' maps on one healthy-calibrated scale, combined.

Every member map is turned into a surprisal against healthy scans
(:mod:`volad.methods.calibration`), so a z-score, a reconstruction error and a
detector's probability become comparable without any lesion label. The
surprisals ``s_i = -log10 p_i`` are then combined by one of four rules
(:func:`combine_surprisals`):

* ``"hmp"``: the **harmonic mean p-value** (Wilson, "The harmonic
  mean p-value for combining dependent tests", PNAS 116(4):1195–1200, 2019),
  ``-log10( 1 / Σ w_i / p_i )`` with weights summing to 1. It is valid for
  dependent members, never falls more than ``log10(1/w_i)`` below any single
  member (a member that alone sees a lesion kind keeps its evidence: with three
  equal members at most 0.48 decades is lost), and is never below the mean of the
  surprisals (members that agree add up as under the mean);
* ``"mean"``: the weighted mean of surprisals (``-log10`` of the geometric mean
  of the p-values): strong when every member sees the lesion, but one member's
  evidence is divided by the number of members;
* ``"rms"`` (the default, here and in :class:`~volad.engine.fusion_builder.FusionBuilder`):
  the weighted root mean square of the surprisals (their power mean
  with exponent 2), between the two: a member that alone sees a lesion keeps at
  least ``sqrt(w_i)`` of its surprisal (half of it among four equal members, a
  quarter under the mean), while voxels where several members agree still rank
  above a lone member's noise, which ``"hmp"`` lets through from every member;
* ``"max"``: the largest surprisal (the smallest p-value), evidence of one
  member only.

Every member map is first smoothed as evaluation would smooth that member
alone (its method's ``median_mm``: a reconstruction residual median-filtered,
an intensity, a z-score or a detector's probability left as it is), and the
calibration is fitted on those maps; the fused map is not smoothed again. One
median over the fused map would erase what a member alone sees in a few
voxels (on ``phantom_kinds`` it cut the fusion's small-lesion AUPRC from about
0.5 to about 0.2).

Which members, weights and rule is set or chosen by
:class:`volad.engine.fusion_builder.FusionBuilder` (``bundles/fusion3d``; by
default each method one vote, :func:`volad.engine.fusion_builder.family_weights`),
which also fits the calibration; this module only applies what was chosen.

A fusion holds copies of its members' trained weights, so its checkpoint
rebuilds it alone: retraining a member does not change a fusion built before.
Each member sees its own contrasts, patch grid and batch size, as its own
``inference.json`` would run it. When a member conditions on anatomy
(:mod:`volad.data.anatomy`), the fusion loads with those channels behind the
contrasts and hands them to that member only.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import nn

from volad.data.anatomy import anatomy_channels
from volad.errors import VoladConfigError
from volad.methods.base import AnomalyMethod
from volad.methods.calibration import TailTable, surprisal
from volad.methods.predict import predict_volume
from volad.methods.registry import recorded_class
from volad.methods.smoothing import median_smooth
from volad.types import AnomalyOutput

COMBINE_RULES = ("hmp", "mean", "rms", "max")


def combine_surprisals(stacked: torch.Tensor, rule: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Combine per-member surprisals ``(members, ...)`` into one map by ``rule`` (see the module docstring).

    Args:
        stacked: Member surprisals, members first.
        rule: ``"hmp"``, ``"mean"``, ``"rms"`` or ``"max"``.
        weights: One per member, summing to 1 (``None``: equal).
    """
    if rule == "max":
        return stacked.amax(0)
    if weights is None:
        weights = torch.full((stacked.shape[0],), 1.0 / stacked.shape[0])
    w = weights.to(stacked).reshape(-1, *([1] * (stacked.dim() - 1)))
    if rule == "mean":
        return (w * stacked).sum(0)
    if rule == "rms":  # surprisals are >= 0; clamped so rounding below 0 cannot flip a sign
        return (w * stacked.clamp(min=0) ** 2).sum(0).sqrt()
    if rule == "hmp":  # log10 Σ w_i 10^{s_i}, computed around the largest term
        top = stacked.amax(0)
        return top + torch.log10((w * torch.pow(10.0, stacked - top)).sum(0))
    raise VoladConfigError(f"combine must be one of {', '.join(COMBINE_RULES)}, got {rule!r}")


class Fusion(AnomalyMethod):
    """Healthy-calibrated fusion of trained methods (see module docstring).

    Args:
        spatial_dims: 3 (members may run in slice mode; the fusion maps whole volumes).
        in_channels: Contrasts of the fusion's input (the union of the members' contrasts).
        members: One record per member: ``name``, ``run`` (its run folder),
            ``checkpoint`` (SHA-256 of the checkpoint its weights came from),
            ``hparams`` (its method's record), ``channels`` (indices of its
            contrasts in the fusion's input), ``patch_size`` and ``batch_size``
            (its inference grid), ``median_kernel`` (the cube, in voxels of the fusion's grid, its
            map is median-filtered by before calibration: its method's own ``median_mm``).
        combine: ``"rms"`` (the weighted root mean square of surprisals, the default),
            ``"hmp"`` (weighted harmonic mean p-value), ``"mean"`` (weighted mean of surprisals) or ``"max"``.
        weights: One weight per member for ``"hmp"``, ``"mean"`` and ``"rms"`` (``None``: equal).
        points: Knots of each member's calibration table.
    """

    stages = ()
    input_view = "volume"
    median_mm = 0.0  # each member's map is smoothed its own way before calibration; the fused map is not smoothed again

    @classmethod
    def map_median_mm(cls, hparams: dict[str, Any]) -> float:
        """No median (0) for a fusion whose members carry their own ``median_kernel``; the literature's 5 mm for the fused map
        of a fusion built before members were smoothed one by one (whose calibration saw raw member maps)."""
        members = hparams.get("members") or ()
        return cls.median_mm if members and all("median_kernel" in m for m in members) else AnomalyMethod.median_mm

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        members: Sequence[dict[str, Any]] = (),
        combine: Literal["hmp", "mean", "rms", "max"] = "rms",
        weights: Sequence[float] | None = None,
        points: int = 512,
    ):
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels)
        if not members:
            raise VoladConfigError("a fusion needs at least one member run")
        if combine not in COMBINE_RULES:
            raise VoladConfigError(f"combine must be one of {', '.join(COMBINE_RULES)}, got {combine!r}")
        if weights is not None and len(weights) != len(members):
            raise VoladConfigError(f"{len(weights)} weights for {len(members)} members")
        nets = []
        for m in members:
            cls = recorded_class(m["hparams"], f"fusion member {m.get('name')!r}")
            if any(not 0 <= c < in_channels for c in m["channels"]):
                raise VoladConfigError(f"fusion member {m.get('name')!r}: channels {m['channels']} out of range for {in_channels} input contrasts")
            nets.append(cls.rebuild(m["hparams"]))
        self.members = nn.ModuleList(nets)
        kinds = {m.anatomy for m in nets if m.anatomy}
        if len(kinds) > 1:
            raise VoladConfigError(f"fusion members condition on different anatomy inputs {sorted(kinds)}; one kind per fusion")
        self.anatomy = kinds.pop() if kinds else None
        self.member_records = [dict(m) for m in members]
        self.combine = combine
        w = torch.ones(len(members)) if weights is None else torch.tensor([float(x) for x in weights])
        self.register_buffer("weights", w / w.sum())
        self.register_buffer("calib_knots", torch.zeros(len(members), points, dtype=torch.float64))
        self.register_buffer("calib_surprisal", torch.zeros(len(members), points, dtype=torch.float64))
        self.register_buffer("calib_slope", torch.ones(len(members), dtype=torch.float64))

    @property
    def names(self) -> list[str]:
        return [m["name"] for m in self.member_records]

    def set_calibration(self, index: int, table: TailTable) -> None:
        """Install member ``index``'s healthy tail table (:func:`volad.methods.calibration.fit_tail`)."""
        self.calib_knots[index] = torch.as_tensor(table.knots, dtype=torch.float64)
        self.calib_surprisal[index] = torch.as_tensor(table.surprisal, dtype=torch.float64)
        self.calib_slope[index] = float(table.slope)

    def member_map(self, index: int, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Member ``index``'s raw map ``(1, W, H, D)`` of one volume ``image`` ``(C, W, H, D)``, run as its inference runs it."""
        rec = self.member_records[index]
        channels = list(rec["channels"])
        if self.members[index].anatomy:  # the anatomy channels sit behind the fusion's contrasts
            channels += list(range(self.in_channels, self.in_channels + anatomy_channels(self.anatomy)))
        amap = predict_volume(
            self.members[index], image[channels], mask, patch_size=rec.get("patch_size") or None, batch_size=int(rec.get("batch_size") or 4), device=image.device
        ).anomaly_map
        kernel = int(rec.get("median_kernel") or 1)
        if kernel > 1:  # the member's own smoothing, before calibration (see the module docstring)
            amap = torch.from_numpy(median_smooth(amap.cpu().numpy(), kernel))
        return amap.to(image.device)

    def calibrated(self, index: int, amap: torch.Tensor) -> torch.Tensor:
        """A member's raw map as healthy surprisal."""
        return surprisal(amap.double(), self.calib_knots[index], self.calib_surprisal[index], self.calib_slope[index]).float()

    def surprisals(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Every member's calibrated map of one volume: ``(members, W, H, D)``."""
        return torch.stack([self.calibrated(i, self.member_map(i, image, mask))[0] for i in range(len(self.members))])

    def fuse(self, stacked: torch.Tensor) -> torch.Tensor:
        """Combine ``(members, ...)`` surprisals by the chosen rule."""
        return combine_surprisals(stacked, self.combine, self.weights)

    def predict(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> AnomalyOutput:
        if mask is None:
            mask = torch.ones_like(x[:, :1])
        maps = [self.fuse(self.surprisals(x[b], mask[b]))[None] * mask[b] for b in range(x.shape[0])]
        return AnomalyOutput(torch.stack(maps), None)
