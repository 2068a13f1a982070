"""Seeds and random states: what makes a run repeatable, and a resumed run the run it would have been."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices), and ask cuDNN for deterministic kernels.

    On the CPU, the same seed and command give bit-identical weights. On CUDA,
    cuDNN's deterministic mode is set, but a few kernels volad's networks use
    (the backward passes of trilinear upsampling and of some scatter/index
    operations) have no deterministic version, so weights agree only to rounding
    across runs; ``torch.use_deterministic_algorithms(True)`` with
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` would name those kernels by failing.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def rng_state(method: Any = None) -> dict:
    """Every random state this process's training loop draws from, as plain data (``weights_only`` loads it).

    Python's ``random``, NumPy's global generator, torch's CPU generator (which
    also drives TorchIO's patch sampler, its augmentations, the queue's subject and
    patch shuffling and the loader workers' seeds) and every CUDA device's
    generator. Whole-volume loaders shuffle by seed and epoch, so they hold no state
    (:func:`volad.data.views.training_loader`). With ``method`` (an
    :class:`~volad.methods.base.AnomalyMethod`), also its own generators
    (:meth:`~volad.methods.base.AnomalyMethod.random_state`: the PII detector's synthesis draws).
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    own = None if method is None else method.random_state()
    return {
        **({"method": own} if own is not None else {}),
        "python": [int(version), torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict, method: Any = None) -> list[str]:
    """Restore what :func:`rng_state` saved (``method``: the method whose own generators it saved); returns the sources restored."""
    restored = []
    if state.get("python") is not None:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal.tolist()), gauss))
        restored.append("Python")
    if state.get("numpy") is not None:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
        restored.append("NumPy")
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"])
        restored.append("torch (TorchIO's sampling and shuffling)")
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
        restored.append("CUDA")
    if method is not None and state.get("method") is not None:
        method.set_random_state(state["method"])
        restored.append(f"{type(method).__name__}'s own generator")
    return restored


def restore_rng_states(state: dict, rank: int, world_size: int, method: Any = None) -> str:
    """Put back this process's random states from a resumable checkpoint (its ``rng``: one entry per process), and
    say what was restored and what could not be (another number of processes, a checkpoint of an older volad)."""
    states = state.get("rng")
    missing: list[str] = []
    if states is None:  # checkpoints of volad before 0.4 kept rank 0's torch state only
        states = [{"torch": state["torch_rng"]}] if state.get("torch_rng") is not None else []
        missing.append("Python and NumPy states (not saved by the volad that wrote this checkpoint)")
    restored: list[str] = []
    if len(states) != world_size:
        missing.append(f"the per-process states ({len(states)} saved, {world_size} processes now): each process is reseeded")
    else:
        restored = set_rng_state(states[rank], method)
        if method is not None and method.random_state() is not None and states[rank].get("method") is None:
            missing.append(f"{type(method).__name__}'s own generator (not saved by the volad that wrote this checkpoint)")
    return ("volad: random states restored: " + (", ".join(restored) or "none")
            + ("" if not missing else "; not restored: " + "; ".join(missing) + " (the run continues, but not bit-identically)"))
