"""Noise generators, the schedule adapter, pDDPM stitching, the multi-stage stop rule, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from volad.methods import MultiStageDiffusion, PatchedDiffusion
from volad.methods.base import Batch
from volad.methods.diffusion.pddpm import block_grid
from volad.methods.diffusion.schedules import NoiseSchedule
from volad.methods.diffusion.synomaly import stop_now
from volad.synthesis.noise import simplex_noise, synomaly_noise


def _neighbour_corr(a: torch.Tensor) -> float:
    return float(np.corrcoef(a[:-1].flatten().numpy(), a[1:].flatten().numpy())[0, 1])


@pytest.mark.parametrize("spatial", [(40, 36), (20, 24, 16)])
def test_simplex_noise_statistics_and_determinism(spatial):
    shape = (3, 2, *spatial)
    a = simplex_noise(shape, period=16, generator=torch.Generator().manual_seed(1))
    b = simplex_noise(shape, period=16, generator=torch.Generator().manual_seed(1))
    c = simplex_noise(shape, period=16, generator=torch.Generator().manual_seed(2))
    assert a.shape == shape and torch.equal(a, b) and not torch.allclose(a, c)
    flat = a.reshape(6, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(6), atol=1e-4) and torch.allclose(flat.std(1), torch.ones(6), atol=1e-3)
    assert not torch.allclose(a[0], a[1])  # every sample draws its own noise
    assert _neighbour_corr(a[0, 0]) > 0.6 > abs(_neighbour_corr(torch.randn(spatial)))  # smooth, unlike white noise


def test_synomaly_noise_is_gaussian_plus_blobs():
    shape = (4, 1, 32, 32, 32)
    y = synomaly_noise(shape, blob_fraction=0.05, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, synomaly_noise(shape, blob_fraction=0.05, generator=torch.Generator().manual_seed(0)))
    gen = torch.Generator().manual_seed(0)
    gauss = torch.randn(shape, generator=gen)  # the first draw is the Gaussian part
    blobs = (y - gauss).abs()
    for i in range(4):
        inside = blobs[i] > 0.1 * blobs[i].max()
        assert 0.01 < inside.float().mean() < 0.25  # blobs cover a few percent of the volume
        assert 0.5 <= blobs[i].max() <= 2.0 + 1e-5  # amplitude range
    assert abs(float(gauss.mean())) < 0.02 and abs(float(gauss.std()) - 1) < 0.02


def test_schedule_adapter_matches_the_forward_process_and_ddim_counts_steps():
    from diffusers import DDPMScheduler

    sched = NoiseSchedule(1000, "cosine")
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    x0, eps = torch.rand(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    t = torch.tensor([10, 700])
    assert torch.allclose(sched.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), atol=1e-6)
    oracle = lambda xt, tt: x0  # noqa: E731 - a perfect x0 predictor
    rec, passes = sched.ddim_reconstruct(oracle, x0, t_start=500, steps=50)
    assert torch.allclose(rec, x0, atol=1e-4) and passes == 26  # DDIM timesteps 500, 480, ..., 0
    with pytest.raises(ValueError):
        NoiseSchedule(1000, "quadratic")


def test_block_grid_and_pddpm_stitching_cover_every_brain_voxel_once():
    assert block_grid([0, 0], [10, 10], 4, 4, (10, 10)) == [(a, b) for a in (0, 4, 6) for b in (0, 4, 6)]
    m = PatchedDiffusion(spatial_dims=3, block_size=8, context_size=16, channels=(4, 8)).eval()
    x = torch.rand(1, 1, 30, 26, 20)
    mask = torch.zeros_like(x)
    mask[..., 4:27, 3:22, 2:18] = 1
    out = m.predict(x, mask)
    cover = m.stats["coverage"][0, 0]
    assert (cover[mask[0, 0] > 0] >= 1).all()
    # stride = block: tiles meet exactly except where the last tile is shifted back to fit the box
    lo, hi = torch.tensor([4, 3, 2]), torch.tensor([27, 22, 18])
    expected_blocks = int(np.prod([len(range(a, max(b - 8, a) + 1, 8)) + (1 if (b - a) % 8 else 0) for a, b in zip(lo.tolist(), hi.tolist())]))
    assert m.stats["windows"] == expected_blocks
    assert torch.equal(out.reconstruction[..., :4, :, :], x[..., :4, :, :])  # outside the brain box the input is kept
    assert out.anomaly_map.shape == (1, 1, 30, 26, 20) and (out.anomaly_map[mask == 0] == 0).all()
    m2 = PatchedDiffusion(spatial_dims=2, block_size=8, block_stride=4, context_size=16, channels=(4, 8)).eval()
    x2, mask2 = torch.rand(1, 1, 24, 24), torch.ones(1, 1, 24, 24)
    m2.predict(x2, mask2)
    assert m2.stats["coverage"].max() == 4 and m2.stats["coverage"].min() == 1  # overlaps averaged with equal weights


def test_pddpm_geometry_defaults_to_the_papers_slices_in_2d_and_the_trainer_uses_the_context_window(tmp_path, syn_root):
    """--spatial_dims 2 alone gives the authors' geometry (48-pixel blocks in 96×96 windows); checkpoints record the values."""
    from volad.engine.trainer import Trainer

    two, three = PatchedDiffusion(spatial_dims=2, channels=(4, 8)), PatchedDiffusion(spatial_dims=3, channels=(4, 8))
    assert (two.block_size, two.context_size, two.block_stride) == (48, 96, 48)
    assert (three.block_size, three.context_size) == (24, 48)
    assert two.hparams["block_size"] == 48 and two.hparams["context_size"] == 96  # the values, not None
    assert PatchedDiffusion.rebuild(two.hparams).hparams == two.hparams
    given = PatchedDiffusion(spatial_dims=3, block_size=8, context_size=16, channels=(4, 8))
    assert given.training_patch_size == 16
    common = dict(dataset="synthetic", data_root=str(syn_root), output_dir=str(tmp_path), device="cpu", val_interval=0)
    assert Trainer(method=given, patch_size=None, **common).patch_size == 16  # no patch named: the context window
    assert Trainer(method=given, patch_size=12, **common).patch_size == 12  # a named patch wins
    with pytest.raises(ValueError, match="context_size 8 must be at least block_size 48"):
        PatchedDiffusion(spatial_dims=2, context_size=8)


def test_cddpm_window_defaults_to_the_papers_slices_in_2d_and_is_the_training_patch(tmp_path, syn_root):
    """--spatial_dims 2 alone trains and restores on the authors' 96×96 slices (48³ in 3D); checkpoints record the value."""
    from volad.engine.trainer import Trainer
    from volad.methods import ConditionedDiffusion

    small = dict(channels=(4, 8), encoder_arch="resnet10")
    two, three = ConditionedDiffusion(spatial_dims=2, **small), ConditionedDiffusion(spatial_dims=3, **small)
    assert (two.window, two.training_patch_size, two.hparams["window"]) == (96, 96, 96)
    assert (three.window, three.training_patch_size) == (48, 48)
    assert ConditionedDiffusion.rebuild(two.hparams).hparams == two.hparams
    assert ConditionedDiffusion(spatial_dims=2, window=0, **small).training_patch_size is None  # whole slices
    common = dict(dataset="synthetic", data_root=str(syn_root), output_dir=str(tmp_path), device="cpu", val_interval=0)
    given = ConditionedDiffusion(spatial_dims=3, window=16, **small)
    assert Trainer(method=given, patch_size=None, **common).patch_size == 16
    assert Trainer(method=given, patch_size=12, **common).patch_size == 12


def test_noise_level_ensemble_averages_the_reconstructions_of_each_level(monkeypatch):
    """t_test as a list: one reconstruction per level (its own noise), averaged before the residual (cDDPM's rule)."""
    m = PatchedDiffusion(spatial_dims=2, block_size=8, context_size=16, channels=(4, 8), noise="gaussian").eval()
    monkeypatch.setattr(m, "denoise", lambda x_t, t: x_t)  # "restores" the noised input as it is
    monkeypatch.setattr(m, "_noise", lambda shape, generator, device: torch.zeros(shape))  # x_t = √α̅_t · x
    x, mask = torch.rand(1, 1, 24, 24) + 0.5, torch.ones(1, 1, 24, 24)
    single = {}
    for t in (100, 700):
        m.t_test = [t]
        single[t] = m.predict(x, mask)
        assert torch.allclose(single[t].reconstruction, m.schedule.alpha_bar(torch.tensor(t)).sqrt() * x)
        passes = m.stats["passes"]
    m.t_test = [100, 700]
    both = m.predict(x, mask)
    assert torch.allclose(both.reconstruction, (single[100].reconstruction + single[700].reconstruction) / 2)
    assert m.stats["passes"] == 2 * passes and m.stats["coverage"].min() == 1  # one pass per level and window
    assert torch.allclose(both.anomaly_map, (x - both.reconstruction).abs())
    real = PatchedDiffusion(spatial_dims=2, block_size=8, context_size=16, channels=(4, 8), t_test=[100, 700]).eval()
    assert torch.equal(real.predict(x, mask).anomaly_map, real.predict(x, mask).anomaly_map)  # each level's noise is seeded
    assert real.hparams["t_test"] == [100, 700]
    with pytest.raises(ValueError, match="t_test must be one or more timesteps"):
        PatchedDiffusion(t_test=[])
    with pytest.raises(ValueError, match="t_test must be one or more timesteps"):
        PatchedDiffusion(t_test=1000)


def test_pddpm_ddim_chain_matches_diffusers_and_costs_one_pass_per_step(monkeypatch):
    """ddim_steps > 0: each noised block runs a DDIM chain; on a whole-window block it is diffusers' DDIM step for step."""
    torch.manual_seed(0)
    m = PatchedDiffusion(spatial_dims=2, block_size=16, context_size=16, channels=(4, 8), noise="gaussian", ddim_steps=10).eval()
    x0, eps = torch.rand(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    x_t = m.schedule.add_noise(x0, eps, torch.tensor([900, 900]))
    with torch.no_grad():
        ours, passes = m._reverse(x_t, (slice(0, 16), slice(0, 16)), 900)
        ref, ref_passes = m.schedule.ddim_reconstruct(m.denoise, x0, t_start=900, steps=10, noise=eps)  # 900, 800, ..., 0
    assert passes == ref_passes == 10
    assert torch.allclose(ours, ref, atol=1e-5)

    # In its context window: the chain's timesteps run from t_test to 0, one pass each, and the block becomes the last prediction.
    m = PatchedDiffusion(spatial_dims=2, block_size=8, context_size=16, channels=(4, 8), ddim_steps=5).eval()
    x, mask = torch.rand(1, 1, 24, 24) + 0.5, torch.ones(1, 1, 24, 24)
    one = PatchedDiffusion(spatial_dims=2, block_size=8, context_size=16, channels=(4, 8)).eval()
    one.predict(x, mask)
    seen = []

    def constant(x_t, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x_t)

    monkeypatch.setattr(m, "denoise", constant)
    out = m.predict(x, mask)
    assert torch.allclose(out.reconstruction, torch.zeros_like(x))
    assert m.stats["passes"] == 5 * one.stats["passes"] and m.stats["windows"] == one.stats["windows"]
    assert seen[:5] == [500, 375, 250, 125, 0]
    with pytest.raises(ValueError, match="ddim_steps must be 0"):
        PatchedDiffusion(ddim_steps=-1)


@pytest.mark.parametrize("cls", [PatchedDiffusion, MultiStageDiffusion])
def test_epsilon_prediction_recovers_x0_and_trains_on_the_noise(cls, monkeypatch):
    """prediction="epsilon": the network outputs ε; denoise turns it into x0, and the loss compares it with the drawn noise."""
    m = cls(spatial_dims=2, channels=(4, 8), prediction="epsilon", beta_schedule="cosine")
    x0, eps = torch.rand(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    t = torch.tensor([50, 900])
    x_t = m.schedule.add_noise(x0, eps, t)
    monkeypatch.setattr(m, "network", lambda inp, tt, condition=None: eps)  # a perfect noise predictor
    assert torch.allclose(m.denoise(x_t, t), x0, atol=1e-4)
    assert torch.equal(m.target(x0, eps), eps) and torch.equal(cls(spatial_dims=2, channels=(4, 8)).target(x0, eps), x0)
    monkeypatch.undo()
    batch = Batch(image=x0, mask=torch.ones_like(x0))
    loss = m.training_step(batch, "main")["loss"]
    assert torch.isfinite(loss) and loss.requires_grad
    with pytest.raises(ValueError, match="prediction must be sample or epsilon"):
        cls(spatial_dims=2, channels=(4, 8), prediction="v")


def test_checkpoints_from_before_an_option_existed_load_with_its_default():
    """A checkpoint written before ``prediction`` existed was trained as x0 (the default): it loads; epsilon does not."""
    from volad.errors import VoladConfigError
    from volad.runs.checkpoint import check_hparams

    old = {k: v for k, v in PatchedDiffusion(spatial_dims=3, channels=(4, 8)).hparams.items() if k != "prediction"}
    check_hparams(PatchedDiffusion(spatial_dims=3, channels=(4, 8)), old, "old.pt")
    with pytest.raises(VoladConfigError, match="old.pt: .*prediction: checkpoint 'sample' vs now 'epsilon'"):
        check_hparams(PatchedDiffusion(spatial_dims=3, channels=(4, 8), prediction="epsilon"), old, "old.pt")


def test_multistage_stop_rule_and_stage_bound(monkeypatch):
    brain = torch.ones(1, 1, 10, 10, 10)
    a = torch.zeros_like(brain, dtype=torch.bool)
    b = a.clone()
    b[..., 0, 0, :9] = True  # 9 of 1000 brain voxels change: < 1 %
    assert stop_now(a, b, brain, 0.01)
    b[..., 0, 1, :2] = True  # 11 changes: > 1 %
    assert not stop_now(a, b, brain, 0.01)
    m = MultiStageDiffusion(spatial_dims=3, channels=(4, 8), max_stages=4, window=0).eval()
    x = torch.rand(1, 1, 12, 12, 12)
    monkeypatch.setattr(m, "restore", lambda xt, clean, t: (x.clone(), 1))  # perfect restoration: empty mask, stop after one stage
    m.predict(x, torch.ones_like(x))
    assert m.stats["stages"] == 1
    flip = {"n": 0}

    def alternating(xt, clean, t):  # a residual blob that moves every stage never settles
        flip["n"] += 1
        r = x.clone()
        k = (flip["n"] % 2) * 6
        r[..., k : k + 2, 0:3, 0:3] += 5.0  # 18 voxels: a clear outlier that moves (2 % of the brain)
        return r, 1

    monkeypatch.setattr(m, "restore", alternating)
    m.predict(x, torch.ones_like(x))
    assert m.stats["stages"] == 4  # bounded by max_stages


@pytest.mark.parametrize("cls", [PatchedDiffusion, MultiStageDiffusion])
def test_a_few_training_steps_restore_a_healthy_volume_better_than_noise(cls, syn_dataset):
    torch.manual_seed(0)
    subject = syn_dataset.transform()(syn_dataset.subjects("train", limit=1)[0])
    x = subject["image"].data[None, :, 4:20, 4:20, 4:20].float()
    mask = subject["brain_mask"].data[None, :, 4:20, 4:20, 4:20].float()
    kwargs = dict(block_size=8, context_size=16) if cls is PatchedDiffusion else dict(window=0)
    m = cls(spatial_dims=3, channels=(8, 16), lr=2e-3, **kwargs)
    t = torch.full((1,), 300, dtype=torch.long)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    x_t = m.schedule.add_noise(x, eps, t)
    with torch.no_grad():
        before = float(((m.denoise(x_t, t) - x).abs() * mask).sum() / mask.sum())
    opt = m.configure_optimizers("main")
    for _ in range(40):
        m.optimization_step(Batch(x.repeat(2, 1, 1, 1, 1), mask.repeat(2, 1, 1, 1, 1)), "main", opt)
    with torch.no_grad():
        after = float(((m.denoise(x_t, t) - x).abs() * mask).sum() / mask.sum())
    noise_err = float(((x_t - x).abs() * mask).sum() / mask.sum())
    assert after < 0.5 * noise_err and after < before


def test_cddpm_stages_train_their_own_parts_and_the_latent_conditions_the_restoration(monkeypatch):
    """cDDPM: the encoder stage trains encoder + pretext only, the main stage encoder + denoiser; the clean input's
    latent changes the restoration; a list of levels averages the reconstructions."""
    from volad.methods import ConditionedDiffusion

    torch.manual_seed(0)
    m = ConditionedDiffusion(spatial_dims=2, channels=(4, 8), encoder_arch="resnet10", t_test=[250, 500], window=0)
    assert m.stages == ("encoder", "main") and ConditionedDiffusion(spatial_dims=2, channels=(4, 8), encoder_arch="resnet10", pretrain="none").stages == ("main",)
    x = torch.rand(2, 1, 32, 32)
    batch = Batch(image=x, mask=torch.ones_like(x))

    def snapshot():
        return {k: v.clone() for k, v in m.state_dict().items() if v.dtype.is_floating_point}

    for stage, moved, kept in (("encoder", ("encoder.", "pretext."), ("net.",)), ("main", ("encoder.", "net."), ("pretext.",))):
        m.train()
        before = snapshot()
        optimizers = m.configure_optimizers(stage)
        for _ in range(3):  # MONAI zero-initialises the output convolutions: gradients reach the encoder from step 3 on
            m.optimization_step(batch, stage, optimizers)
        after = snapshot()
        changed = {k for k in before if not torch.equal(before[k], after[k]) and "running_" not in k and "num_batches" not in k}
        assert any(k.startswith(moved[0]) for k in changed) and any(k.startswith(moved[1]) for k in changed), stage
        assert not any(k.startswith(kept[0]) for k in changed), stage
    m.eval()
    t = m.timesteps_like(500, 2, x.device)
    with torch.no_grad():
        x_t = m.schedule.add_noise(x, torch.randn_like(x), t)
        same_latent = m.denoise(x_t, t, m.encoder(x))
        other_latent = m.denoise(x_t, t, m.encoder(x * 2.0))  # a brighter scan: another latent
    assert not torch.allclose(same_latent, other_latent)
    monkeypatch.setattr(m, "restore", lambda x_t, clean, level: (torch.full_like(clean, float(level)), 1))
    out = m.predict(x, torch.ones_like(x[:, :1]))
    assert torch.allclose(out.reconstruction, torch.full_like(x, 375.0)) and m.stats == {"passes": 2, "levels": 2}
