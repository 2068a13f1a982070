"""The kept best epochs and their uniform average (``best.pt`` under ``average_best``)."""

from __future__ import annotations

import pytest
import torch

from volad.engine.soup import BestEpochs, average_weights
from volad.errors import VoladDataError


def test_floating_tensors_are_averaged_and_integer_ones_come_from_the_first_state():
    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.float16), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([2.0], dtype=torch.float16), "n": torch.tensor(9)}
    c = {"w": torch.tensor([5.0, 1.0]), "h": torch.tensor([3.0], dtype=torch.float16), "n": torch.tensor(1)}
    out = average_weights([a, b, c])
    assert torch.equal(out["w"], torch.tensor([3.0, 3.0]))
    assert out["h"].dtype == torch.float16 and float(out["h"]) == 2.0
    assert int(out["n"]) == 5 and out["n"].dtype == a["n"].dtype
    with pytest.raises(ValueError):
        average_weights([])


def test_the_best_k_are_kept_best_first_and_the_pushed_out_are_returned(tmp_path):
    kept = BestEpochs(tmp_path, 2)
    assert kept.admits(0.0)
    assert kept.add(2, 0.3) == [] and kept.add(4, 0.5) == []
    assert kept.epochs() == [4, 2]
    assert not kept.admits(0.3)  # a tie with the worst kept does not enter
    assert kept.admits(0.31)
    assert kept.add(6, 0.4) == [tmp_path / "epoch0002.pt"]
    assert kept.epochs() == [4, 6]
    assert kept.file_for(6) == tmp_path / "epoch0006.pt"
    with pytest.raises(ValueError):
        BestEpochs(tmp_path, 1)


def test_restoring_deletes_unlisted_files_and_names_a_missing_listed_one(tmp_path):
    for e in (1, 2, 3):
        torch.save({"method": {}}, tmp_path / f"epoch000{e}.pt")
    kept = BestEpochs(tmp_path, 2)
    kept.restore([{"epoch": 2, "val_auprc": 0.5, "file": "epoch0002.pt"}, {"epoch": 1, "val_auprc": 0.4, "file": "epoch0001.pt"}])
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["epoch0001.pt", "epoch0002.pt"]
    assert kept.epochs() == [2, 1]
    with pytest.raises(VoladDataError, match="epoch0009.pt.*missing"):
        BestEpochs(tmp_path, 2).restore([{"epoch": 9, "val_auprc": 0.5, "file": "epoch0009.pt"}])
