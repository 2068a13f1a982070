"""Pretrained teacher weights: fetching or finding the file, checking it, converting its keys, and building a teacher with them.

Weights arrive the way the ecosystem brings them:

* torchvision's ImageNet ResNets: a local file the user gives, else torchvision's
  published file in the torch hub cache (``<torch hub dir>/checkpoints``), downloaded
  there from ``download.pytorch.org`` on first use with ``torch.hub``'s own
  downloader. torchvision names each file after the first hex digits of its SHA-256
  (``resnet18-f37072fd.pth``); a download whose hash differs is never moved into
  the cache, and a cached file whose hash differs is removed, never loaded.
* MedicalNet's 3D ResNets (Chen, Ma, Zheng, "Med3D: Transfer Learning for 3D Medical
  Image Analysis", arXiv:1904.00625, 2019): a local file the user gives, else MONAI's
  own pretrained path (``monai.networks.nets.resnet.get_pretrained_resnet_medicalnet``,
  the Hugging Face hub cache, which checks what it downloads). Their keys are
  converted as MONAI's own loader (``monai.networks.nets.resnet._load_state_dict``) does.

Offline, a missing file is one error naming the file, where it comes from and where
to put it. A trained run's checkpoint holds its teacher's weights, so a run is
rebuilt with ``load_weights=False`` and never reads or fetches the file again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from volad.errors import VoladConfigError, VoladDataError
from volad.io import file_sha256
from volad.nn.teachers import IMAGENET_ARCHITECTURES, ImageNetTeacher, ResNetTeacher, TeacherKind

log = logging.getLogger("volad.nn.pretrained")

MEDICALNET_SOURCES = (
    "MedicalNet weights are published by Tencent (https://github.com/Tencent/MedicalNet, "
    "and on Hugging Face as TencentMedicalNet/MedicalNet-Resnet18 etc., files such as resnet_18_23dataset.pth); "
    "without teacher_weights MONAI downloads them into the Hugging Face hub cache when the machine is online; "
    "offline, download one on a machine with internet access and pass its local path as teacher_weights"
)


#: Where torchvision publishes its weight files.
TORCHVISION_URL = "https://download.pytorch.org/models/"


def published_hash_prefix(name: str) -> str:
    """The SHA-256 prefix a published file name carries (``resnet18-f37072fd.pth`` → ``f37072fd``), as ``torch.hub`` reads it."""
    found = torch.hub.HASH_REGEX.search(name)
    if not found or not found.group(1):
        raise VoladConfigError(f"{name!r} carries no SHA-256 prefix (expected <name>-<hex digits>.pth)")
    return found.group(1)


def verified(path: Path) -> Path:
    """``path`` if its SHA-256 starts with the prefix its published name carries; otherwise the file is removed and refused."""
    prefix = published_hash_prefix(path.name)
    digest = file_sha256(path)
    if not digest.startswith(prefix):
        path.unlink(missing_ok=True)
        raise VoladDataError(path, f"failed its SHA-256 check (its name says {prefix}…, the file hashes to {digest[:len(prefix)]}…): "
                                   "it was removed, never loaded; run again to download it anew")
    return path


def imagenet_weights_file(arch: str, weights: str | Path | None = None) -> Path:
    """The local file of ``arch``'s ImageNet weights.

    ``weights`` if given; else torchvision's file in the torch hub cache, checked
    against the hash prefix in its name; else torchvision's published file, fetched into that cache by ``torch.hub.download_url_to_file``,
    which keeps nothing whose hash differs.

    Raises:
        VoladDataError: the file is not there and cannot be fetched, or fails its hash; the message says where it comes from.
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
            return verified(cache / name)
    return _download(TORCHVISION_URL + names[0], cache / names[0], arch, names)


def _download(url: str, dest: Path, arch: str, names: tuple[str, ...]) -> Path:
    prefix = published_hash_prefix(dest.name)
    print(f"volad: downloading torchvision's ImageNet {arch} weights from {url} to {dest} (first use; later runs read the cache)", flush=True)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=prefix, progress=True)
    except RuntimeError as exc:  # torch.hub's hash refusal: the partial file is already deleted
        if "invalid hash value" not in str(exc):
            raise
        raise VoladDataError(dest, f"the download from {url} failed its SHA-256 check ({exc}); nothing was kept. {_imagenet_sources(arch, names)}") from None
    except OSError as exc:  # no network (URLError is an OSError), refused, or the cache is not writable
        raise VoladDataError(dest, f"no ImageNet weights for {arch} in the local torch hub cache, and downloading them failed ({exc}). "
                                   f"{_imagenet_sources(arch, names)}") from None
    return dest


def _imagenet_sources(arch: str, names: tuple[str, ...]) -> str:
    return (
        f"torchvision publishes them as {' or '.join(names)} ({TORCHVISION_URL}{names[0]}), and volad downloads that file into "
        f"the torch hub cache ({Path(torch.hub.get_dir()) / 'checkpoints'}) on first use when the machine is online; "
        "offline, fetch it on a machine with internet access and put it there, or pass its path as teacher_weights"
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


def fetch_medicalnet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """MedicalNet's weights for ``arch`` through MONAI's own pretrained path (the Hugging Face hub cache, downloaded on first use).

    Raises:
        VoladDataError: they are not cached and cannot be fetched (offline); the message names the file and where to put it.
    """
    from huggingface_hub import constants
    from monai.networks.nets import resnet

    depth = int(arch.removeprefix("resnet"))
    name = f"resnet_{depth}_23dataset.pth" if resnet.resnet_params[arch][-1] else f"resnet_{depth}.pth"
    repo = f"TencentMedicalNet/MedicalNet-Resnet{depth}"
    print(f"volad: MedicalNet {arch} weights from the Hugging Face hub cache ({constants.HF_HUB_CACHE}), downloaded from {repo} on first use", flush=True)
    try:
        state = resnet.get_pretrained_resnet_medicalnet(depth, device="cpu", datasets23=resnet.resnet_params[arch][-1])
    except Exception as exc:  # noqa: BLE001 - offline, refused, or not on the hub: one clear message
        raise VoladDataError(Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}",
                             f"MedicalNet weights {name} for {arch} are not cached and could not be fetched from https://huggingface.co/{repo} "
                             f"({type(exc).__name__}: {exc}). {MEDICALNET_SOURCES}") from None
    if not isinstance(state, dict) or not state:
        raise VoladDataError(Path(constants.HF_HUB_CACHE), f"MONAI's MedicalNet download for {arch} held no state dict")
    return {k.replace("module.", ""): v for k, v in state.items()}


def load_teacher_weights(teacher: ResNetTeacher, path: str | Path | None) -> None:
    """Load MedicalNet (or any ``ResNetFeatures``-compatible) weights into ``teacher``: from ``path``, or (``None``) MONAI's download.

    Keys the teacher lacks (MedicalNet's segmentation head, layer 4) are ignored.
    For several input contrasts the single-channel first convolution is repeated
    over channels and divided by their number, so a constant-across-contrasts
    input gives the pretrained response.

    Raises:
        VoladConfigError: MONAI's download asked for in slice mode.
        VoladDataError: the file is missing, unreadable, cannot be fetched, or does not fit the architecture.
    """
    slices = "MedicalNet weights are 3D and cannot serve slice mode; use teacher 'imagenet', 'ssl', 'random' or 'run' with --spatial_dims 2"
    if path is None:
        if teacher.backbone.conv1.weight.ndim == 4:
            raise VoladConfigError(slices)
        state = fetch_medicalnet_state_dict(teacher.arch)
        path = f"MedicalNet {teacher.arch} (MONAI's download)"
    else:
        state = _medicalnet_state_dict(path)
    own = teacher.backbone.state_dict()
    w = state.get("conv1.weight")
    if w is not None and w.ndim == own["conv1.weight"].ndim and w.shape[1] == 1 and own["conv1.weight"].shape[1] > 1:
        c = own["conv1.weight"].shape[1]
        state["conv1.weight"] = w.repeat(1, c, *([1] * (w.ndim - 2))) / c
    hint = slices if teacher.backbone.conv1.weight.ndim == 4 else "MedicalNet weights are 3D, single-channel ResNets; pick the matching teacher_arch"
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

    Without ``weights`` a pretrained teacher's file is fetched as its ecosystem
    fetches it (see the module docstring).

    Raises:
        VoladConfigError: unknown kind, ``imagenet`` in 3D, ``medicalnet`` in slice mode.
        VoladDataError: the weights file is missing and cannot be fetched, fails its hash, or does not fit.
    """
    if kind == "medicalnet":
        teacher = ResNetTeacher(arch, spatial_dims=spatial_dims, in_channels=in_channels)
        if load_weights:
            load_teacher_weights(teacher, weights or None)
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
    raise VoladConfigError(f"teacher must be 'medicalnet', 'imagenet', 'ssl', 'random' or 'run' (a trained run's encoder, with teacher_run), got {kind!r}")
