"""Training-time validation scores the maps as the report does."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from volad.engine.validation import report_postprocessing, validation_auprc
from volad.evaluation.evaluate import Evaluator
from volad.evaluation.postprocess import postprocess
from volad.methods import IntensityBaseline
from volad.types import defaults_of


def test_validation_post_processes_each_map_as_the_report_does(monkeypatch):
    """Isolated bright voxels (noise a residual's median filter removes) outrank a lesion on raw maps; validation
    must score what the report will score, so it sees the lesion: its AUPRC is scikit-learn's on the post-processed map.
    (The intensity stands in for a reconstruction residual here: it is given the residuals' 5 mm median.)"""
    monkeypatch.setattr(IntensityBaseline, "median_mm", 5.0)
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(2):
        image = torch.full((1, 20, 20, 20), 0.3)
        image[0, 6:14, 6:14, 6:14] = 0.8  # the lesion
        spikes = rng.integers(3, 17, size=(600, 3))
        image[0, spikes[:, 0], spikes[:, 1], spikes[:, 2]] = 1.0  # single-voxel spikes, brighter than the lesion
        mask = torch.ones(1, 20, 20, 20)
        label = torch.zeros(1, 20, 20, 20)
        label[0, 6:14, 6:14, 6:14] = 1
        cases.append((image, mask, label, (2.0, 2.0, 2.0)))
    method = IntensityBaseline()
    post = report_postprocessing(method.hparams)
    assert post.median_mm == 5.0 and post.erosion_mm == defaults_of(Evaluator)["erosion_mm"]
    got = validation_auprc(method, cases)
    scores = np.concatenate([postprocess(c[0][0].numpy(), c[1][0].numpy() > 0, c[3], post).ravel() for c in cases])
    labels = np.concatenate([c[2][0].numpy().ravel() > 0 for c in cases])
    raw = average_precision_score(labels, np.concatenate([c[0][0].numpy().ravel() for c in cases]))
    assert abs(got - average_precision_score(labels, scores)) < 1e-6
    assert got > raw + 0.2  # what the raw maps would have said is far from what the report will say


def test_a_map_without_residual_noise_keeps_its_millimetre_lesions():
    """Lesions of one voxel's radius (7 voxels at 2 mm, a 4–6 mm MS lesion) in a clean intensity map: the intensity's own
    post-processing (no median) finds them all; the residuals' 5 mm median (a 3-voxel cube at 2 mm) erased them, which is
    what every map was scored by before each method said its own window."""
    from volad.evaluation.postprocess import PostProcessing

    image = torch.full((1, 20, 20, 20), 0.3) + 0.02 * torch.rand(1, 20, 20, 20, generator=torch.Generator().manual_seed(0))
    label = torch.zeros(1, 20, 20, 20)
    for c in ((6, 6, 6), (13, 7, 10), (8, 13, 13)):
        for d in ((0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
            label[(0, *(a + b for a, b in zip(c, d)))] = 1
    image[label > 0] = 0.8
    cases = [(image, torch.ones(1, 20, 20, 20), label, (2.0, 2.0, 2.0))]
    method = IntensityBaseline()
    assert report_postprocessing(method.hparams).median_mm == 0.0
    assert validation_auprc(method, cases) == pytest.approx(1.0)
    old = PostProcessing(erosion_mm=defaults_of(Evaluator)["erosion_mm"], median_mm=5.0)
    assert validation_auprc(method, cases, postprocessing=old) < 0.2
