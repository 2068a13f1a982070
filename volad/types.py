"""Shared types and shape helpers.

Tensors follow MONAI's channel-first convention: a batch is ``(B, C, *spatial)``
with one, two or three spatial axes. Code never lists axes literally; it asks
:func:`spatial_axes` instead, so the same reduction works in 2D and 3D.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from volad.errors import VoladConfigError


class AnomalyOutput(NamedTuple):
    """What every method's ``predict`` returns, whatever the mode.

    Attributes:
        anomaly_map: ``(B, 1, *spatial)`` voxel-wise anomaly score, higher is more
            anomalous, in model space (the normalised, preprocessed input grid).
        reconstruction: ``(B, C, *spatial)`` pseudo-healthy image in the same
            normalised intensity space as the input, or ``None`` for methods
            that have none (PII, RD4AD, the intensity baseline).
    """

    anomaly_map: torch.Tensor
    reconstruction: Optional[torch.Tensor] = None


@dataclass
class Batch:
    """What a method sees in training: plain tensors, no TorchIO dicts.

    Attributes:
        image: ``(B, C, *spatial)`` normalised intensities.
        mask: ``(B, 1, *spatial)`` brain mask (0/1 float).
        location: ``(B, 6)`` patch corners in the volume (TorchIO convention), if patched.
    """

    image: torch.Tensor
    mask: torch.Tensor
    location: Optional[torch.Tensor] = None

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        """On ``device``; ``non_blocking`` overlaps the copy from pinned memory with computation."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.image), move(self.mask), None if self.location is None else move(self.location))

    def padded(self, divisor: int) -> "Batch":
        """Image and mask zero-padded at the far end to multiples of ``divisor`` (a method's ``size_divisor``),
        as inference pads its inputs: the one padding rule, applied by the trainer and the inferer, never by a method."""
        if divisor <= 1:
            return self
        return Batch(pad_to_multiple(self.image, divisor)[0], pad_to_multiple(self.mask, divisor)[0], self.location)


def spatial_axes(x: torch.Tensor) -> tuple[int, ...]:
    """Spatial axes of a channel-first batch ``(B, C, *spatial)``.

    Args:
        x: Batched tensor with at least one spatial axis.

    Returns:
        The indices of the spatial axes, e.g. ``(2, 3)`` in 2D and ``(2, 3, 4)`` in 3D.
    """
    if x.ndim < 3:
        raise ValueError(f"expected a batch (B, C, *spatial), got shape {tuple(x.shape)}")
    return tuple(range(2, x.ndim))


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn a device request into a ``torch.device``.

    Args:
        device: ``"auto"`` or ``None`` picks CUDA when present, otherwise the CPU;
            anything else is passed to ``torch.device``.

    Raises:
        VoladConfigError: not a device, or a CUDA device this machine does not have.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise VoladConfigError(f"--device {device}: not a device ({exc}); use auto, cpu, cuda or cuda:N") from exc
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise VoladConfigError(f"--device {device}: this machine has no CUDA device that torch {torch.__version__} can use; "
                                   "use --device cpu, or auto (CUDA when present)")
        if chosen.index is not None and chosen.index >= count:
            raise VoladConfigError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    return chosen


def unset(value: Any) -> bool:
    """Whether a setting was left unset: ``None``, or how a command line spells it (``""``, ``"None"``; the bundle
    CLI cannot pass ``None`` itself). The one rule every component applies."""
    return value is None or (isinstance(value, str) and value in ("", "None"))


def flag(value: bool | str | None, name: str) -> bool | None:
    """The yes/no setting ``name`` as a bool; ``None`` (and ``""``/``"None"``, which is how the bundle CLI spells it) stays ``None``.

    Raises:
        VoladConfigError: a string that is not true/false, yes/no, on/off or 1/0.
    """
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("", "none", "null", "auto"):
        return None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise VoladConfigError(f"--{name}: expected true or false (or null for the device's default), got {value!r}")


def linear_mode(spatial_dims: int) -> str:
    """``F.interpolate`` mode for (bi/tri)linear resampling of ``spatial_dims`` axes."""
    return {1: "linear", 2: "bilinear", 3: "trilinear"}[spatial_dims]


def crop_spatial(x: torch.Tensor, size: Sequence[int], start: Sequence[int] | None = None) -> torch.Tensor:
    """The ``size`` window of the spatial axes of a batch, from ``start`` (default: the origin)."""
    start = [0] * len(size) if start is None else start
    return x[(slice(None), slice(None), *[slice(a, a + s) for a, s in zip(start, size)])]


def pad_to_multiple(x: torch.Tensor, divisor: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the spatial axes of a batch at the far end to multiples of ``divisor``.

    Returns:
        The padded batch and the original spatial size (undo with :func:`crop_spatial`).
    """
    spatial = tuple(x.shape[2:])
    pad: list[int] = []
    for s in reversed(spatial):
        pad += [0, -s % divisor]
    return (F.pad(x, pad) if any(pad) else x), spatial


def to_slices(volume: torch.Tensor) -> torch.Tensor:
    """Slice mode in: a ``(C, W, H, D)`` volume as a batch of ``D`` axial slices ``(D, C, W, H)``."""
    return volume.permute(3, 0, 1, 2)


def from_slices(slices: torch.Tensor) -> torch.Tensor:
    """Slice mode out: a batch of axial slices ``(D, C, W, H)`` stacked back into a ``(C, W, H, D)`` volume."""
    return slices.permute(1, 2, 3, 0)


def drop_depth(patches: torch.Tensor) -> torch.Tensor:
    """Slice-mode patches ``(..., W, H, 1)`` (how TorchIO holds them) as 2D images ``(..., W, H)``."""
    if patches.shape[-1] != 1:
        raise ValueError(f"slice mode expects patches of depth 1, got spatial shape {tuple(patches.shape[2:])}")
    return patches[..., 0]


def add_depth(images: torch.Tensor) -> torch.Tensor:
    """2D images ``(..., W, H)`` as depth-1 patches ``(..., W, H, 1)`` for TorchIO (the inverse of :func:`drop_depth`)."""
    return images[..., None]


def none_means_default(init: Callable[..., None]) -> Callable[..., None]:
    """Let ``None`` stand for a keyword argument's default, so a bundle JSON can list a setting as
    ``null`` ("volad's default") without writing the default a second time."""
    signature = inspect.signature(init)
    defaults = {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty and p.default is not None}

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **{k: (defaults[k] if v is None and k in defaults else v) for k, v in kwargs.items()})

    return wrapper


def defaults_of(fn: Callable[..., Any]) -> dict[str, Any]:
    """Keyword defaults of a function or class (what ``volad evaluate --help`` and bundle ``--help`` show)."""
    target = fn.__init__ if isinstance(fn, type) else fn
    return {k: p.default for k, p in inspect.signature(target).parameters.items() if p.default is not inspect.Parameter.empty}
