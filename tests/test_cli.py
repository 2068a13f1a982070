"""The volad command line."""

import json
import subprocess
import sys

from volad.data.manifest import load_dataset


def test_cli_synth_writes_a_loadable_dataset(tmp_path):
    out = subprocess.run([sys.executable, "-m", "volad.cli", "synth", "--out", str(tmp_path / "s"), "--shape", "16"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ds = load_dataset("synthetic", tmp_path / "s")
    assert len(ds.subjects("test")) == 4
    assert json.loads((tmp_path / "s" / ".volad_complete").read_text())["shape"] == [16, 16, 16]
