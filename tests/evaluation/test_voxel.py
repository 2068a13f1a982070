import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_iou
from sklearn.metrics import average_precision_score, roc_auc_score

from volad.evaluation.postprocess import PostProcessing, binarize, postprocess, volume_score
from volad.evaluation.voxel import ScoreAccumulator, auroc, average_precision, confusion, scores_from_counts


def _data(n=50_000, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.uniform(size=n) < 0.05
    scores = np.round(rng.normal(size=n) + 1.5 * labels, 3).astype(np.float32)  # with ties
    return scores, labels


def test_exact_auc_ap_match_sklearn():
    s, lab = _data()
    assert average_precision(s, lab) == pytest.approx(average_precision_score(lab, s), abs=1e-9)
    assert auroc(s, lab) == pytest.approx(roc_auc_score(lab, s), abs=1e-9)
    acc = ScoreAccumulator()
    for i in range(0, s.size, 7000):
        acc.add(s[i : i + 7000], lab[i : i + 7000])
    ap, roc = acc.curve().ap_auroc()
    assert acc.exact
    assert ap == pytest.approx(average_precision_score(lab, s), abs=1e-9)
    assert roc == pytest.approx(roc_auc_score(lab, s), abs=1e-9)


def test_binned_is_close_to_exact_and_bounded():
    s, lab = _data(200_000, seed=1)
    acc = ScoreAccumulator(exact_limit=10_000, bins=4096)
    for i in range(0, s.size, 10_000):
        chunk = s[i : i + 10_000] * (1 + i / 200_000)  # range grows as volumes arrive
        acc.add(chunk, lab[i : i + 10_000])
    assert not acc.exact and acc.hist.shape == (2, 4096)
    ref = np.concatenate([s[i : i + 10_000] * (1 + i / 200_000) for i in range(0, s.size, 10_000)])
    ap, roc = acc.curve().ap_auroc()
    assert ap == pytest.approx(average_precision_score(lab, ref), abs=2e-3)
    assert roc == pytest.approx(roc_auc_score(lab, ref), abs=2e-3)


def test_undefined_cases():
    assert np.isnan(average_precision(np.array([0.1, 0.2]), np.array([False, False])))
    assert np.isnan(auroc(np.array([0.1, 0.2]), np.array([True, True])))
    assert scores_from_counts(confusion(np.zeros(10, bool), np.zeros(10, bool)))["dice"] == 1.0
    assert scores_from_counts(confusion(np.ones(10, bool), np.zeros(10, bool)))["dice"] == 0.0
    assert scores_from_counts(confusion(np.zeros(10, bool), np.ones(10, bool)))["dice"] == 0.0


def test_dice_iou_match_monai():
    rng = np.random.default_rng(2)
    pred = rng.uniform(size=(12, 12, 12)) > 0.6
    lab = rng.uniform(size=(12, 12, 12)) > 0.7
    ours = scores_from_counts(confusion(pred, lab))
    p = torch.from_numpy(pred)[None, None].float()
    y = torch.from_numpy(lab)[None, None].float()
    assert ours["dice"] == pytest.approx(float(compute_dice(p, y, include_background=True)), abs=1e-6)
    assert ours["iou"] == pytest.approx(float(compute_iou(p, y, include_background=True)), abs=1e-6)


def test_best_dice_threshold_by_hand():
    s = np.array([0.9, 0.8, 0.7, 0.2, 0.1], np.float32)
    lab = np.array([1, 1, 0, 1, 0], bool)
    acc = ScoreAccumulator()
    acc.add(s, lab)
    t, d = acc.curve().best_dice()
    # Thresholds 0.9: 2/4=.5, 0.8: 4/5=.8, 0.7: 4/6, 0.2: 6/7 (TP 3, FP 1, FN 0), 0.1: 6/8.
    assert t == pytest.approx(0.2) and d == pytest.approx(6 / 7)


def test_postprocessing_in_mm():
    pp = PostProcessing(erosion_mm=2.0, median_mm=5.0)
    assert pp.voxels((1, 1, 1)) == {"erosion_voxels": 2, "median_kernel": 5}
    assert pp.voxels((2, 2, 2)) == {"erosion_voxels": 1, "median_kernel": 3}
    amap = np.zeros((12, 12, 12), np.float32)
    amap[6, 6, 6] = 10.0  # an isolated voxel is removed by the median filter
    amap[2:7, 2:7, 2:7] += 1.0
    brain = np.ones_like(amap, bool)
    out = postprocess(amap, brain, (2, 2, 2), pp)
    assert out[6, 6, 6] < 10 and out[4, 4, 4] == 1.0 and out[0, 0, 0] == 0.0


def test_binarize_drops_small_components_and_volume_score():
    amap = np.zeros((10, 10, 10), np.float32)
    amap[1, 1, 1] = 1
    amap[5:8, 5:8, 5:8] = 1
    assert binarize(amap, 0.5, min_component_voxels=2).sum() == 27
    assert volume_score(amap, np.ones_like(amap, bool), "max") == 1.0
