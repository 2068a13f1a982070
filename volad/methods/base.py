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
so one trainer, inferer, evaluator and exporter serve them all.

``hparams`` is captured once, here, from the arguments the concrete class was
constructed with (defaults filled in), plus ``kind``: the class name. No method
writes it by hand. Checkpoints store it, so a run folder rebuilds its method
(:meth:`AnomalyMethod.rebuild`) and a checkpoint is only ever loaded into a method built the
same way.
"""

from __future__ import annotations

import abc
import functools
import inspect
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence

import torch
from torch import nn

from volad.errors import VoladConfigError
from volad.types import AnomalyOutput, Batch  # noqa: F401  (Batch: part of the method contract)
from volad.utils.distributed import TrainingStep


class AnomalyMethod(nn.Module, abc.ABC):
    """Base class of all methods (see module docstring).

    Class attributes:
        stages: Named training stages, run in order (empty: nothing to learn).
        inference_hparams: ``hparams`` keys a checkpoint need not match.
        input_view: ``"patch"`` (trains on patches/slices, any grid) or ``"volume"``
            (needs whole volumes on one grid, e.g. voxel-wise normative models).
        anatomy: Anatomy channels the method reads behind its ``in_channels`` contrasts
            (:mod:`volad.data.anatomy`; ``None``: none). Loading appends them, so every
            path that feeds the method loads with ``dataset.transform(anatomy=method.anatomy)``.
    """

    stages: ClassVar[tuple[str, ...]] = ("main",)
    input_view: ClassVar[Literal["patch", "volume"]] = "patch"
    anatomy: str | None = None
    #: ``hparams`` keys that only change inference (noise level, stitching, stop rule):
    #: recorded, but a checkpoint loads whatever their value, so they can be
    #: chosen on the validation split without retraining.
    inference_hparams: ClassVar[tuple[str, ...]] = ()
    #: ``hparams`` keys that record where something came from (a weights file's path),
    #: not what the method is: never compared between a checkpoint and a method.
    provenance_hparams: ClassVar[tuple[str, ...]] = ()
    #: Constructor arguments that say how to build the method now, not what it is (whether to read a
    #: pretrained file the checkpoint already holds): never recorded in ``hparams``.
    build_arguments: ClassVar[tuple[str, ...]] = ()
    #: Names of the statistics the method records with :meth:`record` (network passes,
    #: windows, stages, synthesised anomalies): read by benchmarks and tests from :attr:`stats`.
    stat_names: ClassVar[tuple[str, ...]] = ()
    #: Whether the training networks tolerate mixed precision (bfloat16 autocast on CUDA, ``amp``).
    amp_safe: ClassVar[bool] = True
    #: How one score per volume is taken from the method's map in evaluation: ``top1`` (mean of the top 1 % of
    #: brain voxels), ``max`` (peaky maps of focal scores), ``mean`` (a whole-image score, f-AnoGAN's).
    volume_score_mode: ClassVar[str] = "top1"
    #: Median-filter window (mm, edge length) that evaluation and validation apply to this method's maps unless told
    #: otherwise (``evaluate.json --median_mm``). 5 mm, the literature's chain (Baur et al. 2021; Behrendt et al. 2024),
    #: for maps of per-voxel residuals, whose isolated noisy voxels it removes (ae3d's test AUPRC on ``phantom_kinds``:
    #: 0.25 without, 0.45 with). 0 for maps without that noise (an intensity, a healthy-calibrated statistic, a trained
    #: segmentation output), where a 3-voxel median mostly erases lesions under 14 of its 27 voxels.
    median_mm: ClassVar[float] = 5.0

    def __init__(self, *, spatial_dims: int, in_channels: int, lr: float = 1e-3):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(in_channels)
        self.lr = float(lr)
        self.hparams: dict[str, Any] = {"kind": type(self).__name__, "spatial_dims": self.spatial_dims, "in_channels": self.in_channels}
        self.stats: dict[str, Any] = {}
        object.__setattr__(self, "_step", None)  # not a submodule: under DDP it holds the method itself
        self.amp = False  # bfloat16 autocast of the training forward passes (set by the trainer)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap each subclass's ``__init__`` so that the outermost call records ``hparams``."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_records_hparams", False):
            return
        signature = inspect.signature(init)

        forwards = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())

        @functools.wraps(init)
        def __init__(self, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            bound = signature.bind(self, *args, **kw)
            bound.apply_defaults()
            own = _plain_arguments(bound, type(self).__name__, skip=type(self).build_arguments)
            if type(self).__init__ is not __init__:  # a parent called through super(): keep for a child that forwards **kwargs
                self._parent_hparams = own
                return
            # A constructor that forwards **kwargs to its parent records the parent's arguments too (defaults filled in).
            inherited = self.__dict__.pop("_parent_hparams", {}) if forwards else {}
            self.__dict__.pop("_parent_hparams", None)
            self.hparams = {"kind": type(self).__name__, **inherited, **own, **self.resolved_hparams()}

        __init__._records_hparams = True  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[method-assign]

    @classmethod
    def rebuild(cls, hparams: dict[str, Any]) -> "AnomalyMethod":
        """Build the method a checkpoint's ``hparams`` describe (weights are loaded afterwards).

        Methods whose constructor reads a file the checkpoint already holds (a
        pretrained teacher) override this so the file is not needed again.
        """
        return cls(**{k: v for k, v in hparams.items() if k != "kind"})

    @classmethod
    def contrast_views(cls, hparams: dict[str, Any]) -> list[tuple[int, str]]:
        """The views, ``(contrast index, sign)``, a fusion splits the method ``hparams`` describe into (:meth:`view`), each
        calibrated and fused as a member of its own; none (the default) when the method is fused whole."""
        return []

    @classmethod
    def view(cls, hparams: dict[str, Any], state: dict[str, Any], channel: int, sign: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The record and trained state of one view (:meth:`contrast_views`): the method on contrast ``channel`` alone, scoring
        deviations of ``sign``."""
        raise VoladConfigError(f"{cls.__name__} has no contrast views: it is fused whole")

    @classmethod
    def map_median_mm(cls, hparams: dict[str, Any]) -> float:
        """The median window (mm) evaluation applies to the maps of the method ``hparams`` describe (:attr:`median_mm`;
        a method whose smoothing depends on how it was built overrides this)."""
        return cls.median_mm

    def record(self, **values: Any) -> None:
        """Keep statistics of the last ``predict`` (or training step) in :attr:`stats`; only declared names."""
        unknown = sorted(set(values) - set(type(self).stat_names))
        if unknown:
            raise RuntimeError(f"{type(self).__name__} records undeclared statistics {unknown}; add them to stat_names")
        self.stats.update(values)

    # -- training ------------------------------------------------------------------
    def random_state(self) -> dict[str, Any] | None:
        """The state of the method's own random generators, beyond the global ones a checkpoint keeps
        (:func:`volad.utils.seed.rng_state`), as plain data; ``None``: it draws from the global ones only."""
        return None

    def set_random_state(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`random_state` returned (a resumed run then draws what it would have)."""

    def configure_optimizers(self, stage: str) -> dict[str, torch.optim.Optimizer]:
        """Optimisers for ``stage`` by name. Default: one Adam over trainable parameters."""
        params = [p for p in self.parameters() if p.requires_grad]
        return {"main": torch.optim.Adam(params, lr=self.lr)} if params else {}

    def training_step(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        """Losses for one batch; ``"loss"`` is the one the default optimisation step minimises.

        Methods with stages implement it (or override :meth:`optimization_step`).
        """
        raise RuntimeError(f"{type(self).__name__} has training stages {self.stages} but no training_step")

    def distribute(self, stage: str, wrap: Callable[[nn.Module], nn.Module] | None) -> None:
        """Under several processes, make ``stage``'s gradients average over them.

        ``wrap`` is DDP (:func:`volad.utils.distributed.data_parallel`). Default: the whole
        :meth:`training_step` goes through it (:class:`volad.utils.distributed.TrainingStep`).
        Methods whose :meth:`optimization_step` calls networks directly (a GAN's
        alternating updates) wrap those networks instead. The trainer calls
        ``distribute(stage, None)`` when the stage ends.
        """
        object.__setattr__(self, "_step", None if wrap is None else wrap(TrainingStep(self)))  # not a submodule

    def losses(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        """:meth:`training_step`, through DDP when the trainer runs several processes (gradients are then
        averaged), under bfloat16 autocast when :attr:`amp` is set (the backward pass stays outside it)."""
        with torch.autocast(batch.image.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return (self._step or self.training_step)(batch, stage)

    def optimization_step(self, batch: Batch, stage: str, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        """One update. Default: backpropagate ``losses["loss"]`` and step the ``"main"`` optimiser."""
        losses = self.losses(batch, stage)
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

        :func:`volad.methods.predict.predict_volume` then always uses a patch grid of it.
        """
        return None

    @property
    def size_divisor(self) -> int:
        """Spatial sizes the network accepts must be multiples of this (1: any)."""
        return 1

    @property
    def training_patch_size(self) -> int | None:
        """The training patch this method needs when the run names none (``patch_size`` null); ``None``: whole volumes or slices."""
        return None

    def resolved_hparams(self) -> dict[str, Any]:
        """Arguments given as ``None`` (a default that depends on others) with the values they took, recorded in
        ``hparams`` so a checkpoint always holds the values that trained it."""
        return {}


def _plain_arguments(bound: inspect.BoundArguments, owner: str, skip: Sequence[str] = ()) -> dict[str, Any]:
    """Constructor arguments as plain JSON-able values (tuples become lists, paths strings), but for ``skip``
    (build arguments: never recorded, so they may be objects, e.g. a trained network)."""

    def plain(value: Any, name: str) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v, name) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v, name) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"{owner}: constructor argument {name!r} is a {type(value).__name__}; methods take plain values (numbers, strings, lists)")

    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        param = bound.signature.parameters[name]
        if name == "self" or name in skip:
            continue
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update({k: plain(v, k) for k, v in value.items()})
        elif param.kind is not inspect.Parameter.VAR_POSITIONAL:
            out[name] = plain(value, name)
    return out
