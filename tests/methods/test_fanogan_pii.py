"""f-AnoGAN (gradient penalty, stage hand-over, map/score) and the synthetic-anomaly detector."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from volad.engine.trainer import Trainer
from volad.errors import VoladConfigError
from volad.methods import FAnoGAN, SyntheticAnomalyDetector
from volad.methods.base import Batch
from volad.methods.fanogan import gradient_penalty
from volad.runs.checkpoint import load_trained
from volad.synthesis.validation import synthetic_validation_set


class LinearCritic(torch.nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x):
        return (x.flatten(1) * self.w.flatten()).sum(1, keepdim=True)


@pytest.mark.parametrize("norm", [0.5, 1.0, 3.0])
def test_gradient_penalty_of_a_linear_critic(norm):
    """D(x) = <w, x> has gradient w everywhere, so the penalty is (‖w‖ − 1)² wherever x̂ lies."""
    w = torch.randn(1, 4, 4, 4)
    w = w / w.norm() * norm
    real, fake = torch.randn(3, 1, 4, 4, 4), torch.randn(3, 1, 4, 4, 4)
    gp = gradient_penalty(LinearCritic(w), real, fake)
    assert torch.isclose(gp, torch.tensor((norm - 1.0) ** 2), atol=1e-5)
    gp.backward()  # the penalty trains the critic (double backward works)


def test_gradient_penalty_on_a_quadratic_critic_uses_the_interpolate():
    """D(x) = ½‖x‖²: ∇D(x̂) = x̂, so the penalty is (‖ε·real + (1 − ε)·fake‖ − 1)²."""
    critic = lambda x: 0.5 * (x.flatten(1) ** 2).sum(1, keepdim=True)  # noqa: E731
    real, fake = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    eps = torch.tensor([0.25, 0.8])
    mixed = eps.view(2, 1, 1, 1) * real + (1 - eps.view(2, 1, 1, 1)) * fake
    expected = ((mixed.flatten(1).norm(dim=1) - 1) ** 2).mean()
    assert torch.isclose(gradient_penalty(critic, real, fake, eps), expected, atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_fanogan_map_mean_is_the_papers_score(spatial_dims):
    torch.manual_seed(0)
    m = FAnoGAN(spatial_dims=spatial_dims, image_size=16, latent_dim=8, generator_channels=(16, 8), critic_channels=(8, 16)).eval()
    x = torch.rand(3, 1, *([16] * spatial_dims))
    out = m.predict(x)
    assert out.reconstruction.shape == x.shape and out.anomaly_map.shape == (3, 1, *([16] * spatial_dims))
    score = m.anomaly_score(x)
    assert torch.allclose(out.anomaly_map.flatten(1).mean(1), score, rtol=0.1)
    with pytest.raises(ValueError, match="16"):
        m.predict(torch.rand(1, 1, *([24] * spatial_dims)))


def _trainer(method, syn_root, out, **kw):
    return Trainer(method=method, dataset="synthetic", data_root=str(syn_root), output_dir=str(out), patch_size=16, batch_size=2,
                   samples_per_volume=2, max_epochs=1, device="cpu", val_interval=0, inference_patch_size=16, **kw)


def test_fanogan_stages_run_separately_and_hand_over(tmp_path, syn_root):
    """Stage encoder needs a finished gan; it then trains only the encoder, on the frozen G and D."""
    kw = dict(spatial_dims=3, image_size=16, latent_dim=8, generator_channels=(16, 8), critic_channels=(8, 16), n_critic=2)
    torch.manual_seed(0)
    with pytest.raises(VoladConfigError, match="needs stage"):
        _trainer(FAnoGAN(**kw), syn_root, tmp_path, stage="encoder").run()
    _trainer(FAnoGAN(**kw), syn_root, tmp_path, stage="gan").run()
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["completed_stages"] == ["gan"] and last["stage"] == "gan"
    gan = {k: v.clone() for k, v in last["method"].items() if not k.startswith("encoder.")}
    enc = {k: v.clone() for k, v in last["method"].items() if k.startswith("encoder.")}
    trainer = _trainer(FAnoGAN(**kw), syn_root, tmp_path, stage="encoder")
    trainer.run()
    after = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert after["completed_stages"] == ["gan", "encoder"]
    for k, v in gan.items():  # batch-norm statistics included: G and D stay in eval mode
        assert torch.equal(after["method"][k], v), k
    assert any(not torch.equal(after["method"][k], v) for k, v in enc.items())
    assert not any(p.requires_grad for p in trainer.method.generator.parameters())
    with pytest.raises(VoladConfigError, match="not 'teacher'"):
        _trainer(FAnoGAN(**kw), syn_root, tmp_path, stage="teacher")


def test_pii_detector_finds_synthetic_anomalies_it_never_saw(syn_dataset):
    """400 steps on random 16³ patches of 4 healthy volumes; new anomalies in 2 unseen volumes are found far above chance."""
    torch.manual_seed(0)
    tf = syn_dataset.transform()
    vols = [(s["image"].data.float(), s["brain_mask"].data.float()) for s in map(tf, syn_dataset.subjects("train"))]
    m = SyntheticAnomalyDetector(spatial_dims=3, channels=(8, 16, 32), radius_range=(0.15, 0.3), lr=2e-3, seed=0)
    opt = m.configure_optimizers("main")
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        xs, ms = [], []
        for _ in range(4):
            image, brain = vols[int(torch.randint(4, (1,), generator=g))]
            crop = (slice(None), *[slice(a, a + 16) for a in torch.randint(0, image.shape[1] - 15, (3,), generator=g).tolist()])
            xs.append(image[crop])
            ms.append(brain[crop])
        m.optimization_step(Batch(torch.stack(xs), torch.stack(ms)), "main", opt)
    cases = synthetic_validation_set(vols[4:] * 2, ["pii", "intensity", "deformation", "cutout"], radius_range=(0.1, 0.2), seed=99)
    m.eval()
    scores, labels = [], []
    for image, brain, label in cases:
        amap = m.predict(image[None], brain[None]).anomaly_map[0, 0]
        sel = brain[0] > 0
        scores.append(amap[sel].numpy())
        labels.append(label[0][sel].numpy() > 0)
    s, y = np.concatenate(scores), np.concatenate(labels)
    assert roc_auc_score(y, s) > 0.65  # chance: 0.5
    assert average_precision_score(y, s) > 4 * y.mean()  # chance: the prevalence


def test_pii_training_step_synthesises_and_learns_shapes(syn_dataset):
    m = SyntheticAnomalyDetector(spatial_dims=2, channels=(4, 8), seed=1, anomaly_probability=1.0)
    x, mask = torch.rand(3, 1, 16, 16), torch.ones(3, 1, 16, 16)
    loss = m.training_step(Batch(x, mask), "main")["loss"]
    assert torch.isfinite(loss) and len(m.stats["synthesis"]) == 3 and all(r["task"] for r in m.stats["synthesis"])
    with pytest.raises(ValueError, match="nothing is left"):
        SyntheticAnomalyDetector(tasks=["pii"], val_tasks=["pii"])
    with pytest.raises(ValueError, match="radius_prior"):
        SyntheticAnomalyDetector(radius_prior="normal")


def test_dice_term_gives_a_millimetre_anomaly_the_weight_of_a_centimetre_one():
    """Cross-entropy alone charges a missed anomaly by its volume; the Dice term charges a missed one-voxel-radius
    anomaly as much as a missed one 27 times its size. Empty samples are left to the cross-entropy."""
    from torch.nn.functional import binary_cross_entropy_with_logits as bce

    from volad.methods.pii import localisation_loss

    label = torch.zeros(2, 1, 24, 24, 24)
    label[0, 0, 11:14, 11:14, 11:14] = 1.0  # 27 voxels
    label[1, 0, 3:12, 3:12, 3:12] = 1.0  # 729 voxels

    def cost_of_missing(sample, dice_weight):
        found = torch.where(label > 0, 12.0, -12.0)  # every voxel right, confidently
        missed = found.clone()
        missed[sample][label[sample] > 0] = -12.0
        return float(localisation_loss(missed, label, dice_weight)["loss"] - localisation_loss(found, label, dice_weight)["loss"])

    assert cost_of_missing(1, 0.0) / cost_of_missing(0, 0.0) == pytest.approx(27, rel=1e-3)
    assert cost_of_missing(1, 1.0) / cost_of_missing(0, 1.0) < 1.6
    dice_small = localisation_loss(torch.where(label > 0, 12.0, -12.0).index_fill(0, torch.tensor([0]), -12.0), label, 1.0)["dice"]
    assert float(dice_small) == pytest.approx(0.5, abs=1e-3)  # one of two samples entirely missed
    logits = torch.randn(label.shape)
    assert torch.equal(localisation_loss(logits, label)["loss"], bce(logits, label))
    empty = torch.zeros_like(label)
    assert torch.allclose(localisation_loss(logits, empty, 1.0)["loss"], bce(logits, empty))
    parts = localisation_loss(logits, label, 0.5)
    assert torch.allclose(parts["loss"], parts["bce"] + 0.5 * parts["dice"]) and 0 < parts["dice"] < 1


def test_inference_only_settings_load_any_checkpoint_and_tune_on_val(tmp_path, syn_root, capsys):
    """t_test may differ from training (it is chosen on val by volad tune); block_size may not."""
    from volad.bundle.config import bundle_config
    from volad.pipelines.tuning import main as tune_main

    out = tmp_path / "run"
    over = dict(dataset="synthetic", data_root=str(syn_root), output_dir=str(out), patch_size=16, block_size=8, context_size=16,
                channels=[4, 8], max_epochs=1, device="cpu", val_interval=0)
    bundle_config("pddpm3d", "train", **over).get_parsed_content("trainer", instantiate=True).run()
    other_t = bundle_config("pddpm3d", "train", **dict(over, t_test=120)).get_parsed_content("method", instantiate=True)
    assert load_trained(other_t, out, "last").t_test == [120]
    other_block = bundle_config("pddpm3d", "train", **dict(over, block_size=4)).get_parsed_content("method", instantiate=True)
    with pytest.raises(VoladConfigError, match="block_size"):
        load_trained(other_block, out, "last")
    # The run folder records the method and data: tuning needs no training overrides.
    assert tune_main(["pddpm3d", "--output_dir", str(out), "--param", "t_test", "--values", "100", "[100,300]", "--checkpoint", "last", "--device", "cpu"]) == 0
    record = json.loads((out / "tuning_t_test.json").read_text())
    assert record["chosen_on"] == "val" and [r["value"] for r in record["rows"]] == [100, [100, 300]]  # a level, and a noise-level ensemble
    assert all(0 <= r["val_auprc"] <= 1 for r in record["rows"]) and record["best"] in (100, [100, 300])
    assert "best on val: t_test=" in capsys.readouterr().out
    with pytest.raises(VoladConfigError, match="changes training"):
        tune_main(["pddpm3d", "--output_dir", str(out), "--param", "block_size", "--values", "4", "--checkpoint", "last"])
