"""torchrun: one DDP training over all processes, sharded inference, experiment tracking.

Two processes on the CPU (gloo), one thread each, as ``torchrun --standalone --nproc_per_node 2``
starts them from the README's command. Every check here failed before volad joined the process
group: two independent trainings raced on one ``last.pt``.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.conftest import REPO
from volad.data.views import set_epoch, subject_ids, training_loader

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
#: Whole 24³ volumes of two training subjects with one brain mask, no noise and instance norm: one
#: process with a batch of 2 and two processes with a batch of 1 each see the same data and the same
#: brain-voxel weighting of the loss, so DDP must give the same weights.
SAME_DATA = ["--patch_size", "0", "--coarse_noise_std", "0", "--method#norm", "INSTANCE", "--val_interval", "0", "--device", "cpu", "--seed", "3"]


def _bundle(role: str, out: Path, *args: str, processes: int = 1, bundle: str = "ae3d") -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
    cmd = [*launch, "-m", "monai.bundle", "run", "--config_file", f"bundles/{bundle}/{role}.json", "--output_dir", str(out), *args]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["method"]


def _differences(a: dict, b: dict) -> torch.Tensor:
    assert a.keys() == b.keys()
    return torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in a if a[k].is_floating_point()])


def test_each_process_draws_its_own_subjects(syn_dataset):
    """DistributedSampler shares: disjoint, equal in length (so no rank waits), reshuffled by set_epoch."""
    subjects = syn_dataset.subjects("train")
    transform = syn_dataset.transform()
    for view, patch in (("patch", 16), ("patch", 0)):
        loaders = [training_loader(subjects, transform, spatial_dims=3, patch_size=patch, batch_size=2, samples_per_volume=2,
                                   view=view, seed=0, rank=r, world_size=2) for r in (0, 1)]
        shares = [subject_ids(loader) for loader in loaders]
        assert not set(shares[0]) & set(shares[1]) and len(shares[0]) == len(shares[1]) == len(subjects) // 2
        assert sorted(shares[0] + shares[1]) == sorted(s["subject_id"] for s in subjects)
        assert len(loaders[0]) == len(loaders[1])
        before = [subject_ids(loader) for loader in loaders]
        for loader in loaders:
            set_epoch(loader, 5)
        assert [subject_ids(loader) for loader in loaders] != before
    odd = [training_loader(subjects[:5], transform, spatial_dims=3, patch_size=16, batch_size=2, samples_per_volume=2,
                           seed=0, rank=r, world_size=2) for r in (0, 1)]
    assert len(odd[0]) == len(odd[1])  # padded: an odd count still gives every rank the same number of steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same tiny ae3d training two ways: one process (with MLflow tracking, then its maps), and
    DDP stopped after epoch 1 then run again to epoch 2."""
    from volad.data.synthetic import generate_synthetic

    base = tmp_path_factory.mktemp("ddp")
    generate_synthetic(base / "data", shape=24, n_train=2, n_val=3, n_test=3, seed=0)
    shutil.copy(base / "data/syn-train-000/syn-train-000_brainmask.nii.gz", base / "data/syn-train-001/syn-train-001_brainmask.nii.gz")
    data = ["--dataset", "synthetic", "--data_root", str(base / "data"), *SAME_DATA]
    out = {name: base / name for name in ("one", "ddp")}
    out["one_log"] = _bundle("train", out["one"], *data, "--max_epochs", "2", "--batch_size", "2", "--tracking", "mlflow")
    _bundle("inference", out["one"])
    out["ddp_log"] = _bundle("train", out["ddp"], *data, "--max_epochs", "1", "--batch_size", "1", processes=2)
    out["resumed_log"] = _bundle("train", out["ddp"], *data, "--max_epochs", "2", "--batch_size", "1", processes=2)
    return out


def test_ddp_trains_one_model_and_resumes(runs):
    """Two processes with batch 1 give the weights of one process with batch 2 (gradients averaged),
    across a DDP run stopped after epoch 1 and resumed from rank 0's checkpoint; one voice prints.

    Tolerance: the gradients agree to rounding (~1e-8), but Adam's first steps move each weight by
    about ±lr whatever the gradient's size, so the few weights whose gradient is pure rounding noise
    (conv biases in front of instance norm) may differ by up to 2·lr; the bulk must agree to 1e-6.
    Without averaging, two processes on different subjects move most weights differently by ~lr.
    """
    log = runs["ddp_log"].stdout
    assert "2 processes (DDP, global batch 2)" in log
    assert sum(line.startswith("volad: main epoch 1/1") for line in log.splitlines()) == 1  # rank 0 only
    assert "continuing stage main from epoch 1 to 2" in runs["resumed_log"].stdout
    diff = _differences(_weights(runs["ddp"]), _weights(runs["one"]))
    assert float(diff.median()) < 1e-6 and float((diff > 1e-5).double().mean()) < 0.02 and float(diff.max()) <= 2.2e-3


def test_sharded_inference_writes_the_maps_of_one_process(runs, tmp_path):
    run = runs["one"]
    shared = _bundle("inference", run, "--maps_dir", str(tmp_path / "shared"), processes=2)
    assert "wrote 6 anomaly map(s)" in shared.stdout
    one, two = (json.loads((d / "index.json").read_text())["subjects"] for d in (run / "maps", tmp_path / "shared"))
    assert [e["subject_id"] for e in one] == [e["subject_id"] for e in two]
    for entry in one:
        a = nib.load(run / "maps" / entry["anomaly_map"]).get_fdata()
        b = nib.load(tmp_path / "shared" / entry["anomaly_map"]).get_fdata()
        np.testing.assert_allclose(a, b, atol=1e-6)


def _mlflow(db: Path) -> dict[str, dict]:
    """Runs of an MLflow SQLite store by start time: metric keys (with steps), params and artefact folder."""
    con = sqlite3.connect(db)
    runs = {}
    for run_id, uri in con.execute("select run_uuid, artifact_uri from runs order by start_time"):
        metrics = {}
        for key, step in con.execute("select key, step from metrics where run_uuid=?", (run_id,)):
            metrics.setdefault(key, []).append(step)
        params = dict(con.execute("select key, value from params where run_uuid=?", (run_id,)))
        runs[run_id] = {"metrics": metrics, "params": params, "artifacts": uri}
    return runs


def test_tracking_records_training_and_evaluation(runs):
    """``--tracking mlflow`` (MONAI's option) records settings, losses and val AUPRC per epoch, then the
    evaluation's figures and report; TensorBoard event files hold the same curves."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs["one"]
    _bundle("evaluate", run, "--bootstrap", "0", "--tracking", "mlflow")
    training, evaluation = _mlflow(run / "mlruns.db").values()
    assert sorted(training["metrics"]["loss"]) == [1, 2]  # per epoch (steps are epochs)
    assert len(training["metrics"]["train_loss"]) >= 2  # per iteration
    assert training["params"]["method.kind"] == "AutoEncoder" and training["params"]["run.seed"] == "3"
    assert {"voxel_auprc", "voxel_dice", "voxel_dice_oracle", "lesion_f1"} <= set(evaluation["metrics"])
    kept = {p.name for p in Path(evaluation["artifacts"].removeprefix("file://")).iterdir()}
    assert {"report.json", "curves.png"} <= kept
    assert (Path(training["artifacts"].removeprefix("file://")) / "training.png").is_file()
    events = EventAccumulator(str(run / "tensorboard" / "main"))
    events.Reload()
    assert {"train_loss", "loss", "l1"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2]  # epochs
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2]  # iterations: one batch of both subjects per epoch


def _in_group(rank: int, port: int, results) -> None:
    """One of two gloo processes: sums over processes, and gradients DDP averages for every kind of step."""
    import torch.distributed as dist

    from volad.methods import AutoEncoder, FAnoGAN
    from volad.methods.baselines import NormativeBaseline
    from volad.types import Batch
    from volad.utils import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out = {}
        # The normative model's sums: each process fits its own volumes; after reduce both hold all of them,
        # and a second epoch's reduce adds only what was added since (a resumed run counts nothing twice).
        model = NormativeBaseline(in_channels=1)
        volumes = torch.arange(4 * 8, dtype=torch.float32).reshape(4, 1, 2, 2, 2) ** 0.5  # 4 volumes, 2 per process
        summed = distributed.SummedBuffers(model)
        model.optimization_step(Batch(volumes[rank :: 2], torch.ones(2, 1, 2, 2, 2)), "fit", {})
        summed.reduce()
        model.optimization_step(Batch(volumes[rank :: 2], torch.ones(2, 1, 2, 2, 2)), "fit", {})
        summed.reduce()
        assert torch.equal(model.count, torch.full_like(model.count, float(model.subjects)))  # the per-voxel coverage adds up too
        out["normative"] = (model.subjects.item(), model.mean.clone(), model.std.clone())
        # One update of each kind under DDP on different data per process: the weights stay identical.
        torch.manual_seed(0)
        ae = AutoEncoder(spatial_dims=3, in_channels=1, channels=[4, 8], latent_channels=4)
        gan = FAnoGAN(spatial_dims=3, in_channels=1, image_size=16, latent_dim=8, generator_channels=[8, 4], critic_channels=[4, 8], n_critic=1)
        torch.manual_seed(10 + rank)  # different data and noise per process
        x, mask = torch.rand(2, 1, 16, 16, 16), torch.ones(2, 1, 16, 16, 16)
        for method, stage in ((ae, "main"), (gan, "gan"), (gan, "encoder")):
            optimizers = method.configure_optimizers(stage)
            optimised = {id(p) for o in optimizers.values() for g in o.param_groups for p in g["params"]}
            method.distribute(stage, lambda m: distributed.data_parallel(m, optimised))
            method.optimization_step(Batch(x, mask), stage, optimizers)
            method.distribute(stage, None)
        for name, method in (("ae", ae), ("gan", gan)):
            out[name] = {k: v.detach().clone() for k, v in method.named_parameters()}  # batch-norm statistics stay per process on the CPU
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_processes_agree_on_statistics_and_weights():
    """Summed statistics and DDP-averaged updates (the default step, f-AnoGAN's critic with its gradient
    penalty and its generator, its encoder) leave both processes with the same model."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_in_group, args=(port, results), nprocs=2, join=True)
    one, two = results[0], results[1]
    volumes = (torch.arange(4 * 8, dtype=torch.float64).reshape(4, 1, 2, 2, 2) ** 0.5).repeat(2, 1, 1, 1, 1)
    count, mean, std = one["normative"]
    assert count == 8 and two["normative"][0] == 8
    torch.testing.assert_close(mean, volumes.mean(0).float())
    torch.testing.assert_close(std, (volumes.var(0) + 0.05**2).sqrt().float())  # the floor in quadrature
    for name in ("ae", "gan"):
        for key in one[name]:
            torch.testing.assert_close(one[name][key], two[name][key], msg=f"{name} {key} differs between processes")


def test_gpu_settings_default_off_on_the_cpu_and_autocast_works(syn_root, tmp_path):
    """Loader workers, pinned memory and autocast stay off on the CPU by default; ``amp`` runs the
    training forward in bfloat16 with float32 weights, and is refused for a float32-only method."""
    from volad.engine.trainer import Trainer
    from volad.errors import VoladConfigError
    from volad.methods import AutoEncoder, FAnoGAN
    from volad.types import Batch

    ae = AutoEncoder(spatial_dims=3, in_channels=1, channels=[4, 8], latent_channels=4, skip_connections=True)
    trainer = Trainer(method=ae, dataset="synthetic", data_root=str(syn_root), output_dir=str(tmp_path / "a"), device="cpu")
    assert (trainer.num_workers, trainer.pin_memory, trainer.amp) == (0, False, False)
    forced = Trainer(method=ae, dataset="synthetic", data_root=str(syn_root), output_dir=str(tmp_path / "b"), device="cpu", amp=True)
    assert forced.amp
    dtypes = []
    ae.unet.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    ae.amp = True
    before = {k: v.clone() for k, v in ae.named_parameters()}
    ae.optimization_step(Batch(torch.rand(2, 1, 16, 16, 16), torch.ones(2, 1, 16, 16, 16)), "main", ae.configure_optimizers("main"))
    assert dtypes == [torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in ae.parameters()) and any((before[k] != v).any() for k, v in ae.named_parameters())
    gan = FAnoGAN(spatial_dims=3, in_channels=1, image_size=16, latent_dim=8, generator_channels=[8, 4], critic_channels=[4, 8])
    with pytest.raises(VoladConfigError, match="--amp: expected true or false"):
        Trainer(method=ae, dataset="synthetic", data_root=str(syn_root), output_dir=str(tmp_path / "d"), device="cpu", amp="maybe")
    assert not Trainer(method=ae, dataset="synthetic", data_root=str(syn_root), output_dir=str(tmp_path / "e"), tensorboard="False").tensorboard
    with pytest.raises(VoladConfigError, match="float32 only"):
        Trainer(method=gan, dataset="synthetic", data_root=str(syn_root), output_dir=str(tmp_path / "c"), device="cpu", amp=True)
