"""One command-line value parser and one ``ID=VALUE`` parser for every command."""

from __future__ import annotations

import pytest


def test_parse_assignments_reads_json_values_and_refuses_bare_words():
    from volad.utils.cli_format import parse_assignments

    assert parse_assignments(["patch_size=96", "channels=[8,16]", "beta_schedule=cosine"]) == {"patch_size": 96, "channels": [8, 16], "beta_schedule": "cosine"}
    with pytest.raises(SystemExit, match="'patch_size' is not ID=VALUE"):
        parse_assignments(["patch_size"])


def test_cli_value_reads_values_as_the_bundle_command_line_does():
    from volad.utils.cli_format import cli_value

    assert [cli_value(v) for v in ("96", "[8,16]", "None", "null", "True", "true", "0.5", "cosine")] == [96, [8, 16], None, None, True, True, 0.5, "cosine"]
