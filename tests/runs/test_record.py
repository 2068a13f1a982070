"""A run folder describes itself: the checkpoint records the method and data, and rebuilds them."""

from __future__ import annotations

import json

import pytest
import torch

from volad.bundle.config import bundle_config
from volad.bundle.overrides import check_overrides
from volad.errors import VoladConfigError
from volad.methods import AutoEncoder, ReverseDistillation, VariationalAutoEncoder
from volad.runs.checkpoint import save_checkpoint
from volad.runs.record import open_run
from volad.types import Batch
from volad.utils.seed import seed_everything

TINY = dict(dataset="synthetic", patch_size=16, batch_size=2, device="cpu", val_interval=0, samples_per_volume=2, max_epochs=1)


@pytest.fixture(scope="module")
def trained(syn_root, tmp_path_factory):
    """A tiny trained ae3d run (latent_channels 8, so not the bundle default)."""
    out = tmp_path_factory.mktemp("run") / "ae"
    seed_everything(0)
    cfg = bundle_config("ae3d", "train", **TINY, data_root=str(syn_root), output_dir=str(out), latent_channels=8)
    trainer = cfg.get_parsed_content("trainer", instantiate=True)
    trainer.run()
    return out, trainer.method


def test_checkpoint_records_method_data_and_inference_defaults(trained, syn_root):
    out, method = trained
    run = open_run(out)
    assert run.kind == "AutoEncoder" and run.hparams == method.hparams and run.hparams["latent_channels"] == 8
    assert run.data["train_dataset"] == "synthetic" and run.data["contrasts"] == ["flair"]
    assert run.data["train_root"] == str(syn_root.resolve()) and run.data["val_spec"] == "synthetic"
    assert run.run["patch_size"] == 16 and run.inference == {"patch_size": None, "batch_size": 2}
    rebuilt = run.method().eval()
    x, mask = torch.rand(1, 1, 24, 24, 24), torch.ones(1, 1, 24, 24, 24)
    with torch.no_grad():
        assert torch.equal(rebuilt.predict(x, mask).anomaly_map, method.eval().predict(x, mask).anomaly_map)
    assert rebuilt.checkpoint_info["sha256"] and rebuilt.checkpoint_info["path"].endswith(".pt")


def test_only_inference_settings_can_change(trained):
    out, _ = trained
    with pytest.raises(VoladConfigError, match="latent_channels is fixed by training for AutoEncoder"):
        open_run(out).method(latent_channels=16)


def test_training_settings_given_to_inference_are_checked_against_the_run(trained):
    out, _ = trained
    config = json.loads(open("bundles/ae3d/inference.json").read())
    where = dict(output_dir=str(out), checkpoint="last")
    with pytest.raises(VoladConfigError, match=r"trained with latent_channels=8, this command asks for latent_channels=16"):
        check_overrides({"latent_channels": "16", **where}, config, "bundles/ae3d/inference.json")
    with pytest.raises(VoladConfigError, match=r"trained with patch_size=16, this command asks for patch_size=32"):
        check_overrides({"patch_size": "32", **where}, config, "bundles/ae3d/inference.json")
    with pytest.raises(VoladConfigError, match="max_epochs is a training setting that inference does not use"):
        check_overrides({"max_epochs": "5", **where}, config, "bundles/ae3d/inference.json")
    # Repeating the run's own values (as older scripts did) is accepted, with a note.
    notes = check_overrides({"latent_channels": "8", "patch_size": "16", "dataset": "synthetic", **where}, config, "bundles/ae3d/evaluate.json")
    assert notes and "the run's own setting" in notes[0]
    with pytest.raises(VoladConfigError, match="unknown setting --latent_channel"):
        check_overrides({"latent_channel": "8", **where}, config, "bundles/ae3d/inference.json")


def test_a_checkpoint_without_a_record_is_refused_clearly(tmp_path):
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"method": {}, "hparams": {"kind": "ae", "spatial_dims": 3}, "epoch": 1})
    with pytest.raises(VoladConfigError, match="does not record how its method and data were set up"):
        open_run(tmp_path)


def test_hparams_are_the_constructor_arguments_with_parent_defaults():
    vae = VariationalAutoEncoder(spatial_dims=2, channels=(4, 8), kl_weight=0.5)
    h = vae.hparams
    assert h["kind"] == "VariationalAutoEncoder" and h["kl_weight"] == 0.5 and h["channels"] == [4, 8]
    assert h["latent_channels"] == 16 and h["lr"] == 1e-3  # the parent's defaults, filled in
    again = VariationalAutoEncoder.rebuild(h)
    assert again.hparams == h and type(again) is VariationalAutoEncoder
    assert AutoEncoder(spatial_dims=3).hparams["kind"] == "AutoEncoder"


def test_a_medicalnet_teacher_rebuilds_without_its_weights_file(tmp_path):
    from tests.methods.test_distillation import _medicalnet_file

    _, path = _medicalnet_file(tmp_path)
    m = ReverseDistillation(spatial_dims=3, teacher="medicalnet", teacher_arch="resnet10", teacher_weights=str(path)).eval()
    state = m.state_dict()
    path.unlink()  # the run moved to another machine: the file is gone, the checkpoint holds the weights
    again = ReverseDistillation.rebuild(m.hparams)
    again.load_state_dict(state)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(again.eval()(x), m(x), atol=1e-6)
    assert again.hparams == m.hparams and again.stages == m.stages


def test_the_trainer_pads_batches_to_the_network_divisor(syn_root, tmp_path):
    """One padding rule: a patch that is no multiple of the network's divisor trains (the trainer pads, as inference does)."""
    seed_everything(0)
    over = {**TINY, "patch_size": 18, "channels": [4, 8], "latent_channels": 4, "skip_connections": False}
    cfg = bundle_config("ae3d", "train", **over, data_root=str(syn_root), output_dir=str(tmp_path / "run"))
    trainer = cfg.get_parsed_content("trainer", instantiate=True)
    assert 18 % trainer.method.size_divisor != 0
    assert (trainer.run()).is_file()
    padded = Batch(torch.ones(1, 1, 18, 18, 18), torch.ones(1, 1, 18, 18, 18)).padded(4)
    assert padded.image.shape == (1, 1, 20, 20, 20) and padded.mask[..., 18:].sum() == 0
