"""Shared fixtures: one tiny synthetic dataset per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def syn_root(tmp_path_factory) -> Path:
    from volad.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate_synthetic(root, shape=24, n_train=6, n_val=3, n_test=3, seed=0)
    return root


@pytest.fixture(scope="session")
def syn_dataset(syn_root):
    from volad.data import load_dataset

    return load_dataset("synthetic", syn_root)


#: The harder benchmark at its smallest: 3 mm, one subject of every kind in val and test.
KINDS_TINY = dict(spacing=3.0, n_train=2, n_val_per_kind=1, n_test_per_kind=1, n_val_healthy=1, n_test_healthy=1, n_test_artefact=1, n_val_artefact=1)


@pytest.fixture(scope="session")
def kinds_root(tmp_path_factory) -> Path:
    from volad.data.phantom_kinds import generate_phantom_kinds

    return generate_phantom_kinds(tmp_path_factory.mktemp("pk") / "phantom_kinds", progress=False, **KINDS_TINY)
