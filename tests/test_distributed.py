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
