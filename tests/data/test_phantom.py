import nibabel as nib
import numpy as np

from volad.data.phantom import generate_phantom


def test_phantom_is_reproducible_and_has_lesions(tmp_path):
    kw = dict(spacing=3.0, n_train=1, n_val=0, n_test=3, seed=5, progress=False)
    a = generate_phantom(tmp_path / "a", **kw)
    b = generate_phantom(tmp_path / "b", **kw)
    for sid in ("ph-train-000", "ph-test-002"):
        for part in ("flair", "t1", "seg", "brainmask"):
            fa = nib.load(a / sid / f"{sid}_{part}.nii.gz")
            assert np.array_equal(fa.get_fdata(), nib.load(b / sid / f"{sid}_{part}.nii.gz").get_fdata())
    seg = nib.load(a / "ph-test-002" / "ph-test-002_seg.nii.gz")
    assert seg.shape == (67, 79, 64)  # MNI152 2009 at 3 mm (nilearn grid)
    assert (seg.get_fdata() > 0).sum() > 20
    assert not nib.load(a / "ph-train-000" / "ph-train-000_seg.nii.gz").get_fdata().any()
    # Subjects differ from each other (deformation, noise), and lesions are brighter in FLAIR.
    f2 = nib.load(a / "ph-test-002" / "ph-test-002_flair.nii.gz").get_fdata()
    f0 = nib.load(a / "ph-test-000" / "ph-test-000_flair.nii.gz").get_fdata()
    assert not np.array_equal(f0, f2)
    lesion = seg.get_fdata() == 2  # oedema
    brain = nib.load(a / "ph-test-002" / "ph-test-002_brainmask.nii.gz").get_fdata() > 0
    assert f2[lesion].mean() > f2[brain & ~lesion].mean()
