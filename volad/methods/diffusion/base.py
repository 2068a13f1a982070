"""What the diffusion methods share: a MONAI ``DiffusionModelUNet`` that predicts x0 or ε, and a schedule."""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from volad.errors import VoladConfigError
from volad.methods.base import AnomalyMethod
from volad.methods.diffusion.schedules import NoiseSchedule
from volad.synthesis.noise import simplex_noise
from volad.types import crop_spatial, pad_to_multiple

NOISE_KINDS = ("simplex", "gaussian")


def noise_levels(t_test: int | Sequence[int], num_train_timesteps: int) -> list[int]:
    """``t_test`` as a list of levels (one, or a noise-level ensemble), each checked to lie in [0, T)."""
    levels = [int(t) for t in (t_test if isinstance(t_test, (list, tuple)) else [t_test])]
    if not levels or not all(0 <= t < num_train_timesteps for t in levels):
        raise VoladConfigError(f"t_test must be one or more timesteps in [0, {num_train_timesteps}), got {t_test!r}")
    return levels


def check_noise_kind(kind: str) -> str:
    """``kind`` if it is one of :data:`NOISE_KINDS`."""
    if kind not in NOISE_KINDS:
        raise VoladConfigError(f"noise must be simplex or gaussian, got {kind!r}")
    return kind


def draw_noise(kind: str, shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """ε of ``shape``: multi-octave simplex noise (the pDDPM/cDDPM authors') or white Gaussian noise."""
    if kind == "simplex":
        return simplex_noise(shape, generator=generator, device=device)
    return torch.randn(tuple(shape), generator=generator).to(device)


class DiffusionMethod(AnomalyMethod):
    """Base of pDDPM, cDDPM and Synomaly: ``denoise(x_t, t)`` predicts the clean image in one pass.

    The network predicts either the clean image itself (``prediction="sample"``, as
    pDDPM's and Synomaly's code do) or the noise ε (``"epsilon"``, as DDPM does; Ho et
    al. 2020), from which :meth:`denoise` recovers x0 = (x_t − √(1 − α̅_t)·ε̂) / √α̅_t.
    Training losses compare like with like: the clean image for ``sample``, the drawn
    noise for ``epsilon`` (:meth:`target`).

    Args:
        spatial_dims: 2 (slice mode) or 3.
        in_channels: Input contrasts.
        channels: Channels per U-Net level (no attention, so any input size works).
        num_res_blocks: Residual blocks per level.
        num_train_timesteps: T of the schedule.
        beta_schedule: ``linear`` or ``cosine``.
        prediction: ``sample`` (x0) or ``epsilon`` (ε); what the network outputs.
        lr: Adam learning rate.
        seed: Seeds the noise drawn at inference, so maps are reproducible.
        condition_dim: Length of a conditioning vector the network also takes (``None``:
            none). It is projected linearly and added to the time embedding, as cDDPM adds
            its encoder's latent (:class:`~volad.methods.diffusion.cddpm.ConditionedDiffusion`).
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int] = (8, 16, 32),
        num_res_blocks: int = 1,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        prediction: str = "sample",
        lr: float = 1e-4,
        seed: int = 0,
        condition_dim: int | None = None,
    ):
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels, lr=lr)
        if prediction not in ("sample", "epsilon"):
            raise VoladConfigError(f"prediction must be sample or epsilon, got {prediction!r}")
        self.prediction = prediction
        channels = [int(c) for c in channels]
        self.net = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=in_channels,
            channels=channels,
            attention_levels=[False] * len(channels),
            num_res_blocks=num_res_blocks,
            norm_num_groups=min(8, channels[0]),
            num_class_embeds=1 if condition_dim else None,
        )
        if condition_dim:  # MONAI embeds class indices; a latent vector needs a linear map to the time embedding
            self.net.class_embedding = nn.Linear(int(condition_dim), self.net.time_embed[-1].out_features)
        self.schedule = NoiseSchedule(num_train_timesteps, beta_schedule)  # type: ignore[arg-type]
        self.divisor = 2 ** (len(channels) - 1)
        self.seed = int(seed)

    @staticmethod
    def timesteps_like(t: int, n: int, device) -> torch.Tensor:
        """``(n,)`` long tensor filled with timestep ``t``."""
        return torch.full((n,), int(t), device=device, dtype=torch.long)

    def network(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """One network pass on ``x_t`` at timesteps ``t`` ``(B,)``: x0 or ε, as ``prediction`` says.
        ``condition``: ``(B, condition_dim)``, for a network built with ``condition_dim``."""
        padded, size = pad_to_multiple(x_t, self.divisor)
        return crop_spatial(self.net(padded, t.to(x_t.device).long(), class_labels=condition), size)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """One network pass: the clean image predicted from ``x_t`` at timesteps ``t`` ``(B,)``."""
        out = self.network(x_t, t, condition)
        if self.prediction == "sample":
            return out
        a = self.schedule.alpha_bar(t.to(x_t.device)).reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        return (x_t - (1 - a).sqrt() * out) / a.sqrt()

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output for a clean ``x0`` noised with ``noise``."""
        return x0 if self.prediction == "sample" else noise

    def denoise_windowed(self, x_t: torch.Tensor, t: int, window: int = 0) -> tuple[torch.Tensor, int]:
        """:meth:`denoise` at one timestep over a sliding window of edge ``window`` (0: in one pass).

        On CPU, MONAI's 3D diffusion U-Net is several times faster per voxel on
        48³ windows than on a whole 2 mm volume. Returns (prediction, network calls).
        """
        if not window or all(s <= window for s in x_t.shape[2:]):
            return self.denoise(x_t, self.timesteps_like(t, x_t.shape[0], x_t.device)), 1
        from monai.inferers import sliding_window_inference

        calls = [0]

        def net(w: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            return self.denoise(w, self.timesteps_like(t, w.shape[0], w.device))

        size = [min(window, s) for s in x_t.shape[2:]]
        out = sliding_window_inference(x_t, size, sw_batch_size=4, predictor=net, overlap=0.25, mode="gaussian")
        return out, calls[0]

    #: Sliding-window edge of :meth:`restore` (methods with a ``window`` setting keep theirs).
    window: int = 48

    def restore(self, x_t: torch.Tensor, x: torch.Tensor, t: int) -> tuple[torch.Tensor, int]:
        """x0 from the whole ``x_t`` at level ``t`` over windows of edge ``window``; ``x`` is the clean input
        (read by conditioned methods only). Returns (restoration, network passes); DDIM chains use it too."""
        return self.denoise_windowed(x_t, t, self.window)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def _timesteps(self, batch: int, low: int, high: int, device) -> torch.Tensor:
        return torch.randint(low, high, (batch,), device=device)
