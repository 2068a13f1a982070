"""An exponential moving average of a method's weights, so the saved model does not rest on the last steps' luck.

Validation AUPRC of a method's raw weights can swing widely from one check to
the next (ae3d: 0.04 → 0.51 → 0.28 between checks on one run), so ``best.pt``
picked among raw snapshots rests on chance. Averaging the weights over the last
few hundred steps (Polyak & Juditsky, "Acceleration of stochastic
approximation by averaging", SIAM J. Control Optim. 1992; as used for the
denoisers of Ho et al., NeurIPS 2020) gives a model that changes slowly, and it
is the averaged weights that are validated, saved for inference and carried
into the next stage. The decay warms up as ``min(decay, (1 + n) / (10 + n))``
after ``n`` updates, so a short run is not dominated by its random start.
Floating-point parameters and buffers (batch-norm statistics) are averaged;
integer buffers are copied. The trainer's default is off (``ema_decay=0``); the
ae3d bundle turns it on (0.999, about the last 12 epochs of 80 steps): over three
training seeds at 30 epochs its validation rose steadily instead of swinging, and
test AUPRC moved by 0.030 between seeds instead of 0.095 (figures in the ae3d
model card). At 4 epochs the average scored below the raw weights.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class WeightAverage:
    """Exponential moving average of ``module``'s state (see module docstring).

    Args:
        module: The module whose weights are averaged (its current weights start the average).
        decay: Weight of the old average per update (0.995: about the last 200 steps).
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def load(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """Continue an average saved in a checkpoint."""
        self.state = {k: v.detach().clone().to(self.state[k].device) for k, v in state.items()}
        self.updates = int(updates)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold the module's current weights into the average."""
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for k, v in module.state_dict().items():
            avg = self.state[k]
            if avg.device != v.device:
                avg = self.state[k] = avg.to(v.device)
            if v.dtype.is_floating_point:
                avg.lerp_(v.detach(), 1.0 - d)
            else:
                avg.copy_(v)

    def applied(self, module: nn.Module) -> contextlib.AbstractContextManager[dict[str, torch.Tensor]]:
        """Inside the block the module holds the averaged weights; yields the raw (training) weights, restored after."""
        return weights_applied(module, self.state)


@contextlib.contextmanager
def weights_applied(module: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the block ``module`` holds ``state``; yields its own weights, which it holds again after."""
    raw = {k: v.detach().clone() for k, v in module.state_dict().items()}
    module.load_state_dict(state)
    try:
        yield raw
    finally:
        module.load_state_dict(raw)
