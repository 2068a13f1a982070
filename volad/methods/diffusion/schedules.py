"""The one place that knows which library supplies diffusion schedules (diffusers).

:class:`NoiseSchedule` wraps diffusers' ``DDPMScheduler`` (forward process,
α̅_t) and ``DDIMScheduler`` (few-step reverse chains), for networks that predict
the clean image x0 directly, as pDDPM and Synomaly do. The rest of volad only
calls :meth:`NoiseSchedule.add_noise` and :meth:`NoiseSchedule.ddim_reconstruct`.

References:
    Ho, Jain, Abbeel. "Denoising diffusion probabilistic models." NeurIPS 2020.
    Song, Meng, Ermon. "Denoising diffusion implicit models." ICLR 2021.
    Nichol & Dhariwal. "Improved denoising diffusion probabilistic models." ICML 2021 (cosine schedule).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

_BETAS = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear"}


class NoiseSchedule:
    """Forward noising and DDIM reverse chains for x0-predicting networks.

    Args:
        num_train_timesteps: T.
        beta_schedule: ``linear`` (DDPM) or ``cosine`` (improved DDPM).
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: Literal["linear", "cosine", "scaled_linear"] = "linear"):
        from diffusers import DDPMScheduler

        if beta_schedule not in _BETAS:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r} ({', '.join(_BETAS)})")
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_schedule = beta_schedule
        self._ddpm = DDPMScheduler(num_train_timesteps=self.num_train_timesteps, beta_schedule=_BETAS[beta_schedule])
        self.alphas_cumprod = self._ddpm.alphas_cumprod.float()

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """α̅_t for integer timesteps ``t`` (any shape)."""
        return self.alphas_cumprod.to(t.device)[t.long()]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = √α̅_t · x0 + √(1 − α̅_t) · ε, with ``t`` of shape ``(B,)``."""
        a = self.alpha_bar(t).reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def ddim_update(self, x_t: torch.Tensor, x0: torch.Tensor, t: int, s: int) -> torch.Tensor:
        """One deterministic DDIM step (η = 0) from level ``t`` to ``s < t`` given the predicted clean image ``x0``:
        ε̂ = (x_t − √α̅_t x0) / √(1 − α̅_t), x_s = √α̅_s x0 + √(1 − α̅_s) ε̂ (Song et al., ICLR 2021, eq. 12)."""
        a_t, a_s = (self.alphas_cumprod[int(v)].to(x_t.device, x_t.dtype) for v in (t, s))
        eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps

    def ddim_reconstruct(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        *,
        t_start: int,
        steps: int = 50,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Noise ``x0`` to ``t_start`` and run a deterministic DDIM chain back to 0.

        Args:
            model: ``(x_t, t) -> x0`` prediction.
            x0: Clean input.
            t_start: Starting timestep.
            steps: DDIM steps over the full range [0, T); only those ≤ t_start run.
            noise: ε for the forward jump (default Gaussian from ``generator``).
            generator: Seeds ε.

        Returns:
            (reconstruction, network passes).
        """
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler(
            num_train_timesteps=self.num_train_timesteps, beta_schedule=_BETAS[self.beta_schedule], prediction_type="sample", clip_sample=False
        )
        ddim.set_timesteps(steps)
        eps = noise if noise is not None else torch.randn(x0.shape, generator=generator).to(x0.device)
        t0 = torch.full((x0.shape[0],), int(t_start), device=x0.device, dtype=torch.long)
        x = self.add_noise(x0, eps, t0)
        passes = 0
        for t in ddim.timesteps:
            if int(t) > t_start:
                continue
            tt = torch.full((x0.shape[0],), int(t), device=x0.device, dtype=torch.long)
            pred = model(x, tt)
            passes += 1
            x = ddim.step(pred, int(t), x).prev_sample
        return x, passes
