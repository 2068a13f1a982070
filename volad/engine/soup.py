"""``best.pt`` as the uniform average of the weights of the few best-validated epochs (a "model soup").

Where validation AUPRC swings from one check to the next, the single best epoch is partly a
draw: the lucky check wins. Wortsman et al. ("Model soups: averaging weights of multiple
fine-tuned models improves accuracy without increasing inference time", ICML 2022) average
the weights of several models of one training instead; here they are the ``k`` epochs with
the highest val AUPRC of one run, floating-point parameters and buffers (batch-norm
statistics) averaged uniformly, integer buffers taken from the best epoch. The average costs
nothing at inference. It is validated once more at the end of the run and that score is
recorded in ``best.pt``; it is the average that is kept, whatever that score, so the rule is
fixed before any label is seen (the val split chose only which epochs enter it).

:class:`BestEpochs` keeps those epochs' weights as ``checkpoints/best_epochs/epochNNNN.pt``
and their list in ``last.pt``, so a resumed run goes on with the same candidates. Files are
written before the ``last.pt`` that lists them and deleted only after the ``last.pt`` that no
longer does; a file that no ``last.pt`` lists (a run killed in between) is removed on resume,
and ``best.pt`` is rebuilt from the listed epochs if it was made from others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from volad.errors import VoladDataError
from volad.runs.checkpoint import read_checkpoint


def average_weights(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of ``states`` (same keys): floating-point tensors averaged (in float64, cast back),
    other tensors (batch-norm batch counters) taken from the first state."""
    if not states:
        raise ValueError("nothing to average")
    out = {}
    for key, first in states[0].items():
        if first.dtype.is_floating_point:
            total = sum(s[key].to(torch.float64) for s in states)
            out[key] = (total / len(states)).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


class BestEpochs:
    """The ``k`` best-validated epochs of a run: their val AUPRC, epoch and weight file (module notes).

    Args:
        folder: Where the epochs' weights are kept (``<output_dir>/checkpoints/best_epochs``).
        k: How many (at least 2; with 1 the trainer keeps ``best.pt`` alone).

    Attributes:
        entries: ``{"epoch", "val_auprc", "file"}`` of each kept epoch, best first (ties: the earlier epoch).
    """

    def __init__(self, folder: str | Path, k: int):
        if int(k) < 2:
            raise ValueError(f"BestEpochs keeps at least 2 epochs, got {k}")
        self.folder, self.k = Path(folder), int(k)
        self.entries: list[dict[str, Any]] = []

    def restore(self, entries: list[dict[str, Any]] | None) -> None:
        """Continue with the epochs a ``last.pt`` listed; weight files it does not list are deleted."""
        self.entries = [dict(e) for e in entries or []]
        listed = {e["file"] for e in self.entries}
        missing = [name for name in listed if not (self.folder / name).is_file()]
        if missing:
            raise VoladDataError(self.folder / missing[0], "is listed in last.pt among the best epochs but is missing; "
                                 "restore it, or train into another --output_dir")
        if self.folder.is_dir():
            for path in self.folder.glob("*.pt"):
                if path.name not in listed:
                    path.unlink()

    def admits(self, val: float) -> bool:
        """Whether an epoch with this val AUPRC enters the kept ones (strictly above the worst kept, once full)."""
        return len(self.entries) < self.k or val > self.entries[-1]["val_auprc"]

    def file_for(self, epoch: int) -> Path:
        """Where epoch ``epoch``'s weights are kept."""
        return self.folder / f"epoch{epoch:04d}.pt"

    def add(self, epoch: int, val: float) -> list[Path]:
        """Enter an epoch whose weights were just written to :meth:`file_for`; returns the files it pushed out,
        to be deleted once a ``last.pt`` without them is written."""
        kept = [e for e in self.entries if e["epoch"] != epoch] + [{"epoch": int(epoch), "val_auprc": float(val), "file": self.file_for(epoch).name}]
        kept.sort(key=lambda e: (-e["val_auprc"], e["epoch"]))
        self.entries, dropped = kept[: self.k], kept[self.k :]
        return [self.folder / e["file"] for e in dropped]

    def epochs(self) -> list[int]:
        """The kept epochs, best first."""
        return [e["epoch"] for e in self.entries]

    def average(self) -> dict[str, torch.Tensor]:
        """The uniform average of the kept epochs' weights (:func:`average_weights`, the best epoch first)."""
        return average_weights([read_checkpoint(self.folder / e["file"])["method"] for e in self.entries])
