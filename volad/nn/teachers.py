"""Teacher encoders for reverse distillation: MONAI ResNet backbones (torchvision's layout for ImageNet's).

Where their weights come from is :mod:`volad.nn.pretrained`; the self-supervised
objectives of the ``"ssl"`` teacher are :mod:`volad.nn.pretext`. The kinds:

* ``"medicalnet"``: MedicalNet ResNet weights (Chen, Ma, Zheng, "Med3D:
  Transfer Learning for 3D Medical Image Analysis", arXiv:1904.00625, 2019),
  read from a local file the user gives, else fetched through MONAI's own
  pretrained path (the Hugging Face hub cache). The keys are converted as MONAI's own
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
  torch hub cache, where ``torchvision`` puts them; a missing file is downloaded
  there from torchvision's site on first use and checked against the SHA-256
  prefix in its name (:mod:`volad.nn.pretrained`). The grey image is repeated over the three colour channels and
  normalised with ImageNet's statistics, as the networks were trained.

* ``"run"``: the frozen encoder of a network volad trained (:class:`EncoderTeacher`):
  for example pii3d's U-Net, trained to find where tissue was made abnormal, or
  ae3d's. It knows brains at the data's own resolution and contrasts.

The ResNets are MONAI ResNet backbones (torchvision's layout and key names for
``"imagenet"``); only layers 1–3 (strides 4, 8, 16) are run. An encoder teacher
gives its first three downsampling stages (strides 2, 4, 8).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import ResNet, ResNetFeatures, UNet
from monai.networks.nets.resnet import ResNetBottleneck
from torch import nn

from volad.errors import VoladConfigError
from volad.nn.autoencoder import ConvEncoder

TeacherKind = Literal["medicalnet", "ssl", "random", "imagenet", "run"]

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


class ResNetTeacher(nn.Module):
    """Multi-scale ResNet encoder returning layer 1–3 features (strides 4, 8, 16).

    Attributes:
        channels: Channels of the three feature maps.
        stride: Stride of the coarsest one (the input's size must be a multiple of it).

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
        self.arch = arch
        self.backbone = self._backbone(arch, spatial_dims, in_channels)
        self.backbone.layer4 = nn.Identity()  # never used; keeps the teacher small
        _trace_safe_shortcuts(self.backbone)
        self.input_mean, self.input_std = float(input_mean), float(input_std)
        self.channels = tuple(_out_channels(getattr(self.backbone, f"layer{i}")) for i in (1, 2, 3))
        self.stride = 16

    @staticmethod
    def _backbone(arch: str, spatial_dims: int, in_channels: int) -> nn.Module:
        if arch not in ARCHITECTURES:
            raise VoladConfigError(f"teacher architecture must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
        return ResNetFeatures(arch, pretrained=False, spatial_dims=spatial_dims, in_channels=in_channels)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the backbone expects it (see ``TEACHER_INPUT_MEAN``)."""
        return (x - self.input_mean) / self.input_std

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = self.backbone
        x = self.prepare(x)
        x = b.act(b.bn1(b.conv1(x)))
        if not b.no_max_pool:
            x = b.maxpool(x)
        f1 = b.layer1(x)
        f2 = b.layer2(f1)
        return [f1, f2, b.layer3(f2)]


def _out_channels(layer: nn.Module) -> int:
    convs = [m for m in layer.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    return convs[-1].out_channels


def encoder_stages(network: nn.Module) -> list[nn.Module]:
    """The downsampling stages of a trained volad network's encoder, in order.

    A MONAI :class:`~monai.networks.nets.UNet` (pii3d, ae3d with skip connections)
    nests each level as ``Sequential(down, SkipConnection(next level), up)``: its
    ``down`` blocks are the stages. A :class:`volad.nn.autoencoder.ConvEncoder`
    (ae3d, vae3d without skips) lists them as ``stages``.

    Raises:
        VoladConfigError: the network holds neither.
    """
    unet = next((m for m in network.modules() if isinstance(m, UNet)), None)
    if unet is not None:
        stages, level = [], unet.model
        while isinstance(level, nn.Sequential) and len(level) == 3 and isinstance(level[1], SkipConnection):
            stages.append(level[0])
            level = level[1].submodule
        return stages
    encoder = next((m for m in network.modules() if isinstance(m, ConvEncoder)), None)
    if encoder is not None:
        return list(encoder.stages)
    raise VoladConfigError(f"{type(network).__name__} has no U-Net or convolutional encoder to serve as a teacher (pii3d, ae3d and vae3d runs do)")


class EncoderTeacher(nn.Module):
    """The first three downsampling stages of a trained volad network's encoder, frozen, as a reverse-distillation teacher.

    The features come at strides 2, 4 and 8 (the ResNets': 4, 8, 16), so the
    finest cell is half as large: at 2 mm, 4 mm. The input is volad's own (the
    network was trained on it), so no normalisation is applied.

    Args:
        network: The trained method (or its network), weights loaded; its modules are shared, not copied.
        in_channels: Contrasts the distillation reads; must be those the network was trained on.
    """

    def __init__(self, network: nn.Module, *, in_channels: int):
        super().__init__()
        stages = encoder_stages(network)
        if len(stages) < 3:
            raise VoladConfigError(f"{type(network).__name__}'s encoder has {len(stages)} downsampling stages; a teacher needs 3")
        first = next(m for m in stages[0].modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
        if first.in_channels != in_channels:
            raise VoladConfigError(f"the teacher run's network reads {first.in_channels} input channel(s), the distillation {in_channels}: "
                                   "train the teacher run on the same contrasts, without anatomy inputs")
        self.stages = nn.ModuleList(stages[:3])
        self.channels = tuple(_out_channels(s) for s in self.stages)
        self.stride = 8

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


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
