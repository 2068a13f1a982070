import io

import numpy as np
import pytest
import torch

from volad.errors import VoladConfigError
from volad.methods import AutoEncoder, Batch, IntensityBaseline, NormativeBaseline, VariationalAutoEncoder
from volad.types import AnomalyOutput, spatial_axes


def _batch(spatial_dims, n=2, size=16, channels=1):
    g = torch.Generator().manual_seed(0)
    shape = (n, channels, *([size] * spatial_dims))
    return Batch(image=torch.rand(shape, generator=g), mask=torch.ones((n, 1, *shape[2:])))


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("cls", [AutoEncoder, VariationalAutoEncoder])
def test_contract_and_state_dict_round_trip(cls, spatial_dims):
    torch.manual_seed(0)
    m = cls(spatial_dims=spatial_dims, in_channels=2, channels=(4, 8), latent_channels=2, coarse_noise_std=0.2)
    b = _batch(spatial_dims, channels=2)
    losses = m.training_step(b, "main")
    assert "loss" in losses and losses["loss"].ndim == 0 and losses["loss"].requires_grad
    m.eval()
    out = m.predict(b.image, b.mask)
    assert isinstance(out, AnomalyOutput)
    assert out.anomaly_map.shape == (2, 1, *b.image.shape[2:])
    assert out.reconstruction.shape == b.image.shape
    assert torch.allclose(out.anomaly_map, (b.image - out.reconstruction).abs().mean(1, keepdim=True))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = cls(spatial_dims=spatial_dims, in_channels=2, channels=(4, 8), latent_channels=2, coarse_noise_std=0.2).eval()
    m2.load_state_dict(torch.load(buf))
    assert torch.equal(m2.predict(b.image, b.mask).anomaly_map, out.anomaly_map)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_autoencoder_learns_to_reconstruct(spatial_dims):
    torch.manual_seed(0)
    m = AutoEncoder(spatial_dims=spatial_dims, channels=(8, 16), latent_channels=8, lr=3e-3)
    b = _batch(spatial_dims, size=16)
    pool = torch.nn.functional.avg_pool2d if spatial_dims == 2 else torch.nn.functional.avg_pool3d
    b.image = pool(b.image, 3, 1, 1)
    opt = m.configure_optimizers("main")
    first = m.optimization_step(b, "main", opt)["loss"]
    for _ in range(60):
        last = m.optimization_step(b, "main", opt)["loss"]
    assert last < 0.5 * first


def test_vae_reports_kl():
    m = VariationalAutoEncoder(spatial_dims=3, channels=(4, 8), latent_channels=2)
    losses = m.training_step(_batch(3), "main")
    assert {"loss", "l1", "kl"} <= set(losses) and losses["kl"] >= 0


def test_intensity_baseline_polarity():
    x = torch.rand(1, 2, 8, 8, 8)
    mask = torch.ones(1, 1, 8, 8, 8)
    assert torch.equal(IntensityBaseline(in_channels=2, channel=1).predict(x, mask).anomaly_map, x[:, 1:2])
    assert torch.allclose(IntensityBaseline(in_channels=2, channel=0, polarity="dark").predict(x, mask).anomaly_map, 1 - x[:, :1])
    assert IntensityBaseline.stages == ()


def test_normative_matches_numpy_statistics():
    g = torch.Generator().manual_seed(1)
    data = torch.rand(5, 1, 6, 6, 6, generator=g)
    m = NormativeBaseline(min_std=1e-6)
    for i in range(0, 5, 2):
        m.optimization_step(Batch(data[i : i + 2], torch.ones_like(data[i : i + 2])), "fit", {})  # the mask counts: every voxel brain
    assert torch.allclose(m.mean, data.mean(0), atol=1e-6)
    assert torch.allclose(m.std, data.std(0), atol=1e-5)
    x = torch.rand(1, 1, 6, 6, 6, generator=g)
    expected = ((x - data.mean(0)) / data.std(0)).abs()
    assert torch.allclose(m.predict(x).anomaly_map, expected, atol=1e-4)
    # Buffers travel with the state dict, even into a fresh (unfitted) model.
    m2 = NormativeBaseline(min_std=1e-6)
    m2.load_state_dict(m.state_dict())
    assert torch.allclose(m2.predict(x).anomaly_map, expected, atol=1e-4)


def test_spatial_axes():
    assert spatial_axes(torch.zeros(1, 1, 4, 4)) == (2, 3)
    assert spatial_axes(torch.zeros(1, 1, 4, 4, 4)) == (2, 3, 4)


def test_fine_noise_scale_adds_voxel_scale_corruption_inside_the_brain():
    """``coarse_noise_factor=[8, 2]``: the training input carries deviations a few voxels wide, which coarse noise alone lacks."""
    image = torch.zeros(4, 1, 32, 32, 32)
    mask = torch.ones_like(image)
    mask[..., :8] = 0
    batch = Batch(image=image, mask=mask)

    def roughness(factors):
        torch.manual_seed(0)
        noisy = AutoEncoder(coarse_noise_std=0.2, coarse_noise_factor=factors).corrupt(batch)
        assert (noisy[..., :8] == 0).all()  # nothing outside the brain
        inside = noisy[..., 8:]
        return (inside[..., 1:] - inside[..., :-1]).abs().mean() / inside.std()

    assert roughness([8, 2]) > 2 * roughness(8)
    with pytest.raises(VoladConfigError, match="coarse_noise_factor"):
        AutoEncoder(coarse_noise_std=0.2, coarse_noise_factor=[])


def test_anatomy_channels_condition_the_autoencoder_but_are_never_reconstructed_or_corrupted():
    """``anatomy="coordinates"``: the network reads 3 coordinate channels behind the contrasts; it corrupts and
    reconstructs only the contrasts, and the same intensities score differently at another place."""
    torch.manual_seed(0)
    ae = AutoEncoder(in_channels=2, anatomy="coordinates", coarse_noise_std=0.5, skip_connections=True, channels=(8, 16))
    assert ae.anatomy == "coordinates" and ae.hparams["anatomy"] == "coordinates"
    image = torch.randn(2, 5, 16, 16, 16)
    mask = torch.ones(2, 1, 16, 16, 16)
    noisy = ae.corrupt(Batch(image=image, mask=mask))
    assert torch.equal(noisy[:, 2:], image[:, 2:]) and not torch.allclose(noisy[:, :2], image[:, :2])
    losses = ae.training_step(Batch(image=image, mask=mask), "main")
    losses["loss"].backward()
    out = ae.eval().predict(image, mask)
    assert out.reconstruction.shape == (2, 2, 16, 16, 16) and out.anomaly_map.shape == (2, 1, 16, 16, 16)
    torch.testing.assert_close(out.anomaly_map, (image[:, :2] - out.reconstruction).abs().mean(1, keepdim=True))
    moved = image.clone()
    moved[:, 2:] += 0.3  # the same intensities, 30 mm away
    assert not torch.allclose(ae.predict(moved, mask).anomaly_map, out.anomaly_map)
    assert AutoEncoder(in_channels=2).anatomy is None


def test_normative_sums_match_numpy_and_read_welford_checkpoints():
    """The normative model keeps float64 sums (they add up over processes); its mean and σ are
    NumPy's, and a checkpoint of the Welford version (mean, M2) loads to the same model."""
    x = torch.rand(5, 1, 3, 3, 3) * 4
    fitted = NormativeBaseline(in_channels=1, min_std=1e-6)
    fitted.optimization_step(Batch(x[:2], torch.ones(2, 1, 3, 3, 3)), "fit", {})
    fitted.optimization_step(Batch(x[2:], torch.ones(3, 1, 3, 3, 3)), "fit", {})
    torch.testing.assert_close(fitted.mean, torch.from_numpy(x.numpy().mean(0)))
    torch.testing.assert_close(fitted.std, torch.from_numpy(x.numpy().std(0, ddof=1)))
    old = NormativeBaseline(in_channels=1, min_std=1e-6)
    old.load_state_dict({"count": torch.tensor(5.0), "mean": x.mean(0), "m2": ((x - x.mean(0)) ** 2).sum(0)})
    torch.testing.assert_close(old.mean, fitted.mean)
    torch.testing.assert_close(old.std, fitted.std)
    torch.testing.assert_close(old.predict(x).anomaly_map, fitted.predict(x).anomaly_map)


def _plain_zscore(train: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray, brain: np.ndarray, floor=0.05, min_coverage=5) -> np.ndarray:
    """The plain voxel-wise z-score recipe, written independently in NumPy: robust (x − median)/IQR in the brain,
    per-voxel mean and σ over the training brains that cover the voxel, σ floor in quadrature, bright polarity,
    z = 0 where fewer than ``min_coverage`` training brains cover the voxel."""

    def robust(v, m):
        q1, med, q3 = np.quantile(v[m], [0.25, 0.5, 0.75])
        return (v - med) / max(q3 - q1, 1e-3)

    norm = np.stack([robust(v, m) for v, m in train])
    masks = np.stack([m for _, m in train])
    n = masks.sum(0)
    mu = (norm * masks).sum(0) / np.maximum(n, 1)
    var = (((norm - mu) ** 2) * masks).sum(0) / np.maximum(n - 1, 1)
    z = (robust(x, brain) - mu) / np.sqrt(var + floor**2)
    z[n < min_coverage] = 0
    return np.where(brain, np.maximum(z, 0), 0)


def _brains(n: int, shape=(12, 12, 12), seed=0):
    """Training volumes whose brains differ in extent: the last rows are brain in only some of them."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        m = np.zeros(shape, bool)
        m[2:10, 2:10, 2 : 8 + (i % 3)] = True  # slice 8 is brain in 2 of 3 subjects, slice 9 in 1 of 3
        v = np.where(m, 0.5 + 0.1 * rng.standard_normal(shape), 0.0).astype(np.float32)
        out.append((v, m))
    return out


def _fit(model: NormativeBaseline, train) -> NormativeBaseline:
    for v, m in train:
        model.optimization_step(Batch(torch.from_numpy(v)[None, None], torch.from_numpy(m.astype(np.float32))[None, None]), "fit", {})
    return model


def test_zscore_is_the_plain_recipe_over_the_brains_that_cover_each_voxel():
    """``zscore`` equals an independent NumPy z-score whose statistics use only the training brains covering each voxel.
    Before, every subject counted everywhere: a subject's background at the rim of another's brain made σ huge there."""
    from volad.methods import build_baseline

    train = _brains(15)
    model = _fit(build_baseline("zscore"), train)
    x, brain = train[0][0].copy(), np.zeros((12, 12, 12), bool)
    brain[2:10, 2:10, 2:10] = True
    x = np.where(brain, 0.5 + 0.1 * np.random.default_rng(9).standard_normal(x.shape), 0).astype(np.float32)
    x[4:6, 4:6, 8:10] += 0.6  # a lesion where only 10 and 5 of the 15 training brains reach
    got = model.predict(torch.from_numpy(x)[None, None], torch.from_numpy(brain.astype(np.float32))[None, None]).anomaly_map[0, 0].numpy()
    expected = _plain_zscore(train, x, brain)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert expected[4:6, 4:6, 8:10].min() > 3  # the lesion at the rim stands out ...
    assert got[4:6, 4:6, 8:10].min() > 3
    fewer = _fit(build_baseline("zscore", min_coverage=6), train)  # ... unless too few brains cover it: slice 9 has 5
    gone = fewer.predict(torch.from_numpy(x)[None, None], torch.from_numpy(brain.astype(np.float32))[None, None]).anomaly_map[0, 0]
    assert (gone[..., 9] == 0).all() and (gone[4:6, 4:6, 8] > 3).all()


def test_normative_floor_is_added_in_quadrature_and_old_checkpoints_cover_every_voxel():
    """σ = sqrt(σ² + floor²); a checkpoint from before per-voxel coverage (one scalar count) loads as every voxel covered."""
    x = torch.rand(6, 1, 3, 3, 3)
    fitted = _fit(NormativeBaseline(min_std=0.05), [(v[0].numpy(), np.ones((3, 3, 3), bool)) for v in x])
    torch.testing.assert_close(fitted.std, torch.from_numpy(np.sqrt(x.numpy().var(0, ddof=1) + 0.05**2)))
    state = {k: v for k, v in fitted.state_dict().items() if k != "subjects"}
    state["count"] = torch.tensor(6.0, dtype=torch.float64)  # what volad 0.3 saved
    old = NormativeBaseline(min_std=0.05)
    old.load_state_dict(state)
    assert old.count.shape == (1, 3, 3, 3) and float(old.subjects) == 6
    torch.testing.assert_close(old.predict(x[:1]).anomaly_map, fitted.predict(x[:1]).anomaly_map)


def test_a_view_of_a_normative_model_is_the_model_fitted_on_that_contrast_with_that_sign():
    """``normative_views`` on two contrasts with both signs splits into four views; each scores exactly as a model fitted on
    that contrast alone with that sign (the fusion calibrates each on its own)."""
    rng = np.random.default_rng(3)
    brain = np.ones((6, 6, 6), bool)
    train = [rng.normal(size=(2, 6, 6, 6)).astype(np.float32) * [[[[0.1]]], [[[0.3]]]] + 1 for _ in range(6)]
    both = NormativeBaseline(in_channels=2, polarity="both", volume_norm="robust", search_radius=1)
    for v in train:
        both.optimization_step(Batch(torch.from_numpy(v)[None], torch.ones(1, 1, 6, 6, 6)), "fit", {})
    views = NormativeBaseline.contrast_views(both.hparams)
    assert views == [(0, "bright"), (0, "dark"), (1, "bright"), (1, "dark")]
    assert NormativeBaseline.contrast_views({**both.hparams, "polarity": ["bright", "both"]}) == [(0, "bright"), (1, "bright"), (1, "dark")]
    x = torch.from_numpy(rng.normal(size=(1, 2, 6, 6, 6)).astype(np.float32)) * 0.3 + 1
    mask = torch.ones(1, 1, 6, 6, 6)
    for channel, sign in views:
        hparams, state = NormativeBaseline.view(both.hparams, both.state_dict(), channel, sign)
        view = NormativeBaseline.rebuild(hparams)
        view.load_state_dict(state)
        alone = _fit(NormativeBaseline(polarity=sign, volume_norm="robust", search_radius=1), [(v[channel], brain) for v in train])
        torch.testing.assert_close(view.predict(x[:, channel : channel + 1], mask).anomaly_map, alone.predict(x[:, channel : channel + 1], mask).anomaly_map)
    with pytest.raises(VoladConfigError, match="no view of contrast 2"):
        NormativeBaseline.view(both.hparams, both.state_dict(), 2, "bright")
    assert IntensityBaseline.contrast_views(IntensityBaseline().hparams) == []  # fused whole


def test_misregistration_search_forgives_a_shifted_border_but_not_a_lesion():
    """``search_radius=1``: a tissue border one voxel off its usual place no longer fires; a lesion still does."""
    shape = (10, 10, 10)
    brain = np.ones(shape, bool)
    rng = np.random.default_rng(0)
    train = []
    for _ in range(8):
        v = np.where(np.arange(10)[:, None, None] < 5, 1.0, 0.0) + 0.02 * rng.standard_normal(shape)
        train.append(((v * np.ones(shape)).astype(np.float32), brain))
    test = np.where(np.arange(10)[:, None, None] < 6, 1.0, 0.0) * np.ones(shape)  # the border moved by one voxel
    test[7:9, 4:6, 4:6] = 1.5  # a lesion in the dark tissue
    t = torch.from_numpy(test.astype(np.float32))[None, None]
    m = torch.ones_like(t)
    plain = _fit(NormativeBaseline(polarity="bright", search_radius=0), train).predict(t, m).anomaly_map[0, 0]
    search = _fit(NormativeBaseline(polarity="bright", search_radius=1), train).predict(t, m).anomaly_map[0, 0]
    assert plain[5, 2:8, 2:8].min() > 5 and search[5, 2:8, 2:8].max() < 1  # the shifted border
    assert search[7:9, 4:6, 4:6].min() > 5  # the lesion
    assert (search <= plain + 1e-6).all()  # the search only ever lowers a score
