"""Anatomy channels: template coordinates appended at loading, the same for a voxel whatever the view."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio


def test_world_coordinates_agree_with_nibabel_for_an_oblique_affine():
    from volad.data.anatomy import world_coordinates

    rng = np.random.default_rng(0)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([2.0, -1.5, 3.0]) @ np.linalg.qr(rng.normal(size=(3, 3)))[0]
    affine[:3, 3] = [-90.0, 40.0, 12.5]
    shape = (5, 4, 3)
    coords = world_coordinates(shape, affine).numpy()
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1).reshape(-1, 3)
    expected = nib.affines.apply_affine(affine, index).reshape(*shape, 3)
    np.testing.assert_allclose(np.moveaxis(coords, 0, -1), expected, atol=1e-4)


def test_loading_appends_coordinates_behind_the_normalised_contrasts(syn_dataset):
    from volad.data.anatomy import COORDINATE_SCALE_MM

    subject = syn_dataset.subjects("val")[0]
    plain = syn_dataset.transform()(subject)
    with_anatomy = syn_dataset.transform(anatomy="coordinates")(subject)
    c = len(syn_dataset.contrasts)
    assert with_anatomy["image"].data.shape[0] == c + 3
    torch.testing.assert_close(with_anatomy["image"].data[:c], plain["image"].data)  # contrasts untouched, normalisation unaffected
    ijk = torch.tensor([3.0, 5.0, 7.0, 1.0])
    world = torch.as_tensor(plain["image"].affine, dtype=torch.float32) @ ijk
    torch.testing.assert_close(with_anatomy["image"].data[c:, 3, 5, 7], world[:3] / COORDINATE_SCALE_MM)


def test_a_patch_and_its_resampled_volume_carry_the_coordinates_of_the_same_place(syn_dataset):
    """Coordinates follow the affine: after resampling and after cropping a patch a voxel keeps its place."""
    from volad.data.anatomy import COORDINATE_SCALE_MM, AppendAnatomy

    subject = syn_dataset.subjects("val")[0]
    coarse = tio.Compose([tio.Resample(2.0), AppendAnatomy("coordinates")])(subject)
    patch = tio.Crop((2, 3, 1, 2, 0, 4))(coarse)  # what a patch sampler does
    c = len(syn_dataset.contrasts)
    i, j, k = 1, 2, 3
    world = torch.as_tensor(patch["image"].affine, dtype=torch.float32) @ torch.tensor([i, j, k, 1.0])
    torch.testing.assert_close(patch["image"].data[c:, i, j, k], world[:3] / COORDINATE_SCALE_MM)
    torch.testing.assert_close(patch["image"].data[c:, i, j, k], coarse["image"].data[c:, i + 2, j + 1, k])


def test_an_unknown_anatomy_kind_is_refused():
    from volad.data.anatomy import anatomy_channels
    from volad.errors import VoladConfigError

    assert anatomy_channels(None) == 0 and anatomy_channels("coordinates") == 3
    with pytest.raises(VoladConfigError, match="anatomy must be one of"):
        anatomy_channels("tissue")
