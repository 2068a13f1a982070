"""Diffusion methods: patched diffusion (pDDPM), conditioned diffusion (cDDPM) and multi-stage diffusion with Synomaly noise."""

from volad.methods.diffusion.cddpm import ConditionedDiffusion
from volad.methods.diffusion.pddpm import PatchedDiffusion
from volad.methods.diffusion.schedules import NoiseSchedule
from volad.methods.diffusion.synomaly import MultiStageDiffusion

__all__ = ["ConditionedDiffusion", "MultiStageDiffusion", "NoiseSchedule", "PatchedDiffusion"]
