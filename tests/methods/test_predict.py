"""A method over one preprocessed volume: whole volumes, slices and patch grids reassemble exactly."""

import pytest
import torch

from volad.methods import AutoEncoder, IntensityBaseline
from volad.methods.base import AnomalyMethod
from volad.methods.predict import predict_volume
from volad.types import AnomalyOutput


class Identity(AnomalyMethod):
    """Map = first channel; checks that tiling/stitching reassembles exactly."""

    def predict(self, x, mask=None):
        return AnomalyOutput(x[:, :1] * 2, x.clone())


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("patch_size", [None, 8, 12])
def test_grid_and_slices_reassemble_exactly(spatial_dims, patch_size):
    x = torch.rand(2, 20, 18, 14)
    mask = torch.ones(1, 20, 18, 14)
    out = predict_volume(Identity(spatial_dims=spatial_dims, in_channels=2), x, mask, patch_size=patch_size, overlap=0.5, batch_size=3)
    assert torch.allclose(out.anomaly_map, x[:1] * 2, atol=1e-5)
    assert torch.allclose(out.reconstruction, x, atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_autoencoder_whole_volume_on_odd_shapes(spatial_dims):
    m = AutoEncoder(spatial_dims=spatial_dims, channels=(4, 8), latent_channels=2)
    x = torch.rand(1, 19, 17, 13)
    out = predict_volume(m, x, torch.ones(1, 19, 17, 13))
    assert out.anomaly_map.shape == (1, 19, 17, 13) and out.reconstruction.shape == (1, 19, 17, 13)
    grid = predict_volume(m, x, torch.ones(1, 19, 17, 13), patch_size=8)
    assert grid.anomaly_map.shape == (1, 19, 17, 13)


def test_volume_view_methods_get_the_whole_volume():
    x = torch.rand(1, 9, 9, 9)
    out = predict_volume(IntensityBaseline(spatial_dims=2), x, torch.ones(1, 9, 9, 9))
    assert torch.equal(out.anomaly_map, x)
