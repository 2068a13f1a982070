"""Calibrated fusion: the method contract, the rule chosen on val, and a build on the harder benchmark."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from volad.engine.fusion_builder import FusionBuilder, family_weights, member_families
from volad.engine.selection import choose_rule
from volad.errors import VoladConfigError
from volad.methods import AutoEncoder, IntensityBaseline
from volad.methods.calibration import fit_tail
from volad.methods.fusion import Fusion, combine_surprisals
from volad.types import defaults_of


def _members() -> list[dict]:
    torch.manual_seed(0)
    ae = AutoEncoder(spatial_dims=3, in_channels=1)
    bright = IntensityBaseline(in_channels=2, channel=1)
    return [
        {"name": "ae", "run": "/runs/ae", "checkpoint": "x", "hparams": ae.hparams, "channels": [0], "patch_size": 16, "batch_size": 2},
        {"name": "bright", "run": "/runs/b", "checkpoint": "y", "hparams": bright.hparams, "channels": [0, 1], "patch_size": None, "batch_size": 1},
    ]


def _calibrated(fusion: Fusion) -> Fusion:
    rng = np.random.default_rng(0)
    for i in range(len(fusion.members)):
        fusion.set_calibration(i, fit_tail(rng.gamma(2.0, 0.2 if i == 0 else 0.4, 20_000)))
    return fusion.eval()


@pytest.mark.parametrize("combine", ["hmp", "mean", "rms", "max"])
def test_fusion_keeps_the_method_contract_and_rebuilds_from_its_record(combine):
    fusion = _calibrated(Fusion(in_channels=2, members=_members(), combine=combine, weights=[1.0, 3.0] if combine in ("mean", "rms") else None))
    x, mask = torch.rand(2, 2, 16, 16, 16), torch.ones(2, 1, 16, 16, 16)
    mask[..., :3] = 0
    out = fusion.predict(x, mask)
    assert out.anomaly_map.shape == (2, 1, 16, 16, 16) and out.reconstruction is None
    assert torch.isfinite(out.anomaly_map).all() and (out.anomaly_map[mask == 0] == 0).all()
    # Each member scores its own contrasts, the surprisals are combined by the rule.
    s = fusion.surprisals(x[1], mask[1])
    assert torch.allclose(s[1], fusion.calibrated(1, x[1, 1:2] * mask[1])[0])
    expected = {
        "mean": 0.25 * s[0] + 0.75 * s[1],
        "rms": torch.sqrt(0.25 * s[0] ** 2 + 0.75 * s[1] ** 2),
        "max": s.amax(0),
        "hmp": torch.log10(0.5 * 10 ** s[0] + 0.5 * 10 ** s[1]),
    }[combine]
    assert torch.allclose(out.anomaly_map[1, 0], expected * mask[1, 0], atol=1e-5)
    # Plain-data record; the checkpoint's state dict (members' weights and calibration) loads into the rebuilt fusion.
    assert fusion.hparams["kind"] == "Fusion" and json.loads(json.dumps(fusion.hparams)) == fusion.hparams
    buf = io.BytesIO()
    torch.save(fusion.state_dict(), buf)
    buf.seek(0)
    again = Fusion.rebuild(fusion.hparams)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.allclose(again.eval().predict(x, mask).anomaly_map, out.anomaly_map)


def test_each_member_is_smoothed_its_own_way_before_calibration_and_the_fused_map_is_not_smoothed_again():
    """A member recorded with a median cube has its map median-filtered before calibration (what evaluation would do to
    it alone); a fusion whose members all carry their kernel is not filtered again in evaluation, an older one is."""
    from scipy import ndimage

    from volad.methods.predict import predict_volume
    from volad.methods.registry import method_median_mm

    members = _members()
    members[0]["median_kernel"], members[1]["median_kernel"] = 3, 1
    fusion = _calibrated(Fusion(in_channels=2, members=members))
    x, mask = torch.rand(2, 16, 16, 16), torch.ones(1, 16, 16, 16)
    raw = predict_volume(fusion.members[0], x[:1], mask, patch_size=16, batch_size=2).anomaly_map  # as the member's inference runs it
    got = fusion.member_map(0, x, mask)
    np.testing.assert_allclose(got.numpy(), ndimage.median_filter(raw.numpy(), size=(1, 3, 3, 3), mode="nearest"), atol=1e-6)
    assert not torch.allclose(got, raw)
    assert torch.equal(fusion.member_map(1, x, mask), x[1:2])  # kernel 1: the intensity as it is
    assert method_median_mm(fusion.hparams) == 0.0
    assert method_median_mm(Fusion(in_channels=2, members=_members()).hparams) == 5.0  # built before: the fused map is filtered


def test_rms_ranks_agreement_above_one_members_noise_and_keeps_a_strong_lone_member():
    """The builder's default rule: a lone member keeps at least ``sqrt(w_i)`` of its surprisal, and a voxel where three
    members agree at 2.5 decades ranks above one member's 4-decade healthy-tissue spike, which hmp ranks first."""
    s = torch.tensor([[4.0, 2.5, 9.0], [0.0, 2.5, 0.0], [0.0, 2.5, 0.0]], dtype=torch.float64)  # spike, agreement, strong lone member
    rms = combine_surprisals(s, "rms")
    np.testing.assert_allclose(rms.numpy(), np.sqrt((s.numpy() ** 2).mean(0)))
    assert (rms >= s.amax(0) / np.sqrt(3) - 1e-12).all() and (rms >= s.mean(0) - 1e-12).all()
    assert rms[1] > rms[0] and rms[2] > rms[1]  # agreement above a lone spike; a strong lone member still first
    hmp = combine_surprisals(s, "hmp")
    assert hmp[0] > hmp[1]  # hmp lets the spike outrank agreement
    assert defaults_of(FusionBuilder)["combine"] == "rms"


def test_harmonic_mean_p_keeps_a_lone_members_evidence_and_adds_up_agreement():
    """hmp: ``log10 Σ w_i 10^{s_i}`` (Wilson 2019), never more than ``log10(1/w_i)`` below any member and never
    below the mean; the mean divides a lone member's evidence by the number of members."""
    s = torch.tensor([[6.0, 0.3, 2.0, 50.0], [0.2, 0.4, 2.0, 0.0], [0.1, 0.5, 2.0, 0.0]], dtype=torch.float64)
    hmp = combine_surprisals(s, "hmp")
    p = 10.0 ** -s.numpy()
    np.testing.assert_allclose(hmp.numpy(), -np.log10(1.0 / (np.mean(1.0 / p, axis=0))))  # the harmonic mean p-value, directly
    assert (hmp >= s.amax(0) - np.log10(3) - 1e-12).all() and (hmp >= s.mean(0) - 1e-12).all()
    assert hmp[0] > 5.5 and combine_surprisals(s, "mean")[0] < 2.2  # one member at 6 decades: hmp keeps 5.5+, the mean 2.1
    assert hmp[2] == pytest.approx(2.0)  # members that agree: as the mean
    assert torch.isfinite(hmp).all() and hmp[3] == pytest.approx(50 - np.log10(3))  # no overflow far in the tail
    w = torch.tensor([0.5, 0.25, 0.25])
    np.testing.assert_allclose(combine_surprisals(s, "hmp", w).numpy(), np.log10((w.numpy()[:, None] * 10.0 ** s.numpy()).sum(0)))
    with pytest.raises(VoladConfigError, match="combine must be one of hmp, mean, rms, max"):
        combine_surprisals(s, "median")


def test_root_mean_square_keeps_half_a_lone_members_evidence_among_four():
    """``rms``: a member alone keeps ``sqrt(w_i)`` of its surprisal (the mean keeps ``w_i``); agreeing members give their common value."""
    s = torch.tensor([[8.0, 2.0, 3.0], [0.0, 2.0, 0.0], [0.0, 2.0, 4.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    rms = combine_surprisals(s, "rms")
    np.testing.assert_allclose(rms.numpy(), np.sqrt((s.numpy() ** 2).mean(0)))
    assert rms[0] == pytest.approx(4.0) and combine_surprisals(s, "mean")[0] == pytest.approx(2.0)
    assert rms[1] == pytest.approx(2.0)
    assert (rms >= s.mean(0) - 1e-12).all() and (rms <= s.amax(0) + 1e-12).all()


def test_fusion_refuses_a_member_outside_its_contrasts():
    members = _members()
    members[1]["channels"] = [0, 2]
    with pytest.raises(VoladConfigError, match="member 'bright': channels \\[0, 2\\] out of range for 2"):
        Fusion(in_channels=2, members=members)


def _scorer(scores: np.ndarray, labels: np.ndarray):
    from volad.evaluation.voxel import average_precision

    return lambda keep, rule: average_precision(combine_surprisals(torch.from_numpy(scores[keep]), rule).numpy(), labels)


def test_the_rule_adds_complementary_members_and_leaves_noise_out():
    rng = np.random.default_rng(0)
    n = 20_000
    labels = np.zeros(n, bool)
    labels[:200] = True  # two lesion kinds: 0..99 and 100..199
    noise = rng.normal(size=(3, n))
    sees_first, sees_second, blind = noise.copy()
    sees_first[:100] += 6
    sees_second[100:200] += 6
    choice = choose_rule(_scorer(np.stack([sees_first, blind, sees_second]), labels), ["a", "noise", "b"], combine="auto", select_members=True)
    assert sorted(choice["members"]) == ["a", "b"]
    assert choice["val_auprc"] > max(choice["single_val_auprc"].values()) + 0.2
    assert {c["rule"] for c in choice["candidates"]} == {"single", "hmp", "mean", "rms", "max"}
    fixed = choose_rule(_scorer(np.stack([sees_first, blind]), labels), ["a", "noise"], combine="mean", select_members=False)
    assert fixed["members"] == ["a", "noise"] and fixed["rule"] == "mean"


def test_build_calibrates_on_healthy_val_scans_and_never_reads_test(tmp_path, kinds_root, monkeypatch):
    from volad.bundle.config import bundle_config
    from volad.data.manifest import Dataset
    from volad.engine.inferer import Inferer

    members = []
    for baseline, polarity in (("normative_signed", None), ("intensity", None), ("intensity", "dark")):
        out = tmp_path / (baseline + (f"_{polarity}" if polarity else ""))
        bundle_config(baseline, "train", dataset="phantom_kinds", data_root=str(kinds_root), output_dir=str(out), device="cpu",
                      **({"polarity": polarity} if polarity else {})).get_parsed_content("trainer", instantiate=True).run()
        members.append(str(out))
    real = Dataset.subjects

    def no_test(self, split, limit=None):
        assert split != "test", "the fusion build read the test split"
        return real(self, split, limit)

    monkeypatch.setattr(Dataset, "subjects", no_test)
    FusionBuilder(output_dir=str(tmp_path / "fusion"), members=members, device="cpu").run()
    monkeypatch.setattr(Dataset, "subjects", real)
    record = json.loads((tmp_path / "fusion" / "fusion.json").read_text())
    assert record["calibration"]["split"] == "val (healthy subjects)"
    assert len(record["calibration"]["subjects"]) == 2  # the healthy and the artefact scan of the tiny val split
    # Candidates are scored as the report will score the fused map: after evaluate.json's default post-processing, which
    # for a fusion is the erosion alone (each member was smoothed its own way: these two, intensities and z-scores, not at all).
    from volad.evaluation.evaluate import Evaluator
    from volad.types import defaults_of

    post = record["selection"]["postprocessing"]
    assert (post["erosion_mm"], post["median_mm"]) == (defaults_of(Evaluator)["erosion_mm"], 0.0)
    assert [m["median_kernel"] for m in record["members"]] == [1, 1, 1]
    # Every method votes once: the bright and the dark intensity are one method watching two signs and share its vote.
    assert record["selection"]["chosen"]["weights"] == {"normative_signed": 0.5, "intensity": 0.25, "intensity_dark": 0.25}
    saved = torch.load(tmp_path / "fusion" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["method"]["weights"]
    assert torch.allclose(saved, torch.tensor([0.5, 0.25, 0.25]))
    Inferer(output_dir=str(tmp_path / "fusion"), splits=["test"], device="cpu").run()
    assert len(list((tmp_path / "fusion" / "maps").glob("*_anomaly.nii.gz"))) == 6  # 4 lesion kinds, healthy, artefact


def test_members_of_one_method_watching_other_contrasts_signs_or_seeds_share_one_vote():
    def rec(name, kind, **hparams):
        return {"name": name, "hparams": {"kind": kind, "spatial_dims": 3, **hparams}, "train_dataset": "phantom_kinds"}

    records = [
        rec("intensity", "IntensityBaseline", in_channels=1, channel=0, polarity="bright"),
        rec("norm_flair_bright", "NormativeBaseline", in_channels=1, polarity="bright", min_std=0.05),
        rec("norm_t1_dark", "NormativeBaseline", in_channels=1, polarity="dark", min_std=0.05),
        rec("norm_all", "NormativeBaseline", in_channels=4, polarity=["both"] * 4, min_std=0.05),
        rec("norm_other_floor", "NormativeBaseline", in_channels=1, polarity="bright", min_std=0.1),  # other settings: its own method
        rec("pii_s0", "SyntheticAnomalyDetector", in_channels=1, seed=0),
        rec("pii_s1", "SyntheticAnomalyDetector", in_channels=1, seed=1),
    ]
    assert member_families(records) == ["intensity", "norm_flair_bright", "norm_flair_bright", "norm_flair_bright", "norm_other_floor", "pii_s0", "pii_s0"]
    w = family_weights(records)
    assert sum(w) == pytest.approx(1.0)
    assert w == pytest.approx([1 / 4, 1 / 12, 1 / 12, 1 / 12, 1 / 4, 1 / 8, 1 / 8])
    other = dict(records[0], name="intensity_brats", train_dataset="brats")  # the same method trained on other data: other evidence
    assert member_families([records[0], other]) == ["intensity", "intensity_brats"]
    assert family_weights(records[:1] + records[5:]) == pytest.approx([0.5, 0.25, 0.25])


def test_build_refuses_itself_as_member(tmp_path, syn_root):
    from volad.bundle.config import bundle_config

    out = tmp_path / "intensity"
    bundle_config("intensity", "train", dataset="synthetic", data_root=str(syn_root), output_dir=str(out), device="cpu").get_parsed_content(
        "trainer", instantiate=True
    ).run()
    with pytest.raises(VoladConfigError, match="is also a member"):
        FusionBuilder(output_dir=str(out), members=[str(out)])


def test_a_member_that_reads_anatomy_gets_the_channels_behind_the_fusions_contrasts():
    torch.manual_seed(0)
    located = AutoEncoder(spatial_dims=3, in_channels=1, anatomy="coordinates")
    members = _members() + [
        {"name": "located", "run": "/runs/l", "checkpoint": "z", "hparams": located.hparams, "channels": [1], "patch_size": None, "batch_size": 1}
    ]
    fusion = Fusion(in_channels=2, members=members)
    assert fusion.anatomy == "coordinates"  # so loading appends the channels for the whole fusion
    fusion.members[2].load_state_dict(located.state_dict())
    x, mask = torch.rand(2 + 3, 16, 16, 16), torch.ones(1, 16, 16, 16)
    alone = located.eval().predict(x[None, [1, 2, 3, 4]], mask[None]).anomaly_map[0]
    torch.testing.assert_close(fusion.eval().member_map(2, x, mask), alone)
    assert Fusion(in_channels=2, members=_members()).anatomy is None
