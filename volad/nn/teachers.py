"""Teacher encoders for reverse distillation, and where their weights come from.

No ImageNet-style teacher exists for 3D MRI, and weight hubs cannot be assumed
reachable, so the teacher is one of these kinds:

* ``"medicalnet"``: MedicalNet ResNet weights (Chen, Ma, Zheng, "Med3D:
  Transfer Learning for 3D Medical Image Analysis", arXiv:1904.00625, 2019),
  read from a local file the user gives. The keys are converted as MONAI's own
  loader (``monai.networks.nets.resnet._load_state_dict``) does: the
  ``"state_dict"`` entry, ``"module."`` prefixes stripped.
* ``"ssl"``: the same architecture trained self-supervised on the healthy
  training split (a named ``"teacher"`` stage), then frozen. See
  :class:`MaskedReconstruction` for the objective.
* ``"random"``: a frozen random initialisation, a weak reference.
* ``"imagenet"`` (slice mode only): torchvision's ImageNet ResNets (``resnet18``,
  ``resnet34``, ``resnet50``, ``wide_resnet50_2``; He et al., "Deep Residual
  Learning for Image Recognition", CVPR 2016; Zagoruyko & Komodakis, "Wide
  Residual Networks", BMVC 2016), the teachers of the RD4AD paper and of
  anomalib. The weights come from a local file (``teacher_weights``) or the
  local torch hub cache, where ``torchvision`` puts them; volad never downloads
  them. The grey image is repeated over the three colour channels and
  normalised with ImageNet's statistics, as the networks were trained.

All are MONAI ResNet backbones (torchvision's layout and key names for
``"imagenet"``); only layers 1–3 (strides 4, 8, 16) are run. A checkpoint
holds the teacher's weights, so a trained run never reads the weights file again
(:func:`weights_from_checkpoint`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import ResNet, ResNetFeatures
from monai.networks.nets.resnet import ResNetBottleneck
from torch import nn

from volad.errors import VoladConfigError, VoladDataError
from volad.synthesis.noise import coarse_noise
from volad.types import linear_mode

log = logging.getLogger("volad.teachers")

TeacherKind = Literal["medicalnet", "ssl", "random", "imagenet"]
ARCHITECTURES = ("resnet10", "resnet18", "resnet34", "resnet50")
#: torchvision ImageNet ResNets: block, blocks per layer, and the file names torchvision
#: gives their weights (IMAGENET1K_V1 first, then V2) in ``<torch hub dir>/checkpoints``.
IMAGENET_ARCHITECTURES: dict[str, tuple[str, list[int], tuple[str, ...]]] = {
    "resnet18": ("basic", [2, 2, 2, 2], ("resnet18-f37072fd.pth",)),
    "resnet34": ("basic", [3, 4, 6, 3], ("resnet34-b627a593.pth",)),
    "resnet50": ("bottleneck", [3, 4, 6, 3], ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth")),
    "wide_resnet50_2": ("wide", [3, 4, 6, 3], ("wide_resnet50_2-95faca4d.pth", "wide_resnet50_2-9ba9bcbe.pth")),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MEDICALNET_SOURCES = (
    "MedicalNet weights are published by Tencent (https://github.com/Tencent/MedicalNet, "
    "and on Hugging Face as TencentMedicalNet/MedicalNet-Resnet18 etc., files such as resnet_18_23dataset.pth); "
    "download one on a machine with internet access and pass its local path as teacher_weights"
)

# volad's inputs map the brain's 1st/99th intensity percentiles to 0/1, so brain tissue has
# mean ≈ 0.5 and s.d. ≈ 0.25. Every teacher sees its input through this fixed affine map:
# - MedicalNet was trained on volumes z-scored over the foreground, and this brings volad's
#   inputs to that range.
# - Centring matters for any teacher. A ReLU network without biases (a random init whose
#   batch norms are still the identity) is positively homogeneous, f(a·x) = a·f(x), so
#   1 − cos cannot see a region that is uniformly brighter, which is what most lesions are.
#   Centred, a bright lesion and healthy tissue have different signs.
# The map is fixed, not per input, so patches and whole volumes see the same transform.
TEACHER_INPUT_MEAN = 0.5
TEACHER_INPUT_STD = 0.25


class ZeroPadShortcut(nn.Module):
    """MONAI's type-A ResNet shortcut (strided identity, zero-padded channels), trace-safe.

    MONAI builds it with ``torch.cat([out.data, zeros])``; ``.data`` is invisible
    to ``torch.jit.trace``, which then freezes the shortcut of the traced input
    into the exported model. This computes the same values without ``.data``.
    """

    def __init__(self, planes: int, stride: int, spatial_dims: int):
        super().__init__()
        self.planes, self.stride, self.spatial_dims = int(planes), int(stride), int(spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = F.avg_pool3d if self.spatial_dims == 3 else F.avg_pool2d
        out = pool(x, kernel_size=1, stride=self.stride)
        pad = out.new_zeros((out.shape[0], self.planes - out.shape[1], *out.shape[2:]))
        return torch.cat([out, pad], dim=1)


def _trace_safe_shortcuts(net: nn.Module) -> None:
    for block in net.modules():
        down = getattr(block, "downsample", None)
        if isinstance(down, functools.partial) and getattr(down.func, "__name__", "") == "_downsample_basic_block":
            block.downsample = ZeroPadShortcut(down.keywords["planes"], down.keywords["stride"], down.keywords["spatial_dims"])


_SKIP_PRETRAINED = False


@contextlib.contextmanager
def weights_from_checkpoint() -> Iterator[None]:
    """Build pretrained teachers without reading their weights file: a checkpoint's weights follow.

    Used when a trained run is rebuilt (:meth:`volad.methods.ReverseDistillation.rebuild`),
    so inference needs neither MedicalNet's nor ImageNet's file.
    """
    global _SKIP_PRETRAINED
    before, _SKIP_PRETRAINED = _SKIP_PRETRAINED, True
    try:
        yield
    finally:
        _SKIP_PRETRAINED = before


class ResNetTeacher(nn.Module):
    """Multi-scale ResNet encoder returning layer 1–3 features (strides 4, 8, 16).

    Args:
        arch: MONAI ResNet name (``resnet10``, ``resnet18``, ``resnet34``, ``resnet50``).
        spatial_dims: 2 or 3.
        in_channels: Input contrasts.
        input_mean: Subtracted from the input before the network.
        input_std: Divides the input before the network.
    """

    def __init__(
        self, arch: str = "resnet18", *, spatial_dims: int = 3, in_channels: int = 1, input_mean: float = TEACHER_INPUT_MEAN, input_std: float = TEACHER_INPUT_STD
    ):
        super().__init__()
        self.backbone = self._backbone(arch, spatial_dims, in_channels)
        self.backbone.layer4 = nn.Identity()  # never used; keeps the teacher small
        _trace_safe_shortcuts(self.backbone)
        self.input_mean, self.input_std = float(input_mean), float(input_std)
        self.channels = tuple(self._out_channels(getattr(self.backbone, f"layer{i}")) for i in (1, 2, 3))

    @staticmethod
    def _backbone(arch: str, spatial_dims: int, in_channels: int) -> nn.Module:
        if arch not in ARCHITECTURES:
            raise VoladConfigError(f"teacher architecture must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
        return ResNetFeatures(arch, pretrained=False, spatial_dims=spatial_dims, in_channels=in_channels)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the backbone expects it (see ``TEACHER_INPUT_MEAN``)."""
        return (x - self.input_mean) / self.input_std

    @staticmethod
    def _out_channels(layer: nn.Sequential) -> int:
        convs = [m for m in layer.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
        return convs[-1].out_channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = self.backbone
        x = self.prepare(x)
        x = b.act(b.bn1(b.conv1(x)))
        if not b.no_max_pool:
            x = b.maxpool(x)
        f1 = b.layer1(x)
        f2 = b.layer2(f1)
        return [f1, f2, b.layer3(f2)]


class WideBottleneck(ResNetBottleneck):
    """ResNet bottleneck with its inner width doubled (torchvision's ``wide_resnet50_2``)."""

    def __init__(self, in_planes: int, planes: int, spatial_dims: int = 3, stride: int = 1, downsample=None, act=("relu", {"inplace": True}), norm="batch"):
        super().__init__(in_planes, planes, spatial_dims=spatial_dims, stride=stride, downsample=downsample, act=act, norm=norm)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        bn = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        width = 2 * planes
        self.conv1, self.bn1 = conv(in_planes, width, kernel_size=1, bias=False), bn(width)
        self.conv2, self.bn2 = conv(width, width, kernel_size=3, stride=stride, padding=1, bias=False), bn(width)
        self.conv3 = conv(width, planes * self.expansion, kernel_size=1, bias=False)


class ImageNetTeacher(ResNetTeacher):
    """A torchvision ImageNet ResNet (slice mode) returning layer 1–3 features.

    Args:
        arch: A key of :data:`IMAGENET_ARCHITECTURES`.
        spatial_dims: Must be 2: ImageNet networks see pictures, i.e. axial slices.
        in_channels: 1 (grey, repeated over the colour channels) or 3 (three contrasts as colours).
    """

    def __init__(self, arch: str = "resnet18", *, spatial_dims: int = 2, in_channels: int = 1):
        if spatial_dims != 2:
            raise VoladConfigError("ImageNet teachers are 2D networks: train in slice mode (--spatial_dims 2), or pick teacher 'random', 'ssl' or 'medicalnet' in 3D")
        if in_channels not in (1, 3):
            raise VoladConfigError(f"an ImageNet teacher reads 1 contrast (grey) or 3 (as colours), not {in_channels}; pick --contrasts accordingly")
        super().__init__(arch, spatial_dims=2, in_channels=in_channels)
        self.register_buffer("rgb_mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("rgb_std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _backbone(arch: str, spatial_dims: int, in_channels: int) -> nn.Module:
        if arch not in IMAGENET_ARCHITECTURES:
            raise VoladConfigError(f"ImageNet teacher architecture must be one of {', '.join(IMAGENET_ARCHITECTURES)}, got {arch!r}")
        block, layers, _ = IMAGENET_ARCHITECTURES[arch]
        return ResNet(
            block=WideBottleneck if block == "wide" else block,
            layers=layers,
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=2,
            n_input_channels=3,
            conv1_t_size=7,
            conv1_t_stride=2,
            shortcut_type="B",
            bias_downsample=False,
            feed_forward=False,
        )

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """volad's inputs map the brain to about [0, 1], as pictures are: grey to RGB, then ImageNet's normalisation."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, *x.shape[2:])
        return (x - self.rgb_mean) / self.rgb_std


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
    kind: TeacherKind, *, arch: str = "resnet18", spatial_dims: int = 3, in_channels: int = 1, weights: str | Path | None = None
) -> ResNetTeacher:
    """Build a teacher of the given kind (untrained for ``ssl``, loaded for ``medicalnet`` and ``imagenet``).

    Inside :func:`weights_from_checkpoint` pretrained teachers are built without their
    weights (a checkpoint's follow).

    Raises:
        VoladConfigError: unknown kind, ``medicalnet`` without a weights path, ``imagenet`` in 3D.
        VoladDataError: the weights file is missing or does not fit.
    """
    if kind == "medicalnet":
        if not weights and not _SKIP_PRETRAINED:
            raise VoladConfigError(f"teacher 'medicalnet' needs teacher_weights, a local file path. {MEDICALNET_SOURCES}")
        teacher = ResNetTeacher(arch, spatial_dims=spatial_dims, in_channels=in_channels)
        if not _SKIP_PRETRAINED:
            load_teacher_weights(teacher, weights)
        return teacher
    if kind == "imagenet":
        imagenet = ImageNetTeacher(arch, spatial_dims=spatial_dims, in_channels=in_channels)
        if not _SKIP_PRETRAINED:
            load_imagenet_weights(imagenet, imagenet_weights_file(arch, weights), arch)
        return imagenet
    if kind in ("ssl", "random"):
        if weights:
            raise VoladConfigError(f"teacher {kind!r} takes no teacher_weights (got {weights!r}); use teacher 'medicalnet' to load a file")
        return ResNetTeacher(arch, spatial_dims=spatial_dims, in_channels=in_channels)
    raise VoladConfigError(f"teacher must be 'medicalnet', 'imagenet', 'ssl' or 'random', got {kind!r}")


class MaskedReconstruction(nn.Module):
    """Self-supervised teacher objective: rebuild the whole image from a block-masked copy.

    Random cubes (squares in 2D) of the input are zeroed, and a light decoder
    must rebuild every voxel from the teacher's three feature scales. Inside
    the cubes this is inpainting, which makes the features encode healthy
    anatomy from context; outside them it is plain reconstruction, which keeps
    the local intensity information that lesions change. The masked-image
    modelling family this follows (e.g. Xie et al., "SimMIM", CVPR 2022) needs
    no labels or augmentation pairs. A contrastive objective would instead
    teach invariance to intensity changes, the very changes a lesion makes.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels to rebuild.
        teacher_channels: Teacher channels at strides 4, 8, 16.
        width: Decoder channels.
        block: Side of the masked blocks, in voxels.
        mask_ratio: Fraction of blocks masked.
    """

    def __init__(self, spatial_dims: int, in_channels: int, teacher_channels: tuple[int, ...], width: int = 32, block: int = 8, mask_ratio: float = 0.3):
        super().__init__()
        self.spatial_dims, self.block, self.mask_ratio = spatial_dims, int(block), float(mask_ratio)
        self.build_head(spatial_dims, in_channels, teacher_channels, width)

    def build_head(self, spatial_dims: int, in_channels: int, teacher_channels: tuple[int, ...], width: int) -> None:
        """The light decoder from the teacher's three scales back to the image."""
        self.lateral = nn.ModuleList(Convolution(spatial_dims, c, width, kernel_size=1, conv_only=True) for c in teacher_channels)
        self.head = nn.Sequential(
            Convolution(spatial_dims, width, width, strides=2, kernel_size=2, is_transposed=True, padding=0, act="RELU", norm="BATCH"),
            Convolution(spatial_dims, width, width // 2, strides=2, kernel_size=2, is_transposed=True, padding=0, act="RELU", norm="BATCH"),
            Convolution(spatial_dims, width // 2, in_channels, kernel_size=3, conv_only=True),
        )

    def corrupt(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Zero a random ``mask_ratio`` of ``block``-sized blocks (``mask`` unused: kept for the shared signature)."""
        b, _, *spatial = x.shape
        grid = [max(1, -(-s // self.block)) for s in spatial]
        keep = (torch.rand((b, 1, *grid), device=x.device) >= self.mask_ratio).float()
        keep = F.interpolate(keep, size=tuple(spatial), mode="nearest")
        return x * keep

    def forward(self, features: list[torch.Tensor], size: tuple[int, ...]) -> torch.Tensor:
        """Reconstruction of size ``size`` from the teacher's features (finest first)."""
        mode = linear_mode(self.spatial_dims)
        top = None
        for lat, f in reversed(list(zip(self.lateral, features))):
            y = lat(f)
            top = y if top is None else y + F.interpolate(top, size=y.shape[2:], mode=mode, align_corners=False)
        out = self.head(top)
        return F.interpolate(out, size=size, mode=mode, align_corners=False) if tuple(out.shape[2:]) != tuple(size) else out


class DenoisingReconstruction(MaskedReconstruction):
    """Self-supervised teacher objective: rebuild the clean image from a copy with coarse noise inside the brain.

    The objective of ae3d, volad's strongest single method (the denoising
    autoencoder of Kascenas, O'Neil and Tsaftaris, MIDL 2022), asked of the
    teacher's features: to undo smooth intensity deviations, they must encode
    what healthy tissue looks like at each place, and a lesion is such a deviation.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels to rebuild.
        teacher_channels: Teacher channels at strides 4, 8, 16.
        width: Decoder channels.
        noise_std: σ of the coarse noise.
        noise_factor: Downsampling factor of the noise grid.
    """

    def __init__(self, spatial_dims: int, in_channels: int, teacher_channels: tuple[int, ...], width: int = 32, noise_std: float = 0.2, noise_factor: int = 8):
        nn.Module.__init__(self)
        self.spatial_dims, self.noise_std, self.noise_factor = spatial_dims, float(noise_std), int(noise_factor)
        self.build_head(spatial_dims, in_channels, teacher_channels, width)

    def corrupt(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` plus coarse Gaussian noise inside ``mask``."""
        noise = coarse_noise(x.shape, factor=self.noise_factor, std=self.noise_std, device=x.device)
        return x + (noise if mask is None else noise * mask)
