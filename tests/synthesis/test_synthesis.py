"""Poisson solves, PII blending, the synthetic-task transforms and their reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
import torchio as tio

from volad.synthesis.poisson import box_poisson_inverse, forward_differences, poisson_interpolate, solve_poisson
from volad.synthesis.shapes import ASPECT, RADIUS_PRIORS, random_region_params, region_mask
from volad.synthesis.tasks import TASKS, apply_task
from volad.synthesis.transforms import LABEL_KEY, RandomSyntheticAnomaly, SyntheticAnomaly
from volad.synthesis.validation import synthetic_validation_set


def _ball(shape, radius):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    c = np.array([n // 2 for n in shape]).reshape([-1] + [1] * len(shape))
    return ((grid - c) ** 2).sum(0) < radius**2, grid.astype(float)


@pytest.mark.parametrize("shape", [(30, 30), (20, 22, 24)])
def test_poisson_reproduces_a_quadratic_from_its_own_gradients(shape):
    """Analytic case: guidance = differences of u*, border = u*; the unique solution is u* itself."""
    region, g = _ball(shape, 8)
    u_star = 0.02 * g[0] ** 2 - 0.03 * g[1] * g[-1] + 0.5 * g[-1]
    start = np.where(region, np.random.default_rng(0).random(shape) * 100, u_star)  # garbage inside Ω
    sol = solve_poisson(region, start, forward_differences(u_star), tol=1e-10)
    assert np.abs(sol - u_star).max() < 1e-6


def test_laplace_with_linear_border_is_linear():
    """Zero guidance is Laplace's equation; a linear function is discretely harmonic, so it is the solution."""
    region, g = _ball((24, 24, 24), 9)
    lin = 0.3 * g[0] - 0.1 * g[1] + 0.7 * g[2] + 2.0
    sol = solve_poisson(region, np.where(region, 0.0, lin), [np.zeros_like(lin)] * 3, tol=1e-10)
    assert np.abs(sol - lin).max() < 1e-6


def test_dst_box_inverse_matches_a_sparse_direct_solve():
    rng = np.random.default_rng(1)
    shape = (7, 9, 6)
    rhs = rng.standard_normal(shape)
    lap1 = [sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(n, n)) for n in shape]
    eye = [sp.identity(n) for n in shape]
    a = sp.kron(sp.kron(lap1[0], eye[1]), eye[2]) + sp.kron(sp.kron(eye[0], lap1[1]), eye[2]) + sp.kron(sp.kron(eye[0], eye[1]), lap1[2])
    direct = spla.spsolve(a.tocsc(), rhs.ravel()).reshape(shape)
    assert np.allclose(box_poisson_inverse(rhs), direct, atol=1e-10)


def test_poisson_region_on_the_border_is_refused():
    region = np.zeros((8, 8), bool)
    region[0, 3] = True
    with pytest.raises(ValueError, match="border"):
        solve_poisson(region, np.zeros((8, 8)), [np.zeros((8, 8))] * 2)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_pii_keeps_the_target_outside_the_region(alpha):
    rng = np.random.default_rng(2)
    target, source = rng.random((24, 24, 24)).astype(np.float32), (3 + rng.random((24, 24, 24))).astype(np.float32)
    region, _ = _ball((24, 24, 24), 7)
    out, label = poisson_interpolate(target, source, region, alpha)
    assert np.array_equal(out[~region], target[~region])
    assert np.allclose(label[region], alpha) and not label[~region].any()
    if alpha == 0.0:  # only the target's own gradients: the target comes back
        assert np.allclose(out, target, atol=1e-4)
    if alpha == 1.0:  # the source's structure appears, seamlessly: its differences, offset to the target's border
        inside = region & np.roll(region, 1, 0) & np.roll(region, -1, 0)
        d_out, d_src = np.diff(out, axis=0), np.diff(source, axis=0)
        mixed = np.abs(d_src) >= np.abs(np.diff(target, axis=0))
        sel = inside[:-1] & mixed
        assert np.corrcoef(d_out[sel], d_src[sel])[0, 1] > 0.9


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_tasks_change_only_the_region_and_label_it(task, ndim):
    rng = np.random.default_rng(3)
    shape = (28,) * ndim
    target, source = rng.random(shape).astype(np.float32), rng.random(shape).astype(np.float32) + 2
    params = {"centre": [14] * ndim, "radii": [6.0] * ndim, "shape_seed": 5, "strength": {"pii": 0.7, "intensity": 0.8, "deformation": 2.0, "cutout": 0.0}[task]}
    region = region_mask(shape, kind="irregular", centre=params["centre"], radii=params["radii"], seed=5)
    out, label = apply_task(task, target, source, region, params)
    changed = out != target
    assert changed.any() and not changed[~region].any()
    assert label.min() >= 0 and label.max() <= 1 and label.max() > 0.5 and not label[~region].any()


def test_random_transform_is_rebuilt_exactly_from_its_record():
    torch.manual_seed(0)
    x = torch.rand(1, 24, 24, 24)
    mask = torch.zeros(1, 24, 24, 24, dtype=torch.uint8)
    mask[:, 3:21, 3:21, 3:21] = 1
    pool = [torch.rand(1, 24, 24, 24), torch.rand(1, 24, 24, 24)]
    seen = set()
    for _ in range(12):
        s = tio.Subject(image=tio.ScalarImage(tensor=x.clone()), brain_mask=tio.LabelMap(tensor=mask))
        out = RandomSyntheticAnomaly(sources=pool)(s)
        name, args = out.applied_transforms[-1]
        assert name == "SyntheticAnomaly"
        seen.add(args["task"])
        again = SyntheticAnomaly(**args, sources=pool)(tio.Subject(image=tio.ScalarImage(tensor=x.clone()), brain_mask=tio.LabelMap(tensor=mask)))
        assert torch.equal(again["image"].data, out["image"].data)
        assert torch.equal(again[LABEL_KEY].data, out[LABEL_KEY].data)
        assert not out[LABEL_KEY].data[mask == 0].any(), "anomalies stay inside the brain"
        assert torch.equal(out["image"].data[mask == 0], x[mask == 0])
    assert len(seen) >= 3


def test_random_transform_in_slice_mode_and_without_sources():
    x = torch.rand(1, 32, 32, 1)
    s = tio.Subject(image=tio.ScalarImage(tensor=x), brain_mask=tio.LabelMap(tensor=torch.ones(1, 32, 32, 1, dtype=torch.uint8)))
    out = RandomSyntheticAnomaly(tasks=["pii", "cutout"], sources=None, spatial_dims=2)(s)
    assert out.applied_transforms[-1][1]["task"] == "cutout"  # pii needs a source, so it is skipped
    assert out[LABEL_KEY].data.shape == (1, 32, 32, 1)
    with pytest.raises(ValueError, match="no source"):
        RandomSyntheticAnomaly(tasks=["pii"], sources=None, spatial_dims=2)(s)


def test_synthetic_validation_set_is_reproducible():
    vols = [(torch.rand(1, 20, 20, 20), torch.ones(1, 20, 20, 20)) for _ in range(3)]
    a = synthetic_validation_set(vols, ["intensity", "deformation"], seed=4)
    b = synthetic_validation_set(vols, ["intensity", "deformation"], seed=4)
    for (ia, _, la), (ib, _, lb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(la, lb) and la.max() > 0


def test_log_uniform_radius_prior_draws_every_octave_of_size_equally_often():
    shape, (lo, hi) = (48, 48, 48), (0.02, 0.32)  # four octaves: 1 to 15 voxels
    octaves = {prior: np.zeros(4) for prior in RADIUS_PRIORS}
    for prior in RADIUS_PRIORS:
        rng = np.random.default_rng(0)
        for _ in range(2000):
            radii = np.asarray(random_region_params(shape, None, rng, (lo, hi), prior)["radii"]) / 48
            assert (radii >= 1 / 48).all() and (radii <= hi * ASPECT + 1e-9).all()
            if prior == "log_uniform":  # one scale, each axis within the aspect factor of it
                assert radii.max() / radii.min() <= ASPECT**2 + 1e-9 or radii.min() == 1 / 48
            scale = float(np.exp(np.log(radii).mean()))
            octaves[prior][min(3, max(0, int(np.log2(scale / lo))))] += 1
    share = octaves["log_uniform"] / octaves["log_uniform"].sum()
    assert np.all(np.abs(share - 0.25) < 0.06), share  # a millimetre lesion is as likely as a centimetre one
    uniform = octaves["uniform"] / octaves["uniform"].sum()
    assert uniform[0] < 0.02 and uniform[2:].sum() > 0.8, uniform  # uniform draws: millimetre sizes are rare
    with pytest.raises(ValueError, match="radius_prior"):
        random_region_params(shape, None, np.random.default_rng(0), (lo, hi), "normal")
    with pytest.raises(ValueError, match="radius_range"):
        random_region_params(shape, None, np.random.default_rng(0), (0.3, 0.1))
