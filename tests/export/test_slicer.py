"""3D Slicer export: every file read back with SimpleITK, nibabel and slicerio; scene references resolve."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from volad.export.slicer import export_run
from volad.io import write_like

BUILTIN_NODES = {"vtkMRMLColorTableNodeGrey"}


def _oblique_affine() -> np.ndarray:
    c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.2, 0.9, 2.0])
    aff[:3, 3] = [-20.0, 15.0, -8.0]
    return aff


def _dataset(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two cases: an oblique affine, and one whose sform (code 2) and qform (code 1) disagree; plus a run's maps."""
    root, run = tmp_path / "data", tmp_path / "run"
    rng = np.random.default_rng(0)
    entries = []
    for sid, kind in (("oblique", "oblique"), ("sqdiff", "sqdiff")):
        img = (rng.random((12, 10, 8)) * 100).astype(np.float32)
        lab = np.zeros(img.shape, np.uint8)
        lab[3:7, 2:6, 2:5] = 1
        nii = nib.Nifti1Image(img, _oblique_affine())
        if kind == "sqdiff":
            sform = np.diag([2.0, 2.0, 2.0, 1.0])
            sform[:3, 3] = [10.0, 20.0, 30.0]
            nii.set_sform(sform, code=2)
            nii.set_qform(_oblique_affine(), code=1)
        else:
            nii.set_sform(_oblique_affine(), code=1)
            nii.set_qform(_oblique_affine(), code=1)
        (root / sid).mkdir(parents=True)
        nib.save(nii, str(root / sid / f"{sid}_t1.nii.gz"))
        lab_img = nib.Nifti1Image(lab, nii.affine, nii.header)
        nib.save(lab_img, str(root / sid / f"{sid}_seg.nii.gz"))
        amap = (lab * 2.0 + rng.random(img.shape)).astype(np.float32)
        write_like(amap, root / sid / f"{sid}_t1.nii.gz", run / "maps" / f"{sid}_anomaly.nii.gz")
        write_like(img * 0.9, root / sid / f"{sid}_t1.nii.gz", run / "maps" / f"{sid}_recon_t1.nii.gz")
        entries.append({"subject_id": sid, "split": "test", "anomaly_map": f"{sid}_anomaly.nii.gz", "reconstructions": {"t1": f"{sid}_recon_t1.nii.gz"}})
    manifest = {
        "name": "tiny",
        "contrasts": {"t1": "{subject}/{subject}_t1.nii.gz"},
        "subjects": "{subject}/{subject}_t1.nii.gz",
        "brain_mask": {"derive": "all"},
        "label": {"pattern": "{subject}/{subject}_seg.nii.gz"},
        "splits": {"test": ["oblique", "sqdiff"]},
    }
    mpath = tmp_path / "tiny.json"
    mpath.write_text(json.dumps(manifest))
    (run / "maps" / "index.json").write_text(json.dumps({"dataset": "tiny", "dataset_spec": str(mpath), "data_root": str(root), "contrasts": ["t1"], "subjects": entries}))
    return mpath, root, run


def _same_itk_geometry(a: Path, b: Path) -> None:
    ra, rb = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    assert ra.GetSize() == rb.GetSize()
    np.testing.assert_allclose(ra.GetOrigin(), rb.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ra.GetSpacing(), rb.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(ra.GetDirection(), rb.GetDirection(), atol=1e-5)


def test_export_lines_up_with_the_input_in_itk_nibabel_and_slicerio(tmp_path):
    import nrrd
    import slicerio

    mpath, root, run = _dataset(tmp_path)
    out = export_run(run, threshold=1.5)
    for sid in ("oblique", "sqdiff"):
        src = root / sid / f"{sid}_t1.nii.gz"
        data = out / sid / "Data"
        for f in (f"{sid}_input.nii.gz", f"{sid}_anomaly.nii.gz", f"{sid}_recon.nii.gz"):
            _same_itk_geometry(data / f, src)  # where Slicer (ITK) puts the input
            np.testing.assert_allclose(nib.load(str(data / f)).affine, nib.load(str(src)).affine, atol=1e-5)  # where nibabel does
        np.testing.assert_allclose(np.asarray(nib.load(str(data / f"{sid}_input.nii.gz")).dataobj), np.asarray(nib.load(str(src)).dataobj), atol=1e-4)
        amap = np.asarray(nib.load(str(run / "maps" / f"{sid}_anomaly.nii.gz")).dataobj)
        np.testing.assert_array_equal(np.asarray(nib.load(str(data / f"{sid}_anomaly.nii.gz")).dataobj), amap)
        assert nib.load(str(data / f"{sid}_anomaly.nii.gz")).get_data_dtype() == np.float32
        seg_path = data / f"{sid}_anomaly.seg.nrrd"
        seg = slicerio.read_segmentation(str(seg_path))
        assert [s["name"] for s in seg["segments"]] == ["anomaly"] and seg["segments"][0]["labelValue"] == 1
        ref = sitk.ReadImage(str(src))
        ijk_to_lps = np.eye(4)
        ijk_to_lps[:3, :3] = np.asarray(ref.GetDirection()).reshape(3, 3) @ np.diag(ref.GetSpacing())
        ijk_to_lps[:3, 3] = ref.GetOrigin()
        np.testing.assert_allclose(seg["ijkToLPS"], ijk_to_lps, atol=1e-4)
        voxels, header = nrrd.read(str(seg_path))
        assert header["space"] == "left-posterior-superior"
        np.testing.assert_array_equal(voxels.astype(bool), amap >= 1.5)
        seg_itk = sitk.ReadImage(str(seg_path))
        np.testing.assert_allclose(seg_itk.GetOrigin(), ref.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(seg_itk.GetDirection(), ref.GetDirection(), atol=1e-5)
    # The sform/qform case really differs between readers: ITK must follow the qform there.
    sq = root / "sqdiff" / "sqdiff_t1.nii.gz"
    assert not np.allclose(nib.load(str(sq)).affine[:3, 3] * [-1, -1, 1], sitk.ReadImage(str(sq)).GetOrigin())


def _check_scene(mrml: Path) -> ET.Element:
    tree = ET.parse(mrml).getroot()
    ids = {n.get("id") for n in tree}
    for node in tree:
        for ref in filter(None, (node.get("references") or "").split(";")):
            role, _, target = ref.partition(":")
            assert target in ids | BUILTIN_NODES, f"{mrml}: {node.get('id')} refers to missing {target} ({role})"
        for attr in ("colorNodeID",):
            if node.get(attr):
                assert node.get(attr) in ids | BUILTIN_NODES
        if node.get("fileName"):
            assert (mrml.parent / node.get("fileName")).is_file(), f"{mrml}: missing {node.get('fileName')}"
    return tree


def test_scene_and_bundle_references_resolve(tmp_path):
    _, _, run = _dataset(tmp_path)
    out = export_run(run, threshold=1.5, subjects=["oblique"])
    tree = _check_scene(out / "oblique" / "oblique.mrml")
    comp = [n for n in tree if n.tag == "SliceComposite"]
    assert {n.get("layoutName") for n in comp} == {"Red", "Yellow", "Green"}
    assert all("backgroundVolume:vtkMRMLScalarVolumeNode1" in n.get("references") and float(n.get("foregroundOpacity")) == 0.5 for n in comp)
    heat = next(n for n in tree if n.get("id") == "vtkMRMLScalarVolumeDisplayNode2")
    assert heat.get("applyThreshold") == "1" and float(heat.get("lowerThreshold")) == pytest.approx(1.5)
    assert {n.tag for n in tree} >= {"Volume", "Segmentation", "ColorTable", "SliceComposite"}
    ctbl = (out / "oblique" / "Data" / "volad_heat.ctbl").read_text().splitlines()
    assert len([ln for ln in ctbl if not ln.startswith("#")]) == 256 and ctbl[2].split()[0] == "0"
    with zipfile.ZipFile(out / "oblique.mrb") as z:
        z.extractall(tmp_path / "unzipped")
    _check_scene(tmp_path / "unzipped" / "oblique" / "oblique.mrml")


def test_export_without_a_threshold_skips_the_segmentation_and_the_cli_uses_the_report(tmp_path, capsys):
    from volad.cli import main as cli

    _, _, run = _dataset(tmp_path)
    out = export_run(run, out_dir=tmp_path / "noseg")
    assert not list(out.rglob("*.seg.nrrd")) and "without a segmentation" in capsys.readouterr().out
    _check_scene(out / "sqdiff" / "sqdiff.mrml")
    (run / "report.json").write_text(json.dumps({"threshold": {"value": 1.2, "name": "val_dice", "chosen_on": "val"}}))
    assert cli(["export-slicer", "--run", str(run), "--out", str(tmp_path / "cli")]) == 0
    seg = tmp_path / "cli" / "oblique" / "Data" / "oblique_anomaly.seg.nrrd"
    import nrrd

    _, header = nrrd.read(str(seg))
    assert "val_dice chosen on val" in header["Segment0_Tags"]
