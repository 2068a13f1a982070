"""RD4AD-style reverse distillation, 2D (slice mode) or 3D.

Reference:
    Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class
    Embedding", CVPR 2022.

A frozen teacher encoder (:mod:`volad.nn.teachers`) gives features at
strides 4, 8 and 16 (2, 4 and 8 for the encoder of a trained volad run); the one-class bottleneck fuses them; the student decoder
rebuilds them (:mod:`volad.nn.distillation`). Training minimises, summed over
the three scales, the mean distance between teacher and student feature vectors,
taken inside the brain. The anomaly map is, per scale, that distance upsampled
to the input size, summed over scales, smoothed by a Gaussian and restricted to
the brain mask. There is no pseudo-healthy image.

Distance. ``distance="cosine"`` is the paper's ``1 − cos`` along channels.
``distance="l2"`` first standardises every teacher channel with its
mean and standard deviation over the brain positions of the healthy training
split (a one-pass ``"feature_stats"`` stage), then takes the mean squared
difference over channels, the distance of Bergmann et al., "Uninformed
Students: Student-Teacher Anomaly Detection with Discriminative Latent
Embeddings", CVPR 2020. Why: cosine similarity ignores feature magnitude, and
a bright, homogeneous lesion (most tumours and white-matter lesions on FLAIR)
gives features that point in nearly the same direction as healthy tissue, only
larger. Measured on the phantom with a self-supervised teacher (scale 1,
nearest healthy feature): lesion features sit at a median ``1 − cos`` of 0.018
against 0.013 for held-out healthy ones, but at a standardised L2 of 1.64
against 0.28 (healthy 95th percentile 0.65).

Denoising student (default; ``student_noise_std=0`` gives plain RD4AD): in
training, the bottleneck sees the teacher's features of the image plus coarse
Gaussian noise inside the brain, while the student's targets are the teacher's
features of the clean image. A plain student learns to pass whatever the
embedding carries, so it also rebuilds the smooth, bright blobs that most brain
lesions are, and misses them; asked to remove perturbations, it rebuilds
healthy features instead. The proxy task follows Tien et al., "Revisiting
Reverse Distillation for Anomaly Detection", CVPR 2023 (RD++, simplex noise);
the coarse noise is the one of the denoising autoencoder of Kascenas et al.
(MIDL 2022), which on brain MRI plays the same role.

Stages, in order: ``"teacher"`` (only with ``teacher="ssl"``) trains the
teacher on the healthy training split (``ssl_task``: masked reconstruction or denoising);
``"feature_stats"`` (only with ``distance="l2"``) fits the channel statistics of
the frozen teacher; ``"student"`` trains the bottleneck and student.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter
from torch import nn

from volad.errors import VoladConfigError
from volad.methods.base import AnomalyMethod, Batch
from volad.methods.losses import masked_l1
from volad.methods.registry import recorded_class
from volad.nn.distillation import FeatureStandardizer, OneClassBottleneck, ReverseStudent, cosine_distance, standardized_distance
from volad.nn.pretext import DenoisingReconstruction, MaskedReconstruction
from volad.nn.pretrained import build_teacher
from volad.nn.teachers import EncoderTeacher, TeacherKind
from volad.synthesis.noise import coarse_noise
from volad.types import AnomalyOutput, crop_spatial, linear_mode


def encoder_teacher(network: nn.Module | None, recorded: dict | None, *, in_channels: int) -> tuple[EncoderTeacher, dict]:
    """The ``"run"`` teacher: the encoder of a trained volad method, frozen.

    Args:
        network: The trained method (weights loaded), when the distillation is built to train.
        recorded: Its record (``hparams``), when a trained distillation is rebuilt from its own
            checkpoint (which holds the teacher's weights): the network is rebuilt from it untrained.
        in_channels: The distillation's input contrasts.

    Returns:
        The teacher and the method's record.

    Raises:
        VoladConfigError: neither given, or a network without an encoder a teacher can use.
    """
    if network is None:
        if recorded is None:
            raise VoladConfigError("teacher 'run' needs teacher_run, a trained run folder (e.g. --teacher_run runs/pii3d)")
        network = recorded_class(recorded, "teacher run").rebuild(recorded)
    record = dict(getattr(network, "hparams", None) or recorded or {})
    return EncoderTeacher(network, in_channels=in_channels), record


class ReverseDistillation(AnomalyMethod):
    """Reverse distillation from a one-class embedding.

    Args:
        spatial_dims: 2 (slice mode) or 3.
        in_channels: Input contrasts.
        teacher: ``"random"`` (frozen random init; default, it scored best on the
            phantom's validation split), ``"ssl"`` (self-supervised on the healthy
            training split), ``"medicalnet"`` (local MedicalNet weights) or
            ``"imagenet"`` (slice mode: torchvision's ImageNet ResNets from a local
            file or the torch hub cache, downloaded there on first use) or ``"run"``
            (the frozen encoder of a trained volad run, ``teacher_run``).
        teacher_arch: ResNet of the teacher (``resnet10/18/34/50``; ImageNet:
            ``resnet18/34/50`` or ``wide_resnet50_2``).
        teacher_weights: Local weights file for ``"medicalnet"`` (default: MONAI's download into the
            Hugging Face hub cache) or ``"imagenet"`` (default: torchvision's file in the torch hub cache).
        teacher_run: The run folder the ``"run"`` teacher came from (provenance; the bundle loads
            it as ``teacher_network``, :func:`volad.runs.record.trained_method`).
        teacher_method: The teacher network's record (``hparams``), filled in from ``teacher_network``
            and recorded, so a trained distillation rebuilds from its own checkpoint alone.
        distance: ``"auto"`` (default: ``"cosine"`` in slice mode, ``"l2"`` in 3D, each
            the better on the validation split of volad's benchmark; model card),
            ``"l2"`` (standardised features) or ``"cosine"`` (the
            paper's); see the module notes.
        student_blocks: Residual blocks per student stage.
        bottleneck_blocks: Residual blocks in the one-class bottleneck.
        bottleneck_stride: 1 keeps the embedding at stride 16 (default); 2 puts
            it at stride 32, as the paper.
        smoothing_sigma: σ of the Gaussian applied to the map, in voxels of the
            grid the teacher sees. The paper's σ = 4 px is one cell of the finest
            (stride-4) features; tying it to voxels keeps that relation at any
            voxel size (8 mm on a 2 mm grid) and zoom (σ / ``feature_zoom`` input
            voxels). 0 disables smoothing.
        feature_zoom: The teacher sees the input enlarged by this factor (1, 2 or 4;
            linear interpolation), so its stride-4/8/16 features fall on cells
            ``feature_zoom`` times finer in millimetres: the finer feature scale small
            lesions need (at 2 mm the finest cell of 1 is 8 mm). Costs about
            ``feature_zoom ** spatial_dims`` times the compute. Maps come back at the input's size.
        student_noise_std: σ of the coarse noise added to the image whose
            embedding the student decodes in training, while its targets stay the
            teacher's features of the clean image (0: plain RD4AD). See the module notes.
        student_noise_factor: Downsampling factor of that noise grid.
        ssl_task: The ``ssl`` teacher's objective: ``"masked"`` (rebuild block-masked
            images, :class:`~volad.nn.pretext.MaskedReconstruction`) or
            ``"denoising"`` (remove coarse noise inside the brain, ae3d's objective,
            :class:`~volad.nn.pretext.DenoisingReconstruction`; its noise is the
            student's ``student_noise_std``/``student_noise_factor``, 0.2 when that is 0).
        ssl_block: Side (voxels) of the blocks masked by the ``ssl`` objective.
        ssl_mask_ratio: Fraction of blocks masked by the ``ssl`` objective.
        lr: Adam learning rate of the student stage (the paper: 0.005, betas (0.5, 0.999)).
        ssl_lr: Adam learning rate of the ``ssl`` teacher stage.
        load_teacher: Read a pretrained teacher's weights file (``False`` when a run is rebuilt from its
            checkpoint, which holds the teacher's weights; not recorded in ``hparams``).
        teacher_network: The trained volad method (pii3d, ae3d, vae3d; weights loaded, same contrasts)
            whose encoder is the ``"run"`` teacher; not recorded in ``hparams``.
    """

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        teacher: TeacherKind = "random",
        teacher_arch: str = "resnet18",
        teacher_weights: str | None = None,
        teacher_run: str | None = None,
        teacher_method: dict | None = None,
        distance: Literal["auto", "l2", "cosine"] = "auto",
        student_blocks: int = 1,
        bottleneck_blocks: int = 1,
        bottleneck_stride: int = 1,
        smoothing_sigma: float = 4.0,
        feature_zoom: int = 1,
        student_noise_std: float = 0.2,
        student_noise_factor: int = 8,
        ssl_task: Literal["masked", "denoising"] = "masked",
        ssl_block: int = 8,
        ssl_mask_ratio: float = 0.3,
        lr: float = 0.005,
        ssl_lr: float = 1e-3,
        load_teacher: bool = True,
        teacher_network: nn.Module | None = None,
    ):
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels, lr=lr)
        if teacher == "run":
            self.teacher, self.teacher_method = encoder_teacher(teacher_network, teacher_method, in_channels=in_channels)
        else:
            if teacher_run or teacher_method or teacher_network is not None:
                raise VoladConfigError(f"teacher {teacher!r} takes no teacher_run; set teacher 'run' to distil from a trained run's encoder")
            self.teacher_method = None
            self.teacher = build_teacher(teacher, arch=teacher_arch, spatial_dims=spatial_dims, in_channels=in_channels, weights=teacher_weights,
                                         load_weights=load_teacher)
        channels = self.teacher.channels
        embed = 2 * channels[-1]
        if bottleneck_stride not in (1, 2):
            raise VoladConfigError(f"bottleneck_stride must be 1 or 2, got {bottleneck_stride}")
        self.bottleneck = OneClassBottleneck(spatial_dims, channels, embed, num_blocks=bottleneck_blocks, stride=bottleneck_stride)
        self.student = ReverseStudent(spatial_dims, embed, channels, num_blocks=student_blocks, embedding_stride=bottleneck_stride)
        if distance not in ("auto", "l2", "cosine"):
            raise VoladConfigError(f"distance must be 'auto', 'l2' or 'cosine', got {distance!r}")
        if distance == "auto":
            distance = "cosine" if spatial_dims == 2 else "l2"
        self.distance = distance
        if distance == "l2":
            self.standardizers = nn.ModuleList(FeatureStandardizer(c) for c in channels)
        self.stages = ("teacher",) * (teacher == "ssl") + ("feature_stats",) * (distance == "l2") + ("student",)
        if ssl_task not in ("masked", "denoising"):
            raise VoladConfigError(f"ssl_task must be 'masked' or 'denoising', got {ssl_task!r}")
        if teacher == "ssl" and ssl_task == "masked":
            self.pretext = MaskedReconstruction(spatial_dims, in_channels, channels, block=ssl_block, mask_ratio=ssl_mask_ratio)
        elif teacher == "ssl":
            self.pretext = DenoisingReconstruction(spatial_dims, in_channels, channels, noise_std=student_noise_std or 0.2, noise_factor=student_noise_factor)
        if smoothing_sigma < 0:
            raise VoladConfigError(f"smoothing_sigma must be >= 0, got {smoothing_sigma}")
        self.smoothing_sigma = float(smoothing_sigma)
        if feature_zoom not in (1, 2, 4):
            raise VoladConfigError(f"feature_zoom must be 1, 2 or 4, got {feature_zoom}")
        self.feature_zoom = int(feature_zoom)
        self.ssl_lr = float(ssl_lr)
        self.student_noise_std, self.student_noise_factor = float(student_noise_std), int(student_noise_factor)
        self._teacher_frozen = True
        self._freeze_teacher(teacher != "ssl")

    #: The weights file's and teacher run's paths are provenance, not architecture: a run moved to another machine still loads.
    provenance_hparams = ("teacher_weights", "teacher_run")
    build_arguments = ("load_teacher", "teacher_network")
    volume_score_mode = "max"  # the paper's image score: the map's maximum

    @classmethod
    def rebuild(cls, hparams: dict) -> "ReverseDistillation":
        """As recorded, except that a pretrained teacher (MedicalNet, ImageNet) is not read from its file again:
        the checkpoint holds its weights."""
        return super().rebuild({**hparams, "load_teacher": False})

    def resolved_hparams(self) -> dict:
        return {"teacher_method": self.teacher_method} if self.teacher_method is not None else {}

    @property
    def training_patch_size(self) -> int | None:
        """48³ patches in 3D; whole slices in slice mode, where the teacher's receptive field needs the slice's
        context (48² patches scored worse than chance on an independent set, whole slices AUROC 0.87; model card)."""
        return 48 if self.spatial_dims == 3 else None

    @property
    def size_divisor(self) -> int:
        return max(self.teacher.stride // self.feature_zoom, 1)

    def zoom(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's view of ``x``: enlarged ``feature_zoom`` times."""
        if self.feature_zoom == 1:
            return x
        return F.interpolate(x, scale_factor=self.feature_zoom, mode=linear_mode(self.spatial_dims), align_corners=False)

    # -- teacher state -------------------------------------------------------------
    def _freeze_teacher(self, frozen: bool) -> None:
        self._teacher_frozen = frozen
        for p in self.teacher.parameters():
            p.requires_grad_(not frozen)
        self.teacher.train(self.training and not frozen)

    def train(self, mode: bool = True) -> "ReverseDistillation":
        """As ``nn.Module.train``, but a frozen teacher stays in eval mode (fixed batch-norm statistics)."""
        super().train(mode)
        if self._teacher_frozen:
            self.teacher.eval()
        return self

    def configure_optimizers(self, stage: str) -> dict[str, torch.optim.Optimizer]:
        if stage == "teacher":
            self._freeze_teacher(False)
            params = list(self.teacher.parameters()) + list(self.pretext.parameters())
            return {"main": torch.optim.Adam(params, lr=self.ssl_lr)}
        if stage == "feature_stats":
            self._freeze_teacher(True)
            return {}
        if stage == "student":
            self._freeze_teacher(True)
            params = list(self.bottleneck.parameters()) + list(self.student.parameters())
            return {"main": torch.optim.Adam(params, lr=self.lr, betas=(0.5, 0.999))}
        raise VoladConfigError(f"{type(self).__name__} has no stage {stage!r} (stages: {self.stages})")

    # -- training ------------------------------------------------------------------
    def teacher_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Teacher features (finest first), standardised with ``distance="l2"``; no gradient once frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._teacher_frozen):
            feats = self.teacher(self.zoom(x))
        if self.distance == "l2":
            feats = [z(f) for z, f in zip(self.standardizers, feats)]
        return [f.detach() for f in feats] if self._teacher_frozen else feats

    def _distance(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        return standardized_distance(teacher, student) if self.distance == "l2" else cosine_distance(teacher, student)

    def distances(self, x: torch.Tensor, *, noise: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-scale distance maps, finest first.

        Args:
            x: Input batch.
            noise: If given, the bottleneck sees the features of ``x + noise``
                while the targets stay those of ``x`` (the denoising student).
        """
        targets = self.teacher_features(x)
        seen = targets if noise is None else self.teacher_features(x + noise)
        rebuilt = self.student(self.bottleneck(seen), [f.shape[2:] for f in targets])
        return [self._distance(t, s) for t, s in zip(targets, rebuilt)]

    @staticmethod
    def _cells(mask: torch.Tensor, size) -> torch.Tensor:
        """Feature positions whose cell holds any brain (0/1)."""
        return (F.adaptive_max_pool3d if mask.ndim == 5 else F.adaptive_max_pool2d)(mask, tuple(size))

    def optimization_step(self, batch: Batch, stage: str, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        if stage != "feature_stats":
            return super().optimization_step(batch, stage, optimizers)
        with torch.no_grad():
            feats = self.teacher(self.zoom(batch.image))
            cells = [self._cells(batch.mask, f.shape[2:]) for f in feats]
            for z, f, c in zip(self.standardizers, feats, cells):
                z.update(f, c)
        return {"positions": float(cells[0].sum())}

    def training_step(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        if stage == "teacher":
            corrupted = self.pretext.corrupt(batch.image, batch.mask)
            recon = self.pretext(self.teacher(self.zoom(corrupted)), tuple(batch.image.shape[2:]))
            loss = masked_l1(recon, batch.image, batch.mask)
            return {"loss": loss, "l1": loss.detach()}
        noise = None
        if self.student_noise_std > 0:
            noise = coarse_noise(batch.image.shape, factor=self.student_noise_factor, std=self.student_noise_std, device=batch.image.device)
            noise = noise * batch.mask
        losses = {}
        for i, d in enumerate(self.distances(batch.image, noise=noise), start=1):
            weight = self._cells(batch.mask, d.shape[2:])  # a position outside the brain teaches nothing useful
            losses[f"scale{i}"] = (d * weight).sum() / weight.sum().clamp_min(1.0)
        loss = sum(losses.values())
        return {"loss": loss, **{k: v.detach() for k, v in losses.items()}}

    # -- inference -----------------------------------------------------------------
    def raw_map(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over scales of the upsampled distance maps, before smoothing."""
        dists = self.distances(x)
        mode = linear_mode(self.spatial_dims)
        return sum(F.interpolate(d, size=tuple(x.shape[2:]), mode=mode, align_corners=False) for d in dists)

    def smooth(self, amap: torch.Tensor) -> torch.Tensor:
        """Gaussian smoothing with replicated borders (MONAI's filter alone pads with zeros and darkens edges)."""
        if self.smoothing_sigma <= 0:
            return amap
        sigma = self.smoothing_sigma / self.feature_zoom
        radius = int(math.ceil(3.0 * sigma))
        pads = [min(radius, s - 1) for s in amap.shape[2:]]
        padded = F.pad(amap, [p for p in reversed(pads) for _ in (0, 1)], mode="replicate")
        out = GaussianFilter(self.spatial_dims, sigma=sigma, truncated=3.0).to(amap.device)(padded)
        return crop_spatial(out, amap.shape[2:], start=pads)

    def predict(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> AnomalyOutput:
        amap = self.smooth(self.raw_map(x))
        if mask is not None:
            amap = amap * mask
        return AnomalyOutput(amap, None)
