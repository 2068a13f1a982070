"""Pretrained teacher weights: finding the file, checking it fits, converting its keys, and building a teacher with them.

MedicalNet's 3D ResNets (Chen, Ma, Zheng, "Med3D: Transfer Learning for 3D Medical
Image Analysis", arXiv:1904.00625, 2019) come from a local file the user gives; their
keys are converted as MONAI's own loader (``monai.networks.nets.resnet._load_state_dict``)
does. torchvision's ImageNet ResNets come from a local file or the torch hub cache.
A trained run's checkpoint holds its teacher's weights, so a run is rebuilt with
``load_weights=False`` and never reads the file again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from volad.errors import VoladConfigError, VoladDataError
from volad.nn.teachers import IMAGENET_ARCHITECTURES, ImageNetTeacher, ResNetTeacher, TeacherKind

log = logging.getLogger("volad.nn.pretrained")

MEDICALNET_SOURCES = (
    "MedicalNet weights are published by Tencent (https://github.com/Tencent/MedicalNet, "
    "and on Hugging Face as TencentMedicalNet/MedicalNet-Resnet18 etc., files such as resnet_18_23dataset.pth); "
    "download one on a machine with internet access and pass its local path as teacher_weights"
)


def imagenet_weights_file(arch: str, weights: str | Path | None = None) -> Path:
    """The local file of ``arch``'s ImageNet weights: ``weights`` if given, else torchvision's file in the torch hub cache.

    Raises:
        VoladDataError: the file is not there; the message says where it comes from.
    """
    names = IMAGENET_ARCHITECTURES[arch][2]
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise VoladDataError(path, f"ImageNet teacher weights not found. {_imagenet_sources(arch, names)}")
        return path
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in names:
        if (cache / name).is_file():
            return cache / name
    raise VoladDataError(cache / names[0], f"no ImageNet weights for {arch} in the local torch hub cache. {_imagenet_sources(arch, names)}")


def _imagenet_sources(arch: str, names: tuple[str, ...]) -> str:
    return (
        f"torchvision publishes them as {' or '.join(names)} (https://download.pytorch.org/models/{names[0]}; "
        f"torchvision.models.{arch}(weights='DEFAULT') saves it to <torch hub dir>/checkpoints, "
        f"here {Path(torch.hub.get_dir()) / 'checkpoints'}); volad never downloads weights: fetch the file on a machine with "
        "internet access and put it there, or pass its path as teacher_weights"
    )


def _read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise VoladDataError(path, f"cannot read {what} as a PyTorch checkpoint ({exc})") from exc
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VoladDataError(path, f"{what}: not a state dict (expected a dict of tensors, or one under 'state_dict')")
    return state


def _load_backbone(teacher: ResNetTeacher, state: dict[str, torch.Tensor], path: str | Path, hint: str) -> None:
    """Load the keys the teacher has; refuse missing keys or other shapes, naming the file."""
    own = teacher.backbone.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        detail = f"{len(missing)} missing keys (e.g. {missing[:2]})" if missing else f"shape mismatch for {wrong[:2]}"
        raise VoladDataError(path, f"does not fit a {teacher.backbone.conv1.weight.ndim - 2}D {type(teacher).__name__}: {detail}. {hint}")
    ignored = sorted(k for k in state if k not in own)
    if ignored:
        log.info("%s: ignoring %d keys the teacher does not use (e.g. %s)", path, len(ignored), ignored[:3])
    teacher.backbone.load_state_dict({k: state[k] for k in own})


def load_imagenet_weights(teacher: ImageNetTeacher, path: str | Path, arch: str) -> None:
    """Load torchvision ImageNet weights (its ``fc`` and ``layer4`` are not used)."""
    _load_backbone(teacher, _read_state_dict(path, "ImageNet teacher weights"), path, f"torchvision's {arch} weights are the file(s) {', '.join(IMAGENET_ARCHITECTURES[arch][2])}")


def _medicalnet_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise VoladDataError(path, f"MedicalNet teacher weights not found. {MEDICALNET_SOURCES}")
    state = _read_state_dict(path, "MedicalNet teacher weights")
    return {k.replace("module.", ""): v for k, v in state.items()}  # MONAI's conversion


def load_teacher_weights(teacher: ResNetTeacher, path: str | Path) -> None:
    """Load MedicalNet (or any ``ResNetFeatures``-compatible) weights into ``teacher``.

    Keys the teacher lacks (MedicalNet's segmentation head, layer 4) are ignored.
    For several input contrasts the single-channel first convolution is repeated
    over channels and divided by their number, so a constant-across-contrasts
    input gives the pretrained response.

    Raises:
        VoladDataError: the file is missing, unreadable, or does not fit the architecture.
    """
    state = _medicalnet_state_dict(path)
    own = teacher.backbone.state_dict()
    w = state.get("conv1.weight")
    if w is not None and w.ndim == own["conv1.weight"].ndim and w.shape[1] == 1 and own["conv1.weight"].shape[1] > 1:
        c = own["conv1.weight"].shape[1]
        state["conv1.weight"] = w.repeat(1, c, *([1] * (w.ndim - 2))) / c
    hint = "MedicalNet weights are 3D, single-channel ResNets; pick the matching teacher_arch"
    if teacher.backbone.conv1.weight.ndim == 4:
        hint = "MedicalNet weights are 3D and cannot serve slice mode; use teacher 'imagenet', 'ssl' or 'random' with --spatial_dims 2"
    _load_backbone(teacher, state, path, hint)


def build_teacher(
    kind: TeacherKind,
    *,
    arch: str = "resnet18",
    spatial_dims: int = 3,
    in_channels: int = 1,
    weights: str | Path | None = None,
    load_weights: bool = True,
) -> ResNetTeacher:
    """Build a teacher of the given kind (untrained for ``ssl``, loaded for ``medicalnet`` and ``imagenet``).

    With ``load_weights=False`` pretrained teachers are built without reading their
    weights file (a trained run's checkpoint holds them).

    Raises:
        VoladConfigError: unknown kind, ``medicalnet`` without a weights path, ``imagenet`` in 3D.
        VoladDataError: the weights file is missing or does not fit.
    """
    if kind == "medicalnet":
        if not weights and load_weights:
            raise VoladConfigError(f"teacher 'medicalnet' needs teacher_weights, a local file path. {MEDICALNET_SOURCES}")
        teacher = ResNetTeacher(arch, spatial_dims=spatial_dims, in_channels=in_channels)
        if load_weights:
            load_teacher_weights(teacher, weights)
        return teacher
    if kind == "imagenet":
        imagenet = ImageNetTeacher(arch, spatial_dims=spatial_dims, in_channels=in_channels)
        if load_weights:
            load_imagenet_weights(imagenet, imagenet_weights_file(arch, weights), arch)
        return imagenet
    if kind in ("ssl", "random"):
        if weights:
            raise VoladConfigError(f"teacher {kind!r} takes no teacher_weights (got {weights!r}); use teacher 'medicalnet' to load a file")
        return ResNetTeacher(arch, spatial_dims=spatial_dims, in_channels=in_channels)
    raise VoladConfigError(f"teacher must be 'medicalnet', 'imagenet', 'ssl' or 'random', got {kind!r}")
