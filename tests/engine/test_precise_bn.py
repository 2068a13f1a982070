"""Precise batch norm: statistics recomputed as the plain average over kept batches, on the weights validated and saved."""

from __future__ import annotations

import pytest
import torch

from volad.engine.precise_bn import recompute_batch_norm
from volad.errors import VoladConfigError
from volad.methods import AutoEncoder
from volad.types import Batch


def _batches(n: int, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [Batch(image=torch.randn(2, 1, 16, 16, 16, generator=g) * (1 + i), mask=torch.ones(2, 1, 16, 16, 16)) for i in range(n)]


def test_statistics_are_the_plain_average_over_the_batches_and_the_method_is_left_as_it_was():
    torch.manual_seed(0)
    method = AutoEncoder(spatial_dims=3, in_channels=1)
    bn = next(m for m in method.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    seen = []
    bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    method.eval()
    method.stats = {"marker": 1}
    batches = _batches(3)
    assert recompute_batch_norm(method, batches, "main") > 0
    assert len(seen) == 3
    dims = [0] + list(range(2, seen[0].dim()))
    mean = torch.stack([x.mean(dim=dims) for x in seen]).mean(0)
    var = torch.stack([x.var(dim=dims, unbiased=True) for x in seen]).mean(0)
    # a cumulative average of the three batches' statistics, not training's exponential one (which would weigh the last most)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5) and torch.allclose(bn.running_var, var, rtol=1e-4)
    assert int(bn.num_batches_tracked) == 3 and bn.momentum == 0.1
    assert not method.training and method.stats == {"marker": 1}


def test_a_method_without_batch_norm_or_without_batches_is_untouched():
    method = AutoEncoder(spatial_dims=3, in_channels=1)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    assert recompute_batch_norm(method, [], "main") == 0
    assert all(torch.equal(v, method.state_dict()[k]) for k, v in before.items())


def test_training_validates_and_saves_recomputed_statistics_also_under_weight_averaging(tmp_path, syn_root):
    from volad.engine.trainer import Trainer

    def train(out, **kw):
        torch.manual_seed(0)
        method = AutoEncoder(spatial_dims=3, in_channels=1)
        Trainer(method=method, dataset="synthetic", data_root=str(syn_root), output_dir=str(out), patch_size=16, max_epochs=2,
                batch_size=2, samples_per_volume=2, val_interval=1, device="cpu", **kw).run()
        return {n: torch.load(out / "checkpoints" / n, map_location="cpu", weights_only=True) for n in ("best.pt", "last.pt")}

    plain = train(tmp_path / "plain")
    precise = train(tmp_path / "precise", precise_bn_batches=2)
    averaged = train(tmp_path / "averaged", precise_bn_batches=2, ema_decay=0.99)
    key = next(k for k in plain["last.pt"]["method"] if k.endswith("num_batches_tracked"))
    assert int(plain["last.pt"]["method"][key]) == 2 * 6  # training's running average: every step of both epochs
    for ck in (precise, averaged):
        # recomputed over the epoch's last two batches just before the check, in what is validated and saved
        assert int(ck["last.pt"]["method"][key]) == 2 and int(ck["best.pt"]["method"][key]) == 2
        assert ck["last.pt"]["run"]["precise_bn_batches"] == 2
    # the raw weights training goes on from keep their own running statistics, updated by the steps after
    assert int(averaged["last.pt"]["train_state"][key]) != 2
    mean_key = key.replace("num_batches_tracked", "running_mean")
    assert not torch.equal(precise["last.pt"]["method"][mean_key], plain["last.pt"]["method"][mean_key])


@pytest.mark.parametrize("setting, match", [({"precise_bn_batches": -1}, "precise_bn_batches must be 0"), ({"average_best": 0}, "average_best must be 1")])
def test_the_trainer_refuses_a_negative_precise_bn_count_and_an_average_of_no_epochs(tmp_path, syn_root, setting, match):
    from volad.engine.trainer import Trainer

    with pytest.raises(VoladConfigError, match=match):
        Trainer(method=AutoEncoder(spatial_dims=3, in_channels=1), dataset="synthetic", data_root=str(syn_root), output_dir=str(tmp_path / "run"),
                patch_size=16, max_epochs=1, device="cpu", **setting)
