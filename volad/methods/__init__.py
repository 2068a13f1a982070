"""Anomaly-detection methods; each is an :class:`~volad.methods.base.AnomalyMethod`."""

from volad.methods.autoencoder import AutoEncoder, VariationalAutoEncoder
from volad.methods.base import AnomalyMethod, Batch
from volad.methods.baselines import IntensityBaseline, NormativeBaseline, build_baseline
from volad.methods.diffusion import ConditionedDiffusion, MultiStageDiffusion, PatchedDiffusion
from volad.methods.distillation import ReverseDistillation
from volad.methods.fanogan import FAnoGAN
from volad.methods.pii import SyntheticAnomalyDetector

__all__ = [
    "AnomalyMethod",
    "AutoEncoder",
    "Batch",
    "ConditionedDiffusion",
    "FAnoGAN",
    "IntensityBaseline",
    "MultiStageDiffusion",
    "NormativeBaseline",
    "PatchedDiffusion",
    "ReverseDistillation",
    "SyntheticAnomalyDetector",
    "VariationalAutoEncoder",
    "build_baseline",
]
