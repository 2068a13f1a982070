"""The volad command line (its entry point and ``--version`` run as a process in tests/test_reliability.py)."""

import json

from volad.cli import main
from volad.data.manifest import load_dataset


def test_cli_synth_writes_a_loadable_dataset(tmp_path):
    assert main(["synth", "--out", str(tmp_path / "s"), "--shape", "16"]) == 0
    ds = load_dataset("synthetic", tmp_path / "s")
    assert len(ds.subjects("test")) == 4
    assert json.loads((tmp_path / "s" / ".volad_complete").read_text())["shape"] == [16, 16, 16]
