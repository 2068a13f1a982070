"""Patched diffusion (pDDPM) for 2D slices and 3D volumes.

Reference:
    Behrendt, Bhattacharya, Krüger, Opfer, Schlaefer. "Patched diffusion models for
    unsupervised anomaly detection in brain MRI." MIDL 2024.

Training: in each context window (a training patch), one block is noised to a
random t (simplex or Gaussian ε) while the rest stays clean, and the network
predicts the clean window in one pass; the L1 loss covers the noised block inside
the brain. Testing: every block position of the brain's bounding box is noised in
turn at ``t_test`` (500 of T = 1000 in the authors' code) inside its context
window, denoised in one pass, and the denoised blocks are stitched into a
pseudo-healthy image. With several ``t_test`` values (a noise-level ensemble),
the pseudo-healthy images made at each level, each with its own noise, are
averaged before the residual, the rule of the cDDPM code (Behrendt et al.,
"Guided reconstruction with conditioned diffusion models for unsupervised
anomaly detection in brain MRIs", Computers in Biology and Medicine 2025; their
``noise_ensemble`` averages reconstructions at t = 250, 500, 750). With ``block_stride == block_size`` (the default, as in
the paper) each voxel is covered exactly once; with a smaller stride
overlapping predictions are averaged with equal weights. The map is the L1
residual. In 3D, blocks and windows are cubes.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F

from volad.methods.base import Batch
from volad.methods.diffusion.base import DiffusionMethod, check_noise_kind, draw_noise, noise_levels
from volad.methods.losses import masked_l1
from volad.types import AnomalyOutput


def block_grid(lo: Sequence[int], hi: Sequence[int], block: int, stride: int, shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Block corners tiling the box ``[lo, hi)`` (clipped to ``shape``) with ``stride``; the last block ends at the box edge."""
    axes = []
    for a, b, n in zip(lo, hi, shape):
        a, b = max(0, a), min(n, b)
        size = min(block, n)
        starts = list(range(a, max(b - size, a) + 1, stride))
        last = min(max(b - size, 0), n - size)
        if not starts or starts[-1] < last:
            starts.append(last)
        axes.append(sorted(set(min(s, n - size) for s in starts)))
    return list(itertools.product(*axes))


#: (block, context window) edges when not given: the authors' 48-pixel patches in 96×96 slices in 2D, half that in 3D.
GEOMETRY = {2: (48, 96), 3: (24, 48)}


class PatchedDiffusion(DiffusionMethod):
    """pDDPM: one-step x0 prediction of noised blocks in clean context.

    ``block_stride``, ``context_size``, ``t_test`` and ``inference_batch`` only
    change inference: a trained checkpoint loads with any value of them.

    Args:
        spatial_dims: 2 (slice mode) or 3.
        in_channels: Input contrasts.
        block_size: Edge of the noised block (voxels; ``None``: :data:`GEOMETRY`).
        block_stride: Stride of test-time blocks (``block_size``: no overlap).
        context_size: Edge of the window the network sees around a block at test
            time (``None``: :data:`GEOMETRY`). Training windows are the training
            patches, and a run that names no ``patch_size`` trains on windows of this edge.
        t_test: Noise level at test time, or a list of levels whose reconstructions
            are averaged (a noise-level ensemble; one pass per level and window).
        noise: ``simplex`` (as in the paper's code) or ``gaussian``.
        inference_batch: Windows per network pass at test time.
        ddim_steps: 0 (the paper's rule): each block is restored in one pass at ``t_test``.
            n > 0: each noised block runs a deterministic DDIM chain (Song et al., "Denoising
            diffusion implicit models", ICLR 2021) of n steps from ``t_test`` down to 0 in its
            clean context, n passes per window; ``t_test`` = T − 1 with 50 steps is the "full
            chain" that the one-step rule is measured against (model card).
        channels, num_res_blocks, num_train_timesteps, beta_schedule, prediction, lr, seed:
            see :class:`~volad.methods.diffusion.base.DiffusionMethod`.
    """

    inference_hparams = ("block_stride", "context_size", "t_test", "inference_batch", "ddim_steps")
    stat_names = ("passes", "windows", "coverage")

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        block_size: int | None = None,
        block_stride: int | None = None,
        context_size: int | None = None,
        t_test: int | Sequence[int] = 500,
        noise: str = "simplex",
        inference_batch: int = 8,
        ddim_steps: int = 0,
        channels: Sequence[int] = (8, 16, 32),
        num_res_blocks: int = 1,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        prediction: str = "sample",
        lr: float = 1e-4,
        seed: int = 0,
    ):
        super().__init__(
            spatial_dims=spatial_dims, in_channels=in_channels, channels=channels, num_res_blocks=num_res_blocks,
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction=prediction, lr=lr, seed=seed,
        )
        if spatial_dims not in GEOMETRY:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        block_size = int(block_size or GEOMETRY[spatial_dims][0])
        context_size = int(context_size or GEOMETRY[spatial_dims][1])
        if context_size < block_size:
            raise ValueError(f"context_size {context_size} must be at least block_size {block_size}")
        self.block_size, self.block_stride = block_size, int(block_stride or block_size)
        self.context_size = int(context_size)
        self.t_test = noise_levels(t_test, num_train_timesteps)
        self.noise_kind, self.inference_batch = check_noise_kind(noise), int(inference_batch)
        if int(ddim_steps) < 0:
            raise ValueError(f"ddim_steps must be 0 (one pass) or a positive number of DDIM steps, got {ddim_steps}")
        self.ddim_steps = int(ddim_steps)

    @property
    def training_patch_size(self) -> int:
        """The context window: training sees blocks in the context they are restored in at test time."""
        return self.context_size

    def resolved_hparams(self) -> dict:
        return {"block_size": self.block_size, "context_size": self.context_size}

    def _noise(self, shape, generator: torch.Generator | None, device) -> torch.Tensor:
        return draw_noise(self.noise_kind, shape, generator, device)

    # -- training ------------------------------------------------------------------
    def _block_masks(self, mask: torch.Tensor) -> torch.Tensor:
        """One block per sample, centred on a random brain voxel, clipped to the window."""
        b, _, *spatial = mask.shape
        out = torch.zeros_like(mask)
        for i in range(b):
            inside = torch.nonzero(mask[i, 0] > 0)
            centre = inside[torch.randint(len(inside), (1,)).item()] if len(inside) else torch.tensor([s // 2 for s in spatial])
            sl = []
            for c, n in zip(centre.tolist(), spatial):
                size = min(self.block_size, n)
                start = min(max(c - size // 2, 0), n - size)
                sl.append(slice(start, start + size))
            out[(i, slice(None), *sl)] = 1.0
        return out

    def training_step(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        x, mask = batch.image, batch.mask
        block = self._block_masks(mask)
        t = self._timesteps(x.shape[0], 1, self.schedule.num_train_timesteps, x.device)
        noise = self._noise(x.shape, None, x.device)
        x_t = self.schedule.add_noise(x, noise, t)
        inp = block * x_t + (1 - block) * x
        loss = masked_l1(self.network(inp, t), self.target(x, noise), block * mask)
        return {"loss": loss}

    # -- inference -----------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> AnomalyOutput:
        mask = torch.ones_like(x[:, :1]) if mask is None else mask
        spatial = tuple(x.shape[2:])
        margin = max(0, (self.context_size - self.block_size) // 2)
        pad = []
        for _ in spatial:
            pad += [margin, margin]
        xp = F.pad(x, pad)
        size = [min(self.block_size, n) for n in spatial]
        blk = tuple(slice(margin, margin + s) for s in size)  # the block inside its window
        grids = []
        for bi in range(x.shape[0]):
            inside = torch.nonzero(mask[bi, 0] > 0)
            if len(inside):
                lo, hi = inside.min(0).values.tolist(), (inside.max(0).values + 1).tolist()
                grids.append((bi, block_grid(lo, hi, self.block_size, self.block_stride, spatial)))
        generator = self._generator()  # each level draws its own noise, in order, so maps repeat
        recon = torch.zeros_like(x)
        weight = torch.zeros_like(x[:, :1])
        passes = windows_done = 0
        for level in self.t_test:
            # The forward process is voxel-wise, so the whole padded input is noised once per level; each window
            # then takes the noised values inside its block and the clean context around it.
            noised = self.schedule.add_noise(xp, self._noise(xp.shape, generator, x.device), self.timesteps_like(level, x.shape[0], x.device))
            for bi, corners in grids:
                for start in range(0, len(corners), self.inference_batch):
                    chunk = corners[start : start + self.inference_batch]
                    windows = []
                    for c in chunk:
                        win = (bi, slice(None), *[slice(a, a + s + 2 * margin) for a, s in zip(c, size)])
                        w = xp[win].clone()
                        w[(slice(None), *blk)] = noised[win][(slice(None), *blk)]
                        windows.append(w)
                    pred, n = self._reverse(torch.stack(windows), blk, level)
                    passes += n
                    windows_done += len(chunk)
                    for c, p in zip(chunk, pred):
                        dst = (bi, slice(None), *[slice(a, a + s) for a, s in zip(c, size)])
                        recon[dst] += p[(slice(None), *blk)]
                        weight[dst] += 1
        covered = weight > 0
        recon = torch.where(covered, recon / weight.clamp_min(1), x)  # the mean over levels and overlapping blocks
        self.record(passes=passes, windows=windows_done, coverage=weight / len(self.t_test))
        amap = (x - recon).abs().mean(dim=1, keepdim=True) * mask
        return AnomalyOutput(anomaly_map=amap, reconstruction=recon)

    def _reverse(self, windows: torch.Tensor, blk: tuple[slice, ...], level: int) -> tuple[torch.Tensor, int]:
        """x0 of ``windows`` whose block ``blk`` is noised to ``level``: one pass, or a DDIM chain over the block.

        Each step of the chain is :meth:`~volad.methods.diffusion.schedules.NoiseSchedule.ddim_update` inside the block, the context
        staying clean. Returns (x̂0, passes).
        """
        n = len(windows)
        if not self.ddim_steps:
            return self.denoise(windows, self.timesteps_like(level, n, windows.device)), 1
        inner = (slice(None), slice(None), *blk)
        steps = torch.linspace(level, 0, self.ddim_steps).round().long().unique_consecutive().tolist()
        x = windows.clone()
        for t, s in zip(steps, [*steps[1:], None]):
            x0 = self.denoise(x, self.timesteps_like(t, n, x.device))
            if s is None:
                break
            x[inner] = self.schedule.ddim_update(x[inner], x0[inner], t, s)
        return x0, len(steps)
