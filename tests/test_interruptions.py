"""Runs that survive interruption: the best checkpoint, resumed randomness, map provenance, scans in any
orientation, fusion members' data, foreign checkpoints, one-line errors and first-use artefacts under torchrun.
Each test failed on the code before the behaviour it names was added."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from volad.errors import VoladConfigError, VoladDataError
from volad.runs.checkpoint import read_checkpoint


class _Killed(BaseException):
    """What a kill looks like to the trainer: nothing after it runs (not an Exception, so nothing catches it)."""


def _trainer(out, syn_root, epochs: int, make_method=None, **kw):
    from volad.engine.trainer import Trainer
    from volad.methods import AutoEncoder
    from volad.utils.seed import seed_everything

    seed_everything(0)  # as the bundle's initialize does, before the network is built
    settings = dict(patch_size=16, batch_size=2, samples_per_volume=2, val_interval=1, device="cpu", tensorboard=False)
    settings.update(kw)
    method = make_method() if make_method is not None else AutoEncoder(lr=1e-3)
    return Trainer(method=method, dataset="synthetic", data_root=str(syn_root), output_dir=str(out), max_epochs=epochs, **settings)


def _kill_after(monkeypatch, name: str, epoch: int) -> None:
    """Kill the run right after it writes checkpoint ``name`` of ``epoch`` (the file is complete on disk)."""
    import volad.engine.trainer

    real = volad.engine.trainer.save_checkpoint

    def save(path, payload):
        out = real(path, payload)
        if path.name == name and payload["epoch"] == epoch:
            monkeypatch.setattr(volad.engine.trainer, "save_checkpoint", real)
            raise _Killed()
        return out

    monkeypatch.setattr(volad.engine.trainer, "save_checkpoint", save)


def _scripted_validation(monkeypatch, scores: list[float]) -> None:
    """Validation that returns ``scores`` in call order (what a noisy val split does across a resume)."""
    from volad.engine.trainer import Trainer

    calls = iter(scores)
    monkeypatch.setattr(Trainer, "validate", lambda self: next(calls))


# -- 1. the best checkpoint survives any interruption --------------------------------------------
def test_a_run_resumed_after_a_new_best_keeps_it(tmp_path, syn_root, monkeypatch):
    # continued with more epochs (no kill): the later, worse epochs never replace epoch 1's best
    _scripted_validation(monkeypatch, [0.5, 0.2, 0.3])
    out = tmp_path / "more"
    _trainer(out, syn_root, 1).run()
    _trainer(out, syn_root, 3).run()
    best = read_checkpoint(out / "checkpoints" / "best.pt")
    assert (best["epoch"], best["val_auprc"]) == (1, 0.5)
    assert read_checkpoint(out / "checkpoints" / "last.pt")["best_val_auprc"] == 0.5

    # killed right after epoch 2 wrote its new best; after the resume, epoch 2 (run again) and 3 score lower
    _scripted_validation(monkeypatch, [0.5, 0.9, 0.6, 0.6])
    out = tmp_path / "killed"
    _kill_after(monkeypatch, "best.pt", 2)
    with pytest.raises(_Killed):
        _trainer(out, syn_root, 3).run()
    _trainer(out, syn_root, 3).run()
    best = read_checkpoint(out / "checkpoints" / "best.pt")
    assert (best["epoch"], best["val_auprc"]) == (2, 0.9)
    assert read_checkpoint(out / "checkpoints" / "last.pt")["best_val_auprc"] == 0.9

    # killed right after epoch 2's last.pt, the write that follows the new best
    _scripted_validation(monkeypatch, [0.5, 0.9, 0.6])
    out = tmp_path / "killed_later"
    _kill_after(monkeypatch, "last.pt", 2)
    with pytest.raises(_Killed):
        _trainer(out, syn_root, 3).run()
    _trainer(out, syn_root, 3).run()
    assert read_checkpoint(out / "checkpoints" / "best.pt")["epoch"] == 2


def test_best_pt_averages_the_best_epochs_and_a_run_killed_anywhere_keeps_the_same_ones(tmp_path, syn_root, monkeypatch, capsys):
    from volad.engine.soup import average_weights

    # val of epochs 1-4, then the average's own check at the end of the run
    scores = [0.5, 0.2, 0.6, 0.55, 0.4]
    _scripted_validation(monkeypatch, list(scores))
    straight = tmp_path / "straight"
    _trainer(straight, syn_root, 4, average_best=2).run()
    ck = straight / "checkpoints"
    assert sorted(p.name for p in (ck / "best_epochs").glob("*.pt")) == ["epoch0003.pt", "epoch0004.pt"]
    best = read_checkpoint(ck / "best.pt")
    assert [e["epoch"] for e in best["averaged_epochs"]] == [3, 4] and best["val_auprc"] == 0.4
    kept = [read_checkpoint(ck / "best_epochs" / f"epoch000{e}.pt")["method"] for e in (3, 4)]
    for k, v in average_weights(kept).items():
        assert torch.allclose(best["method"][k], v), k
    w = next(k for k, v in kept[0].items() if v.is_floating_point() and not torch.equal(v, kept[1][k]))
    assert torch.allclose(best["method"][w], (kept[0][w] + kept[1][w]) / 2)
    assert "best.pt = average of epochs 3, 4" in capsys.readouterr().out
    assert read_checkpoint(ck / "last.pt")["run"]["average_best"] == 2
    from volad.evaluation.report import _checkpoint_line
    from volad.runs.checkpoint import provenance

    line = _checkpoint_line({"checkpoint": provenance(ck / "best.pt", best)})[1]
    assert "the average of the weights of epochs 3 (0.6000), 4 (0.5500), chosen by val AUPRC; the average's own val AUPRC 0.4000" in line

    # killed after epoch 4 wrote its weights (before the last.pt that lists them), and after epoch 3's last.pt
    for name, epoch, replayed in (("epoch0004.pt", 4, True), ("last.pt", 3, False), ("best.pt", 4, True)):
        out = tmp_path / f"killed_{name}_{epoch}"
        _scripted_validation(monkeypatch, scores[:epoch] + scores[epoch - 1 if replayed else epoch :])  # an epoch killed before its last.pt runs again
        _kill_after(monkeypatch, name, epoch)
        with pytest.raises(_Killed):
            _trainer(out, syn_root, 4, average_best=2).run()
        _trainer(out, syn_root, 4, average_best=2).run()
        again = read_checkpoint(out / "checkpoints" / "best.pt")
        assert [e["epoch"] for e in again["averaged_epochs"]] == [3, 4] and again["val_auprc"] == 0.4, name
        assert sorted(p.name for p in (out / "checkpoints" / "best_epochs").glob("*.pt")) == ["epoch0003.pt", "epoch0004.pt"]
        for k, v in best["method"].items():
            assert torch.equal(again["method"][k], v), (name, k)

    with pytest.raises(VoladConfigError, match="average_best"):
        _trainer(tmp_path / "bad", syn_root, 1, average_best=0)


# -- 2. a resumed run is the run it would have been --------------------------------------------------
def _tensors(payload: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in payload.items():
        if isinstance(v, torch.Tensor):
            out[prefix + str(k)] = v
        elif isinstance(v, dict):
            out.update(_tensors(v, f"{prefix}{k}."))
        elif isinstance(v, list):
            out.update(_tensors(dict(enumerate(v)), f"{prefix}{k}."))
    return out


@pytest.mark.parametrize("patch_size", [16, 0], ids=["patch_queue", "whole_volumes"])
def test_a_run_interrupted_at_an_epoch_boundary_resumes_bit_identically(tmp_path, syn_root, monkeypatch, capsys, patch_size):
    straight = tmp_path / "straight"
    _trainer(straight, syn_root, 3, patch_size=patch_size, batch_size=1).run()
    resumed = tmp_path / "resumed"
    _kill_after(monkeypatch, "last.pt", 1)
    with pytest.raises(_Killed):
        _trainer(resumed, syn_root, 3, patch_size=patch_size, batch_size=1).run()
    capsys.readouterr()
    _trainer(resumed, syn_root, 3, patch_size=patch_size, batch_size=1).run()
    assert "random states restored: Python, NumPy, torch" in capsys.readouterr().out

    a, b = (read_checkpoint(d / "checkpoints" / "last.pt") for d in (straight, resumed))
    ta, tb = _tensors({k: a[k] for k in ("method", "optimizers")}), _tensors({k: b[k] for k in ("method", "optimizers")})
    assert ta.keys() == tb.keys() and len(ta) > 20
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} of {len(ta)} tensors differ, e.g. {differ[:3]}"
    assert [h["val_auprc"] for h in a["history"]] == [h["val_auprc"] for h in b["history"]]
    assert len(a["rng"]) == 1 and {"python", "numpy", "torch"} <= set(a["rng"][0])


def test_a_resumed_pii_detector_synthesises_what_it_would_have_and_recomputes_batch_norm_alike(tmp_path, syn_root, monkeypatch, capsys):
    """The detector draws its anomalies from its own generator, which checkpoints did not keep: a resumed run started
    that generator again from its seed and trained on other anomalies than the run it would have been."""
    from volad.methods import SyntheticAnomalyDetector

    def trainer(out):
        return _trainer(out, syn_root, 2, make_method=lambda: SyntheticAnomalyDetector(channels=(4, 8), seed=3), precise_bn_batches=2)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    trainer(straight).run()
    _kill_after(monkeypatch, "last.pt", 1)
    with pytest.raises(_Killed):
        trainer(resumed).run()
    capsys.readouterr()
    trainer(resumed).run()
    assert "SyntheticAnomalyDetector's own generator" in capsys.readouterr().out
    a, b = (read_checkpoint(d / "checkpoints" / "last.pt") for d in (straight, resumed))
    ta, tb = _tensors({k: a[k] for k in ("method", "optimizers")}), _tensors({k: b[k] for k in ("method", "optimizers")})
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} of {len(ta)} tensors differ, e.g. {differ[:3]}"
    assert a["rng"][0]["method"] == b["rng"][0]["method"]


# -- 3. and 4. maps say which checkpoint made them, and are reused only while unchanged ------------
def _infer(out, **kw):
    from volad.engine.inferer import Inferer

    Inferer(output_dir=str(out), device="cpu", **kw).run()
    return json.loads((out / "maps" / "index.json").read_text())


def _evaluate(out, **kw):
    from volad.evaluation.evaluate import Evaluator

    return Evaluator(output_dir=str(out), bootstrap=0, montage_cases=0, **kw).run()


@pytest.fixture(scope="module")
def mapped_run(tmp_path_factory, syn_root):
    """A run trained one epoch (best.pt from val) and mapped, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("mapped") / "run"
    _trainer(out, syn_root, 1).run()
    _infer(out)
    return out


def test_evaluation_refuses_maps_of_an_older_checkpoint_and_the_report_names_its_own(tmp_path, mapped_run, syn_root, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(mapped_run, out)
    first = read_checkpoint(out / "checkpoints" / "best.pt")
    _scripted_validation(monkeypatch, [first["val_auprc"] + 0.5])  # epoch 2 is a new best: best.pt changes
    _trainer(out, syn_root, 2).run()
    with pytest.raises(VoladConfigError) as err:
        _evaluate(out)
    msg = str(err.value)
    assert "stale" in msg and "epoch 1" in msg and "epoch 2" in msg and "inference.json --output_dir" in msg and str(out) in msg
    index = _infer(out)  # remapped with the new best.pt
    report = json.loads(_evaluate(out).read_text())
    assert report["checkpoint"]["epoch"] == 2 and report["checkpoint"]["sha256"] == index["checkpoint"]["sha256"]
    md = (out / "report.md").read_text()
    assert f"SHA-256 {index['checkpoint']['sha256'][:12]}" in md and "epoch 2" in md and "best.pt" in md and "val AUPRC" in md
    # the one given must be the one that mapped
    with pytest.raises(VoladConfigError, match="stale"):
        _evaluate(out, checkpoint="last")  # last.pt is not the file that made these maps (best.pt is)


def test_a_truncated_or_edited_map_is_recomputed_not_reused(tmp_path, mapped_run, capsys):
    out = tmp_path / "run"
    shutil.copytree(mapped_run, out)
    index = json.loads((out / "maps" / "index.json").read_text())
    first, second = index["subjects"][0], index["subjects"][1]
    assert first["files"][first["anomaly_map"]]["bytes"] > 0 and len(first["files"][first["anomaly_map"]]["sha256"]) == 64
    path = out / "maps" / first["anomaly_map"]
    original = nib.load(str(path)).get_fdata()
    path.write_bytes(path.read_bytes()[:200])  # truncated
    other = out / "maps" / second["anomaly_map"]
    img = nib.load(str(other))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 0, img.affine, img.header), str(other))  # edited, still readable
    capsys.readouterr()
    _infer(out)
    printed = capsys.readouterr().out
    assert "wrote 2 anomaly map(s)" in printed and first["subject_id"] in printed and second["subject_id"] in printed
    np.testing.assert_array_equal(nib.load(str(path)).get_fdata(), original)
    _infer(out)
    assert f"reused {len(index['subjects'])} map(s)" in capsys.readouterr().out


# -- 5. scans in any orientation and spacing -------------------------------------------------------
def test_a_scan_stored_flipped_or_at_another_spacing_maps_like_the_original(tmp_path, mapped_run, syn_root, capsys):
    import torchio as tio

    from volad.engine.inferer import Inferer

    cases = tmp_path / "cases"
    src = {"flair": syn_root / "syn-test-001" / "syn-test-001_flair.nii.gz", "brain_mask": syn_root / "syn-test-001" / "syn-test-001_brainmask.nii.gz"}
    to_lps = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt("LPS"))
    for case in ("original", "lps", "resampled"):
        (cases / case).mkdir(parents=True)
        for what, path in src.items():
            dst = cases / case / f"{case}_{what}.nii.gz"
            if case == "original":
                shutil.copy(path, dst)
            elif case == "lps":
                nib.save(nib.load(str(path)).as_reoriented(to_lps), str(dst))
            else:  # 1.5 mm stored at 0.75 mm
                image = (tio.LabelMap if what == "brain_mask" else tio.ScalarImage)(path)
                tio.Resample(0.75)(image).save(dst)
    Inferer(output_dir=str(mapped_run), input=str(cases), maps_dir=str(tmp_path / "maps"), device="cpu").run()
    printed = capsys.readouterr().out
    assert "stored LPS at 1.5×1.5×1.5 mm; reoriented to RAS" in printed and "resampled to 1.5×1.5×1.5 mm" in printed
    assert "original_flair" not in printed  # stored like the training data: nothing to say

    def load(case: str) -> nib.Nifti1Image:
        return nib.load(str(tmp_path / "maps" / f"{case}_anomaly.nii.gz"))

    original = load("original")
    lps = load("lps")
    assert lps.shape == nib.load(str(cases / "lps" / "lps_flair.nii.gz")).shape  # on the scan's own grid
    assert "".join(nib.aff2axcodes(lps.affine)) == "LPS"
    back = lps.as_reoriented(nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("LPS"), nib.orientations.axcodes2ornt("RAS")))
    np.testing.assert_allclose(back.get_fdata(), original.get_fdata(), atol=1e-4 * float(original.get_fdata().max()))

    resampled = load("resampled")
    assert np.allclose(nib.affines.voxel_sizes(resampled.affine), 0.75)
    on_original = tio.Resample(str(src["flair"]))(tio.ScalarImage(tensor=resampled.get_fdata()[None], affine=resampled.affine)).data[0].numpy()
    brain = nib.load(str(src["brain_mask"])).get_fdata() > 0
    corr = np.corrcoef(on_original[brain], original.get_fdata()[brain])[0, 1]
    # the same map up to the interpolations (image to 0.75 mm and back to the training 1.5 mm, map back to 0.75 mm,
    # then onto the original grid here) of a barely trained network: 0.886 measured
    assert corr > 0.85, corr


# -- 7. a checkpoint of another run ---------------------------------------------------------------
def test_a_checkpoint_of_another_run_is_refused_unless_trained_alike_or_given_its_own_maps_folder(tmp_path, mapped_run, syn_root, capsys):
    other = tmp_path / "other"
    _trainer(other, syn_root, 1, contrasts=["t1"]).run()  # the same method on another contrast
    foreign = other / "checkpoints" / "best.pt"
    with pytest.raises(VoladConfigError, match=r"another run than .*contrasts: \['flair'\] vs \['t1'\].*--maps_dir"):
        _infer(mapped_run, checkpoint=str(foreign), dataset="synthetic", data_root=str(syn_root), contrasts=["t1"])
    own_maps = tmp_path / "t1_maps"
    capsys.readouterr()
    _infer(mapped_run, checkpoint=str(foreign), maps_dir=str(own_maps), contrasts=["t1"])
    assert f"into {own_maps}" in capsys.readouterr().out
    index = json.loads((own_maps / "index.json").read_text())
    assert index["checkpoint"]["in_run"] is None and index["checkpoint"]["path"] == str(foreign)
    _evaluate(mapped_run, maps_dir=str(own_maps))  # the maps are checked against the file that made them

    twin = tmp_path / "twin"  # trained exactly like mapped_run: its checkpoint may map into mapped_run's folder
    _trainer(twin, syn_root, 1).run()
    shutil.copytree(mapped_run, tmp_path / "run")
    _infer(tmp_path / "run", checkpoint=str(twin / "checkpoints" / "best.pt"))


# -- 6. fusion knows its members' data -------------------------------------------------------------
def test_fusion_refuses_a_member_trained_on_its_val_or_test_subjects_and_says_which_calibrate_held_out(tmp_path, syn_root, capsys):
    from volad.bundle.config import bundle_config
    from volad.engine.fusion_builder import FusionBuilder

    # a "healthy" dataset whose train split is the synthetic set's val and test subjects
    manifest = json.loads((__import__("volad.data.manifest", fromlist=["manifests_dir"]).manifests_dir() / "synthetic.json").read_text())
    del manifest["generator"]
    manifest["name"] = "leaky"
    manifest["splits"] = {"train": ["syn-val-000", "syn-test-000"], "val": ["syn-val-001"], "test": ["syn-test-001"]}
    leaky = tmp_path / "leaky.json"
    leaky.write_text(json.dumps(manifest))
    runs = {}
    for name, dataset in (("clean", "synthetic"), ("leaky", str(leaky))):
        runs[name] = tmp_path / name
        bundle_config("baseline3d", "train", dataset=dataset, data_root=str(syn_root), output_dir=str(runs[name]), device="cpu").get_parsed_content(
            "trainer", instantiate=True).run()
    # baseline3d's default, the absolute normative model, scores both signs: the fusion splits it into its two views
    with pytest.raises(VoladConfigError, match=r"fusion member leaky:flair\+ trained on 2 file\(s\) of synthetic's val or test subjects \(e.g. (test|val)/syn-"):
        FusionBuilder(output_dir=str(tmp_path / "fusion"), members=[str(runs["clean"]), str(runs["leaky"])], dataset="synthetic",
                      data_root=str(syn_root), device="cpu")
    builder = FusionBuilder(output_dir=str(tmp_path / "fusion"), members=[str(runs["clean"])], dataset="synthetic", data_root=str(syn_root),
                            device="cpu", calibration_split="train")
    builder.run()
    record = json.loads((tmp_path / "fusion" / "fusion.json").read_text())
    assert record["members"][0]["train_dataset"] == "synthetic" and record["members"][0]["train_root"] == str(syn_root.resolve())
    assert [m["held_out_of_training"] for m in record["calibration"]["members"].values()] == [False, False]  # clean:flair+, clean:flair-


# -- 9. a first-use dataset is built once when processes start together ------------------------------
def test_processes_starting_together_on_an_empty_cache_build_the_dataset_once(tmp_path):
    import subprocess
    import sys

    from volad.data.manifest import manifests_dir

    manifest = json.loads((manifests_dir() / "synthetic.json").read_text())
    manifest["generator"]["kwargs"] = {"shape": 16, "seed": 0, "n_train": 2, "n_val": 1, "n_test": 1}
    mpath = tmp_path / "tiny.json"
    mpath.write_text(json.dumps(manifest))
    root = tmp_path / "cache" / "synthetic"
    code = f"from volad.data import load_dataset; print(len(load_dataset({str(mpath)!r}, {str(root)!r}).split_ids('train')))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-500:] for o in outs]
    assert [o[0].strip().splitlines()[-1] for o in outs] == ["2", "2", "2"]
    assert (root / ".volad_complete").is_file() and not list(root.parent.glob(".synthetic.partial-*"))


# -- 8. every error is one line naming the file -----------------------------------------------------
def test_errors_name_the_file_and_the_problem(tmp_path, mapped_run, syn_root, capsys):
    from volad.cli import main
    from volad.types import resolve_device

    for name, text in (("broken", "{not json"), ("foreign", json.dumps({"method": "x"}))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(text)
        assert main(["compare", str(tmp_path / name)]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"volad: error: {tmp_path / name / 'report.json'}: ")
        assert ("is not JSON" in last) if name == "broken" else ("no dataset, split, threshold, voxel" in last)

    out = tmp_path / "run"
    shutil.copytree(mapped_run, out)
    index = json.loads((out / "maps" / "index.json").read_text())
    entry = next(e for e in index["subjects"] if e["split"] == "test")
    path = out / "maps" / entry["anomaly_map"]
    img = nib.load(str(path))
    moved = img.affine.copy()
    moved[:3, 3] += [3.0, 0.0, -4.0]
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), moved), str(path))
    with pytest.raises(VoladDataError) as err:
        _evaluate(out)
    assert str(err.value).startswith(str(path)) and "origin 5 mm away (+3, +0, -4 mm)" in str(err.value)

    if not torch.cuda.is_available():
        with pytest.raises(VoladConfigError, match="--device cuda: this machine has no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(VoladConfigError, match="--device gpu: not a device"):
        resolve_device("gpu")


def test_the_resume_error_says_what_may_change_and_a_changed_ema_decay_is_said(tmp_path, syn_root, capsys):
    from volad.runs.checkpoint import RESUME_RULE

    out = tmp_path / "run"
    _trainer(out, syn_root, 1, val_interval=0).run()
    with pytest.raises(VoladConfigError, match="batch_size: run has 2, this command 3") as err:
        _trainer(out, syn_root, 2, val_interval=0, batch_size=3).run()
    assert RESUME_RULE in str(err.value) and "--ema_decay may change" in RESUME_RULE
    capsys.readouterr()
    _trainer(out, syn_root, 2, val_interval=0, ema_decay=0.9).run()
    assert "ema_decay changes on resume from None to 0.9" in capsys.readouterr().out

    # a run of an earlier volad, which kept the single best epoch and did not record average_best
    last = out / "checkpoints" / "last.pt"
    payload = read_checkpoint(last)
    del payload["run"]["average_best"]
    torch.save(payload, last)
    with pytest.raises(VoladConfigError, match="average_best: run has 1, this command 3"):
        _trainer(out, syn_root, 3, val_interval=0, ema_decay=0.9, average_best=3).run()
    _trainer(out, syn_root, 3, val_interval=0, ema_decay=0.9).run()


def test_maps_evaluated_into_another_folder_are_checked_against_the_run_that_made_them(tmp_path, mapped_run):
    """What the budget study does: a run's maps evaluated with their report in a folder of its own."""
    report = json.loads(_evaluate(tmp_path / "elsewhere", maps_dir=str(mapped_run / "maps")).read_text())
    assert report["checkpoint"]["in_run"] == "checkpoints/best.pt"
