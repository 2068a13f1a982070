"""Healthy calibration: a surprisal of s is reached by healthy voxels once in 10**s, on any score scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from volad.errors import VoladConfigError
from volad.methods.calibration import fit_tail, surprisal


def _apply(table, values):
    return surprisal(torch.as_tensor(values, dtype=torch.float64), torch.as_tensor(table.knots), torch.as_tensor(table.surprisal), table.slope).numpy()


@pytest.mark.parametrize("draw", [lambda r, n: r.normal(size=n), lambda r, n: 50 * r.gamma(2.0, size=n) + 7])
def test_surprisal_is_calibrated_on_fresh_healthy_scores(draw):
    rng = np.random.default_rng(0)
    table = fit_tail(draw(rng, 200_000))
    fresh = _apply(table, draw(rng, 400_000))
    for s in (1.0, 2.0, 3.0):
        assert (fresh >= s).mean() == pytest.approx(10**-s, rel=0.25)


def test_surprisal_is_monotone_and_keeps_order_beyond_the_healthy_maximum():
    rng = np.random.default_rng(1)
    healthy = rng.normal(size=10_000)
    table = fit_tail(healthy)
    v = np.linspace(-6, 12, 500)
    s = _apply(table, v)
    assert np.all(np.diff(s) >= 0)
    assert s[0] == 0.0  # below every healthy score: tail probability 1
    beyond = v > healthy.max()
    assert np.all(np.diff(s[beyond]) > 0) and s[beyond].min() >= np.log10(healthy.size) - 1e-9


def test_ties_get_the_tail_probability_of_the_whole_tie():
    scores = np.r_[np.zeros(9_000), np.linspace(0.1, 1.0, 1_000)]  # 90 % of healthy voxels score exactly 0
    table = fit_tail(scores)
    assert _apply(table, [0.0])[0] == pytest.approx(0.0, abs=1e-6)  # P(S >= 0) = 1
    assert _apply(table, [0.55])[0] == pytest.approx(-np.log10(0.05), abs=0.02)


def test_too_few_scores_are_refused_by_name():
    with pytest.raises(VoladConfigError, match="member ae3d: 12 finite healthy voxel scores"):
        fit_tail(np.arange(12.0), what="member ae3d")
