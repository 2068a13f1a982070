"""Weight averaging: the warmed-up decay; training validates and saves the average, and resumes the raw weights."""

from __future__ import annotations

import torch
from torch import nn

from volad.engine.ema import WeightAverage


def test_average_follows_the_decay_and_applied_restores_the_raw_weights():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = WeightAverage(net, decay=0.9)
    expected = net[0].weight.detach().clone()
    for n in range(1, 6):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        ema.update(net)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * net[0].weight.detach()
    assert torch.allclose(ema.state["0.weight"], expected)
    assert ema.state["1.num_batches_tracked"] == net[1].num_batches_tracked  # integers are copied, not averaged
    raw = net[0].weight.detach().clone()
    with ema.applied(net) as saved:
        assert torch.allclose(net[0].weight, expected) and torch.equal(saved["0.weight"], raw)
    assert torch.equal(net[0].weight, raw)


def test_training_saves_the_average_for_inference_and_resumes_the_raw_weights(tmp_path, syn_root):
    from volad.engine.trainer import Trainer
    from volad.methods import AutoEncoder

    def trainer(epochs, ema_decay=0.995):
        torch.manual_seed(0)
        method = AutoEncoder(spatial_dims=3, in_channels=1)
        return Trainer(method=method, dataset="synthetic", data_root=str(syn_root), output_dir=str(tmp_path), patch_size=16,
                       max_epochs=epochs, batch_size=2, samples_per_volume=2, val_interval=1, device="cpu", ema_decay=ema_decay)

    trainer(2).run()
    last = torch.load(tmp_path / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    key = next(k for k, v in last["method"].items() if v.dtype.is_floating_point and v.dim() > 1)
    assert last["ema_updates"] == 2 * 6  # 6 subjects x 2 patches / batch 2, two epochs
    # The completed stage's result is its average; the raw weights stay beside it, for a longer run to continue from.
    assert not torch.equal(last["train_state"][key], last["method"][key])
    assert [h["epoch"] for h in last["history"]] == [1, 2] and all(h["val_auprc"] is not None for h in last["history"])
    assert (tmp_path / "training.png").stat().st_size > 1000
    trainer(3, ema_decay=0.99).run()  # the decay may change on resume: it shapes the average, not the training path
    longer = torch.load(tmp_path / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert longer["ema_updates"] == 3 * 6 and longer["run"]["ema_decay"] == 0.99  # the average continued across the resume
    assert [h["epoch"] for h in longer["history"]] == [1, 2, 3]
    best = torch.load(tmp_path / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    # best.pt holds the averaged weights it was validated with, and nothing only a resume needs.
    assert not {"train_state", "ema_updates", "optimizers", "engine", "torch_rng"} & set(best)
    assert best["val_auprc"] == max(h["val_auprc"] for h in longer["history"])


def test_statistics_stages_are_not_averaged(tmp_path, syn_root):
    """A stage without optimisers (a normative model's one-pass statistics) keeps its exact accumulated values."""
    from volad.engine.trainer import Trainer
    from volad.methods import NormativeBaseline

    Trainer(method=NormativeBaseline(), dataset="synthetic", data_root=str(syn_root), output_dir=str(tmp_path), max_epochs=1, device="cpu").run()
    last = torch.load(tmp_path / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert "train_state" not in last and "ema_updates" not in last


def test_a_finished_averaged_run_asked_for_more_epochs_is_the_run_it_would_have_been(tmp_path, syn_root):
    """Before the fix the finished stage saved its average as the raw weights too, so 1 + 1 epochs continued
    from the average and differed from 2 epochs straight (by about the learning rate, in most weights)."""
    from volad.engine.trainer import Trainer
    from volad.methods import AutoEncoder

    def run(out, epochs):
        torch.manual_seed(0)
        Trainer(method=AutoEncoder(spatial_dims=3, in_channels=1), dataset="synthetic", data_root=str(syn_root), output_dir=str(out),
                patch_size=16, max_epochs=epochs, batch_size=2, samples_per_volume=2, val_interval=0, device="cpu", ema_decay=0.9,
                seed=5).run()
        return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)

    straight = run(tmp_path / "straight", 2)
    run(tmp_path / "extended", 1)
    extended = run(tmp_path / "extended", 2)
    for part in ("method", "train_state"):
        assert straight[part].keys() == extended[part].keys()
        assert all(torch.equal(straight[part][k], extended[part][k]) for k in straight[part]), part


def test_a_stage_after_an_averaged_one_starts_from_the_average_also_after_a_resume(tmp_path, syn_root):
    """Killed between two stages, a resumed run hands the next stage the first stage's average, as an uninterrupted one."""
    from volad.engine.trainer import Trainer
    from volad.methods import AutoEncoder

    class TwoStages(AutoEncoder):
        stages = ("warm", "main")

    started = {}

    def run(out, stage=None):
        torch.manual_seed(0)
        method = TwoStages(spatial_dims=3, in_channels=1)
        original = method.configure_optimizers

        def configure(stage_name):
            started.setdefault(str(out), {})[stage_name] = {k: v.clone() for k, v in method.state_dict().items()}
            return original("main")

        method.configure_optimizers = configure
        Trainer(method=method, dataset="synthetic", data_root=str(syn_root), output_dir=str(out), patch_size=16, max_epochs=1,
                batch_size=2, samples_per_volume=2, val_interval=0, device="cpu", ema_decay=0.9, seed=5, stage=stage).run()
        return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)

    run(tmp_path / "straight")
    run(tmp_path / "resumed", stage="warm")  # stops after the first stage, as a kill between the stages would
    run(tmp_path / "resumed")
    straight, resumed = started[str(tmp_path / "straight")]["main"], started[str(tmp_path / "resumed")]["main"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
