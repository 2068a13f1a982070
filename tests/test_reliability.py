"""Trustworthy runs: no stale maps, safe checkpoints, repeatable seeds, one owner per run folder,
errors a person can act on. Each test failed before the behaviour it names was fixed."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.conftest import REPO, bundle_cli
from volad.bundle.config import bundle_config
from volad.data.manifest import load_dataset, manifests_dir
from volad.errors import VoladConfigError, VoladDataError
from volad.export import write_nifti
from volad.io import read_image, write_json
from volad.runs.checkpoint import load_trained, save_checkpoint
from volad.utils import rundir
from volad.utils.seed import seed_everything

TINY = dict(dataset="synthetic", patch_size=16, batch_size=2, device="cpu", val_interval=0, samples_per_volume=4)


def _cli(role: str, *args: str, bundle: str = "ae3d") -> subprocess.CompletedProcess:
    return bundle_cli(bundle, role, *args, check=False)


def _last_line(out: subprocess.CompletedProcess) -> str:
    return (out.stderr.strip().splitlines() or [""])[-1]


def _train(out: Path, root: Path, epochs: int, seed: int = 0, **extra) -> Path:
    seed_everything(seed)  # as the bundle's initialize does, before the network is built
    cfg = bundle_config("ae3d", "train", **TINY, data_root=str(root), output_dir=str(out), max_epochs=epochs, seed=seed, **extra)
    return cfg.get_parsed_content("trainer", instantiate=True).run()


def _infer(out: Path, root: Path, **extra) -> dict:
    """inference.json on a run folder: the run says which method and data (``root`` is what it was trained on)."""
    cfg = bundle_config("ae3d", "inference", output_dir=str(out), device="cpu", **extra)
    cfg.get_parsed_content("inferer", instantiate=True).run()
    return json.loads((out / "maps" / "index.json").read_text())


def _copy_dataset(syn_root: Path, tmp_path: Path, **manifest_changes) -> tuple[Path, Path]:
    """A private copy of the synthetic dataset and a manifest for it (no generator)."""
    root = tmp_path / "data"
    shutil.copytree(syn_root, root)
    manifest = json.loads((manifests_dir() / "synthetic.json").read_text())
    del manifest["generator"]
    manifest.update(manifest_changes)
    mpath = tmp_path / "manifest.json"
    mpath.write_text(json.dumps(manifest))
    return root, mpath


# -- 1. stale maps ---------------------------------------------------------------------------
def test_inference_recomputes_maps_after_more_training(tmp_path, syn_root, capsys):
    out = tmp_path / "run"
    _train(out, syn_root, epochs=1)
    first = _infer(out, syn_root)
    n = len(first["subjects"])
    map0 = nib.load(str(out / "maps" / first["subjects"][0]["anomaly_map"])).get_fdata()
    capsys.readouterr()
    again = _infer(out, syn_root)
    assert f"reused {n} map(s)" in capsys.readouterr().out
    assert again["checkpoint"]["sha256"] == first["checkpoint"]["sha256"]

    _train(out, syn_root, epochs=2)  # the same run, trained further: new weights
    later = _infer(out, syn_root)
    printed = capsys.readouterr().out
    assert f"wrote {n} anomaly map(s)" in printed and "reused" not in printed
    assert later["checkpoint"]["sha256"] != first["checkpoint"]["sha256"] and later["checkpoint"]["epoch"] == 2
    map1 = nib.load(str(out / "maps" / later["subjects"][0]["anomaly_map"])).get_fdata()
    assert not np.allclose(map0, map1)

    _infer(out, syn_root, inference_patch_size=16)  # an inference setting changed: recomputed
    assert f"wrote {n} anomaly map(s)" in capsys.readouterr().out
    grid = _infer(out, syn_root, inference_patch_size=16)
    assert f"reused {n} map(s)" in capsys.readouterr().out
    assert grid["predict"]["patch_size"] == 16


# -- 2. checkpoints load as plain data only ----------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_is_refused_without_running_code(tmp_path, syn_root):
    marker = tmp_path / "code_ran"
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    crafted = {"method": _Payload(marker), "hparams": {}, "epoch": 1}
    torch.save(crafted, out / "checkpoints" / "best.pt")
    torch.save(crafted, out / "checkpoints" / "last.pt")
    method = bundle_config("ae3d", "train", dataset="synthetic", data_root=str(syn_root)).get_parsed_content("method", instantiate=True)
    with pytest.raises(VoladConfigError, match="best.pt: refusing to load"):
        load_trained(method, out)
    with pytest.raises(VoladConfigError, match="last.pt: refusing to load"):
        _train(out, syn_root, epochs=1)  # resume reads last.pt
    assert not marker.exists()


# -- 3. empty test split -----------------------------------------------------------------------
def _maps_for(root: Path, maps: Path, ids: list[str]) -> None:
    for sid in ids:
        ref = nib.load(str(root / sid / f"{sid}_flair.nii.gz"))
        write_nifti(np.asarray(ref.dataobj, np.float32), ref.affine, maps / f"{sid}_anomaly.nii.gz")


def test_evaluation_refuses_an_empty_test_split_and_never_scores_one_without_lesions(tmp_path, syn_root):
    from volad.evaluation.evaluate import Evaluator

    table = json.loads((syn_root / "splits.json").read_text())
    for name, test in (("empty", []), ("healthy", table["train"][:3])):
        root, mpath = _copy_dataset(syn_root, tmp_path / name, splits={**table, "test": test})
        maps = tmp_path / name / "maps"
        _maps_for(root, maps, table["val"] + test)
        run = tmp_path / name / "run"
        ev = Evaluator(output_dir=str(run), maps_dir=str(maps), dataset=str(mpath), data_root=str(root), bootstrap=0)
        if name == "empty":
            with pytest.raises(VoladConfigError, match="split 'test' of dataset 'synthetic' .* has no subjects: nothing to evaluate"):
                ev.run()
            assert not (run / "report.json").exists()
            continue
        ev.run()  # healthy only: false positives are measured, overlap figures are explicitly undefined
        rep = json.loads((run / "report.json").read_text())
        assert "no lesion voxels" in rep["undefined"] and rep["n_lesioned"] == 0
        assert all(rep["voxel"][k] is None for k in ("dice", "iou", "precision", "recall", "auroc", "auprc", "dice_oracle"))
        assert all(t["voxel"].get("dice") is None for t in rep["thresholds"].values())
        assert rep["voxel"]["fpr"] is not None
        assert "Undefined figures" in (run / "report.md").read_text()


# -- 4. seeds repeat ---------------------------------------------------------------------------
def test_same_seed_gives_same_weights_through_the_bundle_command(tmp_path, syn_root):
    """The command seeds before anything random: the same seed gives the same weights as a run from code
    (``run_bundle``, what bench and protocol use), another seed other weights."""
    from volad.bundle.config import run_bundle

    settings = dict(dataset="synthetic", data_root=str(syn_root), patch_size=16, max_epochs=1, batch_size=2, samples_per_volume=2, device="cpu")
    res = _cli("train", *[a for k, v in settings.items() for a in (f"--{k}", str(v))], "--output_dir", str(tmp_path / "run0"), "--seed", "3")
    assert res.returncode == 0, res.stderr[-2000:]
    for k, seed in ((1, 3), (2, 4)):
        run_bundle("ae3d", "train", **settings, output_dir=str(tmp_path / f"run{k}"), seed=seed)
    weights = [torch.load(tmp_path / f"run{k}" / "checkpoints" / "last.pt", weights_only=True)["method"] for k in range(3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0] if weights[0][k].is_floating_point())


# -- 5. one owner per run folder ---------------------------------------------------------------
def test_second_training_into_a_busy_run_folder_is_refused(tmp_path, syn_root):
    out = tmp_path / "run"
    with rundir.claim(out, "training"):  # this test process stands for a training still running
        res = _cli("train", "--dataset", "synthetic", "--data_root", str(syn_root), "--output_dir", str(out), "--max_epochs", "1", "--device", "cpu")
    assert res.returncode != 0
    assert _last_line(res).startswith(f"volad: error: {out.resolve()}: run folder is in use by training (pid {os.getpid()}")
    assert not (out / "checkpoints").exists()


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / rundir.LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "h", "what": "training", "since": "then"}))
    with rundir.claim(out, "inference"):
        owner = json.loads((out / rundir.LOCK_NAME).read_text())
    assert owner["pid"] == os.getpid() and owner["what"] == "inference"
    assert "taking over the lock of training (pid 999999" in capsys.readouterr().out


def test_resume_refuses_other_settings_but_allows_more_epochs(tmp_path, syn_root):
    out = tmp_path / "run"
    _train(out, syn_root, epochs=1, seed=1)
    with pytest.raises(VoladConfigError, match=r"seed: run has 1, this command 2"):
        _train(out, syn_root, epochs=2, seed=2)
    other_root = tmp_path / "copy"
    shutil.copytree(syn_root, other_root)
    with pytest.raises(VoladConfigError, match=r"train_root: run has .*, this command .*copy"):
        _train(out, other_root, epochs=2, seed=1)
    _train(out, syn_root, epochs=2, seed=1)
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2


# -- 6. and 7. readable errors -----------------------------------------------------------------
def test_truncated_nifti_is_named_in_training_and_evaluation(tmp_path, syn_root):
    root, mpath = _copy_dataset(syn_root, tmp_path)
    bad = root / "syn-train-000" / "syn-train-000_flair.nii.gz"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(VoladDataError, match="truncated or corrupt") as e:
        read_image(bad)
    assert str(bad) in str(e.value)
    res = _cli("train", "--dataset", str(mpath), "--data_root", str(root), "--output_dir", str(tmp_path / "run"), "--max_epochs", "1",
               "--patch_size", "16", "--device", "cpu")
    assert res.returncode != 0
    assert _last_line(res).startswith(f"volad: error: {bad}: cannot be read: the file is truncated or corrupt")
    assert "Failed to evaluate" not in res.stderr  # MONAI's wrapper chain is not shown

    from volad.evaluation.evaluate import Evaluator

    maps = tmp_path / "maps"
    table = json.loads((syn_root / "splits.json").read_text())
    _maps_for(syn_root, maps, table["val"] + table["test"])
    broken = maps / f"{table['test'][0]}_anomaly.nii.gz"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    with pytest.raises(VoladDataError, match="truncated or corrupt") as e:
        Evaluator(output_dir=str(tmp_path / "ev"), maps_dir=str(maps), dataset="synthetic", data_root=str(syn_root), bootstrap=0).run()
    assert str(broken) in str(e.value)


def test_misspelled_override_and_help_do_not_start_the_default_job(tmp_path):
    out = tmp_path / "run"
    res = _cli("train", "--output_dir", str(out), "--max_epoch", "1")
    assert res.returncode != 0
    assert _last_line(res) == "volad: error: unknown setting --max_epoch: this bundle has no ID 'max_epoch'; did you mean --max_epochs?"
    shown = _cli("train", "--output_dir", str(out), "--help")
    assert shown.returncode == 0
    assert "--max_epochs" in shown.stdout and "70" in shown.stdout and "Model card" in shown.stdout
    assert not out.exists()


# -- 8. data check -----------------------------------------------------------------------------
def test_data_check_finds_what_would_fail_or_shrink_the_dataset(tmp_path, syn_root):
    from volad.data.check import check_dataset

    table = json.loads((syn_root / "splits.json").read_text())
    splits = {"train": table["train"] + ["ghost-01"], "val": table["val"], "test": []}
    label = {"pattern": "{subject}/{subject}_seg.nii.gz", "anomaly_values": "nonzero", "values": [0, 1], "missing": "error"}
    root, mpath = _copy_dataset(syn_root, tmp_path, splits=splits, label=label)
    nan_img = root / "syn-train-001" / "syn-train-001_flair.nii.gz"
    img = nib.load(str(nan_img))
    data = np.asarray(img.dataobj, np.float32)
    data[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(nan_img))
    short = root / "syn-train-002" / "syn-train-002_flair.nii.gz"
    short.write_bytes(short.read_bytes()[: short.stat().st_size // 2])
    (root / "syn-train-003" / "syn-train-003_brainmask.nii.gz").unlink()  # the file subjects are found by
    seg = root / "syn-val-000" / "syn-val-000_seg.nii.gz"
    lab = nib.load(str(seg))
    values = np.asarray(lab.dataobj).astype(np.uint8)
    values[4, 4, 4] = 7
    write_nifti(values, lab.affine, seg, dtype=np.uint8)

    report = check_dataset(str(mpath), root, progress=False)
    text = report.summary()
    assert not report.usable and "NOT usable" in text
    expect = {
        str(nan_img): "contains 1 NaN or Inf voxels",
        str(short): "truncated or corrupt",
        str(root / "syn-train-003" / "syn-train-003_brainmask.nii.gz"): "lacks this one, by which subjects are found",
        str(seg): "unexpected label value(s) [7]",
    }
    for path, problem in expect.items():
        assert any(p.path == path and problem in p.message for p in report.errors), (path, problem, text)
    assert any("split 'test' is empty" in p.message for p in report.errors)
    assert any("split 'train' names 2 subject(s) not found" in p.message for p in report.errors)  # ghost-01 and the maskless one
    quick = check_dataset(str(mpath), root, progress=False, read_voxels=False)
    assert not any("NaN" in p.message for p in quick.problems) and not quick.usable

    # Loading refuses the undeclared label value too (it was silently ignored before).
    ds = load_dataset(mpath, root)
    with pytest.raises(VoladDataError, match=r"syn-val-000_seg\.nii\.gz: unexpected label value\(s\) \[7\]"):
        ds.transform()(ds.subject("syn-val-000", "val"))


def test_wrongly_typed_manifest_field_names_manifest_and_field(tmp_path, syn_root):
    _, mpath = _copy_dataset(syn_root, tmp_path, default_contrasts="flair")
    with pytest.raises(VoladDataError, match=rf"{mpath}: manifest field default_contrasts: 'flair' is not of type 'array'"):
        load_dataset(mpath, syn_root)


# -- 9. full disk, unwritable folders ----------------------------------------------------------
def test_full_disk_is_named_as_such_with_the_path(tmp_path, monkeypatch):
    import volad.io

    def failing_save(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: basic_ios::clear: iostream error")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(volad.io.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 0))
    target = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(VoladDataError, match=r"last\.pt: could not be written: no space left on device \(0\.0 MB free") as e:
        save_checkpoint(target, {"x": 1})
    assert str(target) in str(e.value)
    assert not target.exists() and not list(target.parent.iterdir())  # no partial file, no temporary

    def enospc(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", enospc)
    with pytest.raises(VoladDataError, match=r"report\.json: could not be written: no space left on device"):
        write_json({"a": 1}, tmp_path / "report.json")


def test_unwritable_output_folder_is_found_before_the_first_epoch(tmp_path, syn_root, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(VoladConfigError, match=rf"{blocker}/run: output folder cannot be created"):
        _train(blocker / "run", syn_root, epochs=1)
    assert "epoch" not in capsys.readouterr().out


# -- 10. temporaries of killed writes ----------------------------------------------------------
def test_temporaries_left_by_a_killed_write_are_removed_on_the_next_run(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "maps").mkdir()
    stale = [out / "checkpoints" / ".last.pt.k2j_x9q1.tmp.pt", out / "maps" / ".s1_anomaly.nii.gz.ab12cd34.tmp.nii.gz"]
    for p in stale:
        p.write_bytes(b"x" * 1000)
    keep = out / "maps" / ".notes.txt"
    keep.write_text("a user's file")
    with rundir.claim(out, "training"):
        assert json.loads((out / rundir.LOCK_NAME).read_text())["what"] == "training"
    assert not any(p.exists() for p in stale) and keep.exists()
    assert "removed 2 temporary file(s)" in capsys.readouterr().out


# -- everyday use ------------------------------------------------------------------------------
def _parsers():
    from volad import cli
    from volad.evaluation import compare
    from volad.pipelines import bench, protocol, tuning

    todo = [cli.build_parser(), bench.build_parser(), protocol.build_parser(), tuning.build_parser(), compare.build_parser()]
    while todo:
        p = todo.pop()
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())


def test_every_volad_option_has_help_and_version_is_shown():
    from volad import __version__

    missing = [f"{p.prog} {a.option_strings or a.dest}" for p in _parsers() for a in p._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert not missing
    res = subprocess.run([sys.executable, "-m", "volad.cli", "--version"], capture_output=True, text=True, cwd=REPO)
    assert res.stdout.strip() == f"volad {__version__}"
