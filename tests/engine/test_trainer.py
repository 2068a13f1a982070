"""The trainer's learning-rate schedule (the rest of training is tested through the bundles and tests/test_reliability.py)."""

from __future__ import annotations

import pytest
import torch


def test_cosine_schedule_decays_the_learning_rate_to_zero_over_the_stage(tmp_path, syn_root):
    import math

    from volad.engine.trainer import Trainer
    from volad.errors import VoladConfigError
    from volad.methods import AutoEncoder

    def trainer(**kw):
        torch.manual_seed(0)
        return Trainer(method=AutoEncoder(lr=1e-3), dataset="synthetic", data_root=str(syn_root), output_dir=str(tmp_path), patch_size=16,
                       max_epochs=2, batch_size=2, samples_per_volume=2, val_interval=0, device="cpu", **kw)

    trainer(lr_schedule="cosine").run()
    group = torch.load(tmp_path / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["optimizers"]["main"]["param_groups"][0]
    steps = 2 * 6  # two epochs of 6 steps; the last step ran at step index 11 of 12
    assert group["initial_lr"] == 1e-3
    assert group["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (steps - 1) / steps)))
    with pytest.raises(VoladConfigError, match="lr_schedule: run has 'cosine', this command 'constant'"):
        trainer(lr_schedule="constant").run()  # the schedule shapes the training path: a resume may not change it
    with pytest.raises(VoladConfigError, match="lr_schedule must be constant or cosine"):
        trainer(lr_schedule="linear")


def test_cpu_budget_saves_snapshots_ends_training_and_is_not_spent_twice(tmp_path, syn_root, capsys):
    """``snapshot_minutes`` / ``max_cpu_minutes`` (the budget study): the run stops on CPU time, not on max_epochs."""
    from volad.engine.trainer import Trainer
    from volad.errors import VoladConfigError
    from volad.methods import AutoEncoder
    from volad.runs.checkpoint import read_checkpoint

    def trainer(**kw):
        torch.manual_seed(0)
        return Trainer(method=AutoEncoder(lr=1e-3), dataset="synthetic", data_root=str(syn_root), output_dir=str(tmp_path), patch_size=16,
                       max_epochs=50, batch_size=2, samples_per_volume=2, val_interval=0, device="cpu", tensorboard=False, **kw)

    tiny = 1e-6  # passed within the first epoch
    trainer(snapshot_minutes=[tiny, 1000.0], max_cpu_minutes=tiny).run()
    ck = tmp_path / "checkpoints"
    last = read_checkpoint(ck / "last.pt")
    assert last["epoch"] == 1 and last["completed_stages"] == ["main"]  # ended by the budget, 49 epochs early
    assert last["history"][0]["cpu_seconds"] > 0
    snap = read_checkpoint(ck / "cpu_1e-06min.pt")  # saved after the step that passed the mark: the first
    assert snap["epoch"] == 1 and "optimizers" not in snap  # weights and provenance only, like best.pt
    assert tiny <= snap["cpu_minutes"] < last["cpu_minutes"] == pytest.approx(last["history"][0]["cpu_seconds"] / 60, abs=1e-3)
    assert not all(torch.equal(v, last["method"][k]) for k, v in snap["method"].items())  # one step in, not the epoch's end
    assert not (ck / "cpu_1000min.pt").exists()  # never reached
    capsys.readouterr()
    trainer(snapshot_minutes=[tiny, 1000.0], max_cpu_minutes=tiny).run()  # the same command again: nothing more to train
    assert "already used its CPU budget" in capsys.readouterr().out
    assert read_checkpoint(ck / "last.pt")["epoch"] == 1
    with pytest.raises(VoladConfigError, match="max_cpu_minutes must be positive"):
        trainer(max_cpu_minutes=0)
    with pytest.raises(VoladConfigError, match="snapshot_minutes must be positive"):
        trainer(snapshot_minutes=[-1])
