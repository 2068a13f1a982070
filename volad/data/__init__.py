"""Datasets: manifests, generated data (synthetic, phantom), preprocessing and batch views."""

from volad.data.manifest import Dataset, load_dataset

__all__ = ["Dataset", "load_dataset"]
