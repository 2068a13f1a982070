"""Training-time validation scores the maps as the report does."""

import numpy as np
import torch
from sklearn.metrics import average_precision_score

from volad.engine.validation import report_postprocessing, validation_auprc
from volad.evaluation.evaluate import Evaluator
from volad.evaluation.postprocess import postprocess
from volad.methods import IntensityBaseline
from volad.types import defaults_of


def test_validation_post_processes_each_map_as_the_report_does():
    """Isolated bright voxels (noise the report's median filter removes) outrank a lesion on raw maps; validation
    must score what the report will score, so it sees the lesion: its AUPRC is scikit-learn's on the post-processed map."""
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
    ev = defaults_of(Evaluator)
    assert report_postprocessing().as_dict()["median_mm"] == ev["median_mm"] and report_postprocessing().erosion_mm == ev["erosion_mm"]
    got = validation_auprc(IntensityBaseline(), cases)
    scores = np.concatenate([postprocess(c[0][0].numpy(), c[1][0].numpy() > 0, c[3], report_postprocessing()).ravel() for c in cases])
    labels = np.concatenate([c[2][0].numpy().ravel() > 0 for c in cases])
    raw = average_precision_score(labels, np.concatenate([c[0][0].numpy().ravel() for c in cases]))
    assert abs(got - average_precision_score(labels, scores)) < 1e-6
    assert got > raw + 0.2  # what the raw maps would have said is far from what the report will say
