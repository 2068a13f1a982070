"""The trainer's learning-rate schedule (the rest of training is tested through the bundles and tests/test_reliability.py)."""

from __future__ import annotations

import pytest
import torch


def test_cosine_schedule_decays_the_learning_rate_to_zero_over_the_stage(tmp_path, syn_root):
    import math

    from volad.engine import Trainer
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
