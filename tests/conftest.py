"""Shared fixtures: one tiny synthetic dataset per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
#: The environment bundle commands run in: two threads, no warnings between the lines a test reads.
ENV = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")


def bundle_command(name: str, role: str, *args: str, **overrides) -> list[str]:
    """``python -m monai.bundle run --config_file bundles/<name>/<role>.json ...``, as a user types it from the repo root."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"bundles/{name}/{role}.json", *args]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def bundle_cli(name: str, role: str, *args: str, check: bool = True, **overrides) -> subprocess.CompletedProcess:
    """Run one bundle job in its own process (the one subprocess runner of the tests); ``check``: it must succeed."""
    cmd = bundle_command(name, role, *args, **overrides)
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV, timeout=600)
    if check:
        assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def bundle_inprocess(name: str, role: str, capfd, **overrides) -> subprocess.CompletedProcess:
    """Run one bundle job in this process, as ``python -m monai.bundle run`` would (the same config files and
    components, without an interpreter start); its printed output comes back as a finished command's would."""
    from volad.bundle.config import run_bundle

    capfd.readouterr()
    run_bundle(name, role, **{k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()})
    out = capfd.readouterr()
    return subprocess.CompletedProcess([name, role], 0, out.out, out.err)


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
