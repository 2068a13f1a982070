"""Losses shared by several methods."""

from __future__ import annotations

import torch


def masked_l1(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error inside ``mask`` (broadcast over channels)."""
    weight = mask.expand_as(x)
    return ((x - y).abs() * weight).sum() / weight.sum().clamp_min(1.0)
