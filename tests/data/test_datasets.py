"""Real-dataset manifests against fake copies in their exact layouts; split rules; readers; checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volad.cli import main as cli
from volad.data.fakes import make_fake
from volad.data.manifest import check_same_loading, load_dataset
from volad.errors import VoladConfigError, VoladDataError

_CACHE: dict[tuple[str, int | None], Path] = {}


@pytest.fixture(scope="session")
def fakes(tmp_path_factory):
    """``fakes(name, n=None)``: a fake dataset, written once per session (treat as read-only)."""
    base = tmp_path_factory.mktemp("fakes")

    def get(name: str, n: int | None = None) -> Path:
        key = (name, n)
        if key not in _CACHE:
            _CACHE[key] = make_fake(name, base / f"{name}-{n}", n=n)
        return _CACHE[key]

    return get


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- loaders on fake layouts ----------------------------------------------------------
@pytest.mark.parametrize(
    "name, n, contrasts, splits",
    [
        ("atlas_v2", 10, None, {"val": 1, "test": 9}),
        ("brats2020", 8, ["t1", "t1ce", "t2", "flair"], {"val": 1, "test": 7}),
        ("brats2021", 10, ["flair", "t2"], {"val": 1, "test": 9}),
        ("brats2023_gli", 10, ["t2f"], None),
        ("ixi", 10, ["t2"], {"train": 8, "val": 1}),
        ("mslub", 10, ["flair", "t1", "t2"], {"val": 2, "test": 8}),
    ],
)
def test_volume_loaders_read_fake_layouts(fakes, name, n, contrasts, splits):
    ds = load_dataset(name, fakes(name, n), contrasts)
    table = ds.split_table()
    if splits is not None:
        assert {k: len(v) for k, v in table.items()} == splits
    assert not set(table.get("val", [])) & set(table.get("test", [])) and not set(table.get("train", [])) & set(table.get("test", []))
    transform = ds.transform()
    for split, ids in table.items():
        for sid in ids[:2]:
            s = transform(ds.subject(sid, split))
            assert s["image"].data.shape[0] == len(ds.contrasts)
            assert s["brain_mask"].data.any()
            assert set(np.unique(s["label"].data.numpy())) <= {0, 1}
            assert s["status"] == ("healthy" if name == "ixi" else "anomalous")
            if s["status"] == "anomalous":
                assert s["label"].data.any(), f"{name} {sid}: lesion label is empty"


def test_brats2020_reads_the_misnamed_segmentation_of_case_355(fakes):
    ds = load_dataset("brats2020", fakes("brats2020", 8))
    assert (ds.root / "BraTS20_Training_355" / "W39_1998.09.19_Segm.nii").is_file()
    assert not (ds.root / "BraTS20_Training_355" / "BraTS20_Training_355_seg.nii").exists()
    subject = ds.subject("BraTS20_Training_355", "test")
    assert subject["label"].path.name == "W39_1998.09.19_Segm.nii"
    raw = np.unique(subject["label"].data.numpy())
    assert set(raw) <= {0, 1, 2, 4} and 4 in raw  # 2020 labels: enhancing tumour is 4
    assert ds.transform()(subject)["label"].data.sum() == (subject["label"].data > 0).sum()


def test_brats2020_case_355_also_loads_when_a_user_renamed_its_segmentation(fakes, tmp_path):
    root = _copy(fakes("brats2020", 8), tmp_path / "b")
    case = root / "BraTS20_Training_355"
    (case / "W39_1998.09.19_Segm.nii").rename(case / "BraTS20_Training_355_seg.nii")
    subject = load_dataset("brats2020", root).subject("BraTS20_Training_355", "test")
    assert subject["label"].path.name == "BraTS20_Training_355_seg.nii"


def test_brats2023_aliases_and_patient_grouping(fakes):
    root = fakes("brats2023_gli", 10)
    ds = load_dataset("brats2023_gli", root, ["t2f", "t1c"])
    assert ds.contrasts == ["flair", "t1ce"]
    assert [p.name for p in ds.path_of("BraTS-GLI-00000-001", "contrast")] == ["BraTS-GLI-00000-001-t2f.nii.gz", "BraTS-GLI-00000-001-t1c.nii.gz"]
    raw = np.unique(ds.subject("BraTS-GLI-00000-000", "test")["label"].data.numpy())
    assert 3 in raw and 4 not in raw  # 2023: enhancing tumour is 3
    for seed in range(6):  # both time points of patient 00000 always share a split
        ds.manifest["splits"]["rule"]["seed"] = seed
        ds._splits = None
        where = {sid: split for split, ids in ds.split_table().items() for sid in ids}
        assert where["BraTS-GLI-00000-000"] == where["BraTS-GLI-00000-001"]


def test_ixi_sites_are_metadata_and_raw_grids_differ(fakes):
    ds = load_dataset("ixi", fakes("ixi", 6), ["t1"])
    s = ds.subject("IXI003-HH-0829", "train")
    assert s["site"] == "HH"
    with pytest.raises(VoladDataError, match="geometry differs"):
        load_dataset("ixi", ds.root, ["t1", "t2"]).subject("IXI003-HH-0829", "train")
    # IXI007 has no T2: choosing t2 discovers only subjects that have it.
    assert "IXI007-IOP-0833" in load_dataset("ixi", ds.root, ["t1"]).discover()
    assert "IXI007-IOP-0833" not in load_dataset("ixi", ds.root, ["t2"]).discover()


def test_picture_benchmarks_follow_the_protocol_split_sizes(fakes):
    br = load_dataset("br35h", fakes("br35h"))
    sizes = {k: {c: sum(br.status(s)[1] == c for s in v) for c in ("no", "yes")} for k, v in br.split_table().items()}
    assert sizes == {"train": {"no": 1000, "yes": 0}, "val": {"no": 50, "yes": 150}, "test": {"no": 450, "yes": 1350}}
    s = br.transform()(br.subject(br.split_ids("test")[0], "test"))
    assert tuple(s["image"].data.shape) == (1, 256, 256, 1)
    assert 0.0 <= float(s["image"].data.min()) and float(s["image"].data.max()) <= 1.0
    assert s["brain_mask"].data.all()
    btm = load_dataset("brain_tumor_mri", fakes("brain_tumor_mri"))
    table = btm.split_table()
    cats = {k: sorted({c: sum(btm.status(s)[1] == c for s in v) for c in ("notumor", "glioma", "meningioma", "pituitary")}.items()) for k, v in table.items()}
    assert dict(cats["train"])["notumor"] == 1000 and sum(dict(cats["train"]).values()) == 1000
    assert dict(cats["test"]) == {"notumor": 600, "glioma": 300, "meningioma": 300, "pituitary": 0}
    assert dict(cats["val"]) == {"notumor": 100, "glioma": 50, "meningioma": 50, "pituitary": 0}
    assert not set(table["val"]) & set(table["test"])


def test_picture_reader_greys_rgb_and_scales_to_unit_range(tmp_path):
    import SimpleITK as sitk

    from volad.data.readers import read_image2d

    grey = (np.arange(12 * 10).reshape(12, 10) * 2).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(tmp_path / "g.png"))
    sitk.WriteImage(sitk.GetImageFromArray(np.repeat(grey[..., None], 3, -1), isVector=True), str(tmp_path / "c.png"))
    a, _ = read_image2d(tmp_path / "g.png", size=10)
    b, _ = read_image2d(tmp_path / "c.png", size=10)
    assert a.shape == (1, 10, 10, 1)
    np.testing.assert_allclose(a, b, atol=1e-6)
    # Row r, column c of the picture is volume[c, rows-1-r] (upright in viewers).
    small, _ = read_image2d(tmp_path / "g.png", size=12)
    assert np.isclose(small[0, 3, 11, 0], grey[0, 3] / 255.0, atol=0.02)


# -- FastMRI+ ----------------------------------------------------------------------------
def test_fastmri_box_rows_follow_the_flip_and_zero_size_boxes_are_clamped():
    from volad.data.fastmri import Annotation, box_mask, health_status

    rows = [
        Annotation("f", 1, False, 2, 3, 4, 2, "Lesion"),  # rows [10-3-2, 10-3) = [5, 7), columns [2, 6)
        Annotation("f", 0, False, 7, 0, 0, 0, "Lesion"),  # zero size: one pixel at row 9, column 7
        Annotation("f", None, True, None, None, None, None, "Lesion"),  # study level: no mask
    ]
    m = box_mask((2, 10, 10), rows)
    expected = np.zeros((2, 10, 10), dtype=np.uint8)
    expected[1, 5:7, 2:6] = 1
    expected[0, 9, 7] = 1
    np.testing.assert_array_equal(m, expected)
    assert health_status(rows) == "anomalous"
    assert health_status([Annotation("f", None, True, None, None, None, None, "Normal for age")]) == "healthy"
    assert health_status([Annotation("f", None, True, None, None, None, None, "Motion artifact")]) is None
    assert health_status(None) is None


def test_fastmri_labels_cover_exactly_the_bright_boxes_of_the_fake_h5(fakes):
    import h5py

    from volad.data.fastmri import read_annotations
    from volad.data.readers import rows_to_volume

    root = fakes("fastmri_plus_brain", 8)
    ds = load_dataset("fastmri_plus_brain", root)
    assert ds.reader.geometry(ds.path_of(ds.split_ids("test")[0], "contrast")[0]).affine[0, 0] == pytest.approx(0.6875)
    ann = read_annotations(root / "brain.csv")
    statuses = {sid: ds.status(sid)[0] for sid in ds.discover()}
    assert "AXT2" not in " ".join(statuses)  # contrast filter
    assert None in statuses.values()  # the study with only a study-level finding
    for sid, status in statuses.items():
        if status != "anomalous":
            continue
        path = ds.path_of(sid, "contrast")[0]
        subject = ds.subject(sid, "test")
        label = subject["label"].data[0].numpy()
        with h5py.File(path) as f:
            rss = np.asarray(f["reconstruction_rss"])
        bright = rows_to_volume(rss > rss.max() * 0.9)
        box_slice = next(r.slice for r in ann[sid] if not r.study_level and r.width)
        np.testing.assert_array_equal(label[..., box_slice], bright[..., box_slice])
        zero_slice = next(r.slice for r in ann[sid] if not r.study_level and not r.width)
        assert label[..., zero_slice].sum() == (1 if zero_slice != box_slice else label[..., box_slice].sum())
    with pytest.raises(VoladConfigError, match="one contrast per study"):
        load_dataset("fastmri_plus_brain", root, ["flair", "t1"])


# -- split rules ---------------------------------------------------------------------------
def test_split_rule_is_reproducible_exact_and_refuses_impossible_counts():
    from volad.data.splits import assign

    members = {f"h{i:02d}": ("healthy", "healthy") for i in range(20)} | {f"a{i:02d}": ("anomalous", "anomalous") for i in range(10)}
    members["x"] = (None, None)
    rule = {"seed": 3, "assign": {"train": {"healthy": 12}, "val": {"healthy": 0.1, "anomalous": 0.3}, "test": {"healthy": "rest", "anomalous": "rest"}}}
    a, b = assign(members, rule), assign(members, rule)
    assert a == b
    assert [len(a[k]) for k in ("train", "val", "test")] == [12, 2 + 3, 6 + 7]
    assert "x" not in sum(a.values(), [])
    assert all(members[s][0] == "healthy" for s in a["train"])
    assert assign(members, {**rule, "seed": 4})["train"] != a["train"]
    with pytest.raises(VoladDataError, match="needs 25 healthy subjects but only 20"):
        assign(members, {"seed": 0, "assign": {"train": {"healthy": 25}}})


# -- data check -----------------------------------------------------------------------------
def test_data_check_passes_a_good_fake_and_names_each_broken_file(fakes, tmp_path, capsys):
    good = fakes("brats2021", 10)
    assert cli(["data", "check", "--dataset", "brats2021", "--root", str(good)]) == 0
    out = capsys.readouterr().out
    assert "usable" in out and "subjects: found 10, the published dataset has 1251" in out

    root = _copy(good, tmp_path / "brats")
    (root / "BraTS2021_00002" / "BraTS2021_00002_t2.nii.gz").unlink()  # a missing contrast
    seg = root / "BraTS2021_00004" / "BraTS2021_00004_seg.nii.gz"  # an unknown label value (3 is 2023's ET)
    img = nib.load(str(seg))
    data = np.asarray(img.dataobj).copy()
    data[data == 4] = 3
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(seg))
    assert cli(["data", "check", "--dataset", "brats2021", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("ERROR")]
    assert any("BraTS2021_00002_t2.nii.gz" in ln and "missing" in ln for ln in lines)
    assert any("BraTS2021_00004_seg.nii.gz" in ln and "unexpected label value(s) [3]" in ln for ln in lines)
    assert "NOT usable" in out

    ms = _copy(fakes("mslub", 5), tmp_path / "mslub")
    mask = ms / "patient02" / "patient02_brainmask.nii.gz"
    img = nib.load(str(mask))
    shifted = img.affine.copy()
    shifted[:3, 3] += [2.0, 0.0, 0.0]  # a shifted mask
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), str(mask))
    assert cli(["data", "check", "--dataset", "mslub", "--root", str(ms)]) == 1
    out = capsys.readouterr().out
    assert any("patient02_brainmask.nii.gz" in ln and "off the grid" in ln for ln in out.splitlines() if ln.startswith("ERROR"))


def test_data_check_reports_a_wrong_root_in_one_line(tmp_path, capsys):
    assert cli(["data", "check", "--dataset", "atlas_v2", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "no subject matches" in out and "NOT usable" in out


# -- combining datasets -----------------------------------------------------------------------
def test_datasets_read_differently_cannot_be_combined(fakes):
    with pytest.raises(VoladConfigError, match="loaded differently"):
        check_same_loading(load_dataset("ixi", fakes("ixi", 6)), load_dataset("br35h", fakes("br35h")))


def test_slice_only_datasets_refuse_3d_training(fakes, tmp_path):
    from volad.engine.trainer import Trainer
    from volad.methods import AutoEncoder

    with pytest.raises(VoladConfigError, match="--spatial_dims 2"):
        Trainer(method=AutoEncoder(spatial_dims=3, in_channels=1, channels=(4, 8), latent_channels=4), dataset="br35h", data_root=str(fakes("br35h")), output_dir=str(tmp_path))


def test_every_shipped_manifest_follows_the_schema(tmp_path):
    import jsonschema

    from volad.data.manifest import known_datasets, manifests_dir, read_manifest

    schema = json.loads((manifests_dir() / "schema.json").read_text())
    names = known_datasets()
    assert {"atlas_v2", "brats2020", "brats2021", "brats2023_gli", "ixi", "fastmri_plus_brain", "mslub", "br35h", "brain_tumor_mri"} <= set(names)
    for name in names:
        jsonschema.validate(read_manifest(name)[0], schema)
    bad = dict(read_manifest("brats2021")[0], splits={"rule": {"assign": {"val": {"anomalous": "half"}}}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
