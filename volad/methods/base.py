"""The one method contract every volad method follows.

A method is an ``nn.Module`` that

* learns in one or more named **stages** (``stages``), each with its own
  optimisers (:meth:`AnomalyMethod.configure_optimizers`) and epochs;
* turns a batch into named losses (:meth:`AnomalyMethod.training_step`);
  methods that alternate optimisers (GANs) or accumulate statistics instead of
  gradients (the normative baseline) override
  :meth:`AnomalyMethod.optimization_step`;
* maps an input batch to an :class:`~volad.types.AnomalyOutput`
  (:meth:`AnomalyMethod.predict`), in 2D and 3D alike.

Methods never read files, choose thresholds, compute metrics or write outputs,
so one trainer, inferer, evaluator and exporter serve them all. ``hparams``
records the constructor arguments; checkpoints store it so that a checkpoint is
only ever loaded into a method built the same way.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from volad.types import AnomalyOutput, Batch  # noqa: F401  (Batch: part of the method contract)


class AnomalyMethod(nn.Module, abc.ABC):
    """Base class of all methods (see module docstring).

    Class attributes:
        stages: Named training stages, run in order (empty: nothing to learn).
        inference_hparams: ``hparams`` keys a checkpoint need not match.
        input_view: ``"patch"`` (trains on patches/slices, any grid) or ``"volume"``
            (needs whole volumes on one grid, e.g. voxel-wise normative models).
    """

    stages: ClassVar[tuple[str, ...]] = ("main",)
    input_view: ClassVar[Literal["patch", "volume"]] = "patch"
    #: ``hparams`` keys that only change inference (noise level, stitching, stop rule):
    #: recorded, but a checkpoint loads whatever their value, so they can be
    #: chosen on the validation split without retraining.
    inference_hparams: ClassVar[tuple[str, ...]] = ()
    #: Names of the statistics the method records with :meth:`record` (network passes,
    #: windows, stages, synthesised anomalies): read by benchmarks and tests from :attr:`stats`.
    stat_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, spatial_dims: int, in_channels: int, lr: float = 1e-3):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(in_channels)
        self.lr = float(lr)
        self.hparams: dict[str, Any] = {"spatial_dims": self.spatial_dims, "in_channels": self.in_channels}
        self.stats: dict[str, Any] = {}

    def record(self, **values: Any) -> None:
        """Keep statistics of the last ``predict`` (or training step) in :attr:`stats`; only declared names."""
        unknown = sorted(set(values) - set(type(self).stat_names))
        if unknown:
            raise RuntimeError(f"{type(self).__name__} records undeclared statistics {unknown}; add them to stat_names")
        self.stats.update(values)

    # -- training ------------------------------------------------------------------
    def configure_optimizers(self, stage: str) -> dict[str, torch.optim.Optimizer]:
        """Optimisers for ``stage`` by name. Default: one Adam over trainable parameters."""
        params = [p for p in self.parameters() if p.requires_grad]
        return {"main": torch.optim.Adam(params, lr=self.lr)} if params else {}

    def training_step(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        """Losses for one batch; ``"loss"`` is the one the default optimisation step minimises.

        Methods with stages implement it (or override :meth:`optimization_step`).
        """
        raise RuntimeError(f"{type(self).__name__} has training stages {self.stages} but no training_step")

    def optimization_step(self, batch: Batch, stage: str, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        """One update. Default: backpropagate ``losses["loss"]`` and step the ``"main"`` optimiser."""
        losses = self.training_step(batch, stage)
        opt = optimizers["main"]
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    # -- inference -----------------------------------------------------------------
    @abc.abstractmethod
    def predict(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> AnomalyOutput:
        """Anomaly map (and pseudo-healthy image, if any) for ``x`` of shape ``(B, C, *spatial)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The anomaly map of ``x`` (no mask), so that a trained method exports as one network
        (``python -m monai.bundle ckpt_export --use_trace True``)."""
        return self.predict(x).anomaly_map

    @property
    def required_patch_size(self) -> int | None:
        """Edge of the only input size the networks accept (``None``: any size).

        :func:`volad.inference.predict_volume` then always uses a patch grid of it.
        """
        return None

    @property
    def size_divisor(self) -> int:
        """Spatial sizes the network accepts must be multiples of this (1: any)."""
        return 1
