"""Several processes, one job: PyTorch's own distributed engine under ``torchrun``.

``torchrun --nproc_per_node N -m monai.bundle run --config_file bundles/<m>/train.json``
starts N copies of the bundle; torchrun gives each its ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE`` and rendezvous address. :func:`setup` (called by every bundle's
``initialize`` step, :func:`volad.bundle.startup.start`) sees them and joins the
process group (NCCL on CUDA, one GPU per process; gloo on the CPU), so the plain
command under torchrun trains one model with
:class:`~torch.nn.parallel.DistributedDataParallel` instead of N racing copies.
Without torchrun nothing changes: one process, :func:`world_size` 1.

What each part does with it:

* training (:class:`volad.engine.trainer.Trainer`): each process draws other subjects
  (a :class:`~torch.utils.data.DistributedSampler` feeds TorchIO's queue),
  gradients are averaged by DDP, statistics accumulated over the data (feature
  standardisation, the normative model) are summed over the processes
  (:class:`SummedBuffers`), batch norm is synchronised on CUDA
  (:class:`~torch.nn.SyncBatchNorm`), and only rank 0 validates, writes
  checkpoints, plots, logs and progress;
* inference (:class:`volad.engine.inferer.Inferer`): the subjects are split between
  the processes, and rank 0 writes the index of all maps;
* evaluation runs on rank 0 (it reads maps, it trains nothing).
"""

from __future__ import annotations

import atexit
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

#: How long a process waits for the others at a collective (validation on rank 0 included).
TIMEOUT = datetime.timedelta(minutes=60)


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup() -> bool:
    """Join the process group torchrun describes (once); returns whether this is a distributed run.

    With CUDA, NCCL for tensors on the GPU (each process uses GPU ``LOCAL_RANK``) and
    gloo for those on the CPU (small bookkeeping, or a ``--device cpu`` run); gloo alone otherwise.
    """
    if not launched() or not dist.is_available():
        return False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=TIMEOUT)
        atexit.register(_leave)
    return True


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the process that writes checkpoints, logs, progress and indexes (the only one without DDP)."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def local_device(device: torch.device) -> torch.device:
    """A bare ``cuda`` means this process's own GPU under torchrun."""
    if device.type == "cuda" and device.index is None and active():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not active():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the processes (every rank must call it with the same keys)."""
    if not active() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist())}


def sync_batch_norm(module: nn.Module, device: torch.device) -> nn.Module:
    """Batch norm over the whole global batch: :class:`~torch.nn.SyncBatchNorm`, on CUDA.

    PyTorch's SyncBatchNorm runs on GPUs only; on the CPU (gloo) each process
    normalises with its own share of the batch and DDP keeps rank 0's running
    statistics. The state dict keys are those of ordinary batch norm, so
    checkpoints load in one process.
    """
    if active() and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


class TrainingStep(nn.Module):
    """A method's ``training_step`` as a module's ``forward``, so that DDP can wrap it.

    DDP averages gradients in the backward pass that follows a forward through
    the wrapper; wrapping the step (not the method, whose ``forward`` makes
    anomaly maps) keeps the method, its parameter names and its checkpoints unchanged.
    """

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, batch, stage: str):
        return self.method.training_step(batch, stage)


def data_parallel(module: nn.Module, optimised: set[int] | None = None) -> nn.Module:
    """``module`` under DDP, with the trainable parameters it has now (build it once per stage).

    A stage may leave trainable parts of a method idle (the student while the
    teacher learns): when some trainable parameter is not among ``optimised``
    (``id`` of the optimisers' parameters), DDP is told to look for unused
    parameters each step. The input is already on the process's device, so no
    ``device_ids``; buffers (batch-norm statistics) follow rank 0's.
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    idle = optimised is None or any(id(p) not in optimised for p in trainable)
    return nn.parallel.DistributedDataParallel(module, find_unused_parameters=idle)


class SummedBuffers:
    """Statistics that are sums over the training data, summed over the processes too.

    A module declares them with a class attribute ``summed_buffers`` (buffer
    names). Each process adds its own subjects; :meth:`reduce` (after every
    epoch, before a checkpoint is written) all-reduces what was added since the
    last reduce, so every process then holds the sum over all subjects, and a
    resumed run does not count anything twice.
    """

    def __init__(self, method: nn.Module):
        self.buffers: list[tuple[nn.Module, str]] = [
            (m, name) for m in method.modules() for name in getattr(type(m), "summed_buffers", ())
        ]
        self.snapshot = [getattr(m, name).detach().clone() for m, name in self.buffers]

    @torch.no_grad()
    def reduce(self) -> None:
        if not active():
            return
        for i, (m, name) in enumerate(self.buffers):
            now = getattr(m, name)
            before = self.snapshot[i]
            if before.shape != now.shape:  # allocated on the first batch (the normative model's grid)
                before = torch.zeros_like(now)
            added = (now - before).contiguous()
            dist.all_reduce(added)
            now.copy_(before + added)
            self.snapshot[i] = now.detach().clone()
