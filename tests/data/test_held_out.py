"""A view of a dataset whose val split lacks one lesion kind (the leave-one-kind-out protocol)."""

import json

import pytest

from volad.data.held_out import val_kinds, without_kind_in_val
from volad.data.manifest import load_dataset
from volad.errors import VoladConfigError


def test_the_view_drops_one_kind_from_val_only_and_reads_the_same_files(kinds_root, tmp_path):
    assert val_kinds("phantom_kinds", str(kinds_root)) == ["tumour", "isointense_mass", "small_wml", "stroke"]
    view = without_kind_in_val("phantom_kinds", str(kinds_root), "small_wml", tmp_path / "view")
    original, held = load_dataset("phantom_kinds", kinds_root), load_dataset("phantom_kinds", view)
    assert held.split_ids("train") == original.split_ids("train") and held.split_ids("test") == original.split_ids("test")
    assert set(original.split_ids("val")) - set(held.split_ids("val")) == {sid for sid in original.split_ids("val") if original.status(sid)[1] == "small_wml"}
    assert "small_wml" not in val_kinds("phantom_kinds", str(view)) and len(held.split_ids("val")) == len(original.split_ids("val")) - 1
    sid = held.split_ids("test")[0]
    assert [p.resolve() for p in held.path_of(sid, "contrast")] == [p.resolve() for p in original.path_of(sid, "contrast")]
    assert json.loads((kinds_root / "splits.json").read_text())["val"] == original.split_ids("val")  # the original is untouched
    assert without_kind_in_val("phantom_kinds", str(kinds_root), "small_wml", tmp_path / "view") == view  # reused


def test_the_view_refuses_a_kind_val_does_not_hold(kinds_root, tmp_path):
    with pytest.raises(VoladConfigError, match="no lesion kind 'haemorrhage' \\(it has: tumour, isointense_mass, small_wml, stroke\\)"):
        without_kind_in_val("phantom_kinds", str(kinds_root), "haemorrhage", tmp_path / "view")
