"""A method over one whole preprocessed volume: whole, on a Hann-weighted patch grid, or slice by slice.

:func:`predict_volume` is how every map is made from a volume that is already
loaded and normalised: by :mod:`volad.engine.inferer` (files in, files out), by
validation during training, and by a fusion for each of its members
(:class:`volad.methods.fusion.Fusion`). It sits beside the method contract, so
methods that run other methods can use it.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torchio as tio

from volad.data.views import choose_view, patch_shape
from volad.methods.base import AnomalyMethod
from volad.types import AnomalyOutput, add_depth, crop_spatial, drop_depth, from_slices, pad_to_multiple, to_slices


@torch.inference_mode()
def _predict_batch(method: AnomalyMethod, x: torch.Tensor, mask: torch.Tensor) -> AnomalyOutput:
    xp, spatial = pad_to_multiple(x, method.size_divisor)
    mp, _ = pad_to_multiple(mask, method.size_divisor)
    out = method.predict(xp, mp)
    rec = None if out.reconstruction is None else crop_spatial(out.reconstruction, spatial)
    return AnomalyOutput(crop_spatial(out.anomaly_map, spatial), rec)


@torch.inference_mode()
def predict_volume(
    method: AnomalyMethod,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    patch_size: int | Sequence[int] | None = None,
    overlap: float = 0.25,
    batch_size: int = 4,
    device: torch.device | str | None = None,
) -> AnomalyOutput:
    """Anomaly map of one preprocessed volume.

    Args:
        method: A trained method (its ``spatial_dims`` chooses 3D or slice mode).
        image: ``(C, W, H, D)`` normalised volume.
        mask: ``(1, W, H, D)`` brain mask.
        patch_size: ``None`` or 0 runs whole volumes (3D) or whole slices (2D); else a
            Hann-weighted patch grid with this patch (in-plane size in slice mode).
            Methods with a ``required_patch_size`` always use a grid of that size.
        overlap: Fraction of the patch that neighbouring patches share.
        batch_size: Patches or slices per forward pass.
        device: Device to run on (default: the method's).

    Returns:
        Unbatched :class:`AnomalyOutput`: map ``(1, W, H, D)``, reconstruction ``(C, W, H, D)`` or None.
    """
    if device is None:
        device = next(itertools.chain(method.parameters(), method.buffers()), torch.zeros(())).device
    method.eval()
    # 0 (the CLI cannot pass None) also means whole volumes/slices; fixed-size networks (f-AnoGAN) always need their grid.
    patch_size = patch_size or method.required_patch_size
    image, mask = image.float(), mask.float()
    view = choose_view(method.input_view, method.spatial_dims, patch_size)
    if view == "volume":
        out = _predict_batch(method, image[None].to(device), mask[None].to(device))
        return AnomalyOutput(out.anomaly_map[0].cpu(), None if out.reconstruction is None else out.reconstruction[0].cpu())
    if view == "slices":
        maps, recs = [], []
        depth = image.shape[-1]
        for start in range(0, depth, batch_size):
            sl = slice(start, min(depth, start + batch_size))
            xs = to_slices(image[..., sl]).to(device)
            ms = to_slices(mask[..., sl]).to(device)
            out = _predict_batch(method, xs, ms)
            maps.append(out.anomaly_map.cpu())
            if out.reconstruction is not None:
                recs.append(out.reconstruction.cpu())
        amap = from_slices(torch.cat(maps))
        rec = from_slices(torch.cat(recs)) if recs else None
        return AnomalyOutput(amap, rec)
    return _predict_grid(method, image, mask, patch_shape(patch_size, method.spatial_dims), overlap, batch_size, device)


def _predict_grid(method, image, mask, patch, overlap, batch_size, device) -> AnomalyOutput:
    patch = tuple(min(p, s) for p, s in zip(patch, image.shape[1:]))
    ov = tuple(2 * int(round(p * overlap / 2)) if p > 1 else 0 for p in patch)
    subject = tio.Subject(image=tio.ScalarImage(tensor=image), brain_mask=tio.LabelMap(tensor=mask.to(torch.uint8)))
    sampler = tio.GridSampler(subject, patch_size=patch, patch_overlap=ov, padding_mode=0)
    agg_map = tio.GridAggregator(sampler, overlap_mode="hann")
    agg_rec = tio.GridAggregator(sampler, overlap_mode="hann")
    has_rec = False
    loader = tio.SubjectsLoader(sampler, batch_size=batch_size)
    for batch in loader:
        x = batch["image"][tio.DATA].float()
        m = batch["brain_mask"][tio.DATA].float()
        if method.spatial_dims == 2:
            x, m = drop_depth(x), drop_depth(m)
        out = _predict_batch(method, x.to(device), m.to(device))
        amap, rec = out.anomaly_map.cpu(), out.reconstruction
        if method.spatial_dims == 2:
            amap = add_depth(amap)
            rec = None if rec is None else add_depth(rec)
        loc = batch[tio.LOCATION]
        agg_map.add_batch(amap, loc)
        if rec is not None:
            has_rec = True
            agg_rec.add_batch(rec.cpu(), loc)
    return AnomalyOutput(agg_map.get_output_tensor().float(), agg_rec.get_output_tensor().float() if has_rec else None)
