"""Multi-stage diffusion with Synomaly noise, 2D or 3D.

Reference:
    Bi, Huang, Stolt-Ansó, et al. "Synomaly noise and multi-stage diffusion: a novel
    approach for unsupervised anomaly detection in medical images." arXiv 2411.04004, 2024.

Training: healthy inputs get Synomaly noise (Gaussian plus lesion-like blobs,
:func:`volad.synthesis.noise.synomaly_noise`) at a random t, and the network
learns to predict the clean input in one pass (L1 inside the brain).

Testing, in stages, starting from the input x:

1. noise the current image to ``t_test`` (Gaussian ε, seeded) and denoise it in one pass;
2. mask = voxels whose residual |x − x̂| exceeds its brain mean + ``mask_k`` standard deviations;
3. the next image is x̂ inside the mask and the original x outside it;
4. stop when the mask changes by less than ``stop_change`` (1 %) of the brain, or
   after ``max_stages`` (5, as in the authors' code).

The map is the final residual |x − x̂|. Large volumes are denoised with a sliding
window (``window``), which on CPU is several times faster than one whole-volume
pass of the same network.
"""

from __future__ import annotations

from typing import Sequence

import torch

from volad.methods.base import Batch
from volad.methods.diffusion.base import DiffusionMethod
from volad.methods.losses import masked_l1
from volad.synthesis.noise import synomaly_noise
from volad.types import AnomalyOutput


def stop_now(previous: torch.Tensor, current: torch.Tensor, brain: torch.Tensor, tolerance: float) -> bool:
    """The multi-stage stop rule: the residual mask changed in less than ``tolerance`` of the brain."""
    changed = (previous != current) & (brain > 0)
    return bool(changed.sum() <= tolerance * brain.sum().clamp_min(1))


class MultiStageDiffusion(DiffusionMethod):
    """Synomaly multi-stage diffusion: restore, mask the residual, blend, repeat.

    Args:
        spatial_dims: 2 (slice mode) or 3.
        in_channels: Input contrasts.
        t_train_max: Training timesteps are drawn from [1, t_train_max).
        t_test: Noise level of each test stage.
        max_stages: Upper bound on stages.
        stop_change: Stop when the mask changes in less than this fraction of the brain.
        mask_k: Residual threshold in brain standard deviations above the brain mean.
        blob_sigma: Synomaly blob scale (voxels).
        window: Sliding-window edge for test-time passes (0: whole input at once).
        channels, num_res_blocks, num_train_timesteps, beta_schedule, prediction, lr, seed:
            see :class:`~volad.methods.diffusion.base.DiffusionMethod`.

    ``t_test``, ``max_stages``, ``stop_change`` and ``mask_k`` only change
    inference: a trained checkpoint loads with any value of them.
    """

    inference_hparams = ("t_test", "max_stages", "stop_change", "mask_k", "window")
    stat_names = ("passes", "stages")

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        t_train_max: int = 600,
        t_test: int = 300,
        max_stages: int = 5,
        stop_change: float = 0.01,
        mask_k: float = 2.0,
        blob_sigma: float = 3.0,
        window: int = 48,
        channels: Sequence[int] = (8, 16, 32),
        num_res_blocks: int = 1,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "cosine",
        prediction: str = "sample",
        lr: float = 1e-4,
        seed: int = 0,
    ):
        super().__init__(
            spatial_dims=spatial_dims, in_channels=in_channels, channels=channels, num_res_blocks=num_res_blocks,
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction=prediction, lr=lr, seed=seed,
        )
        self.t_train_max, self.t_test = int(t_train_max), int(t_test)
        self.max_stages, self.stop_change, self.mask_k = int(max_stages), float(stop_change), float(mask_k)
        self.blob_sigma, self.window = float(blob_sigma), int(window)

    def training_step(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        x, mask = batch.image, batch.mask
        t = self._timesteps(x.shape[0], 1, self.t_train_max, x.device)
        eps = synomaly_noise(x.shape, blob_sigma=self.blob_sigma, device=x.device)
        out = self.network(self.schedule.add_noise(x, eps, t) * mask, t)
        return {"loss": masked_l1(out, self.target(x, eps), mask)}

    @torch.no_grad()
    def predict(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> AnomalyOutput:
        mask = torch.ones_like(x[:, :1]) if mask is None else mask
        gen = self._generator()
        current = x
        previous = torch.zeros_like(mask, dtype=torch.bool)
        passes, stages = 0, 0
        recon = x
        for _ in range(self.max_stages):
            eps = torch.randn(x.shape, generator=gen).to(x.device)
            x_t = self.schedule.add_noise(current, eps, self.timesteps_like(self.t_test, x.shape[0], x.device)) * mask
            recon, n = self.restore(x_t, x, self.t_test)
            recon = recon * mask
            passes += n
            stages += 1
            residual = (x - recon).abs().mean(dim=1, keepdim=True)
            inside = residual[mask > 0]
            cut = inside.mean() + self.mask_k * inside.std() if inside.numel() > 1 else residual.max()
            anomalous = (residual > cut) & (mask > 0)
            current = torch.where(anomalous, recon, x)
            if stop_now(previous, anomalous, mask, self.stop_change):
                break
            previous = anomalous
        self.record(passes=passes, stages=stages)
        amap = (x - recon).abs().mean(dim=1, keepdim=True) * mask
        return AnomalyOutput(anomaly_map=amap, reconstruction=recon)
