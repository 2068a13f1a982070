"""Every bundle runs train → inference → evaluate; training through ``python -m monai.bundle run``.

Inference and evaluation are one template for every bundle (tests/bundles/test_configs.py): ae3d runs them
through the command too, the others in-process from the same config files, which saves two interpreter
starts per bundle.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from tests.conftest import REPO, bundle_cli, bundle_command, bundle_inprocess
from volad.bundle.config import bundle_dir, combines_runs, discover_bundles


def _cases() -> list:
    """Every discovered bundle in both modes, with the tiny-test overrides of its own folder."""
    cases = []
    for name in discover_bundles():
        if combines_runs(name):  # trains nothing itself: tests/bundles/test_fusion_bundle.py runs it on trained members
            continue
        path = bundle_dir() / name / "test_overrides.json"
        spec = json.loads(path.read_text()) if path.is_file() else None
        for dims in (3, 2):
            extra = None if spec is None else spec[f"{dims}d"]
            slow = spec is not None and f"{dims}d" in spec.get("slow", [])
            label = "-".join(extra.values()) if extra else "default"
            cases.append(pytest.param(name, dims, extra, marks=[pytest.mark.slow] if slow else [], id=f"{name}-{dims}d-{label}"))
    return cases


# Slice mode of some bundles runs with -m slow only (their test_overrides.json says so), to keep the default
# suite under its time budget; their 3D cases and the shared slice-mode code paths (ae3d, pddpm3d, ...) stay in it.
@pytest.mark.parametrize("name,spatial_dims,extra", _cases())
def test_bundle_end_to_end(tmp_path, syn_root, capfd, name, spatial_dims, extra):
    assert extra is not None, f"bundles/{name} has no test_overrides.json: every bundle keeps its tiny-test overrides there"
    out_dir = tmp_path / "run"
    common = {**dict(dataset="synthetic", data_root=syn_root, output_dir=out_dir, spatial_dims=spatial_dims, patch_size=16), **extra}
    train = bundle_cli(name, "train", max_epochs=2, batch_size=2, device="cpu", seed=1, **common)
    assert "checkpoint" in train.stdout
    # Training says up front what it will use.
    assert f"healthy subjects of synthetic/train at {syn_root}, contrasts flair, device cpu, seed 1" in train.stdout
    assert "steps per epoch; validation:" in train.stdout
    assert "Engine run starting" not in train.stdout + train.stderr  # Ignite's INFO lines stay quiet
    if name == "rd4ad3d":
        epochs = [ln for ln in train.stdout.splitlines() if " epoch " in ln and ln.startswith("volad:")]
        # distance "auto": standardised L2 (with its feature_stats pass) in 3D, cosine (none) in slice mode
        stages = ["teacher"] * int(extra.get("teacher_epochs", 0)) * (extra.get("teacher") == "ssl") + ["feature_stats"] * (spatial_dims == 3) + ["student", "student"]
        assert [ln.split()[1] for ln in epochs] == stages
        # Only the final stage's maps are validated (val_interval 2), so best.pt always holds a trained student.
        assert [ln.split()[1] for ln in epochs if "val AUPRC" in ln] == ["student"]
        if spatial_dims == 3:
            _check_torchscript_export(out_dir, common)
    if name == "fanogan3d":  # both stages ran from one train.json, the encoder's maps were validated
        epochs = [ln.split()[1] for ln in train.stdout.splitlines() if ln.startswith("volad:") and " epoch " in ln]
        assert epochs == ["gan", "gan", "encoder", "encoder"]
    if name == "pii3d" and "val_tasks" in extra:  # validated on held-out synthetic tasks, no lesion labels
        assert "held-out synthetic tasks" in train.stderr + train.stdout
    if name != "baseline3d" or extra.get("baseline") != "intensity":
        assert (out_dir / "checkpoints" / "last.pt").is_file()
    # The run folder describes itself: inference and evaluation need nothing but --output_dir.
    def job(role: str, **overrides):
        if name == "ae3d":
            return bundle_cli(name, role, **overrides)
        return bundle_inprocess(name, role, capfd, **overrides)

    job("inference", device="cpu", output_dir=out_dir)
    index = json.loads((out_dir / "maps" / "index.json").read_text())
    assert {e["split"] for e in index["subjects"]} == {"val", "test"}
    for entry in index["subjects"]:
        src = entry["image_paths"][0]
        amap = out_dir / "maps" / entry["anomaly_map"]
        # Exactly the input's grid, read back by ITK (Slicer) and nibabel.
        a, b = sitk.ReadImage(src), sitk.ReadImage(str(amap))
        assert a.GetSize() == b.GetSize()
        assert np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection())
        assert np.allclose(a.GetSpacing(), b.GetSpacing())
        assert np.allclose(nib.load(src).affine, nib.load(amap).affine)
        assert np.isfinite(nib.load(amap).get_fdata()).all()
        if name in ("ae3d", "vae3d", "pddpm3d", "cddpm3d", "synomaly3d", "fanogan3d"):
            rec = out_dir / "maps" / entry["reconstructions"]["flair"]
            assert nib.load(rec).shape == nib.load(src).shape
    evaluation = job("evaluate", output_dir=out_dir, min_component_voxels=0)  # every component kept: ⌈Dice⌉ bounds Dice (below)
    assert "volad: evaluating 3 test subjects of synthetic" in evaluation.stdout
    assert "volad: evaluate test: 3/3" in evaluation.stderr  # progress, also when not on a terminal
    report = json.loads((out_dir / "report.json").read_text())
    assert report["threshold"]["chosen_on"] == "val"
    assert report["split"] == "test" and report["dataset"] == "synthetic"
    assert report["method"] == out_dir.name  # named after the run folder, not hand-written
    assert set(report["voxel"]) >= {"dice", "iou", "auroc", "auprc", "dice_oracle"}
    assert len(report["per_volume"]) == 3
    assert report["voxel"]["dice_oracle"] >= report["voxel"]["dice"] - 1e-9  # the oracle (over the map's voxels) is an upper bound
    assert 0 <= report["voxel"]["auprc"] <= 1
    assert (out_dir / "report.md").read_text().startswith("# ")
    assert (out_dir / "curves.png").stat().st_size > 1000


def _check_torchscript_export(out_dir, overrides) -> None:
    """``monai.bundle ckpt_export`` (tracing; the function the card's command runs, called in-process) gives a network
    that reproduces the method's map."""
    from monai.bundle import ckpt_export

    from volad.bundle.config import bundle_config
    from volad.runs.checkpoint import load_trained

    ts_path = out_dir / "rd4ad3d.ts"
    ckpt_export(net_id="method", config_file=str(REPO / "bundles/rd4ad3d/train.json"), meta_file=str(REPO / "bundles/rd4ad3d/metadata.json"),
                ckpt_file=str(out_dir / "checkpoints" / "last.pt"), key_in_ckpt="method", filepath=str(ts_path), use_trace=True,
                input_shape=[1, 1, 32, 32, 32], **{k: str(v) if hasattr(v, "is_dir") else v for k, v in overrides.items()})
    exported = torch.jit.load(str(ts_path)).eval()
    method = load_trained(bundle_config("rd4ad3d", "train", **{k: v for k, v in overrides.items() if k != "output_dir"}).get_parsed_content("method"), out_dir, "last")
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(exported(x), method.eval()(x), atol=1e-4)


def test_inference_refuses_a_checkpoint_from_another_mode(tmp_path, syn_root):
    from volad.bundle.config import run_bundle

    out_dir = tmp_path / "run"
    # trained in this process (the command is tested end to end above); the refusal is the command's own output
    run_bundle("ae3d", "train", dataset="synthetic", data_root=str(syn_root), output_dir=str(out_dir), patch_size=16, max_epochs=1,
               device="cpu", val_interval=0, samples_per_volume=2)
    out = bundle_cli("ae3d", "inference", check=False, dataset="synthetic", data_root=syn_root, output_dir=out_dir, spatial_dims=2)
    assert out.returncode != 0
    assert "trained with spatial_dims=3, this command asks for spatial_dims=2" in out.stderr + out.stdout


def _saved_epoch(path) -> int:
    """Epoch in a checkpoint, or -1 while it does not exist or is being renamed into place."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return -1


def test_kill_and_resume(tmp_path, syn_root):
    """A training process killed after a checkpoint resumes from it and finishes all epochs."""
    out_dir = tmp_path / "run"
    args = ["--dataset", "synthetic", "--data_root", str(syn_root), "--output_dir", str(out_dir), "--patch_size", "16",
            "--max_epochs", "4", "--samples_per_volume", "16", "--device", "cpu", "--val_interval", "0"]
    cmd = bundle_command("ae3d", "train", *args)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    last = out_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _saved_epoch(last) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed; make epochs longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert 2 <= killed_at < 4
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")], "temporary checkpoint left behind"
    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last} (stage main, epoch {killed_at})" in resumed.stdout
    epochs_run = [ln for ln in resumed.stdout.splitlines() if ln.startswith("volad: main epoch")]
    assert len(epochs_run) == 4 - killed_at
    assert torch.load(last, map_location="cpu", weights_only=True)["completed_stages"] == ["main"]
    # Asking for more epochs continues the finished run instead of starting over.
    longer = [a if a != "4" else "5" for a in cmd]  # the only "4" is the max_epochs value
    more = subprocess.run(longer, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "continuing stage main from epoch 4 to 5" in more.stdout
    epochs_more = [ln for ln in more.stdout.splitlines() if ln.startswith("volad: main epoch")]
    assert len(epochs_more) == 1 and epochs_more[0].startswith("volad: main epoch 5/5")
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 5


def test_each_fact_is_written_once():
    """inference.json and evaluate.json hold only their own settings; evaluation defaults live in Evaluator alone."""
    from volad.evaluation.evaluate import Evaluator
    from volad.types import defaults_of

    evaluation_defaults = defaults_of(Evaluator)
    for name in discover_bundles():
        folder = bundle_dir() / name
        train = json.loads((folder / "train.json").read_text())
        # Shared names, own facts: the run folder, the device, the inference batch, the data to map (null: the run's).
        training_ids = set(train) - {"output_dir", "device", "batch_size", "dataset", "data_root", "initialize", "run"}
        for role in ("inference", "evaluate"):
            config = json.loads((folder / f"{role}.json").read_text())
            # An inference-only setting (t_test) may be listed as null, "as trained"; a value would restate train.json.
            repeated = sorted(k for k in training_ids & set(config) if config[k] is not None)
            assert not repeated, f"{name}/{role}.json repeats training settings {repeated}: the run folder records them"
        inference = json.loads((folder / "inference.json").read_text())
        assert "method" not in inference and "trainer" not in inference
        for key, value in json.loads((folder / "evaluate.json").read_text()).items():
            if key in evaluation_defaults and value is not None:
                assert value != evaluation_defaults[key], f"{name}/evaluate.json restates the default {key}={value!r}; leave it null"
        assert "bundle_root" not in train  # nothing read it
