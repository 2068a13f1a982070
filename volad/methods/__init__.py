"""Anomaly-detection methods; each is an :class:`~volad.methods.base.AnomalyMethod`."""

from volad.methods.autoencoder import AutoEncoder, VariationalAutoEncoder
from volad.methods.base import AnomalyMethod, Batch
from volad.methods.baselines import IntensityBaseline, NormativeBaseline, build_baseline

__all__ = [
    "AnomalyMethod",
    "AutoEncoder",
    "Batch",
    "IntensityBaseline",
    "NormativeBaseline",
    "VariationalAutoEncoder",
    "build_baseline",
]
