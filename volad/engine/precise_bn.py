"""Batch-norm statistics recomputed under fixed weights before each validation ("precise BN").

A network with batch norm is evaluated with running statistics that training kept as an
exponential average (momentum 0.1) of the per-batch means and variances: in effect the
last ten or so batches, each computed under different weights. With small batches those
statistics are noisy, and the validation score that picks ``best.pt`` can move with them
even where the weights barely change. Wu & Johnson ("Rethinking 'Batch' in BatchNorm",
arXiv:2105.07576, 2021, section 3) recompute them instead, under the weights being
evaluated, as the average over many training batches.
:class:`PreciseBatchNorm` does that at the end of each validated epoch: it keeps
the epoch's last ``batches`` training batches, passes them through the method's own
training forward (its synthesis included, so the statistics are those of the inputs the
network trained on) without gradients, and the averaged statistics replace the running
ones in the weights that are validated and saved. Training then goes on from them as
usual. Under ``ema_decay`` the averaged weights get the recomputed statistics.

Measured on pii3d (batches of four 48³ patches; model card): alone, its validation swung as
much with the statistics recomputed as without, and test AUPRC over five training seeds kept
the same mean and spread; with ``best.pt`` the average of the three best epochs
(:mod:`volad.engine.soup`) it raised test AUPRC at four seeds of five, and pii3d's bundle
turns both on (``--precise_bn_batches 40 --average_best 3``).
"""

from __future__ import annotations

import collections

import torch
from torch import nn

from volad.methods.base import AnomalyMethod
from volad.types import Batch


def batch_norms(module: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The batch-norm layers of ``module`` that keep running statistics, by their names in its state dict."""
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


@torch.no_grad()
def recompute_batch_norm(method: AnomalyMethod, batches: list[Batch], stage: str) -> int:
    """Replace ``method``'s batch-norm running statistics by their plain average over ``batches``.

    Each batch goes through :meth:`AnomalyMethod.training_step` in training mode without
    gradients; the method's recorded statistics (:attr:`AnomalyMethod.stats`) and training
    mode are left as they were. Returns the number of layers recomputed (0: the method has
    no batch norm, nothing is done).
    """
    layers = list(batch_norms(method).values())
    if not layers or not batches:
        return 0
    momenta = [m.momentum for m in layers]
    stats, was_training = dict(method.stats), method.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    method.train()
    try:
        for batch in batches:
            method.training_step(batch, stage)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        method.stats = stats
        method.train(was_training)
    return len(layers)


class PreciseBatchNorm:
    """Keeps the last ``batches`` training batches of the epoch and recomputes the batch-norm statistics
    from them (:func:`recompute_batch_norm`) before the epoch's validation (module notes).

    Args:
        batches: How many of the epoch's last batches the statistics are averaged over (0: off; the
            trainer refuses a negative ``precise_bn_batches``).
    """

    def __init__(self, batches: int):
        self.batches = int(batches)
        self.kept: collections.deque[Batch] = collections.deque(maxlen=max(self.batches, 1))

    def start_epoch(self) -> None:
        """Forget the previous epoch's batches (they were seen under older weights)."""
        self.kept.clear()

    def keep(self, batch: Batch) -> None:
        """Remember a training batch (the oldest kept one is dropped)."""
        if self.batches:
            self.kept.append(batch)

    def apply(self, method: AnomalyMethod, stage: str, ema_state: dict[str, torch.Tensor] | None = None) -> int:
        """Recompute the statistics of ``method`` (which holds the weights about to be validated); with ``ema_state``
        (the averaged weights, applied to ``method`` by the caller) the recomputed buffers are written into it too.
        Returns the number of layers recomputed."""
        if not self.batches:
            return 0
        done = recompute_batch_norm(method, list(self.kept), stage)
        if done and ema_state is not None:
            for name, m in batch_norms(method).items():
                for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                    ema_state[f"{name}.{buffer}"].copy_(getattr(m, buffer))
        return done
