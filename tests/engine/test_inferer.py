"""Maps out on the input grid after resampling; scans given by path."""

import json

import numpy as np

from tests.methods.test_predict import Identity


def test_maps_come_back_on_the_input_grid_after_resampling(syn_dataset):
    """Preprocessing that changes the grid (1.5 mm -> 3 mm, reoriented) is undone for the outputs."""
    import numpy as np

    from volad.data.preprocessing import preprocessing
    from volad.engine.inferer import infer_subject

    subject = syn_dataset.subjects("test")[1]
    transform = preprocessing(spacing=3.0, canonical=True)
    assert tuple(transform(subject)["image"].spatial_shape) != tuple(subject["image"].spatial_shape)
    pred = infer_subject(Identity(spatial_dims=3, in_channels=1), subject, transform)
    assert pred.anomaly_map.shape == tuple(subject["image"].spatial_shape)
    # The identity "reconstruction" comes back close to the input, in its own intensity units.
    raw = subject["image"].data[0].numpy().astype(np.float32)
    brain = subject["brain_mask"].data[0].numpy() > 0
    rec = pred.reconstruction[0]
    weights_rec, weights_raw = np.clip(rec, 0, None), raw * brain
    grid = np.indices(raw.shape).reshape(3, -1)
    centroid = lambda w: (grid * w.ravel()).sum(1) / w.sum()  # noqa: E731
    assert np.abs(centroid(weights_rec) - centroid(weights_raw)).max() < 0.5  # voxels: no shift or flip
    from scipy import ndimage

    inner = ndimage.binary_erosion(brain, iterations=2)  # away from the resampled brain edge
    assert abs(rec[inner].mean() / raw[inner].mean() - 1) < 0.1  # input intensity units


def test_scans_given_by_path_are_mapped_on_their_own_grid(syn_root, tmp_path):
    """``inference.json --input``: a case folder on another grid than training; maps and the Slicer scene line up with it."""
    import SimpleITK as sitk
    import torchio as tio

    from volad.bundle.config import bundle_config
    from volad.engine.inferer import Inferer
    from volad.utils.seed import seed_everything

    run = tmp_path / "run"
    seed_everything(0)
    over = dict(dataset="synthetic", data_root=str(syn_root), output_dir=str(run), patch_size=16, batch_size=2, device="cpu",
                val_interval=0, max_epochs=1, samples_per_volume=2)
    bundle_config("ae3d", "train", **over).get_parsed_content("trainer", instantiate=True).run()
    case = tmp_path / "patient7"
    case.mkdir()
    crop = tio.Crop((1, 3, 2, 1, 0, 4))  # another shape and origin than any training volume
    for src, dst in (("flair", "patient7_FLAIR.nii.gz"), ("brainmask", "patient7_brain_mask.nii.gz")):
        image = tio.ScalarImage(syn_root / "syn-test-001" / f"syn-test-001_{src}.nii.gz")
        crop(image).save(case / dst)
    Inferer(output_dir=str(run), input=str(case), device="cpu", slicer_dir=str(tmp_path / "slicer")).run()
    index = json.loads((run / "scans" / "index.json").read_text())
    (entry,) = index["subjects"]
    assert entry["subject_id"] == "patient7" and entry["split"] == "input" and entry["input"] == str(case.resolve())
    scan, amap = sitk.ReadImage(str(case / "patient7_FLAIR.nii.gz")), sitk.ReadImage(str(run / "scans" / entry["anomaly_map"]))
    assert scan.GetSize() == amap.GetSize() == (20, 21, 20)
    assert np.allclose(scan.GetOrigin(), amap.GetOrigin()) and np.allclose(scan.GetDirection(), amap.GetDirection())
    assert np.isfinite(sitk.GetArrayFromImage(amap)).all()
    assert (tmp_path / "slicer" / "patient7.mrb").is_file()
    assert not (run / "maps").exists()  # the dataset's maps (and their evaluation) are untouched


def test_a_run_that_reads_anatomy_loads_it_everywhere_and_the_map_depends_on_where_the_scan_is(syn_root, tmp_path):
    """ae3d with ``anatomy="coordinates"``: training, validation and inference load the coordinate channels; the
    pseudo-healthy image keeps the contrasts only; the same scan moved 40 mm in template space maps differently."""
    import nibabel as nib
    import torchio as tio

    from volad.bundle.config import bundle_config
    from volad.engine.inferer import Inferer, infer_subject
    from volad.runs.record import open_run
    from volad.utils.seed import seed_everything

    run = tmp_path / "run"
    seed_everything(0)
    over = dict(dataset="synthetic", data_root=str(syn_root), output_dir=str(run), patch_size=16, batch_size=2, device="cpu",
                val_interval=1, max_epochs=1, samples_per_volume=2, anatomy="coordinates")
    bundle_config("ae3d", "train", **over).get_parsed_content("trainer", instantiate=True).run()
    Inferer(output_dir=str(run), splits="val", device="cpu").run()
    index = json.loads((run / "maps" / "index.json").read_text())
    entry = index["subjects"][0]
    assert index["method"]["anatomy"] == "coordinates"
    assert list(entry["reconstructions"]) == ["flair"]  # one pseudo-healthy contrast, no coordinate channels
    assert nib.load(str(run / "maps" / entry["reconstructions"]["flair"])).shape == nib.load(str(run / "maps" / entry["anomaly_map"])).shape

    method = open_run(str(run)).method().eval()
    from volad.data import load_dataset

    ds = load_dataset("synthetic", syn_root)
    subject = ds.subjects("val")[0]
    here = infer_subject(method, subject, ds.transform(anatomy=method.anatomy)).anomaly_map
    moved = tio.Subject({k: v for k, v in subject.items()})
    for key in ("image", "brain_mask"):
        affine = subject[key].affine.copy()
        affine[0, 3] += 40.0
        moved[key] = type(subject[key])(tensor=subject[key].data, affine=affine)
    there = infer_subject(method, moved, ds.transform(anatomy=method.anatomy)).anomaly_map
    assert np.isfinite(here).all() and not np.allclose(here, there)
